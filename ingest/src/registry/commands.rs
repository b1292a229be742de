//! Deciding the new registry record of every change to an installation or
//! an account: registration, enrollment on first sync, metadata from the
//! plugin's headers, a plan set by the provider, a secret rotation. Writing
//! it to Kafka and applying it is the caller's job; so is checking who
//! asks (`handlers`).
//!
//! Plans belong to the provider: a caller without `plans:write` can neither
//! set nor change one. An installation it registers gets its account's plan
//! (what the provider set for the account, or the configured default), and
//! each plan change is appended to the installation's `plan_history` with
//! who made it and when, so governance can decide every event with the plan
//! in force at its time, in a replay too.

use serde::{Deserialize, Deserializer, Serialize};
use usage_schemas::{Account, Installation, PlanPeriod};
use usage_service_kit::policy::Policy;

use super::{Entry, Sealer};

pub const POLICIES: [&str; 2] = ["v1_or_v2", "v2_only"];
/// `registered_by` (and `changed_by` of the first plan) of an enrolled installation.
pub const FIRST_SYNC: &str = "first_sync";
/// Longest overlap during which a rotated-out secret still verifies.
pub const MAX_OVERLAP_SECS: i64 = 86_400;
pub const DEFAULT_OVERLAP_SECS: i64 = 900;

/// The OpenAPI schema of [`account_id`]: a string or an integer.
pub fn account_id_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    ObjectBuilder::new()
        .schema_type(SchemaType::Array(vec![Type::String, Type::Integer]))
        .description(Some(
            "The account: a string, or its number as the deployed plugin sends it.",
        ))
        .build()
}

/// An account id sent as a JSON string or number (the deployed plugin sends
/// its account's numeric id).
pub fn account_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    usage_service_kit::auth::id_text(&value)
        .ok_or_else(|| serde::de::Error::custom("account_id must be a string or a number"))
}

#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// `{uuid}_{hex site hash}`.
    pub install_id: String,
    /// A string, or the account's number.
    #[serde(deserialize_with = "account_id")]
    #[schema(schema_with = account_id_schema)]
    pub account_id: String,
    pub secret: String,
    /// Only a caller with `plans:write` may choose it; others get the
    /// account's plan, and may name it only if it is that one.
    #[serde(default)]
    pub plan: Option<String>,
    pub site_hash: String,
    #[serde(default)]
    pub wp_site_id: Option<i64>,
    #[serde(default)]
    pub plugin_version: Option<String>,
    #[serde(default)]
    pub wordpress_version: Option<String>,
    #[serde(default)]
    pub php_version: Option<String>,
    #[serde(default)]
    pub is_multisite: bool,
    #[serde(default)]
    pub signature_policy: Option<String>,
}

// The secret stays out of logs.
impl std::fmt::Display for RegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "register {} for {}", self.install_id, self.account_id)
    }
}

impl std::fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("install_id", &self.install_id)
            .field("account_id", &self.account_id)
            .field("secret", &"***")
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    pub secret: String,
    #[serde(default)]
    pub overlap_seconds: Option<i64>,
}

impl std::fmt::Debug for RotateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotateRequest")
            .field("secret", &"***")
            .field("overlap_seconds", &self.overlap_seconds)
            .finish()
    }
}

/// What the API shows of an installation: everything but the secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct InstallationView {
    pub install_id: String,
    pub account_id: String,
    pub plan: String,
    pub site_hash: String,
    pub wp_site_id: Option<i64>,
    pub is_multisite: bool,
    pub plugin_version: Option<String>,
    pub wordpress_version: Option<String>,
    pub php_version: Option<String>,
    pub signature_policy: String,
    pub previous_secret_valid_until: Option<String>,
    pub registered_at: String,
    pub updated_at: String,
    pub revision: i64,
    pub plan_history: Vec<PlanPeriodView>,
    pub registered_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PlanPeriodView {
    pub plan: String,
    pub since: String,
    pub changed_by: String,
}

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl From<&Installation> for InstallationView {
    fn from(r: &Installation) -> Self {
        Self {
            install_id: r.install_id.clone(),
            account_id: r.account_id.clone(),
            plan: r.plan.clone(),
            site_hash: r.site_hash.clone(),
            wp_site_id: r.wp_site_id,
            is_multisite: r.is_multisite,
            plugin_version: r.plugin_version.clone(),
            wordpress_version: r.wordpress_version.clone(),
            php_version: r.php_version.clone(),
            signature_policy: r.signature_policy.clone(),
            previous_secret_valid_until: r.previous_secret_valid_until.map(iso),
            registered_at: iso(r.registered_at),
            updated_at: iso(r.updated_at),
            revision: r.revision,
            plan_history: r
                .periods()
                .into_iter()
                .map(|p| PlanPeriodView {
                    plan: p.plan,
                    since: iso(p.since),
                    changed_by: p.changed_by,
                })
                .collect(),
            registered_by: r.registered_by.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Invalid(String),
    #[error("installation {0} belongs to another account")]
    OtherAccount(String),
    #[error("installation {0} is registered with another secret; rotate it with POST /api/usage/installations/{0}/rotate-secret")]
    SecretMismatch(String),
    #[error("unknown installation {0}")]
    Unknown(String),
    #[error("could not seal the secret")]
    Seal,
    #[error("{0}")]
    PlanForbidden(String),
    #[error("account {account} has registered {limit} installations, its limit; the provider can raise it")]
    LimitReached { account: String, limit: usize },
}

/// What a registration does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write this record (new installation, or changed attributes).
    Write { record: Installation, created: bool },
    /// Same request as what is registered: nothing to write.
    Unchanged(Installation),
}

pub fn valid_install_id(id: &str) -> bool {
    // {uuid-v4}_{sha256(site_url) hex, possibly shortened}
    let Some((uuid, hash)) = id.split_once('_') else {
        return false;
    };
    uuid::Uuid::try_parse(uuid).is_ok()
        && uuid.len() == 36
        && (6..=64).contains(&hash.len())
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `acc_` and up to 64 letters, digits, `_` or `-`; or the numeric id the
/// deployed plugin sends (up to 20 digits).
pub fn valid_account_id(id: &str) -> bool {
    let named = id.strip_prefix("acc_").is_some_and(|rest| {
        (1..=64).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    });
    let numeric = (1..=20).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit());
    named || numeric
}

fn check_secret(secret: &str) -> Result<(), CommandError> {
    if !(16..=256).contains(&secret.len()) {
        return Err(CommandError::Invalid(
            "secret must be 16 to 256 bytes".into(),
        ));
    }
    Ok(())
}

fn check_version(name: &str, v: &Option<String>) -> Result<(), CommandError> {
    if let Some(v) = v {
        if v.len() > 32 || v.chars().any(char::is_control) {
            return Err(CommandError::Invalid(format!(
                "{name} must be at most 32 printable characters"
            )));
        }
    }
    Ok(())
}

fn validate(req: &RegisterRequest) -> Result<(), CommandError> {
    if !valid_install_id(&req.install_id) {
        return Err(CommandError::Invalid(
            "install_id must be {uuid}_{hex site hash}".into(),
        ));
    }
    check_account(&req.account_id)?;
    check_secret(&req.secret)?;
    if req.site_hash.is_empty()
        || req.site_hash.len() > 64
        || !req.site_hash.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(CommandError::Invalid(
            "site_hash must be 1 to 64 hex characters".into(),
        ));
    }
    if let Some(p) = &req.signature_policy {
        if !POLICIES.contains(&p.as_str()) {
            return Err(CommandError::Invalid(
                "signature_policy must be v1_or_v2 or v2_only".into(),
            ));
        }
    }
    if req.wp_site_id.is_some_and(|id| id < 0) {
        return Err(CommandError::Invalid(
            "wp_site_id must not be negative".into(),
        ));
    }
    check_version("plugin_version", &req.plugin_version)?;
    check_version("wordpress_version", &req.wordpress_version)?;
    check_version("php_version", &req.php_version)?;
    Ok(())
}

fn check_account(id: &str) -> Result<(), CommandError> {
    if valid_account_id(id) {
        Ok(())
    } else {
        Err(CommandError::Invalid(
            "account_id must be acc_ followed by letters, digits, _ or -, or a number".into(),
        ))
    }
}

/// Who asks, and what the provider set for the account.
#[derive(Debug, Clone)]
pub struct Asking<'a> {
    /// `Claims::actor()`: recorded as who registered or changed the plan.
    pub actor: String,
    /// Holds `plans:write`.
    pub may_set_plans: bool,
    /// The plan the account's new installations get.
    pub account_plan: &'a str,
    /// The plans there are.
    pub policy: &'a Policy,
}

impl Asking<'_> {
    /// The plan a registration ends with, given the one it asks for and the
    /// one it would keep (`current`: the registered plan, or the account's).
    fn plan(&self, asked: Option<&str>, current: &str) -> Result<String, CommandError> {
        match asked {
            None => Ok(current.to_string()),
            Some(p) if p == current => Ok(p.to_string()),
            Some(p) if !self.policy.knows(p) => Err(CommandError::Invalid(format!(
                "plan must be one of {}",
                self.policy.plan_names()
            ))),
            Some(p) if !self.may_set_plans => Err(CommandError::PlanForbidden(format!(
                "plans are set by the provider: this token may not set plan {p:?} (the installation's plan is {current:?})"
            ))),
            Some(p) => Ok(p.to_string()),
        }
    }
}

/// Decides what registering `req` means given what is registered.
pub fn register(
    existing: Option<&Entry>,
    req: &RegisterRequest,
    asking: &Asking<'_>,
    sealer: &Sealer,
    now_ms: i64,
) -> Result<Decision, CommandError> {
    validate(req)?;
    let policy = req
        .signature_policy
        .clone()
        .or_else(|| existing.map(|e| e.record.signature_policy.clone()))
        .unwrap_or_else(|| "v1_or_v2".into());
    let Some(existing) = existing else {
        let plan = asking.plan(req.plan.as_deref(), asking.account_plan)?;
        let record = Installation {
            install_id: req.install_id.clone(),
            account_id: req.account_id.clone(),
            plan: plan.clone(),
            site_hash: req.site_hash.to_ascii_lowercase(),
            wp_site_id: req.wp_site_id,
            is_multisite: req.is_multisite,
            plugin_version: req.plugin_version.clone(),
            wordpress_version: req.wordpress_version.clone(),
            php_version: req.php_version.clone(),
            signature_policy: policy,
            secret_sealed: sealer
                .seal(&req.install_id, req.secret.as_bytes())
                .map_err(|_| CommandError::Seal)?,
            previous_secret_sealed: None,
            previous_secret_valid_until: None,
            registered_at: now_ms,
            updated_at: now_ms,
            revision: 1,
            plan_history: vec![PlanPeriod {
                plan,
                since: now_ms,
                changed_by: asking.actor.clone(),
            }],
            registered_by: Some(asking.actor.clone()),
        };
        return Ok(Decision::Write {
            record,
            created: true,
        });
    };
    let current = &existing.record;
    if current.account_id != req.account_id {
        return Err(CommandError::OtherAccount(req.install_id.clone()));
    }
    if !existing.has_secret(req.secret.as_bytes()) {
        return Err(CommandError::SecretMismatch(req.install_id.clone()));
    }
    let plan = asking.plan(req.plan.as_deref(), &current.plan)?;
    let mut next = with_plan(current, &plan, &asking.actor, now_ms);
    next.site_hash = req.site_hash.to_ascii_lowercase();
    next.wp_site_id = req.wp_site_id;
    next.is_multisite = req.is_multisite;
    next.plugin_version = req.plugin_version.clone();
    next.wordpress_version = req.wordpress_version.clone();
    next.php_version = req.php_version.clone();
    next.signature_policy = policy;
    Ok(match revise(current, next, now_ms) {
        None => Decision::Unchanged(current.clone()),
        Some(record) => Decision::Write {
            record,
            created: false,
        },
    })
}

/// `current` with `plan` from now on (a copy of it when that is its plan
/// already), the change recorded in its history.
fn with_plan(current: &Installation, plan: &str, actor: &str, now_ms: i64) -> Installation {
    let mut next = current.clone();
    if plan != current.plan {
        next.plan_history = current.periods();
        next.plan_history.push(PlanPeriod {
            plan: plan.to_string(),
            since: now_ms,
            changed_by: actor.to_string(),
        });
        next.plan = plan.to_string();
    }
    next
}

/// `next` as the next revision of `current`, or `None` if nothing changed.
fn revise(current: &Installation, mut next: Installation, now_ms: i64) -> Option<Installation> {
    if &next == current {
        return None;
    }
    next.updated_at = now_ms;
    next.revision = current.revision + 1;
    Some(next)
}

/// The provider sets an installation's plan (`plans:write`); `None` when it
/// has that plan already.
pub fn set_plan(existing: &Entry, plan: &str, actor: &str, now_ms: i64) -> Option<Installation> {
    let current = &existing.record;
    revise(current, with_plan(current, plan, actor, now_ms), now_ms)
}

/// What the plugin's headers say about its site on each sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub plugin_version: Option<String>,
    pub wordpress_version: Option<String>,
    pub php_version: Option<String>,
    pub is_multisite: Option<bool>,
}

impl Metadata {
    /// A header value that is a plausible version (at most 32 printable
    /// characters); anything else is ignored, never an error.
    pub fn version(value: Option<&str>) -> Option<String> {
        let v = value?.trim();
        (!v.is_empty() && v.len() <= 32 && !v.chars().any(char::is_control)).then(|| v.to_string())
    }
}

/// The record with the metadata the plugin sent, when it differs.
pub fn update_metadata(existing: &Entry, meta: &Metadata, now_ms: i64) -> Option<Installation> {
    let current = &existing.record;
    let mut next = current.clone();
    if let Some(v) = &meta.plugin_version {
        next.plugin_version = Some(v.clone());
    }
    if let Some(v) = &meta.wordpress_version {
        next.wordpress_version = Some(v.clone());
    }
    if let Some(v) = &meta.php_version {
        next.php_version = Some(v.clone());
    }
    if let Some(m) = meta.is_multisite {
        next.is_multisite = m;
    }
    revise(current, next, now_ms)
}

/// An unknown installation's first signed sync: the record that enrolls it
/// with the secret it brought (`X-Install-Secret`), the account's plan
/// (never what the site says its plan is), and its site hash taken from
/// the install_id.
pub fn enroll(
    install_id: &str,
    account_id: &str,
    secret: &str,
    account_plan: &str,
    meta: &Metadata,
    sealer: &Sealer,
    now_ms: i64,
) -> Result<Installation, CommandError> {
    if !valid_install_id(install_id) {
        return Err(CommandError::Invalid(
            "install_id must be {uuid}_{hex site hash}".into(),
        ));
    }
    check_account(account_id)?;
    check_secret(secret)?;
    let site_hash = install_id
        .split_once('_')
        .map(|(_, hash)| hash.to_ascii_lowercase())
        .unwrap_or_default();
    Ok(Installation {
        install_id: install_id.to_string(),
        account_id: account_id.to_string(),
        plan: account_plan.to_string(),
        site_hash,
        wp_site_id: None,
        is_multisite: meta.is_multisite.unwrap_or(false),
        plugin_version: meta.plugin_version.clone(),
        wordpress_version: meta.wordpress_version.clone(),
        php_version: meta.php_version.clone(),
        signature_policy: "v1_or_v2".into(),
        secret_sealed: sealer
            .seal(install_id, secret.as_bytes())
            .map_err(|_| CommandError::Seal)?,
        previous_secret_sealed: None,
        previous_secret_valid_until: None,
        registered_at: now_ms,
        updated_at: now_ms,
        revision: 1,
        plan_history: vec![PlanPeriod {
            plan: account_plan.to_string(),
            since: now_ms,
            changed_by: FIRST_SYNC.into(),
        }],
        registered_by: Some(FIRST_SYNC.into()),
    })
}

/// `PUT /api/usage/accounts/{account_id}`: what the provider sets.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountRequest {
    #[serde(default)]
    pub plan: Option<String>,
    /// `null` goes back to the gateway's default limit.
    #[serde(default, deserialize_with = "some_or_null")]
    #[schema(value_type = Option<i64>)]
    pub max_installations: Option<Option<i64>>,
    /// Also move every installation of the account to the new plan (default).
    #[serde(default = "yes")]
    pub apply_to_installations: bool,
}

fn yes() -> bool {
    true
}

/// Tells a field sent as `null` (`Some(None)`) from one left out (`None`).
fn some_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

/// The account record after `req`; `None` when nothing changes.
pub fn account(
    account_id: &str,
    existing: Option<&Account>,
    req: &AccountRequest,
    default_plan: &str,
    actor: &str,
    now_ms: i64,
) -> Result<Option<Account>, CommandError> {
    check_account(account_id)?;
    if let Some(Some(n)) = req.max_installations {
        if !(0..=10_000_000).contains(&n) {
            return Err(CommandError::Invalid(
                "max_installations must be between 0 and 10,000,000".into(),
            ));
        }
    }
    let current = existing.cloned().unwrap_or_else(|| Account {
        account_id: account_id.to_string(),
        plan: default_plan.to_string(),
        max_installations: None,
        updated_at: now_ms,
        updated_by: actor.to_string(),
        revision: 0,
    });
    let mut next = current.clone();
    if let Some(plan) = &req.plan {
        next.plan = plan.clone();
    }
    if let Some(max) = req.max_installations {
        next.max_installations = max;
    }
    if existing.is_some() && next == current {
        return Ok(None);
    }
    next.updated_at = now_ms;
    next.updated_by = actor.to_string();
    next.revision = current.revision + 1;
    Ok(Some(next))
}

/// The record after rotating to `req.secret`; the old secret keeps verifying
/// for the overlap (default 15 minutes, at most a day).
pub fn rotate(
    existing: &Entry,
    req: &RotateRequest,
    sealer: &Sealer,
    now_ms: i64,
) -> Result<Installation, CommandError> {
    check_secret(&req.secret)?;
    let overlap = req.overlap_seconds.unwrap_or(DEFAULT_OVERLAP_SECS);
    if !(0..=MAX_OVERLAP_SECS).contains(&overlap) {
        return Err(CommandError::Invalid(format!(
            "overlap_seconds must be between 0 and {MAX_OVERLAP_SECS}"
        )));
    }
    let current = &existing.record;
    if existing.has_secret(req.secret.as_bytes()) {
        return Err(CommandError::Invalid(
            "the new secret equals the current one".into(),
        ));
    }
    let mut next = current.clone();
    next.previous_secret_sealed = Some(current.secret_sealed.clone());
    next.previous_secret_valid_until = Some(now_ms + overlap * 1000);
    next.secret_sealed = sealer
        .seal(&current.install_id, req.secret.as_bytes())
        .map_err(|_| CommandError::Seal)?;
    next.updated_at = now_ms;
    next.revision = current.revision + 1;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Registry, Sealer};

    const ID: &str = "550e8400-e29b-41d4-a716-446655440000_a3b4c5d6e7f8";

    fn registry() -> Registry {
        Registry::new(Sealer::from_hex(crate::registry::seal::DEV_KEY_HEX).unwrap())
    }

    fn request(plan: Option<&str>) -> RegisterRequest {
        serde_json::from_value(serde_json::json!({
            "install_id": ID, "account_id": 4217, "secret": "0123456789abcdef-secret",
            "plan": plan, "site_hash": "A3B4C5D6E7F8"
        }))
        .unwrap()
    }

    fn asking<'a>(policy: &'a Policy, may_set_plans: bool) -> Asking<'a> {
        Asking {
            actor: if may_set_plans {
                "admin:ops".into()
            } else {
                "account:4217".into()
            },
            may_set_plans,
            account_plan: "free",
            policy,
        }
    }

    fn written(d: Decision) -> Installation {
        match d {
            Decision::Write { record, .. } => record,
            Decision::Unchanged(r) => panic!("nothing written: {r:?}"),
        }
    }

    #[test]
    fn an_account_registers_with_its_accounts_plan_and_cannot_choose_another() {
        let r = registry();
        let policy = Policy::default();
        let sealer = r.sealer();
        // The numeric account id of the deployed plugin is accepted.
        let req = request(None);
        assert_eq!(req.account_id, "4217");
        let first = written(register(None, &req, &asking(&policy, false), sealer, 1_000).unwrap());
        assert_eq!(first.plan, "free");
        assert_eq!(first.plan_history[0].changed_by, "account:4217");
        assert_eq!(first.registered_by.as_deref(), Some("account:4217"));
        // Naming the plan it gets anyway is fine; another is refused.
        assert!(register(
            None,
            &request(Some("free")),
            &asking(&policy, false),
            sealer,
            1_000
        )
        .is_ok());
        assert!(matches!(
            register(
                None,
                &request(Some("credits")),
                &asking(&policy, false),
                sealer,
                1_000
            ),
            Err(CommandError::PlanForbidden(_))
        ));
        // Re-registering its own installation as `credits`: refused, nothing changes.
        r.apply(first.clone()).unwrap();
        let entry = r.get(ID).unwrap();
        assert!(matches!(
            register(
                Some(&entry),
                &request(Some("credits")),
                &asking(&policy, false),
                sealer,
                2_000
            ),
            Err(CommandError::PlanForbidden(_))
        ));
        assert!(matches!(
            register(
                Some(&entry),
                &request(None),
                &asking(&policy, false),
                sealer,
                2_000
            ),
            Ok(Decision::Unchanged(_))
        ));
        // The provider may, and the change is in the history.
        let upgraded = written(
            register(
                Some(&entry),
                &request(Some("pro")),
                &asking(&policy, true),
                sealer,
                2_000,
            )
            .unwrap(),
        );
        assert_eq!(upgraded.plan, "pro");
        assert_eq!(upgraded.revision, 2);
        assert_eq!(
            upgraded
                .plan_history
                .iter()
                .map(|p| (p.plan.as_str(), p.since, p.changed_by.as_str()))
                .collect::<Vec<_>>(),
            [("free", 1_000, "account:4217"), ("pro", 2_000, "admin:ops")]
        );
        assert!(matches!(
            register(
                Some(&entry),
                &request(Some("gold")),
                &asking(&policy, true),
                sealer,
                2_000
            ),
            Err(CommandError::Invalid(_))
        ));
    }

    #[test]
    fn requests_never_show_their_secret() {
        let req = request(None);
        let rotate: RotateRequest =
            serde_json::from_str(r#"{"secret": "0123456789abcdef-secret"}"#).unwrap();
        for shown in [format!("{req:?}"), format!("{rotate:?}"), req.to_string()] {
            assert!(!shown.contains("0123456789abcdef"), "{shown}");
        }
    }

    #[test]
    fn a_registration_with_another_secret_is_refused() {
        let r = registry();
        let policy = Policy::default();
        let first = written(
            register(None, &request(None), &asking(&policy, false), r.sealer(), 1).unwrap(),
        );
        r.apply(first).unwrap();
        let mut other = request(None);
        other.secret = "another-secret-of-16-bytes".into();
        assert!(matches!(
            register(
                Some(&r.get(ID).unwrap()),
                &other,
                &asking(&policy, false),
                r.sealer(),
                2
            ),
            Err(CommandError::SecretMismatch(_))
        ));
    }

    #[test]
    fn enrollment_takes_the_accounts_plan_and_the_site_hash_of_the_install_id() {
        let r = registry();
        let meta = Metadata {
            plugin_version: Some("2.4.1".into()),
            is_multisite: Some(true),
            ..Metadata::default()
        };
        let record = enroll(ID, "4217", "0123456789abcdef", "pro", &meta, r.sealer(), 5).unwrap();
        assert_eq!(
            (
                record.plan.as_str(),
                record.site_hash.as_str(),
                record.registered_by.as_deref()
            ),
            ("pro", "a3b4c5d6e7f8", Some(FIRST_SYNC))
        );
        assert!(record.is_multisite);
        r.apply(record).unwrap();
        assert!(r.get(ID).unwrap().has_secret(b"0123456789abcdef"));
        for (id, account, secret) in [
            ("not-an-install-id", "4217", "0123456789abcdef"),
            (ID, "acc_", "0123456789abcdef"),
            (ID, "4217", "short"),
        ] {
            assert!(matches!(
                enroll(
                    id,
                    account,
                    secret,
                    "free",
                    &Metadata::default(),
                    r.sealer(),
                    5
                ),
                Err(CommandError::Invalid(_))
            ));
        }
    }

    #[test]
    fn metadata_changes_make_a_revision_and_the_same_metadata_none() {
        let r = registry();
        let record = enroll(
            ID,
            "4217",
            "0123456789abcdef",
            "free",
            &Metadata::default(),
            r.sealer(),
            5,
        )
        .unwrap();
        r.apply(record).unwrap();
        let entry = r.get(ID).unwrap();
        let meta = Metadata {
            plugin_version: Metadata::version(Some(" 2.5.0 ")),
            wordpress_version: Metadata::version(Some("x".repeat(40).as_str())),
            ..Metadata::default()
        };
        assert_eq!(
            meta.wordpress_version, None,
            "an implausible version is ignored"
        );
        let next = update_metadata(&entry, &meta, 9).unwrap();
        assert_eq!(
            (
                next.plugin_version.as_deref(),
                next.revision,
                next.updated_at
            ),
            (Some("2.5.0"), 2, 9)
        );
        r.apply(next).unwrap();
        assert!(update_metadata(&r.get(ID).unwrap(), &meta, 10).is_none());
    }

    #[test]
    fn the_provider_sets_an_accounts_plan_and_limit() {
        let req: AccountRequest =
            serde_json::from_str(r#"{"plan": "agency", "max_installations": 20}"#).unwrap();
        assert!(req.apply_to_installations);
        let a = account("acc_9", None, &req, "free", "admin:ops", 7)
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.plan.as_str(), a.max_installations, a.revision),
            ("agency", Some(20), 1)
        );
        assert!(account("acc_9", Some(&a), &req, "free", "admin:ops", 8)
            .unwrap()
            .is_none());
        let back: AccountRequest = serde_json::from_str(r#"{"max_installations": null}"#).unwrap();
        let b = account("acc_9", Some(&a), &back, "free", "admin:ops", 9)
            .unwrap()
            .unwrap();
        assert_eq!(
            (b.plan.as_str(), b.max_installations, b.revision),
            ("agency", None, 2)
        );
        let bad: AccountRequest = serde_json::from_str(r#"{"max_installations": -1}"#).unwrap();
        assert!(account("acc_9", None, &bad, "free", "admin:ops", 9).is_err());
    }
}

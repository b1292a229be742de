//! Registering an installation and rotating its secret: deciding the new
//! registry record. Writing it to Kafka and applying it is the caller's job.

use serde::{Deserialize, Serialize};
use usage_schemas::Installation;

use super::{Entry, Sealer};

pub const PLANS: [&str; 4] = ["free", "pro", "agency", "credits"];
pub const POLICIES: [&str; 2] = ["v1_or_v2", "v2_only"];
/// Longest overlap during which a rotated-out secret still verifies.
pub const MAX_OVERLAP_SECS: i64 = 86_400;
pub const DEFAULT_OVERLAP_SECS: i64 = 900;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub install_id: String,
    pub account_id: String,
    pub secret: String,
    pub plan: String,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    pub secret: String,
    #[serde(default)]
    pub overlap_seconds: Option<i64>,
}

/// What the API shows of an installation: everything but the secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

pub fn valid_account_id(id: &str) -> bool {
    id.strip_prefix("acc_").is_some_and(|rest| {
        (1..=64).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    })
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
    if !valid_account_id(&req.account_id) {
        return Err(CommandError::Invalid(
            "account_id must be acc_ followed by letters, digits, _ or -".into(),
        ));
    }
    check_secret(&req.secret)?;
    if !PLANS.contains(&req.plan.as_str()) {
        return Err(CommandError::Invalid(
            "plan must be free, pro, agency or credits".into(),
        ));
    }
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

/// Decides what registering `req` means given what is registered.
pub fn register(
    existing: Option<&Entry>,
    req: &RegisterRequest,
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
        let record = Installation {
            install_id: req.install_id.clone(),
            account_id: req.account_id.clone(),
            plan: req.plan.clone(),
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
    let mut next = current.clone();
    next.plan = req.plan.clone();
    next.site_hash = req.site_hash.to_ascii_lowercase();
    next.wp_site_id = req.wp_site_id;
    next.is_multisite = req.is_multisite;
    next.plugin_version = req.plugin_version.clone();
    next.wordpress_version = req.wordpress_version.clone();
    next.php_version = req.php_version.clone();
    next.signature_policy = policy;
    if &next == current {
        return Ok(Decision::Unchanged(next));
    }
    next.updated_at = now_ms;
    next.revision = current.revision + 1;
    Ok(Decision::Write {
        record: next,
        created: false,
    })
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

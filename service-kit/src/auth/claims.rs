//! What a verified token says: who (`sub`, `role`, the account), what it may
//! do (`scope`), and for how long.
//!
//! Permissions are separate, so that the token every WordPress site holds
//! can send and read its account's usage, and no more:
//!
//! | permission | allows |
//! | --- | --- |
//! | `usage:send` | sending usage batches, admission checks (both also need the installation's signature), enrollment on first sync |
//! | `usage:read` | summaries, raw events, exports, the governance report |
//! | `installations:manage` | registering installations, updating their metadata, rotating a secret (with proof of the current one) |
//! | `data:erase` | erasing an installation's data |
//! | `plans:write` | setting plans and account limits (provider-level tokens only) |
//! | `usage:admit` | admission checks for any installation without its signature (provider-level tokens only) |
//!
//! A token's `scope` claim (space-separated, OAuth style, or a JSON array)
//! lists its permissions. Without one, a role has its defaults: a provider
//! admin everything; an `account` token (what deployed sites hold) `usage:send
//! usage:read installations:manage`; the multisite roles `usage:read`; a
//! `service` token nothing. Account-bound roles never hold the provider-level
//! permissions, whatever their scope says.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::JwtError;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    ProviderAdmin,
    /// The account's token; also the role of a token with no `role` claim
    /// (tokens of the plugin's original backend carry none).
    #[default]
    Account,
    NetworkAdmin,
    SiteAdmin,
    User,
    /// A provider-side service (e.g. the generation API asking for
    /// admission, or a billing integration): only what its scope lists.
    Service,
}

impl Role {
    /// Roles that act for the provider rather than for one account.
    pub fn is_provider(self) -> bool {
        matches!(self, Role::ProviderAdmin | Role::Service)
    }

    fn default_permissions(self) -> &'static [Permission] {
        use Permission::*;
        match self {
            Role::ProviderAdmin => &[
                SendUsage,
                ReadUsage,
                ManageInstallations,
                EraseData,
                SetPlans,
                Admit,
            ],
            Role::Account => &[SendUsage, ReadUsage, ManageInstallations],
            Role::NetworkAdmin | Role::SiteAdmin | Role::User => &[ReadUsage],
            Role::Service => &[],
        }
    }
}

/// One thing a token may do (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    SendUsage,
    ReadUsage,
    ManageInstallations,
    EraseData,
    SetPlans,
    Admit,
}

impl Permission {
    pub const ALL: [Permission; 6] = [
        Permission::SendUsage,
        Permission::ReadUsage,
        Permission::ManageInstallations,
        Permission::EraseData,
        Permission::SetPlans,
        Permission::Admit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::SendUsage => "usage:send",
            Permission::ReadUsage => "usage:read",
            Permission::ManageInstallations => "installations:manage",
            Permission::EraseData => "data:erase",
            Permission::SetPlans => "plans:write",
            Permission::Admit => "usage:admit",
        }
    }

    /// Only provider-level roles may hold it.
    fn provider_only(self) -> bool {
        matches!(self, Permission::SetPlans | Permission::Admit)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_hash: Option<String>,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Space-separated permissions; `None`: the role's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// One audience; a token listing several is read as the first that
    /// matches the configured one (see [`ClaimRules`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

impl Claims {
    pub fn is_admin(&self) -> bool {
        self.role == Role::ProviderAdmin
    }

    /// Whether the token may do `p`.
    pub fn may(&self, p: Permission) -> bool {
        if p.provider_only() && !self.role.is_provider() {
            return false;
        }
        match &self.scope {
            None => self.role.default_permissions().contains(&p),
            Some(scope) => scope.split_ascii_whitespace().any(|s| s == p.as_str()),
        }
    }

    /// Who did something, for records: `admin:<sub>`, `service:<sub>`,
    /// `account:<account_id>`, ...
    pub fn actor(&self) -> String {
        let who = match self.role {
            Role::ProviderAdmin => "admin",
            Role::Service => "service",
            Role::Account => "account",
            Role::NetworkAdmin => "network_admin",
            Role::SiteAdmin => "site_admin",
            Role::User => "user",
        };
        let id = if self.role.is_provider() {
            self.sub.as_str()
        } else {
            self.account_id.as_deref().unwrap_or(&self.sub)
        };
        format!("{who}:{id}")
    }
}

/// How the services read and check claims (the JWT settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRules {
    /// The claim that carries the account id (`account_id`, `sub`, `id`, ...).
    pub account_claim: String,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud` (or one of them), when set.
    pub audience: Option<String>,
    /// Longest accepted lifetime (`exp` minus `iat`, or minus now without `iat`).
    pub max_lifetime_secs: Option<i64>,
}

impl Default for ClaimRules {
    fn default() -> Self {
        Self {
            account_claim: "account_id".into(),
            issuer: None,
            audience: None,
            max_lifetime_secs: None,
        }
    }
}

/// An id given as a JSON string or number (`"acc_12"`, `"12"`, `12`).
pub fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

fn text(map: &Map<String, Value>, name: &str) -> Result<Option<String>, JwtError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(JwtError::Claims(format!("{name} must be a string"))),
    }
}

fn number(map: &Map<String, Value>, name: &str) -> Result<Option<i64>, JwtError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| JwtError::Claims(format!("{name} must be a number"))),
    }
}

impl ClaimRules {
    /// Reads and checks a verified token's payload at `now` (unix seconds).
    pub fn read(&self, payload: &Map<String, Value>, now: i64) -> Result<Claims, JwtError> {
        let role = match payload.get("role") {
            None | Some(Value::Null) => Role::default(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|_| JwtError::Claims(format!("unknown role {v}")))?,
        };
        let account_id = match payload.get(&self.account_claim) {
            None | Some(Value::Null) => None,
            Some(v) => Some(id_text(v).ok_or_else(|| {
                JwtError::Claims(format!(
                    "{} must be a string or a number",
                    self.account_claim
                ))
            })?),
        };
        let scope = match payload.get("scope") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| JwtError::Claims("scope must list strings".into()))?
                    .join(" "),
            ),
            Some(_) => return Err(JwtError::Claims("scope must be a string".into())),
        };
        let aud = match payload.get("aud") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(items)) => {
                let auds: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
                auds.iter()
                    .find(|a| Some(**a) == self.audience.as_deref())
                    .or(auds.first())
                    .map(|a| a.to_string())
            }
            Some(_) => return Err(JwtError::Claims("aud must be a string".into())),
        };
        let install_ids = match payload.get("install_ids") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value(v.clone())
                    .map_err(|_| JwtError::Claims("install_ids must list strings".into()))?,
            ),
        };
        let claims = Claims {
            sub: match payload.get("sub") {
                Some(v) => id_text(v).unwrap_or_default(),
                None => String::new(),
            },
            role,
            account_id,
            install_ids,
            user_hash: text(payload, "user_hash")?,
            exp: number(payload, "exp")?
                .ok_or_else(|| JwtError::Claims("exp is required".into()))?,
            nbf: number(payload, "nbf")?,
            iat: number(payload, "iat")?,
            scope,
            iss: text(payload, "iss")?,
            aud,
        };
        self.check(&claims, now)?;
        Ok(claims)
    }

    fn check(&self, c: &Claims, now: i64) -> Result<(), JwtError> {
        use super::LEEWAY_SECS;
        if c.exp.saturating_add(LEEWAY_SECS) < now {
            return Err(JwtError::Expired);
        }
        if c.nbf
            .is_some_and(|nbf| nbf.saturating_sub(LEEWAY_SECS) > now)
        {
            return Err(JwtError::NotYetValid);
        }
        if let Some(max) = self.max_lifetime_secs {
            // An `iat` in the future would stretch the lifetime: never later than now.
            let from = c.iat.map_or(now, |iat| iat.min(now));
            if c.exp.saturating_sub(from) > max.saturating_add(LEEWAY_SECS) {
                return Err(JwtError::Claims(format!(
                    "the token lives longer than the {max} s allowed"
                )));
            }
        }
        if let Some(issuer) = &self.issuer {
            if c.iss.as_ref() != Some(issuer) {
                return Err(JwtError::Claims("iss is not the expected issuer".into()));
            }
        }
        if let Some(audience) = &self.audience {
            if c.aud.as_ref() != Some(audience) {
                return Err(JwtError::Claims("aud is not this service".into()));
            }
        }
        if !c.role.is_provider() && c.account_id.is_none() {
            return Err(JwtError::Claims(format!(
                "{} is required",
                self.account_claim
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(rules: &ClaimRules, v: Value) -> Result<Claims, JwtError> {
        rules.read(v.as_object().unwrap(), 1_000)
    }

    #[test]
    fn a_site_token_sends_and_reads_but_cannot_erase_or_set_plans() {
        let c = read(
            &ClaimRules::default(),
            json!({"sub": "s", "role": "account", "account_id": "acc_1", "exp": 2_000}),
        )
        .unwrap();
        assert!(c.may(Permission::SendUsage) && c.may(Permission::ReadUsage));
        assert!(c.may(Permission::ManageInstallations));
        assert!(!c.may(Permission::EraseData));
        assert!(!c.may(Permission::SetPlans));
        assert!(!c.may(Permission::Admit));
        assert_eq!(c.actor(), "account:acc_1");
    }

    #[test]
    fn a_scope_lists_exactly_what_a_token_may_do() {
        let rules = ClaimRules::default();
        let c = read(
            &rules,
            json!({"sub": "s", "account_id": "acc_1", "exp": 2_000, "scope": "usage:read data:erase"}),
        )
        .unwrap();
        assert!(c.may(Permission::ReadUsage) && c.may(Permission::EraseData));
        assert!(!c.may(Permission::SendUsage) && !c.may(Permission::ManageInstallations));
        // Provider-level permissions are never an account's, whatever it lists.
        let c = read(
            &rules,
            json!({"account_id": "acc_1", "exp": 2_000, "scope": ["plans:write", "usage:admit"]}),
        )
        .unwrap();
        assert!(!c.may(Permission::SetPlans) && !c.may(Permission::Admit));
        // A service token holds only its scope.
        let c = read(
            &rules,
            json!({"sub": "gen-api", "role": "service", "exp": 2_000, "scope": "usage:admit"}),
        )
        .unwrap();
        assert!(c.may(Permission::Admit) && !c.may(Permission::ReadUsage));
        assert_eq!(c.actor(), "service:gen-api");
        let c = read(&rules, json!({"sub": "x", "role": "service", "exp": 2_000})).unwrap();
        assert!(Permission::ALL.iter().all(|p| !c.may(*p)));
    }

    #[test]
    fn the_account_claim_is_configurable_and_may_be_a_number() {
        // The plugin's original backend: no role, the account as a number in `id`.
        let rules = ClaimRules {
            account_claim: "id".into(),
            ..ClaimRules::default()
        };
        let c = read(&rules, json!({"id": 4217, "email": "x@y", "exp": 2_000})).unwrap();
        assert_eq!(
            (c.role, c.account_id.as_deref()),
            (Role::Account, Some("4217"))
        );
        let c = read(&rules, json!({"id": "4217", "exp": 2_000})).unwrap();
        assert_eq!(c.account_id.as_deref(), Some("4217"));
        assert!(matches!(
            read(&rules, json!({"id": 1.5, "exp": 2_000})),
            Err(JwtError::Claims(_))
        ));
        assert!(matches!(
            read(&rules, json!({"account_id": "acc_1", "exp": 2_000})),
            Err(JwtError::Claims(m)) if m == "id is required"
        ));
        let by_sub = ClaimRules {
            account_claim: "sub".into(),
            ..ClaimRules::default()
        };
        let c = read(&by_sub, json!({"sub": 77, "exp": 2_000})).unwrap();
        assert_eq!(
            (c.sub.as_str(), c.account_id.as_deref()),
            ("77", Some("77"))
        );
    }

    #[test]
    fn issuer_audience_and_lifetime_are_checked_when_configured() {
        let rules = ClaimRules {
            issuer: Some("https://accounts.example".into()),
            audience: Some("usage-api".into()),
            max_lifetime_secs: Some(86_400),
            ..ClaimRules::default()
        };
        let good = json!({"account_id": "acc_1", "iss": "https://accounts.example",
                          "aud": ["other", "usage-api"], "iat": 900, "exp": 2_000});
        assert_eq!(
            read(&rules, good.clone()).unwrap().aud.as_deref(),
            Some("usage-api")
        );
        let mut bad = good.clone();
        bad["iss"] = json!("https://evil.example");
        assert!(read(&rules, bad).is_err());
        let mut bad = good.clone();
        bad["aud"] = json!("other");
        assert!(read(&rules, bad).is_err());
        let mut bad = good.clone();
        bad["exp"] = json!(900 + 86_400 * 400);
        assert!(matches!(read(&rules, bad), Err(JwtError::Claims(m)) if m.contains("longer")));
        // Without iat, the lifetime left is what counts.
        let mut no_iat = good;
        no_iat.as_object_mut().unwrap().remove("iat");
        no_iat["exp"] = json!(1_000 + 86_400);
        assert!(read(&rules, no_iat.clone()).is_ok());
        no_iat["exp"] = json!(1_000 + 2 * 86_400);
        assert!(read(&rules, no_iat.clone()).is_err());
        // An iat in the future does not stretch it; a huge exp does not overflow.
        no_iat["iat"] = json!(1_000 + 86_400);
        assert!(read(&rules, no_iat.clone()).is_err());
        no_iat["exp"] = json!(1e300);
        assert!(read(&rules, no_iat).is_err());
    }

    #[test]
    fn malformed_claims_are_refused() {
        let rules = ClaimRules::default();
        for bad in [
            json!({"account_id": "acc_1"}),
            json!({"account_id": "acc_1", "exp": "soon"}),
            json!({"account_id": "acc_1", "exp": 2_000, "role": "root"}),
            json!({"account_id": "acc_1", "exp": 2_000, "scope": 5}),
            json!({"account_id": "acc_1", "exp": 2_000, "install_ids": "x"}),
            json!({"account_id": ["acc_1"], "exp": 2_000}),
        ] {
            assert!(
                matches!(read(&rules, bad.clone()), Err(JwtError::Claims(_))),
                "{bad}"
            );
        }
    }
}

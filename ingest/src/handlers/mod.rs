//! The gateway's request handlers: plain async functions from a parsed
//! request to a response or an `IngestError`.
//!
//! - `usage`: sending usage (with enrollment on first sync), admission,
//!   and the governance report;
//! - `registry`: registering installations, rotating secrets, and what
//!   only the provider may set (plans, account limits).
//!
//! Who may do what (the token's permissions, `usage_service_kit::auth`):
//!
//! | endpoint | needs |
//! | --- | --- |
//! | `POST /api/usage/event` | `usage:send`, the account's installation, its signature |
//! | `POST /api/usage/admit` | `usage:admit` (provider service), or `usage:send` and the installation's signature |
//! | `GET /api/usage/governance` | `usage:read`, the account's installation |
//! | `POST /api/usage/installations` | `installations:manage` for the account; choosing a plan needs `plans:write` |
//! | `POST .../{id}/rotate-secret` | `installations:manage` and proof of the current secret, or a provider admin |
//! | `PUT .../{id}/plan`, `PUT /api/usage/accounts/{id}` | `plans:write` (provider admin or billing service) |

pub mod registry;
pub mod usage;

use std::sync::Arc;

use usage_service_kit::auth::{Claims, JwtVerifier, Permission, Role};
use usage_service_kit::policy::{PlanPolicy, Policy};
use warp::http::HeaderMap;

use crate::batch::Limits;
use crate::error::IngestError;
use crate::flood::FloodGuard;
use crate::governance::ledger::Ledger;
use crate::governance::GovernanceView;
use crate::metrics::IngestMetrics;
use crate::registry::accounts::Accounts;
use crate::registry::{Registry, WriteLocks};

pub use usage::AdmitRequest;

/// The trust settings of the registry (`Config`).
#[derive(Debug, Clone)]
pub struct Trust {
    /// Unknown installations enroll on their first signed sync.
    pub enroll_on_first_sync: bool,
    pub max_installations_per_account: usize,
    /// The plan of an account the provider never set.
    pub default_plan: String,
    /// `USAGE_BILLING_LATE_GRACE_HOURS`, in ms.
    pub late_grace_ms: i64,
    /// The shortest time between two metadata revisions of an installation.
    pub metadata_every_ms: i64,
}

/// Everything the handlers share.
pub struct Gateway<S> {
    pub registry: Arc<Registry>,
    pub accounts: Arc<Accounts>,
    pub governance: Arc<GovernanceView>,
    pub ledger: Ledger,
    pub flood: FloodGuard,
    pub policy: Policy,
    pub trust: Trust,
    /// Serialises this gateway's registry writes per account (the
    /// per-account limit, and one enrollment of an installation at a time).
    pub writes: WriteLocks,
    pub sink: S,
    pub jwt: JwtVerifier,
    pub limits: Limits,
    pub signature_window_secs: i64,
    pub instance: String,
    pub events_topic: String,
    pub installations_topic: String,
    pub accounts_topic: String,
    pub metrics: IngestMetrics,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl<S> Gateway<S> {
    fn claims(&self, headers: &HeaderMap) -> Result<Claims, IngestError> {
        Ok(self
            .jwt
            .verify_header(header(headers, "authorization"), now_ms() / 1000)?)
    }

    /// The token's claims, if it holds `permission`.
    fn authorize(
        &self,
        headers: &HeaderMap,
        permission: Permission,
        what: &'static str,
    ) -> Result<Claims, IngestError> {
        let claims = self.claims(headers)?;
        if claims.may(permission) {
            Ok(claims)
        } else {
            Err(IngestError::Forbidden(what))
        }
    }

    /// Whether the token speaks for `account_id`: a provider-level token
    /// for any account, any other for its own.
    fn speaks_for(claims: &Claims, account_id: &str) -> bool {
        claims.role.is_provider() || claims.account_id.as_deref() == Some(account_id)
    }

    /// Who may read `record`'s governance: a provider-level token, the
    /// account's token, and the multisite roles for the installations their
    /// token lists (as the query API's access rules).
    fn may_read(claims: &Claims, record: &usage_schemas::Installation) -> bool {
        if claims.role.is_provider() {
            return true;
        }
        if claims.account_id.as_deref() != Some(record.account_id.as_str()) {
            return false;
        }
        match claims.role {
            Role::Account => true,
            _ => claims
                .install_ids
                .as_deref()
                .unwrap_or_default()
                .contains(&record.install_id),
        }
    }

    /// Who may register or change `account_id`'s installations.
    fn may_manage(claims: &Claims, account_id: &str) -> Result<(), IngestError> {
        let allowed = claims.is_admin()
            || (claims.role == Role::Account
                && claims.may(Permission::ManageInstallations)
                && claims.account_id.as_deref() == Some(account_id));
        if allowed {
            Ok(())
        } else {
            Err(IngestError::Forbidden(
                "manage this account's installations",
            ))
        }
    }

    /// The plan an account's new installations get.
    fn account_plan(&self, account_id: &str) -> String {
        self.accounts
            .get(account_id)
            .map_or_else(|| self.trust.default_plan.clone(), |a| a.plan.clone())
    }

    /// How many installations `account_id` may register.
    fn installation_limit(&self, account_id: &str) -> usize {
        self.accounts
            .get(account_id)
            .and_then(|a| a.max_installations)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(self.trust.max_installations_per_account)
    }

    fn plan_policy(&self, plan: &str) -> &PlanPolicy {
        self.policy.plan(plan)
    }

    /// The registry and the accounts are loaded (a plan or a secret is
    /// never decided from a half-read topic).
    fn require_registry(&self) -> Result<(), IngestError> {
        use usage_service_kit::follower::Table;
        if self.registry.is_caught_up() && self.accounts.is_caught_up() {
            Ok(())
        } else {
            Err(IngestError::RegistryLoading)
        }
    }

    /// The governance states are loaded (admission never answers from none).
    fn require_governance(&self) -> Result<(), IngestError> {
        use usage_service_kit::follower::Table;
        if self.governance.is_caught_up() {
            Ok(())
        } else {
            Err(IngestError::RegistryLoading)
        }
    }
}

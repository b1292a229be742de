//! Figures across installations, for the provider's dashboard and for any
//! integration: the overview (`overview`), analytics (`analytics`), the
//! month-end projection (`projection`) and anomalies (`anomalies`).
//!
//! Every figure is scoped by the token's role, as the rest of the API: a
//! provider admin (or a service with `usage:read`) sees the fleet, an
//! account its own installations, a network admin the sub-sites its token
//! lists, a site admin its one installation. A `user` sees only its own rows
//! of one installation, which is no fleet: refused.
//!
//! Fleet-wide figures over a large fleet read millions of rollup rows, so
//! answers are kept for a short while (`cache`), and the provider's default
//! pages are computed ahead in the background: the dashboard never waits for
//! them.

pub mod analytics;
pub mod anomalies;
pub mod cache;
pub mod overview;
pub mod projection;
pub mod series;

use std::time::Duration;

use clickhouse::query::Query;
use usage_service_kit::auth::{Claims, Permission, Role};

use crate::error::QueryError;

/// Which installations a request covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fleet {
    /// Every installation (provider-level tokens).
    All,
    /// The installations of one account.
    Account(String),
    /// Some installations of one account (multisite roles).
    Installs { account: String, ids: Vec<String> },
}

impl Fleet {
    /// The fleet `claims` may see.
    pub fn of(claims: &Claims) -> Result<Self, QueryError> {
        if !claims.may(Permission::ReadUsage) {
            return Err(QueryError::Forbidden(
                "read usage: it lacks the usage:read permission".into(),
            ));
        }
        if claims.role.is_provider() {
            return Ok(Fleet::All);
        }
        let account = claims
            .account_id
            .clone()
            .ok_or_else(|| QueryError::Forbidden("read usage without an account".into()))?;
        match claims.role {
            Role::Account => Ok(Fleet::Account(account)),
            Role::NetworkAdmin | Role::SiteAdmin => Ok(Fleet::Installs {
                account,
                ids: claims.install_ids.clone().unwrap_or_default(),
            }),
            _ => Err(QueryError::Forbidden(
                "read figures across installations (a user sees its own rows only)".into(),
            )),
        }
    }

    /// A predicate on `install_id` selecting the fleet's rows (parameters
    /// bound by [`Fleet::bind`]).
    pub fn sql(&self) -> &'static str {
        match self {
            Fleet::All => "1",
            Fleet::Account(_) => {
                "install_id IN (SELECT install_id FROM installation_metadata FINAL
                                WHERE account_id = {fleet_account:String})"
            }
            Fleet::Installs { .. } => {
                "install_id IN (SELECT install_id FROM installation_metadata FINAL
                                WHERE account_id = {fleet_account:String}
                                  AND install_id IN {fleet_ids:Array(String)})"
            }
        }
    }

    pub fn bind(&self, q: Query) -> Query {
        match self {
            Fleet::All => q,
            Fleet::Account(account) => q.param("fleet_account", account),
            Fleet::Installs { account, ids } => {
                q.param("fleet_account", account).param("fleet_ids", ids)
            }
        }
    }

    /// A cache key for what this fleet sees.
    pub fn key(&self) -> String {
        match self {
            Fleet::All => "all".into(),
            Fleet::Account(a) => format!("account:{a}"),
            Fleet::Installs { account, ids } => {
                let mut ids = ids.clone();
                ids.sort();
                format!("installs:{account}:{}", ids.join(","))
            }
        }
    }
}

/// The kept answers of every fleet-wide endpoint (and of the installations
/// list's ranking).
pub struct Caches {
    pub overview: cache::Cache<overview::Overview>,
    pub analytics: cache::Cache<analytics::Analytics>,
    pub projection: cache::Cache<projection::Projection>,
    pub anomalies: cache::Cache<anomalies::Anomalies>,
    pub rankings: cache::Cache<crate::installations::Ranking>,
}

impl Caches {
    pub fn new(ttl: Duration) -> Self {
        Self {
            overview: cache::Cache::new(ttl),
            analytics: cache::Cache::new(ttl),
            projection: cache::Cache::new(ttl),
            anomalies: cache::Cache::new(ttl),
            rankings: cache::Cache::new(ttl),
        }
    }

    /// Recomputes what is due (see [`cache::Cache::warm`]).
    pub async fn warm(&self) -> usize {
        self.overview.warm().await
            + self.analytics.warm().await
            + self.projection.warm().await
            + self.anomalies.warm().await
            + self.rankings.warm().await
    }
}

/// A decimal sum as ClickHouse writes it, as a JSON number (USD).
pub fn usd(text: &str) -> f64 {
    text.parse().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(role: Role, account: Option<&str>, ids: Option<Vec<&str>>) -> Claims {
        Claims {
            sub: "t".into(),
            role,
            account_id: account.map(str::to_string),
            install_ids: ids.map(|v| v.into_iter().map(str::to_string).collect()),
            exp: i64::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn each_role_sees_its_own_fleet() {
        assert_eq!(
            Fleet::of(&claims(Role::ProviderAdmin, None, None)).unwrap(),
            Fleet::All
        );
        assert_eq!(
            Fleet::of(&claims(Role::Account, Some("acc_1"), None)).unwrap(),
            Fleet::Account("acc_1".into())
        );
        assert_eq!(
            Fleet::of(&claims(
                Role::NetworkAdmin,
                Some("acc_1"),
                Some(vec!["a", "b"])
            ))
            .unwrap(),
            Fleet::Installs {
                account: "acc_1".into(),
                ids: vec!["a".into(), "b".into()]
            }
        );
        assert!(Fleet::of(&claims(Role::User, Some("acc_1"), Some(vec!["a"]))).is_err());
        let mut no_read = claims(Role::Account, Some("acc_1"), None);
        no_read.scope = Some("usage:send".into());
        assert!(Fleet::of(&no_read).is_err());
    }
}

//! The query API's configuration: flags or environment, local defaults.

use std::net::SocketAddr;

use clap::Parser;
use usage_service_kit::auth::JwtArgs;
use usage_service_kit::clickhouse::ClickHouseArgs;
use usage_service_kit::kafka::KafkaArgs;
use usage_service_kit::policy::GovernanceArgs;
use usage_service_kit::telemetry::LogArgs;

/// The query API (ClickHouse -> JSON/CSV).
#[derive(Debug, Clone, Parser)]
#[command(name = "usage-query", version)]
pub struct Config {
    /// HTTP listen address (query API, /health, /ready, /metrics).
    #[arg(long, env = "USAGE_QUERY_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub jwt: JwtArgs,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    /// Kafka: erasure tombstones the registry and governance topics.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The governance policy (plan caps, thresholds and prices) the
    /// dashboard's cap progress and revenue read: the same file as the
    /// gateways' and processors'.
    #[command(flatten)]
    pub governance: GovernanceArgs,
    #[command(flatten)]
    pub dashboard: DashboardArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// The dashboard's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct DashboardArgs {
    /// How long a fleet figure that was expensive to compute (over 100 ms)
    /// stays fresh, in seconds (or ten times its cost, if longer); cheaper
    /// ones are always computed afresh. The figures asked for in the last
    /// 10 minutes are recomputed in the background before they are this
    /// old. 0 turns keeping off: every figure is computed when asked.
    #[arg(
        long = "dashboard-cache-secs",
        env = "USAGE_DASHBOARD_CACHE_SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(0..=3600)
    )]
    pub cache_secs: u64,
    /// Mark the session cookie `Secure` (only sent over HTTPS): set it when
    /// the service is reached over HTTPS, as in production.
    #[arg(
        long = "dashboard-secure-cookie",
        env = "USAGE_DASHBOARD_SECURE_COOKIE",
        default_value_t = false
    )]
    pub secure_cookie: bool,
    /// The longest a dashboard session lasts, in hours (never longer than
    /// the token it was opened with).
    #[arg(
        long = "dashboard-session-hours",
        env = "USAGE_DASHBOARD_SESSION_HOURS",
        default_value_t = 12,
        value_parser = clap::value_parser!(i64).range(1..=720)
    )]
    pub session_hours: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_locally() {
        let c = Config::try_parse_from(["usage-query"]).unwrap();
        assert_eq!(c.listen.port(), 8081);
        assert_eq!(c.clickhouse.database, "usage");
        assert_eq!(c.dashboard.cache_secs, 60);
        assert!(!c.dashboard.secure_cookie);
        assert_eq!(c.dashboard.session_hours, 12);
        assert!(c.governance.config.is_none());
    }

    #[test]
    fn dashboard_settings_are_checked() {
        let c = Config::try_parse_from([
            "usage-query",
            "--dashboard-cache-secs",
            "5",
            "--dashboard-secure-cookie",
        ])
        .unwrap();
        assert_eq!(
            (c.dashboard.cache_secs, c.dashboard.secure_cookie),
            (5, true)
        );
        assert!(Config::try_parse_from(["usage-query", "--dashboard-cache-secs", "3601"]).is_err());
        let off = Config::try_parse_from(["usage-query", "--dashboard-cache-secs", "0"]).unwrap();
        assert_eq!(off.dashboard.cache_secs, 0);
        assert!(
            Config::try_parse_from(["usage-query", "--dashboard-session-hours", "9999"]).is_err()
        );
    }

    #[test]
    fn declares_its_environment_variables() {
        let cmd = <Config as clap::CommandFactory>::command();
        let envs: Vec<_> = cmd
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        assert!(envs.contains(&"USAGE_QUERY_LISTEN".to_string()));
        assert!(envs.contains(&"USAGE_CLICKHOUSE_URL".to_string()));
        assert!(envs.contains(&"USAGE_DASHBOARD_CACHE_SECS".to_string()));
        assert!(envs.contains(&"USAGE_GOVERNANCE_CONFIG".to_string()));
    }
}

//! The query API's configuration: flags or environment, local defaults.

use std::net::SocketAddr;

use clap::Parser;
use usage_service_kit::auth::JwtArgs;
use usage_service_kit::clickhouse::ClickHouseArgs;
use usage_service_kit::kafka::KafkaArgs;
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
    #[command(flatten)]
    pub log: LogArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_locally() {
        let c = Config::try_parse_from(["usage-query"]).unwrap();
        assert_eq!(c.listen.port(), 8081);
        assert_eq!(c.clickhouse.database, "usage");
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
    }
}

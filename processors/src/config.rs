//! The processors' configuration: flags or environment, local defaults.

use std::net::SocketAddr;

use clap::Parser;
use usage_service_kit::clickhouse::ClickHouseArgs;
use usage_service_kit::kafka::KafkaArgs;
use usage_service_kit::telemetry::LogArgs;

/// The stream processors (events topic -> ClickHouse).
#[derive(Debug, Clone, Parser)]
#[command(name = "usage-processors", version)]
pub struct Config {
    /// HTTP listen address (/health, /ready, /metrics).
    #[arg(
        long,
        env = "USAGE_PROCESSORS_LISTEN",
        default_value = "127.0.0.1:8082"
    )]
    pub listen: SocketAddr,
    /// Kafka consumer group; instances in the same group share the partitions.
    #[arg(
        long,
        env = "USAGE_PROCESSORS_GROUP",
        default_value = "usage-processors"
    )]
    pub group: String,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_locally() {
        let c = Config::try_parse_from(["usage-processors"]).unwrap();
        assert_eq!(c.listen.port(), 8082);
        assert_eq!(c.group, "usage-processors");
        assert_eq!(c.clickhouse.url, "http://127.0.0.1:8123");
        assert_eq!(c.clickhouse.database, "usage");
    }

    #[test]
    fn the_password_never_appears_in_debug_output() {
        let c = Config::try_parse_from(["usage-processors", "--clickhouse-password", "hunter2"])
            .unwrap();
        assert_eq!(c.clickhouse.password, "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}

//! The gateway's configuration: flags or environment, local defaults.

use std::net::SocketAddr;

use clap::Parser;
use usage_service_kit::kafka::KafkaArgs;
use usage_service_kit::telemetry::LogArgs;

/// The usage-event gateway (ingest).
#[derive(Debug, Clone, Parser)]
#[command(name = "usage-ingest", version)]
pub struct Config {
    /// HTTP listen address (plugin API, /health, /ready, /metrics).
    #[arg(long, env = "USAGE_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Name of this gateway instance, recorded on every event it accepts.
    #[arg(long, env = "USAGE_INGEST_INSTANCE", default_value = "ingest-local")]
    pub instance: String,
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
        let c = Config::try_parse_from(["usage-ingest"]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.kafka.events_topic, "usage.events.v1");
    }

    #[test]
    fn flags_override_defaults_and_bad_values_are_refused() {
        let c = Config::try_parse_from([
            "usage-ingest",
            "--listen",
            "0.0.0.0:9999",
            "--kafka-brokers",
            "k1:9092,k2:9092",
            "--events-partitions",
            "48",
        ])
        .unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(c.kafka.events_partitions, 48);
        assert!(Config::try_parse_from(["usage-ingest", "--listen", "nope"]).is_err());
    }
}

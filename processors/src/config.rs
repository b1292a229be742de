//! The processors' configuration: flags or environment, local defaults.

use std::net::SocketAddr;

use clap::Parser;
use usage_service_kit::clickhouse::ClickHouseArgs;
use usage_service_kit::kafka::KafkaArgs;
use usage_service_kit::policy::GovernanceArgs;
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
    /// Workers in this process, each an independent member of the consumer
    /// group with its own partitions, batches, stored ids and governance
    /// state, exactly like separate instances: while one waits on
    /// ClickHouse, another decodes and counts its next batch (one worker
    /// alone leaves both the processor and ClickHouse idle half the time).
    /// More workers than partitions leaves some idle. Two by default: on
    /// two cores they drain 1.2-1.5 times what one does (BENCHMARKS.md).
    #[arg(
        long,
        env = "USAGE_PROCESSORS_WORKERS",
        default_value_t = 2,
        value_parser = clap::value_parser!(u16).range(1..=256)
    )]
    pub workers: u16,
    /// Most events written to ClickHouse in one batch. Batches close after
    /// `batch_wait_ms` or at this size.
    #[arg(long, env = "USAGE_PROCESSORS_BATCH_EVENTS", default_value_t = 50_000)]
    pub batch_events: usize,
    /// Most stored event ids kept in memory by the process, shared evenly
    /// by its workers (16 bytes each, about 20 with the set's overhead), to
    /// tell duplicates without asking ClickHouse (`rollup::seen`): the
    /// (installation, day) pairs used least recently are read again from
    /// ClickHouse when needed.
    #[arg(
        long,
        env = "USAGE_PROCESSORS_SEEN_IDS_MAX",
        default_value_t = 4_000_000
    )]
    pub seen_ids_max: usize,
    /// Longest a batch waits for more events after its first one, in ms
    /// (bounds the freshness of the rollups).
    #[arg(long, env = "USAGE_PROCESSORS_BATCH_WAIT_MS", default_value_t = 200)]
    pub batch_wait_ms: u64,
    /// Kafka consumer session timeout: how fast a dead instance's partitions
    /// move to the survivors.
    #[arg(
        long,
        env = "USAGE_PROCESSORS_SESSION_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub session_timeout_ms: u64,
    /// How often the price table is re-read from ClickHouse, in seconds.
    #[arg(
        long,
        env = "USAGE_PROCESSORS_PRICE_REFRESH_SECS",
        default_value_t = 60
    )]
    pub price_refresh_secs: u64,
    /// Seconds between retries of a step that failed for a reason no retry
    /// cures (a missing table or column, refused grants): the stage is
    /// marked stalled (`/ready`, `usage_processor_stalled_stages`) and
    /// resumes within this long of the fix. Never below 5 s.
    #[arg(
        long,
        env = "USAGE_PROCESSORS_PERMANENT_RETRY_SECS",
        default_value_t = 30
    )]
    pub permanent_retry_secs: u64,
    #[command(flatten)]
    pub governance: GovernanceArgs,
    /// How far apart two gateways' received_at may be for events of one
    /// installation that reach its partition in the other order, in ms: the
    /// windows' watermark trails the latest governance time by the grace
    /// plus this, so such an event still counts.
    #[arg(
        long,
        env = "USAGE_GOVERNANCE_ARRIVAL_SKEW_MS",
        default_value_t = 10_000
    )]
    pub governance_arrival_skew_ms: i64,
    /// An installation with no new event for this long (seconds, wall
    /// clock) leaves the governance state in memory; its next event
    /// rebuilds it from ClickHouse with the same counts.
    #[arg(long, env = "USAGE_GOVERNANCE_IDLE_SECS", default_value_t = 1800)]
    pub governance_idle_secs: u64,
    /// TEST ONLY: abort right after the N-th batch reached ClickHouse, before
    /// its offsets are committed (proves redelivery counts nothing twice).
    /// This and the other crash counts are per worker: the first worker to
    /// reach N aborts the process.
    #[arg(long, env = "USAGE_PROCESSORS_CRASH_AFTER_FLUSH", hide = true)]
    pub crash_after_flush: Option<u64>,
    /// TEST ONLY: abort in the N-th flush after its rollup deltas are
    /// written and before its raw events are. Never set in production.
    #[arg(long, env = "USAGE_PROCESSORS_CRASH_AFTER_DELTAS", hide = true)]
    pub crash_after_deltas: Option<u64>,
    /// TEST ONLY: wait this many ms after each batch is written and
    /// governed, before looking again for erasures recorded meanwhile.
    #[arg(
        long,
        env = "USAGE_PROCESSORS_PAUSE_BEFORE_ERASURE_CHECK_MS",
        hide = true
    )]
    pub pause_before_erasure_check_ms: Option<u64>,
    /// TEST ONLY: abort right after the N-th write of governance decisions
    /// to ClickHouse (batches, plan changes and retries all count), before
    /// they (and the states) go to Kafka.
    #[arg(
        long,
        env = "USAGE_PROCESSORS_CRASH_AFTER_DECISIONS_STORED",
        hide = true
    )]
    pub crash_after_decisions_stored: Option<u64>,
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
        assert_eq!(c.permanent_retry_secs, 30);
        assert_eq!(c.workers, 2);
    }

    #[test]
    fn workers_are_at_least_one() {
        assert!(Config::try_parse_from(["usage-processors", "--workers", "0"]).is_err());
        let c = Config::try_parse_from(["usage-processors", "--workers", "3"]).unwrap();
        assert_eq!(c.workers, 3);
    }

    #[test]
    fn the_password_never_appears_in_debug_output() {
        let c = Config::try_parse_from(["usage-processors", "--clickhouse-password", "hunter2"])
            .unwrap();
        assert_eq!(c.clickhouse.password, "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}

//! The gateway's configuration: flags or environment, local defaults.

use std::net::SocketAddr;

use clap::Parser;
use usage_service_kit::auth::JwtArgs;
use usage_service_kit::kafka::KafkaArgs;
use usage_service_kit::policy::GovernanceArgs;
use usage_service_kit::telemetry::LogArgs;

/// The usage-event gateway (ingest).
#[derive(Clone, Parser)]
#[command(name = "usage-ingest", version)]
pub struct Config {
    /// HTTP listen address (plugin API, /health, /ready, /metrics).
    #[arg(long, env = "USAGE_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Name of this gateway instance, recorded on every event it accepts.
    #[arg(long, env = "USAGE_INGEST_INSTANCE", default_value = "ingest-local")]
    pub instance: String,
    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "USAGE_INGEST_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: u64,
    /// Most events accepted in one batch (the plugin sends at most 50).
    #[arg(long, env = "USAGE_INGEST_MAX_EVENTS", default_value_t = 500)]
    pub max_events: usize,
    /// How far a signature's timestamp may be from server time, in seconds.
    #[arg(
        long,
        env = "USAGE_INGEST_SIGNATURE_WINDOW_SECS",
        default_value_t = 300
    )]
    pub signature_window_secs: i64,
    /// How far an event's created_at may be ahead of server time, in
    /// seconds. At most 3000: the processors take a day that began an hour
    /// after they took their partitions over as holding only events they
    /// wrote (`processors/src/rollup/seen.rs`), which a later limit would
    /// let a site break by dating events into it.
    #[arg(
        long,
        env = "USAGE_INGEST_MAX_FUTURE_SECS",
        default_value_t = 300,
        value_parser = clap::value_parser!(i64).range(0..=3000)
    )]
    pub max_future_secs: i64,
    /// Oldest created_at accepted, in days (raw events are kept 90 days and
    /// rollups are recomputed from them, so this must stay well below 90).
    #[arg(long, env = "USAGE_INGEST_MAX_AGE_DAYS", default_value_t = 35, value_parser = clap::value_parser!(i64).range(1..=80))]
    pub max_age_days: i64,
    /// How long a request waits for Kafka to confirm its events before 503.
    #[arg(long, env = "USAGE_INGEST_KAFKA_TIMEOUT_MS", default_value_t = 5000)]
    pub kafka_timeout_ms: u64,
    /// AES-256-GCM key (64 hex chars) sealing installation secrets on the
    /// registry topic. The default is for local use only.
    #[arg(
        long,
        env = "USAGE_REGISTRY_KEY",
        default_value = crate::registry::seal::DEV_KEY_HEX,
        hide_env_values = true,
        hide_default_value = true
    )]
    pub registry_key: String,
    /// Whether an unknown installation enrolls on its first signed sync
    /// that brings its secret (`X-Install-Secret`), as the deployed plugin's
    /// original backend did: `first_sync` or `off` (explicit registration only).
    #[arg(long, env = "USAGE_ENROLLMENT", default_value = "first_sync", value_parser = ["first_sync", "off"])]
    pub enrollment: String,
    /// Most installations one account may register (every gateway and
    /// processor holds the registry in memory); the provider can set
    /// another limit per account (`PUT /api/usage/accounts/{account_id}`).
    #[arg(
        long,
        env = "USAGE_MAX_INSTALLATIONS_PER_ACCOUNT",
        default_value_t = 5_000
    )]
    pub max_installations_per_account: usize,
    /// The shortest time between two registry revisions of one
    /// installation's metadata (plugin, WordPress and PHP versions from its
    /// headers), in seconds: a site cannot churn the registry.
    #[arg(long, env = "USAGE_METADATA_EVERY_SECS", default_value_t = 600)]
    pub metadata_every_secs: i64,
    /// The plan of an account the provider never set one for.
    #[arg(long, env = "USAGE_DEFAULT_PLAN", default_value = "free")]
    pub default_plan: String,
    /// Requests per second one installation may sustain before 429
    /// `too_many_requests`. An honest plugin sends one request per inline
    /// generation (seconds apart) and a queued batch every 5 minutes.
    #[arg(long, env = "USAGE_INGEST_FLOOD_RPS", default_value_t = 50.0)]
    pub flood_rps: f64,
    /// Requests one installation may send at once above that rate.
    #[arg(long, env = "USAGE_INGEST_FLOOD_BURST", default_value_t = 500)]
    pub flood_burst: u32,
    /// Generations an admission may let an installation go past its cap
    /// (0: never, on one gateway).
    #[arg(long, env = "USAGE_ADMIT_SLACK", default_value_t = 0)]
    pub admit_slack: u64,
    /// How long an admitted generation counts as pending before its usage
    /// event arrives, in seconds; after that it no longer holds the cap.
    /// Longer than the plugin's queue (5 minutes) and its retries.
    #[arg(long, env = "USAGE_ADMIT_HOLD_SECS", default_value_t = 1200)]
    pub admit_hold_secs: u64,
    /// How many gateways answer admissions for the same installations
    /// (behind one balancer): each admits its share of what the processors'
    /// state leaves, so together they overshoot a cap by at most the slack
    /// plus one per gateway. 1 for a single gateway.
    #[arg(long, env = "USAGE_ADMIT_GATEWAYS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub admit_gateways: u64,
    #[command(flatten)]
    pub governance: GovernanceArgs,
    #[command(flatten)]
    pub jwt: JwtArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("instance", &self.instance)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_events", &self.max_events)
            .field("signature_window_secs", &self.signature_window_secs)
            .field("max_age_days", &self.max_age_days)
            .field("kafka_timeout_ms", &self.kafka_timeout_ms)
            .field("enrollment", &self.enrollment)
            .field(
                "max_installations_per_account",
                &self.max_installations_per_account,
            )
            .field("default_plan", &self.default_plan)
            .field("metadata_every_secs", &self.metadata_every_secs)
            .field("flood_rps", &self.flood_rps)
            .field("flood_burst", &self.flood_burst)
            .field("admit_slack", &self.admit_slack)
            .field("admit_hold_secs", &self.admit_hold_secs)
            .field("admit_gateways", &self.admit_gateways)
            .field("governance", &self.governance)
            .field("registry_key", &"***")
            .field("jwt", &self.jwt)
            .field("kafka", &self.kafka)
            .finish_non_exhaustive()
    }
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
        assert_eq!(c.kafka.accounts_topic, "usage.accounts.v1");
        assert_eq!(c.enrollment, "first_sync");
        assert_eq!(c.max_installations_per_account, 5_000);
        assert_eq!(c.default_plan, "free");
        assert_eq!(c.governance.late_grace_hours, 48);
        assert_eq!(c.jwt.account_claim, "account_id");
    }

    #[test]
    fn events_may_not_be_dated_into_a_day_the_processors_take_as_their_own() {
        let c = Config::try_parse_from(["usage-ingest", "--max-future-secs", "3000"]).unwrap();
        assert_eq!(c.max_future_secs, 3000);
        assert!(Config::try_parse_from(["usage-ingest", "--max-future-secs", "3601"]).is_err());
    }

    #[test]
    fn governance_and_trust_settings_parse_and_refuse_nonsense() {
        let c = Config::try_parse_from([
            "usage-ingest",
            "--enrollment",
            "off",
            "--max-installations-per-account",
            "20",
            "--billing-late-grace-hours",
            "72",
            "--jwt-account-claim",
            "id",
            "--jwt-issuer",
            "https://accounts.example",
        ])
        .unwrap();
        assert_eq!(c.enrollment, "off");
        assert_eq!(c.max_installations_per_account, 20);
        assert_eq!(c.governance.late_grace_ms(), 72 * 3_600_000);
        assert_eq!(c.jwt.account_claim, "id");
        assert_eq!(c.jwt.issuer.as_deref(), Some("https://accounts.example"));
        assert!(Config::try_parse_from(["usage-ingest", "--enrollment", "always"]).is_err());
        assert!(
            Config::try_parse_from(["usage-ingest", "--billing-late-grace-hours", "-1"]).is_err()
        );
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
        assert!(Config::try_parse_from(["usage-ingest", "--max-age-days", "120"]).is_err());
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let c = Config::try_parse_from([
            "usage-ingest",
            "--registry-key",
            &"ab".repeat(32),
            "--jwt-secret",
            "topsecret-jwt",
        ])
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains(&"ab".repeat(32)));
        assert!(!shown.contains("topsecret-jwt"));
    }
}

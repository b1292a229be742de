//! The gateway: verifies signed usage batches from the plugin fleet and
//! appends the accepted events to Kafka, acknowledging only what Kafka has.
//!
//! - `routes`: the HTTP surface; `handlers`: what each endpoint does;
//! - `signature`: the legacy and v2 HMAC checks; `batch`: parsing and
//!   per-event validation; `error`: the one error type and its HTTP mapping;
//! - `registry`: the event-sourced installation registry (commands, secret
//!   sealing), followed from its topic by `usage_service_kit::follower`;
//! - `governance`: admission (`POST /api/usage/admit`), over-limit marks
//!   and the governance report, from the processors' published state and
//!   what this gateway accepted and admitted since (`governance::ledger`);
//! - `flood`: the per-installation request limit (429 only for floods);
//! - `sink`: the Kafka writer.

pub mod batch;
pub mod config;
pub mod error;
pub mod flood;
pub mod governance;
pub mod handlers;
pub mod metrics;
pub mod openapi;
pub mod registry;
pub mod routes;
pub mod signature;
pub mod sink;

use std::sync::Arc;
use std::time::Duration;

use usage_service_kit::service::{HttpService, Service};
use usage_service_kit::{Metrics, Probe};

pub use config::Config;
pub use error::IngestError;

use crate::batch::Limits;
use crate::handlers::Gateway;
use crate::registry::{Registry, Sealer};
use crate::sink::KafkaSink;

pub const SERVICE: &str = "ingest";

/// A started gateway process.
pub struct IngestService {
    pub http: HttpService,
    pub registry: Arc<Registry>,
    gateway: Arc<Gateway<KafkaSink>>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Service for IngestService {
    type Config = Config;
    type Error = IngestError;
    const BINARY: &'static str = "usage-ingest";

    fn log_args(config: &Config) -> &usage_service_kit::telemetry::LogArgs {
        &config.log
    }

    async fn start(config: Config) -> Result<Self, IngestError> {
        let metrics = Metrics::new(SERVICE);
        if config.registry_key == registry::seal::DEV_KEY_HEX {
            tracing::warn!("USAGE_REGISTRY_KEY is the development default: set it in production");
        }
        let sealer = Sealer::from_hex(&config.registry_key)
            .map_err(|e| IngestError::Startup(e.to_string()))?;
        let registry = Arc::new(Registry::new(sealer));
        let sink = KafkaSink::new(
            &config.kafka,
            Duration::from_millis(config.kafka_timeout_ms),
        )
        .map_err(|e| IngestError::Startup(format!("Kafka producer: {e}")))?;

        let topics = config.kafka.ensure_topics_in_background();
        let follower = tokio::spawn(usage_service_kit::follower::follow(
            registry.clone(),
            config.kafka.clone(),
            config.kafka.installations_topic.clone(),
        ));

        let governance = Arc::new(governance::GovernanceView::default());
        let governance_follower = tokio::spawn(usage_service_kit::follower::follow(
            governance.clone(),
            config.kafka.clone(),
            config.kafka.governance_topic.clone(),
        ));
        let accounts = Arc::new(registry::accounts::Accounts::default());
        let accounts_follower = tokio::spawn(usage_service_kit::follower::follow(
            accounts.clone(),
            config.kafka.clone(),
            config.kafka.accounts_topic.clone(),
        ));
        let policy = config
            .governance
            .policy()
            .map_err(|e| IngestError::Startup(e.to_string()))?;
        if config.flood_rps.is_nan() || config.flood_rps <= 0.0 {
            return Err(IngestError::Startup(format!(
                "USAGE_INGEST_FLOOD_RPS must be above 0, not {}",
                config.flood_rps
            )));
        }
        if !policy.knows(&config.default_plan) {
            return Err(IngestError::Startup(format!(
                "USAGE_DEFAULT_PLAN {:?} is not a plan of the governance policy ({})",
                config.default_plan,
                policy.plan_names()
            )));
        }
        let gateway = Arc::new(Gateway {
            registry: registry.clone(),
            accounts: accounts.clone(),
            governance: governance.clone(),
            ledger: governance::ledger::Ledger::new(
                i64::try_from(config.admit_hold_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
                config.admit_slack,
                config.admit_gateways,
            ),
            flood: flood::FloodGuard::new(config.flood_rps, config.flood_burst),
            policy,
            trust: handlers::Trust {
                enroll_on_first_sync: config.enrollment == "first_sync",
                max_installations_per_account: config.max_installations_per_account,
                default_plan: config.default_plan.clone(),
                late_grace_ms: config.governance.late_grace_ms(),
                metadata_every_ms: config.metadata_every_secs.saturating_mul(1000),
            },
            writes: Default::default(),
            sink,
            jwt: config.jwt.verifier().map_err(IngestError::Startup)?,
            limits: Limits {
                max_events: config.max_events,
                max_future_secs: config.max_future_secs,
                max_age_secs: config.max_age_days * 86_400,
                ..Limits::default()
            },
            signature_window_secs: config.signature_window_secs,
            instance: config.instance.clone(),
            events_topic: config.kafka.events_topic.clone(),
            installations_topic: config.kafka.installations_topic.clone(),
            accounts_topic: config.kafka.accounts_topic.clone(),
            metrics: metrics::IngestMetrics::register(&metrics),
        });
        // Memory follows the active installations: idle ledgers and
        // refilled flood buckets are dropped every minute.
        let sweeper = {
            let gateway = gateway.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(60));
                loop {
                    every.tick().await;
                    let now = chrono::Utc::now().timestamp_millis();
                    gateway.ledger.sweep(now, 600_000);
                    gateway.flood.sweep(now);
                }
            })
        };
        let registry_probe = {
            let registry = registry.clone();
            Probe::new("registry", move || {
                let caught_up = registry.is_caught_up();
                async move {
                    if caught_up {
                        Ok(())
                    } else {
                        Err("still reading the installations topic".to_string())
                    }
                }
            })
        };
        let governance_probe = Probe::new("governance", move || {
            use usage_service_kit::follower::Table;
            let caught_up = governance.is_caught_up() && accounts.is_caught_up();
            async move {
                if caught_up {
                    Ok(())
                } else {
                    Err("still reading the governance and accounts topics".to_string())
                }
            }
        });
        let http = HttpService::start(
            SERVICE,
            openapi::document(),
            config.listen,
            metrics,
            vec![config.kafka.probe(), registry_probe, governance_probe],
            routes::routes(gateway.clone(), config.max_body_bytes),
        )
        .await
        .map_err(|source| IngestError::Bind {
            addr: config.listen,
            source,
        })?;
        Ok(Self {
            http,
            registry,
            gateway,
            background: vec![
                topics,
                follower,
                governance_follower,
                accounts_follower,
                sweeper,
            ],
        })
    }

    async fn stop(self) {
        self.http.stop().await;
        for task in self.background {
            task.abort();
        }
        self.gateway.sink.flush();
    }
}

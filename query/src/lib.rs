//! The query API: summaries, raw events, installations and exports, the
//! fleet's figures and the provider dashboard, served from ClickHouse.

pub mod access;
pub mod config;
pub mod dashboard;
pub mod decisions;
pub mod erasure;
pub mod error;
pub mod events;
pub mod export;
pub mod fleet;
pub mod installation;
pub mod installations;
pub mod openapi;
pub mod params;
pub mod routes;
pub mod summary;

use std::sync::Arc;

use usage_service_kit::service::{HttpService, Service};
use usage_service_kit::Metrics;

pub use config::Config;
pub use error::QueryError;

pub const SERVICE: &str = "query";

/// A started query API.
pub struct QueryApi {
    pub http: HttpService,
    warmer: tokio::task::JoinHandle<()>,
}

impl Service for QueryApi {
    type Config = Config;
    type Error = QueryError;
    const BINARY: &'static str = "usage-query";

    fn log_args(config: &Config) -> &usage_service_kit::telemetry::LogArgs {
        &config.log
    }

    async fn start(config: Config) -> Result<Self, QueryError> {
        let metrics = Metrics::new(SERVICE);
        let probes = vec![config.clickhouse.probe()];
        let producer: rdkafka::producer::FutureProducer = config
            .kafka
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(|e| QueryError::Kafka(format!("producer: {e}")))?;
        // FINAL need not merge across partitions: every table is partitioned
        // by a function of a date in its sorting key, so the copies of a row
        // always share a partition (and FINAL then works per partition).
        let reader = config
            .clickhouse
            .client()
            .with_setting("do_not_merge_across_partitions_select_final", "1");
        let policy = config
            .governance
            .policy()
            .map_err(|e| QueryError::Startup(e.to_string()))?;
        let ttl = std::time::Duration::from_secs(config.dashboard.cache_secs);
        let api = Arc::new(routes::Api {
            clickhouse: reader,
            jwt: config.jwt.verifier().map_err(QueryError::Startup)?,
            eraser: erasure::Eraser {
                clickhouse: config.clickhouse.client(),
                producer,
                kafka: config.kafka.clone(),
            },
            policy: Arc::new(policy),
            caches: fleet::Caches::new(ttl),
            sessions: routes::Sessions {
                secure: config.dashboard.secure_cookie,
                max_age_secs: config.dashboard.session_hours * 3600,
            },
        });
        let warmed = api.clone();
        let http = HttpService::start(
            SERVICE,
            openapi::document(),
            config.listen,
            metrics,
            probes,
            routes::routes(api),
        )
        .await
        .map_err(|source| QueryError::Bind {
            addr: config.listen,
            source,
        })?;
        let warmer = tokio::spawn(keep_warm(warmed, ttl));
        Ok(Self { http, warmer })
    }

    async fn stop(self) {
        self.warmer.abort();
        self.http.stop().await;
    }
}

/// Computes the provider's default pages ahead, then keeps them and the
/// figures people are looking at fresh (see [`fleet::cache`]).
async fn keep_warm(api: Arc<routes::Api>, ttl: std::time::Duration) {
    let every = (ttl / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(15),
    );
    loop {
        routes::default_pages(&api).await;
        let recomputed = api.caches.warm().await;
        if recomputed > 0 {
            tracing::debug!(recomputed, "dashboard figures recomputed");
        }
        tokio::time::sleep(every).await;
    }
}

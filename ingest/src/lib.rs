//! The gateway: verifies signed usage batches from the plugin fleet and
//! appends the accepted events to Kafka.

pub mod config;
pub mod error;

use usage_service_kit::service::{no_routes, HttpService, Service};
use usage_service_kit::Metrics;

pub use config::Config;
pub use error::IngestError;

pub const SERVICE: &str = "ingest";

/// A started gateway.
pub struct Gateway {
    pub http: HttpService,
}

impl Service for Gateway {
    type Config = Config;
    type Error = IngestError;
    const BINARY: &'static str = "usage-ingest";

    fn log_args(config: &Config) -> &usage_service_kit::telemetry::LogArgs {
        &config.log
    }

    async fn start(config: Config) -> Result<Self, IngestError> {
        let metrics = Metrics::new(SERVICE);
        // Topics are created in the background: the gateway must come up (and
        // report not-ready) even while Kafka is still starting.
        let kafka = config.kafka.clone();
        tokio::spawn(async move {
            let mut delay = std::time::Duration::from_millis(200);
            while let Err(err) = kafka.ensure_topics().await {
                tracing::warn!(%err, "could not ensure topics yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
        });
        let http = HttpService::start(
            SERVICE,
            config.listen,
            metrics,
            vec![config.kafka.probe()],
            no_routes(),
        )
        .await
        .map_err(|source| IngestError::Bind {
            addr: config.listen,
            source,
        })?;
        Ok(Self { http })
    }

    async fn stop(self) {
        self.http.stop().await;
    }
}

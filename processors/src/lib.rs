//! The stream processors: consume the events topic, write raw events and
//! rollups to ClickHouse, and compute governance signals.

pub mod config;
pub mod error;

use usage_service_kit::service::{no_routes, HttpService, Service};
use usage_service_kit::Metrics;

pub use config::Config;
pub use error::ProcessorError;

pub const SERVICE: &str = "processors";

/// A started processor instance.
pub struct Processors {
    pub http: HttpService,
}

impl Service for Processors {
    type Config = Config;
    type Error = ProcessorError;
    const BINARY: &'static str = "usage-processors";

    fn log_args(config: &Config) -> &usage_service_kit::telemetry::LogArgs {
        &config.log
    }

    async fn start(config: Config) -> Result<Self, ProcessorError> {
        let metrics = Metrics::new(SERVICE);
        let probes = vec![config.kafka.probe(), config.clickhouse.probe()];
        let http = HttpService::start(SERVICE, config.listen, metrics, probes, no_routes())
            .await
            .map_err(|source| ProcessorError::Bind {
                addr: config.listen,
                source,
            })?;
        Ok(Self { http })
    }

    async fn stop(self) {
        self.http.stop().await;
    }
}

//! The stream processors: consume the events topic and keep ClickHouse's raw
//! events and rollups exact (`rollup` explains the exactly-once mechanism),
//! price events from the dated price table (`pricing`), and mirror the
//! installation registry into `installation_metadata` (`installations`).

pub mod config;
pub mod consumer;
pub mod error;
pub mod governance;
pub mod installations;
pub mod metrics;
pub mod pricing;
pub mod rollup;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use usage_service_kit::service::{no_routes, HttpService, Service};
use usage_service_kit::Metrics;

pub use config::Config;
pub use error::ProcessorError;

use crate::consumer::{BatchLimits, CrashAfterFlush, EventsConsumer};
use crate::pricing::PriceTable;

pub const SERVICE: &str = "processors";

/// A started processor instance.
pub struct Processors {
    pub http: HttpService,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn consumer(config: &Config, group: &str, topic: &str) -> Result<StreamConsumer, ProcessorError> {
    let consumer: StreamConsumer = config
        .kafka
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set(
            "heartbeat.interval.ms",
            (config.session_timeout_ms / 4).max(500).to_string(),
        )
        // A ClickHouse outage pauses consumption; stay in the group meanwhile.
        .set("max.poll.interval.ms", "600000")
        .set("fetch.wait.max.ms", "50")
        // Prefetch at most ~16 MiB: enough for full batches, bounded RSS.
        .set("queued.max.messages.kbytes", "16384")
        .create()
        .map_err(|e| ProcessorError::Startup(format!("Kafka consumer: {e}")))?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| ProcessorError::Startup(format!("subscribe {topic}: {e}")))?;
    Ok(consumer)
}

/// Loads the price table, retrying until ClickHouse answers, then refreshes it.
async fn keep_prices(
    client: clickhouse::Client,
    prices: Arc<RwLock<PriceTable>>,
    loaded: watch::Sender<bool>,
    refresh: Duration,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        match PriceTable::load(&client).await {
            Ok(table) if !table.is_empty() => {
                *prices.write().unwrap_or_else(|p| p.into_inner()) = table;
                let _ = loaded.send(true);
                tokio::time::sleep(refresh).await;
                delay = Duration::from_millis(200);
            }
            Ok(_) => {
                tracing::error!("model_prices is empty: run usage-migrate");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(err) => {
                tracing::warn!(%err, "cannot load prices yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
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
        let clickhouse = config.clickhouse.client();
        let (shutdown, shutdown_rx) = watch::channel(false);

        let topics = config.kafka.ensure_topics_in_background();

        let prices = Arc::new(RwLock::new(PriceTable::default()));
        let (loaded, mut loaded_rx) = watch::channel(false);
        let price_task = tokio::spawn(keep_prices(
            clickhouse.clone(),
            prices.clone(),
            loaded,
            Duration::from_secs(config.price_refresh_secs),
        ));

        let events = EventsConsumer {
            consumer: consumer(&config, &config.group, &config.kafka.events_topic)?,
            topic: config.kafka.events_topic.clone(),
            clickhouse: clickhouse.clone(),
            prices,
            limits: BatchLimits {
                max_events: config.batch_events,
                max_wait: Duration::from_millis(config.batch_wait_ms),
            },
            metrics: metrics::ProcessorMetrics::register(&metrics),
            crash_after_flush: CrashAfterFlush(config.crash_after_flush),
        };
        let mut events_shutdown = shutdown_rx.clone();
        let events_task = tokio::spawn(async move {
            // No event is priced before the price table is known.
            tokio::select! {
                loaded = loaded_rx.wait_for(|l| *l) => if loaded.is_err() { return },
                _ = events_shutdown.changed() => return,
            }
            events.run(events_shutdown).await;
        });

        let installations = installations::run(
            consumer(
                &config,
                &format!("{}-installations", config.group),
                &config.kafka.installations_topic,
            )?,
            clickhouse,
            shutdown_rx,
        );
        let installations_task = tokio::spawn(installations);

        let probes = vec![config.kafka.probe(), config.clickhouse.probe()];
        let http = HttpService::start(SERVICE, config.listen, metrics, probes, no_routes())
            .await
            .map_err(|source| ProcessorError::Bind {
                addr: config.listen,
                source,
            })?;
        Ok(Self {
            http,
            shutdown,
            tasks: vec![events_task, installations_task, topics, price_task],
        })
    }

    async fn stop(self) {
        let _ = self.shutdown.send(true);
        let mut tasks = self.tasks.into_iter();
        // The consumers finish the batch in hand (bounded), the rest just stop.
        for task in tasks.by_ref().take(2) {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        for task in tasks {
            task.abort();
        }
        self.http.stop().await;
    }
}

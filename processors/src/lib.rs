//! The stream processors: consume the events topic and keep ClickHouse's raw
//! events and rollups exact (`rollup` explains the exactly-once mechanism),
//! price events from the dated price table (`pricing`), and mirror the
//! installation registry into `installation_metadata` (`installations`).

pub mod config;
pub mod consumer;
pub mod error;
pub mod governance;
pub mod installations;
pub mod ledger;
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

use crate::consumer::{BatchLimits, EventsConsumer, FaultInjection};
use crate::pricing::PriceTable;

pub const SERVICE: &str = "processors";

/// A started processor instance.
pub struct Processors {
    pub http: HttpService,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// `statistics`: librdkafka's statistics every second, for a context that
/// reads them (the events consumer's lag per partition).
fn consumer<C: rdkafka::consumer::ConsumerContext + 'static>(
    config: &Config,
    group: &str,
    topic: &str,
    context: C,
    statistics: bool,
) -> Result<StreamConsumer<C>, ProcessorError> {
    let consumer: StreamConsumer<C> = config
        .kafka
        .client_config()
        .set(
            "statistics.interval.ms",
            if statistics { "1000" } else { "0" },
        )
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
        .create_with_context(context)
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
    let mut backoff = usage_service_kit::retry::Backoff::default();
    loop {
        match PriceTable::load(&client).await {
            Ok(table) if !table.is_empty() => {
                *prices.write().unwrap_or_else(|p| p.into_inner()) = table;
                let _ = loaded.send(true);
                tokio::time::sleep(refresh).await;
                backoff.reset();
            }
            Ok(_) => {
                tracing::error!("model_prices is empty: run usage-migrate");
                backoff.wait().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot load prices yet");
                backoff.wait().await;
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

        let policy = config
            .governance
            .policy()
            .map_err(|e| ProcessorError::Startup(e.to_string()))?;
        tracing::info!(?policy, "governance policy");
        let registry_known = prometheus::IntGauge::new(
            "processor_registry_installations",
            "installations known from the registry topic",
        )
        .map_err(|e| ProcessorError::Startup(e.to_string()))?;
        metrics.register(Box::new(registry_known.clone()));
        let (plans, plan_changes) = governance::tables::Plans::new(Some(registry_known));
        let plans_task = tokio::spawn(usage_service_kit::follower::follow(
            plans.clone(),
            config.kafka.clone(),
            config.kafka.installations_topic.clone(),
        ));
        let published = Arc::new(governance::tables::Published::default());
        let published_task = tokio::spawn(usage_service_kit::follower::follow(
            published.clone(),
            config.kafka.clone(),
            config.kafka.governance_topic.clone(),
        ));
        let governance_producer: rdkafka::producer::FutureProducer = config
            .kafka
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .create()
            .map_err(|e| ProcessorError::Startup(format!("Kafka producer: {e}")))?;
        let processor_metrics = metrics::ProcessorMetrics::register(&metrics);
        let stalls = usage_service_kit::retry::Stalls::default();
        let workers = usize::from(config.workers.max(1));
        // Every worker hears of every plan change; only the owner of the
        // installation's partition acts on it (`Engine::on_plan_change`).
        let (plan_senders, plan_receivers): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| tokio::sync::mpsc::unbounded_channel::<String>())
            .unzip();
        let fan_out_task = tokio::spawn(async move {
            let mut plan_changes = plan_changes;
            while let Some(install) = plan_changes.recv().await {
                for sender in &plan_senders {
                    let _ = sender.send(install.clone());
                }
            }
        });
        let mut events = Vec::with_capacity(workers);
        let lag_exporters = consumer::Exporters::default();
        for (index, plan_changes) in plan_receivers.into_iter().enumerate() {
            let worker_metrics = if index == 0 {
                processor_metrics.clone()
            } else {
                processor_metrics.for_worker()
            };
            events.push(EventsConsumer {
                consumer: Arc::new(consumer(
                    &config,
                    &config.group,
                    &config.kafka.events_topic,
                    consumer::RebalanceWatch::with_lag(
                        &config.kafka.events_topic,
                        processor_metrics.consumer_lag.clone(),
                        lag_exporters.clone(),
                        index,
                    ),
                    true,
                )?),
                topic: config.kafka.events_topic.clone(),
                clickhouse: clickhouse.clone(),
                prices: prices.clone(),
                seen: tokio::sync::Mutex::new(
                    rollup::seen::SeenIds::new((config.seen_ids_max / workers).max(1))
                        .with_ownership(rollup::seen::Ownership {
                            registered_at: {
                                let plans = plans.clone();
                                Arc::new(move |install: &str| plans.registered_at(install))
                            },
                            clock_margin_ms: config.governance_arrival_skew_ms,
                        }),
                ),
                limits: BatchLimits {
                    max_events: config.batch_events,
                    max_wait: Duration::from_millis(config.batch_wait_ms),
                },
                faults: FaultInjection {
                    crash_after_flush: config.crash_after_flush,
                    crash_after_deltas: config.crash_after_deltas,
                    pause_before_erasure_check: config
                        .pause_before_erasure_check_ms
                        .map(Duration::from_millis),
                },
                governance: governance::engine::Engine::new(governance::engine::EngineSetup {
                    policy: policy.clone(),
                    windows: governance::window::WindowConfig {
                        grace_ms: config.governance.grace_ms,
                        skew_ms: config.governance_arrival_skew_ms,
                        ..Default::default()
                    },
                    idle_after: Duration::from_secs(config.governance_idle_secs),
                    plans: plans.clone(),
                    published: published.clone(),
                    producer: governance_producer.clone(),
                    kafka: config.kafka.clone(),
                    clickhouse: clickhouse.clone(),
                    metrics: worker_metrics.governance.clone(),
                    crash_after_decisions_stored: config.crash_after_decisions_stored,
                }),
                metrics: worker_metrics,
                plan_changes,
                ledger: ledger::Ledger {
                    client: clickhouse.clone(),
                    topic: config.kafka.events_topic.clone(),
                    group: config.group.clone(),
                },
                kafka: config.kafka.client_config(),
                stalls: stalls.for_worker(index),
                permanent_retry: Duration::from_secs(config.permanent_retry_secs),
            });
        }
        tracing::info!(workers, "events workers");
        let mut events_shutdown = shutdown_rx.clone();
        let events_task = tokio::spawn(async move {
            // No event is priced before the price table is known, nor
            // governed before every installation's plan and last published
            // state are.
            let plans_known = async {
                use usage_service_kit::follower::Table;
                while !plans.is_caught_up() || !published.is_caught_up() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            tokio::select! {
                loaded = async {
                    let prices = loaded_rx.wait_for(|l| *l).await.is_ok();
                    plans_known.await;
                    prices
                } => if !loaded { return },
                _ = events_shutdown.changed() => return,
            }
            tracing::info!("prices and plans loaded: consuming the events topic");
            // Dropped (on a stop that took too long), the set aborts them.
            let mut running = tokio::task::JoinSet::new();
            for worker in events {
                running.spawn(worker.run(events_shutdown.clone()));
            }
            while let Some(ended) = running.join_next().await {
                if let Err(err) = ended {
                    tracing::error!(%err, "an events worker ended abnormally; its consumer left the group and the other workers take its partitions over");
                }
            }
        });

        let installations = installations::run(
            consumer(
                &config,
                &format!("{}-installations", config.group),
                &config.kafka.installations_topic,
                rdkafka::consumer::DefaultConsumerContext,
                false,
            )?,
            clickhouse,
            shutdown_rx,
        );
        let installations_task = tokio::spawn(installations);

        let probes = vec![
            config.kafka.probe(),
            config.clickhouse.probe(),
            stalls.probe(),
        ];
        let http = HttpService::start(
            SERVICE,
            openapi_document(),
            config.listen,
            metrics,
            probes,
            no_routes(),
        )
        .await
        .map_err(|source| ProcessorError::Bind {
            addr: config.listen,
            source,
        })?;
        Ok(Self {
            http,
            shutdown,
            tasks: vec![
                events_task,
                installations_task,
                topics,
                price_task,
                fan_out_task,
                plans_task,
                published_task,
            ],
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

/// The processors' OpenAPI document: only the operational endpoints every
/// service has, derived from their handlers.
fn openapi_document() -> &'static str {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let doc = usage_service_kit::server::bare_openapi(
            "usage-processors",
            "The stream processors: rollups, governance and the registry mirror from Kafka into \
             ClickHouse. No API of their own: health, readiness and metrics.",
        );
        usage_service_kit::server::render_openapi(doc, env!("CARGO_PKG_VERSION"))
    })
}

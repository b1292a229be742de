//! `/health` and `/ready`.
//!
//! `/health` says the process is up and serving HTTP. `/ready` says its
//! dependencies (Kafka, ClickHouse) answered the last probe: a load balancer
//! or the local stack waits on it before sending traffic. Probes run in the
//! background on an interval so `/ready` itself is a cheap read and a slow
//! dependency cannot pile up requests.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;

use crate::Metrics;

type CheckFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// One dependency check, e.g. "kafka" or "clickhouse".
#[derive(Clone)]
pub struct Probe {
    name: &'static str,
    check: CheckFn,
}

impl Probe {
    pub fn new<F, Fut>(name: &'static str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Self {
            name,
            check: Arc::new(move || Box::pin(check())),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub async fn run(&self) -> Result<(), String> {
        (self.check)().await
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct DependencyStatus {
    pub ok: bool,
    /// "ok", or why the last probe failed.
    pub detail: String,
}

/// The readiness state of one service, shared by its HTTP handlers.
#[derive(Clone)]
pub struct Readiness {
    state: Arc<RwLock<BTreeMap<&'static str, DependencyStatus>>>,
}

impl Readiness {
    /// Starts probing every `interval`; every dependency starts as not ready.
    pub fn start(probes: Vec<Probe>, interval: Duration, metrics: Metrics) -> Self {
        let state: BTreeMap<_, _> = probes
            .iter()
            .map(|p| {
                (
                    p.name(),
                    DependencyStatus {
                        ok: false,
                        detail: "not checked yet".into(),
                    },
                )
            })
            .collect();
        let readiness = Self {
            state: Arc::new(RwLock::new(state)),
        };
        for probe in probes {
            let readiness = readiness.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    let result =
                        tokio::time::timeout(interval.max(Duration::from_secs(2)), probe.run())
                            .await
                            .unwrap_or_else(|_| Err("probe timed out".into()));
                    metrics.set_dependency_up(probe.name(), result.is_ok());
                    readiness.record(probe.name(), result);
                }
            });
        }
        readiness
    }

    fn record(&self, name: &'static str, result: Result<(), String>) {
        let status = match result {
            Ok(()) => DependencyStatus {
                ok: true,
                detail: "ok".into(),
            },
            Err(detail) => DependencyStatus { ok: false, detail },
        };
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let previous = state.insert(name, status.clone());
        // Log transitions only: a dependency that stays down must not flood the log.
        if previous.as_ref().map(|p| p.ok) != Some(status.ok) {
            if status.ok {
                tracing::info!(dependency = name, "dependency ready");
            } else {
                tracing::warn!(dependency = name, detail = %status.detail, "dependency not ready");
            }
        }
    }

    pub fn is_ready(&self) -> bool {
        self.snapshot().values().all(|s| s.ok)
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, DependencyStatus> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

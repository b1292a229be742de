//! The Prometheus registry of one service, rendered at `/metrics`.
//!
//! Each service registers its own counters and histograms on it; the shared
//! ones (build info, readiness per dependency) are registered here.

use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    dependency_up: IntGaugeVec,
}

impl Metrics {
    /// A registry whose metrics all carry the `usage_` prefix and a `service` label.
    pub fn new(service: &str) -> Self {
        let labels = std::iter::once(("service".to_string(), service.to_string())).collect();
        let registry = Registry::new_custom(Some("usage".into()), Some(labels))
            .unwrap_or_else(|_| Registry::new());
        let dependency_up = IntGaugeVec::new(
            Opts::new(
                "dependency_up",
                "1 when the last probe of the dependency succeeded",
            ),
            &["dependency"],
        )
        .expect("static metric definition is valid");
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "constant 1, labelled with the version"),
            &["version"],
        )
        .expect("static metric definition is valid");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let metrics = Self {
            registry,
            dependency_up,
        };
        metrics.register(Box::new(metrics.dependency_up.clone()));
        metrics.register(Box::new(build_info));
        metrics
    }

    /// Registers a collector; a duplicate name is a programming error worth a log, not a crash.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        if let Err(err) = self.registry.register(collector) {
            tracing::warn!(%err, "metric registered twice");
        }
    }

    pub(crate) fn set_dependency_up(&self, dependency: &str, up: bool) {
        self.dependency_up
            .with_label_values(&[dependency])
            .set(i64::from(up));
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(%err, "could not encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

//! The processors' Prometheus metrics.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};
use usage_service_kit::Metrics;

/// One worker's part of a gauge of the whole process (the worker's ids kept,
/// partitions owned, installations governed): setting it moves the exported
/// total by the change, so the gauge reads the sum over the workers.
#[derive(Clone)]
pub struct GaugeShare {
    total: IntGauge,
    mine: Arc<AtomicI64>,
}

impl GaugeShare {
    pub fn new(total: IntGauge) -> Self {
        Self {
            total,
            mine: Arc::default(),
        }
    }

    pub fn set(&self, value: i64) {
        let before = self.mine.swap(value, Ordering::Relaxed);
        self.total.add(value - before);
    }

    /// Another worker's share of the same total, starting at 0.
    pub fn fresh(&self) -> Self {
        Self::new(self.total.clone())
    }
}

#[derive(Clone)]
pub struct ProcessorMetrics {
    pub consumed: IntCounter,
    pub inserted: IntCounter,
    pub duplicates: IntCounter,
    pub erased: IntCounter,
    pub undecodable: IntCounter,
    pub flush_errors: IntCounter,
    /// Failed steps by stage and kind (`transient`: retried soon;
    /// `permanent`: schema or grants, retried slowly until fixed).
    pub errors: IntCounterVec,
    /// Stages held up by a permanent fault right now (alert when > 0).
    pub stalled: IntGauge,
    pub commit_errors: IntCounter,
    pub flush_seconds: Histogram,
    /// The flush's steps: `lookup` (erasures, stored ids), `deltas`, `raw`.
    pub flush_phase_seconds: HistogramVec,
    /// (installation, day) pairs first touched: `read` from ClickHouse, or
    /// `known` empty (only this instance wrote them).
    pub seen_days_loaded: IntCounterVec,
    /// Stored event ids kept in memory, and their (installation, day) pairs.
    pub seen_ids: GaugeShare,
    pub seen_days: GaugeShare,
    /// Partitions of the events topic this instance owns right now.
    pub assigned_partitions: GaugeShare,
    /// Batches redone with their recorded offsets on taking partitions over.
    pub redone_batches: IntCounter,
    /// Per owned partition: messages not yet committed (librdkafka's
    /// statistics, refreshed every second).
    pub consumer_lag: IntGaugeVec,
    pub governance: crate::governance::engine::GovernanceMetrics,
}

fn counter(metrics: &Metrics, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("static metric definition");
    metrics.register(Box::new(c.clone()));
    c
}

fn histogram(metrics: &Metrics, name: &str, help: &str) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]))
    .expect("static metric definition");
    metrics.register(Box::new(h.clone()));
    h
}

impl ProcessorMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let flush_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "processor_flush_seconds",
                "time to write one batch: stored ids, rollup deltas, raw events",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("static metric definition");
        metrics.register(Box::new(flush_seconds.clone()));
        let flush_phase_seconds = HistogramVec::new(
            HistogramOpts::new(
                "processor_flush_phase_seconds",
                "time of each step of a batch's write: lookup (erasures, stored ids), deltas, raw",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["phase"],
        )
        .expect("static metric definition");
        metrics.register(Box::new(flush_phase_seconds.clone()));
        let seen_ids = IntGauge::new(
            "processor_seen_ids",
            "stored event ids kept in memory to tell duplicates (rollup::seen)",
        )
        .expect("static metric definition");
        metrics.register(Box::new(seen_ids.clone()));
        let seen_days = IntGauge::new(
            "processor_seen_days",
            "(installation, day) pairs whose stored event ids are kept in memory",
        )
        .expect("static metric definition");
        metrics.register(Box::new(seen_days.clone()));
        let assigned_partitions = IntGauge::new(
            "processor_assigned_partitions",
            "events-topic partitions owned by this instance",
        )
        .expect("static metric definition");
        metrics.register(Box::new(assigned_partitions.clone()));
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "processor_consumer_lag",
                "events-topic messages after the committed offset, per owned partition",
            ),
            &["partition"],
        )
        .expect("static metric definition");
        metrics.register(Box::new(consumer_lag.clone()));
        let errors = IntCounterVec::new(
            Opts::new(
                "processor_errors_total",
                "failed steps by stage (write, ledger, governance, erasure-check, redo-read) and kind (transient, permanent)",
            ),
            &["stage", "kind"],
        )
        .expect("static metric definition");
        metrics.register(Box::new(errors.clone()));
        let seen_days_loaded = IntCounterVec::new(
            Opts::new(
                "processor_seen_days_loaded_total",
                "(installation, day) pairs first touched: read from ClickHouse, or known empty (only this instance wrote them)",
            ),
            &["how"],
        )
        .expect("static metric definition");
        metrics.register(Box::new(seen_days_loaded.clone()));
        let stalled = IntGauge::new(
            "processor_stalled_stages",
            "stages held up by a permanent fault (a missing table or column, refused grants): page an operator",
        )
        .expect("static metric definition");
        metrics.register(Box::new(stalled.clone()));
        Self {
            errors,
            stalled,
            seen_days_loaded,
            redone_batches: counter(
                metrics,
                "processor_batches_redone_total",
                "unfinished batches redone with their recorded offsets on taking partitions over",
            ),
            consumer_lag,
            consumed: counter(
                metrics,
                "processor_messages_consumed_total",
                "messages read from the events topic",
            ),
            inserted: counter(
                metrics,
                "processor_events_inserted_total",
                "new raw events written to ClickHouse",
            ),
            duplicates: counter(
                metrics,
                "processor_events_duplicate_total",
                "events not written again: already stored or twice in one batch (retries, redelivery, replay)",
            ),
            erased: counter(
                metrics,
                "processor_events_erased_total",
                "events dropped: their installation was erased after they were received",
            ),
            undecodable: counter(
                metrics,
                "processor_messages_undecodable_total",
                "messages skipped because they do not decode",
            ),
            flush_errors: counter(
                metrics,
                "processor_flush_errors_total",
                "failed ClickHouse writes (retried)",
            ),
            commit_errors: counter(
                metrics,
                "processor_commit_errors_total",
                "failed offset commits (batch re-read)",
            ),
            flush_seconds,
            flush_phase_seconds,
            seen_ids: GaugeShare::new(seen_ids),
            seen_days: GaugeShare::new(seen_days),
            assigned_partitions: GaugeShare::new(assigned_partitions),
            governance: crate::governance::engine::GovernanceMetrics {
                too_late: Some(counter(
                    metrics,
                    "governance_events_too_late_total",
                    "events behind the watermark: stored and in rollups, not in the windows",
                )),
                decisions: Some(counter(
                    metrics,
                    "governance_decisions_total",
                    "governance decisions published",
                )),
                installations: Some({
                    let g = IntGauge::new(
                        "governance_installations",
                        "installations with governance state in memory",
                    )
                    .expect("static metric definition");
                    metrics.register(Box::new(g.clone()));
                    GaugeShare::new(g)
                }),
                evicted: Some(counter(
                    metrics,
                    "governance_installations_evicted_total",
                    "idle installations whose state left memory (rebuilt on their next event)",
                )),
                rebuilt: Some(counter(
                    metrics,
                    "governance_installations_rebuilt_total",
                    "installations whose state was rebuilt from ClickHouse (first sight, rebalance, eviction)",
                )),
                started: Some(counter(
                    metrics,
                    "governance_installations_started_total",
                    "installations started on first sight without reading their history: registered after the takeover, or with no stored event but the batch's own",
                )),
                recovered: Some(counter(
                    metrics,
                    "governance_events_recovered_total",
                    "stored events an attempt that died never governed, counted on redelivery",
                )),
                rebuild_seconds: Some(histogram(
                    metrics,
                    "governance_rebuild_seconds",
                    "time to rebuild the installations a batch sees for the first time",
                )),
                batch_seconds: Some(histogram(
                    metrics,
                    "governance_batch_seconds",
                    "time to govern one batch: rebuilds, counting, publishing",
                )),
            },
        }
    }

    /// The metrics of one more worker: the same counters and histograms,
    /// its own shares of the gauges.
    pub fn for_worker(&self) -> Self {
        let mut worker = self.clone();
        worker.seen_ids = self.seen_ids.fresh();
        worker.seen_days = self.seen_days.fresh();
        worker.assigned_partitions = self.assigned_partitions.fresh();
        worker.governance.installations = self
            .governance
            .installations
            .as_ref()
            .map(GaugeShare::fresh);
        worker
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauge_reads_the_sum_of_its_shares() {
        let total = IntGauge::new("t", "t").unwrap();
        let one = GaugeShare::new(total.clone());
        let two = one.fresh();
        one.set(6);
        two.set(6);
        assert_eq!(total.get(), 12);
        // A worker that loses its partitions moves only its own part.
        one.set(0);
        assert_eq!(total.get(), 6);
        two.set(4);
        one.set(8);
        assert_eq!(total.get(), 12);
        two.set(4);
        assert_eq!(
            total.get(),
            12,
            "setting the same value again changes nothing"
        );
    }
}

//! The gateway's Prometheus metrics.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};
use usage_service_kit::Metrics;

#[derive(Clone)]
pub struct IngestMetrics {
    /// Requests by endpoint and outcome (the `error` code, or `ok`).
    pub requests: IntCounterVec,
    pub events_accepted: IntCounter,
    /// Refused events by reason.
    pub events_refused: IntCounterVec,
    /// Time from request to Kafka's confirmation of the whole batch.
    pub kafka_write_seconds: Histogram,
    /// Events stored with an over-limit mark, by reason.
    pub events_over_limit: IntCounterVec,
    /// Installations enrolled on their first signed sync.
    pub enrolled: IntCounter,
    /// Admission answers: `allowed`, or the reason of a refusal.
    pub admissions: IntCounterVec,
    /// Time to answer an admission, from the request to the answer.
    pub admission_seconds: Histogram,
}

impl IngestMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new("ingest_requests_total", "requests by endpoint and outcome"),
                &["endpoint", "outcome"],
            )
            .expect("static metric definition"),
            events_accepted: IntCounter::new(
                "ingest_events_accepted_total",
                "events confirmed by Kafka and acknowledged",
            )
            .expect("static metric definition"),
            events_refused: IntCounterVec::new(
                Opts::new(
                    "ingest_events_refused_total",
                    "events refused by validation",
                ),
                &["reason"],
            )
            .expect("static metric definition"),
            kafka_write_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "ingest_kafka_write_seconds",
                    "Kafka confirmation latency per batch",
                )
                .buckets(vec![
                    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )
            .expect("static metric definition"),
            events_over_limit: IntCounterVec::new(
                Opts::new(
                    "ingest_events_over_limit_total",
                    "events stored that arrived over a limit, by reason",
                ),
                &["reason"],
            )
            .expect("static metric definition"),
            enrolled: IntCounter::new(
                "ingest_installations_enrolled_total",
                "installations enrolled on their first signed sync",
            )
            .expect("static metric definition"),
            admissions: IntCounterVec::new(
                Opts::new(
                    "ingest_admissions_total",
                    "admission answers: allowed, or why not",
                ),
                &["outcome"],
            )
            .expect("static metric definition"),
            admission_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "ingest_admission_seconds",
                    "time to decide an admission (handler)",
                )
                .buckets(vec![
                    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005,
                ]),
            )
            .expect("static metric definition"),
        };
        metrics.register(Box::new(m.requests.clone()));
        metrics.register(Box::new(m.events_over_limit.clone()));
        metrics.register(Box::new(m.enrolled.clone()));
        metrics.register(Box::new(m.admissions.clone()));
        metrics.register(Box::new(m.admission_seconds.clone()));
        metrics.register(Box::new(m.events_accepted.clone()));
        metrics.register(Box::new(m.events_refused.clone()));
        metrics.register(Box::new(m.kafka_write_seconds.clone()));
        m
    }
}

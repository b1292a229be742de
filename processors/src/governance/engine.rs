//! Runs governance for the installations whose partitions this processor
//! owns, after each batch is stored, and publishes what changed.
//!
//! - Only events stored for the first time (`FlushReport::fresh`) are counted:
//!   retries, redeliveries and replays move no counter.
//! - An installation's state is built on first sight from ClickHouse (its raw
//!   events of the last hour and grace, in arrival order, and today's cap
//!   alerts), so after a restart or a partition move the new owner resumes
//!   with the counts it would have had.
//! - The monthly cap uses the exact monthly rollup: the count after the
//!   batch, minus the batch's own events, plus one per event as they are
//!   evaluated in order.
//! - States that changed go to the compacted governance topic, decisions to
//!   the decisions topic and the `governance_decisions` table, before the
//!   batch's offsets are committed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use clickhouse::{Client, Row};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use usage_schemas::wire::AvroRecord;
use usage_schemas::{Installation as RegistryRecord, UsageEvent};
use usage_service_kit::follower::Table;
use usage_service_kit::kafka::KafkaArgs;

use super::policy::{Level, Policy};
use super::state::{Decision, GovernanceState, Installation};
use super::window::{Applied, WindowConfig};

/// Every installation's plan, followed from the registry topic by every
/// processor instance; plan changes are sent to the engine to re-evaluate.
pub struct Plans {
    plans: RwLock<HashMap<String, String>>,
    changes: tokio::sync::mpsc::UnboundedSender<String>,
    caught_up: std::sync::atomic::AtomicBool,
}

impl Plans {
    pub fn new() -> (Arc<Self>, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Arc::new(Self {
                plans: RwLock::default(),
                changes: tx,
                caught_up: Default::default(),
            }),
            rx,
        )
    }

    pub fn plan(&self, install_id: &str) -> Option<String> {
        self.plans
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(install_id)
            .cloned()
    }
}

impl Table for Plans {
    fn apply(&self, key: Option<&[u8]>, value: Option<&[u8]>) {
        let Some(record) = value.and_then(|v| RegistryRecord::from_wire(v).ok()) else {
            if let Some(id) = key.and_then(|k| std::str::from_utf8(k).ok()) {
                self.plans
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id);
            }
            return;
        };
        let previous = self
            .plans
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.install_id.clone(), record.plan.clone());
        if previous.as_deref() != Some(record.plan.as_str()) {
            let _ = self.changes.send(record.install_id);
        }
    }

    fn caught_up(&self) {
        self.caught_up
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_caught_up(&self) -> bool {
        self.caught_up.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("kafka: {0}")]
    Kafka(String),
}

#[derive(Debug, Row, Serialize)]
struct DecisionRow {
    decision_id: String,
    install_id: String,
    kind: String,
    reason: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    at: DateTime<Utc>,
}

#[derive(Debug, Row, Deserialize)]
struct RawCount {
    install_id: String,
    event_id: String,
    created_at: i64,
    total_tokens: u32,
}

#[derive(Clone, Default)]
pub struct GovernanceMetrics {
    pub too_late: Option<prometheus::IntCounter>,
    pub decisions: Option<prometheus::IntCounter>,
    pub installations: Option<prometheus::IntGauge>,
}

pub struct Engine {
    pub policy: Policy,
    pub windows: WindowConfig,
    pub plans: Arc<Plans>,
    pub producer: FutureProducer,
    pub kafka: KafkaArgs,
    pub clickhouse: Client,
    pub metrics: GovernanceMetrics,
    installs: HashMap<String, Installation>,
    published: HashMap<String, GovernanceState>,
    /// What the last batch decided but could not publish yet.
    unpublished: Option<(Vec<GovernanceState>, Vec<Decision>)>,
}

fn month_key(ms: i64) -> String {
    let d = DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .date_naive();
    format!("{:04}-{:02}-01", d.year(), d.month())
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

impl Engine {
    pub fn new(
        policy: Policy,
        windows: WindowConfig,
        plans: Arc<Plans>,
        producer: FutureProducer,
        kafka: KafkaArgs,
        clickhouse: Client,
        metrics: GovernanceMetrics,
    ) -> Self {
        Self {
            policy,
            windows,
            plans,
            producer,
            kafka,
            clickhouse,
            metrics,
            installs: HashMap::new(),
            published: HashMap::new(),
            unpublished: None,
        }
    }

    /// Installations with state in memory (the ones this instance owns and saw).
    pub fn installations(&self) -> usize {
        self.installs.len()
    }

    fn plan_of(&self, install_id: &str) -> String {
        self.plans.plan(install_id).unwrap_or_else(|| "free".into())
    }

    /// Builds the state of installations seen for the first time since start,
    /// from what ClickHouse already holds (minus this batch's own events).
    async fn rebuild(
        &mut self,
        installs: &[&str],
        batch_ids: &HashSet<&str>,
        since: i64,
    ) -> Result<(), EngineError> {
        let new: Vec<&str> = installs
            .iter()
            .copied()
            .filter(|i| !self.installs.contains_key(*i))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let list = new.iter().map(|i| quote(i)).collect::<Vec<_>>().join(",");
        let rows: Vec<RawCount> = self
            .clickhouse
            .query(&format!(
                "SELECT install_id, event_id, toUnixTimestamp64Milli(created_at) AS created_at, total_tokens
                 FROM usage_events FINAL
                 WHERE install_id IN ({list}) AND created_at >= fromUnixTimestamp64Milli(toInt64(?))
                 ORDER BY install_id, received_at, created_at, event_id"
            ))
            .bind(since)
            .fetch_all()
            .await?;
        let alerts: Vec<(String, String, i64)> = self
            .clickhouse
            .query(&format!(
                "SELECT install_id, kind, toUnixTimestamp64Milli(at) FROM governance_decisions FINAL
                 WHERE install_id IN ({list}) AND kind IN ('cap_warning', 'cap_critical', 'blocked')
                   AND at >= now64(3) - INTERVAL 2 DAY"
            ))
            .fetch_all()
            .await?;
        for id in &new {
            self.installs
                .insert(id.to_string(), Installation::default());
        }
        // The batch being governed is already stored: its events are counted
        // by the caller, in order, so they are left out here.
        for r in rows {
            if batch_ids.contains(r.event_id.as_str()) {
                continue;
            }
            if let Some(state) = self.installs.get_mut(&r.install_id) {
                state.count(&self.windows, r.created_at, u64::from(r.total_tokens));
            }
        }
        for (install, kind, at) in alerts {
            let level = match kind.as_str() {
                "cap_warning" => Level::Warning,
                "cap_critical" => Level::Critical,
                _ => Level::Blocked,
            };
            if let Some(state) = self.installs.get_mut(&install) {
                let day = DateTime::<Utc>::from_timestamp_millis(at)
                    .unwrap_or_default()
                    .date_naive();
                state.remember_alert(level, day);
            }
        }
        Ok(())
    }

    /// Exact generations per (install_id, month start) from the monthly rollup.
    async fn monthly(
        &self,
        keys: &BTreeMap<(String, String), u64>,
    ) -> Result<HashMap<(String, String), u64>, EngineError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let list = keys
            .keys()
            .map(|(i, m)| format!("({}, toDate('{m}'))", quote(i)))
            .collect::<Vec<_>>()
            .join(",");
        let rows: Vec<(String, String, u64)> = self
            .clickhouse
            .query(&format!(
                "SELECT install_id, toString(month), sum(requests) FROM usage_monthly FINAL
                 WHERE (install_id, month) IN ({list}) GROUP BY install_id, month"
            ))
            .fetch_all()
            .await?;
        Ok(rows.into_iter().map(|(i, m, n)| ((i, m), n)).collect())
    }

    /// Counts the batch's fresh events and publishes what changed.
    pub async fn on_batch(
        &mut self,
        events: &[UsageEvent],
        fresh: &[usize],
    ) -> Result<(), EngineError> {
        if fresh.is_empty() {
            return Ok(());
        }
        let fresh: Vec<&UsageEvent> = fresh.iter().filter_map(|i| events.get(*i)).collect();
        // Each installation's events, in topic order, grouped once.
        let mut installs: Vec<&str> = Vec::new();
        let mut by_install: HashMap<&str, Vec<&UsageEvent>> = HashMap::new();
        let mut batch_months: BTreeMap<(String, String), u64> = BTreeMap::new();
        for e in &fresh {
            let events_of = by_install.entry(e.install_id.as_str()).or_default();
            if events_of.is_empty() {
                installs.push(&e.install_id);
            }
            events_of.push(e);
            *batch_months
                .entry((e.install_id.clone(), month_key(e.created_at)))
                .or_default() += 1;
        }
        // Every accepted event's installation was registered on the registry
        // topic before the gateway accepted it, so the plans follower will
        // know it: wait for that rather than govern with a guessed plan.
        // One deadline for the whole batch, so unknown installations (e.g.
        // erased meanwhile) cannot stall it for long.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for install in &installs {
            while self.plans.plan(install).is_none() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if self.plans.plan(install).is_none() {
                tracing::warn!(%install, "plan still unknown; governing with the default plan");
            }
        }
        let batch_ids: HashSet<&str> = fresh.iter().map(|e| e.event_id.as_str()).collect();
        let since = fresh.iter().map(|e| e.created_at).min().unwrap_or_default()
            - self.windows.long.length_ms()
            - self.windows.grace_ms;
        self.rebuild(&installs, &batch_ids, since).await?;
        let totals = self.monthly(&batch_months).await?;

        let mut counted: HashMap<(String, String), u64> = HashMap::new();
        let mut changed: Vec<GovernanceState> = Vec::new();
        let mut decisions: Vec<Decision> = Vec::new();
        for install in installs {
            let plan = self.plan_of(install);
            let Some(state) = self.installs.get_mut(install) else {
                continue;
            };
            let mut last = None;
            for e in by_install.get(install).into_iter().flatten() {
                let tokens = u64::try_from(e.total_tokens).unwrap_or_default();
                if state.count(&self.windows, e.created_at, tokens) == Applied::TooLate {
                    if let Some(c) = &self.metrics.too_late {
                        c.inc();
                    }
                }
                let key = (install.to_string(), month_key(e.created_at));
                let k = counted.entry(key.clone()).or_default();
                *k += 1;
                let total = totals.get(&key).copied().unwrap_or_default();
                let used = total.saturating_sub(batch_months[&key]) + *k;
                let (s, d) = state.evaluate(
                    install,
                    &plan,
                    used,
                    e.created_at,
                    &self.policy,
                    &self.windows,
                );
                decisions.extend(d);
                last = Some(s);
            }
            if let Some(s) = last {
                if self.published.get(install) != Some(&s) {
                    changed.push(s);
                }
            }
        }
        if let Some(g) = &self.metrics.installations {
            g.set(self.installs.len() as i64);
        }
        self.unpublished = Some((changed, decisions));
        self.retry_publish().await
    }

    /// True when a batch was counted but its decisions are not published yet.
    pub fn has_unpublished(&self) -> bool {
        self.unpublished.is_some()
    }

    /// Publishes what the last batch decided (again, after a failure).
    pub async fn retry_publish(&mut self) -> Result<(), EngineError> {
        let Some((states, decisions)) = self.unpublished.clone() else {
            return Ok(());
        };
        self.publish(states, decisions).await?;
        self.unpublished = None;
        Ok(())
    }

    /// Re-evaluates an installation whose plan changed (an upgrade unblocks it
    /// at once, without waiting for an event the gateway would refuse).
    pub async fn on_plan_change(&mut self, install_id: &str) -> Result<(), EngineError> {
        let plan = self.plan_of(install_id);
        let Some(previous) = self.published.get(install_id).cloned() else {
            return Ok(());
        };
        let Some(state) = self.installs.get_mut(install_id) else {
            return Ok(());
        };
        let used = u64::try_from(previous.monthly_used).unwrap_or_default();
        let (s, d) = state.evaluate(
            install_id,
            &plan,
            used,
            previous.as_of,
            &self.policy,
            &self.windows,
        );
        self.publish(vec![s], d).await
    }

    async fn publish(
        &mut self,
        states: Vec<GovernanceState>,
        decisions: Vec<Decision>,
    ) -> Result<(), EngineError> {
        let kafka_err = |e: String| EngineError::Kafka(e);
        let timeout = Duration::from_secs(10);
        let mut deliveries = Vec::new();
        let mut payloads = Vec::new();
        for s in &states {
            payloads.push((
                self.kafka.governance_topic.clone(),
                s.install_id.clone(),
                s.to_wire().map_err(|e| kafka_err(e.to_string()))?,
            ));
        }
        for d in &decisions {
            payloads.push((
                self.kafka.decisions_topic.clone(),
                d.install_id.clone(),
                d.to_wire().map_err(|e| kafka_err(e.to_string()))?,
            ));
        }
        for (topic, key, value) in &payloads {
            let mut record = FutureRecord::to(topic)
                .key(key.as_str())
                .payload(value.as_slice());
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((_, r)) if tokio::time::Instant::now() < deadline => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(kafka_err(e.to_string())),
                }
            }
        }
        for d in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(kafka_err(e.to_string())),
                Err(_) => return Err(kafka_err("producer shut down".into())),
            }
        }
        if !decisions.is_empty() {
            let mut insert = self
                .clickhouse
                .insert::<DecisionRow>("governance_decisions")
                .await?;
            for d in &decisions {
                insert
                    .write(&DecisionRow {
                        decision_id: d.decision_id.clone(),
                        install_id: d.install_id.clone(),
                        kind: d.kind.clone(),
                        reason: d.reason.clone(),
                        at: DateTime::<Utc>::from_timestamp_millis(d.at).unwrap_or_default(),
                    })
                    .await?;
            }
            insert.end().await?;
            if let Some(c) = &self.metrics.decisions {
                c.inc_by(decisions.len() as u64);
            }
            for d in &decisions {
                tracing::info!(install_id = %d.install_id, kind = %d.kind, reason = %d.reason, "governance decision");
            }
        }
        for s in states {
            self.published.insert(s.install_id.clone(), s);
        }
        Ok(())
    }
}

//! The events-topic consumer: batches bounded by size and time, written by
//! `rollup::flush`, offsets committed only once ClickHouse has everything.
//!
//! While ClickHouse is down the loop stops consuming and retries the same
//! batch with backoff (up to 5 s between tries), then resumes; nothing is
//! committed until it succeeds, so nothing is lost, and the rollup mechanism
//! makes the retry count nothing twice. A message that does not decode is
//! logged with its partition and offset, counted, and skipped (a poison
//! message must not stop billing for everyone).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use usage_schemas::wire::AvroRecord;
use usage_schemas::UsageEvent;

use crate::governance::engine::Engine;
use crate::metrics::ProcessorMetrics;
use crate::pricing::PriceTable;
use crate::rollup::{self, FlushReport};

/// Notes rebalances: on a revocation, governance state the next owner may
/// change is dropped before this instance governs again; on an assignment,
/// the new owner catches up with plan changes nobody acted on meanwhile.
#[derive(Clone, Default)]
pub struct RebalanceWatch {
    revoked: Arc<AtomicBool>,
    assigned: Arc<AtomicBool>,
}

impl RebalanceWatch {
    /// True once after every revocation.
    fn take_revoked(&self) -> bool {
        self.revoked.swap(false, Ordering::SeqCst)
    }

    /// True once after every assignment.
    fn take_assigned(&self) -> bool {
        self.assigned.swap(false, Ordering::SeqCst)
    }
}

impl ClientContext for RebalanceWatch {}

impl ConsumerContext for RebalanceWatch {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if matches!(rebalance, Rebalance::Revoke(_)) {
            self.revoked.store(true, Ordering::SeqCst);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if matches!(rebalance, Rebalance::Assign(_)) {
            self.assigned.store(true, Ordering::SeqCst);
        }
    }
}

/// Which installations this instance owns: its assigned partitions of the
/// events topic and the topic's partition count.
struct Ownership {
    assigned: std::collections::HashSet<i32>,
    partitions: i32,
}

impl Ownership {
    /// The partition of `install_id`, if this instance owns it.
    fn partition_owned(&self, install_id: &str) -> Option<i32> {
        let p = usage_service_kit::kafka::partition_for_key(install_id.as_bytes(), self.partitions);
        self.assigned.contains(&p).then_some(p)
    }
}

pub type EventsStream = StreamConsumer<RebalanceWatch>;

#[derive(Debug, Clone)]
pub struct BatchLimits {
    pub max_events: usize,
    pub max_wait: Duration,
}

/// Test-only fault injection, never set in production.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultInjection {
    /// Abort the process right after the N-th flush reached ClickHouse and
    /// before its offsets are committed, to prove the redelivered batch
    /// counts nothing twice.
    pub crash_after_flush: Option<u64>,
    /// Wait this long after each batch is written and governed, before the
    /// erasure's second look: a test records an erasure in that window, the
    /// race `settle_erasures` closes.
    pub pause_before_erasure_check: Option<Duration>,
}

pub struct EventsConsumer {
    pub consumer: EventsStream,
    pub topic: String,
    pub clickhouse: clickhouse::Client,
    pub prices: Arc<RwLock<PriceTable>>,
    pub limits: BatchLimits,
    pub metrics: ProcessorMetrics,
    pub faults: FaultInjection,
    pub governance: Engine,
    /// Installations whose plan changed (from the registry follower).
    pub plan_changes: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// What `collect` gathered: a batch, and plan changes to re-evaluate.
struct Collected {
    events: Vec<UsageEvent>,
    offsets: BTreeMap<i32, i64>,
    plan_changes: Vec<String>,
}

/// Waits `delay` before a retry, then doubles it (up to 5 s); false when
/// shutdown came first.
async fn back_off(delay: &mut Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(*delay) => {}
        _ = shutdown.changed() => return false,
    }
    *delay = (*delay * 2).min(Duration::from_secs(5));
    true
}

impl EventsConsumer {
    /// Consumes until `shutdown` turns true; the batch in hand is finished first.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut flushes = 0u64;
        loop {
            let Some(batch) = self.collect(&mut shutdown).await else {
                return;
            };
            if self.consumer.context().take_revoked() {
                self.governance.forget_all();
            }
            if !batch.events.is_empty() {
                let Some(report) = self.write(&batch.events, &mut shutdown).await else {
                    return;
                };
                flushes += 1;
                if self.faults.crash_after_flush == Some(flushes) {
                    tracing::error!(
                        "crash-after-flush fault injection: aborting before the offset commit"
                    );
                    std::process::abort();
                }
                if !self.govern(&batch.events, &report, &mut shutdown).await {
                    return;
                }
                if let Some(pause) = self.faults.pause_before_erasure_check {
                    tokio::time::sleep(pause).await;
                }
                if !self
                    .settle_erasures(&batch.events, &report, &mut shutdown)
                    .await
                {
                    return;
                }
            }
            let mut plan_changes = batch.plan_changes;
            if self.consumer.context().take_assigned() {
                plan_changes.extend(self.governance.plans_not_yet_applied());
            }
            if !plan_changes.is_empty() {
                let ownership = self.ownership();
                for install in &plan_changes {
                    let partition = ownership.as_ref().and_then(|o| o.partition_owned(install));
                    // A plan change is acted on once every event the
                    // gateways received before it is counted: live, at
                    // once; in a replay, only when the replay has caught
                    // up (before that, the events that arrive after the
                    // change apply it at its own time, as they did live).
                    let since = self.governance.plan_changed_at(install);
                    if let Some(p) = partition.filter(|p| !self.caught_up(*p, since)) {
                        tracing::debug!(%install, partition = p, "plan change waits for the partition to catch up");
                        self.governance.retry_plan_change(install);
                        continue;
                    }
                    let owned = partition.is_some();
                    if let Err(err) = self.governance.on_plan_change(install, owned).await {
                        tracing::warn!(%err, %install, "re-evaluation after a plan change failed; retrying in 1 s");
                        self.governance.retry_plan_change(install);
                    }
                }
            }
            if !batch.offsets.is_empty() {
                self.commit(&batch.offsets);
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }

    /// The partitions this instance owns now. Plan changes and rebalances
    /// are rare: the metadata call is cheap enough there.
    fn ownership(&self) -> Option<Ownership> {
        let assigned = self.consumer.assignment().ok()?;
        let partitions = match self
            .consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(2))
        {
            Ok(m) => m
                .topics()
                .iter()
                .find(|t| t.name() == self.topic)
                .map_or(0, |t| t.partitions().len()),
            Err(err) => {
                tracing::warn!(%err, "cannot read the events topic's partition count");
                return None;
            }
        };
        Some(Ownership {
            assigned: assigned
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect(),
            partitions: i32::try_from(partitions).unwrap_or(i32::MAX),
        })
    }

    /// Whether this instance has consumed every event of `partition` the
    /// gateways received before `since` (ms): its next offset (the position,
    /// or the committed offset when nothing was consumed since the
    /// assignment) reached the first message stamped at or after `since`
    /// (the high watermark when there is none yet).
    fn caught_up(&self, partition: i32, since: i64) -> bool {
        let timeout = Duration::from_secs(2);
        let offset_of = |tpl: &TopicPartitionList| match tpl
            .find_partition(&self.topic, partition)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        let mut at = TopicPartitionList::new();
        if at
            .add_partition_offset(&self.topic, partition, Offset::Offset(since))
            .is_err()
        {
            return false;
        }
        let target = match self.consumer.offsets_for_times(at, timeout) {
            Ok(found) => match offset_of(&found) {
                Some(o) => o,
                None => match self
                    .consumer
                    .fetch_watermarks(&self.topic, partition, timeout)
                {
                    Ok((_, high)) => high,
                    Err(_) => return false,
                },
            },
            Err(_) => return false,
        };
        let next = self
            .consumer
            .position()
            .ok()
            .and_then(|p| offset_of(&p))
            .or_else(|| {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&self.topic, partition);
                self.consumer
                    .committed_offsets(tpl, timeout)
                    .ok()
                    .and_then(|c| offset_of(&c))
            });
        next.unwrap_or(0) >= target
    }

    /// Counts the batch's new events in governance and publishes, retrying
    /// until it succeeds (before the offsets are committed).
    async fn govern(
        &mut self,
        events: &[UsageEvent],
        report: &FlushReport,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut delay = Duration::from_millis(100);
        let governed = self
            .governance
            .to_govern(events, &report.fresh, &report.stored);
        // Counting happens once; only publishing is retried (see Engine).
        let mut result = self.governance.on_batch(events, &governed).await;
        while let Err(err) = result {
            tracing::warn!(%err, retry_in = ?delay, "governance failed; retrying");
            if !back_off(&mut delay, shutdown).await {
                return false;
            }
            result = if self.governance.has_unpublished() {
                self.governance.retry_publish().await
            } else {
                // It failed before counting anything: run it whole again.
                self.governance.on_batch(events, &governed).await
            };
        }
        true
    }

    /// The second look for erasures (`rollup`, point 4), once everything of
    /// the batch is written: the rows of installations erased meanwhile are
    /// deleted, and governance forgets them.
    async fn settle_erasures(
        &mut self,
        events: &[UsageEvent],
        report: &FlushReport,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut delay = Duration::from_millis(100);
        let installs = || events.iter().map(|e| e.install_id.as_str());
        loop {
            match rollup::delete_erased_meanwhile(
                &self.clickhouse,
                &report.erased_before,
                installs(),
            )
            .await
            {
                Ok(deleted) => {
                    for install in &deleted {
                        if let Err(err) = self.governance.erased(install).await {
                            tracing::warn!(%err, %install, "governance tombstone after an erasure failed");
                        }
                    }
                    return true;
                }
                Err(err) => {
                    tracing::warn!(%err, retry_in = ?delay, "looking for erasures failed; retrying");
                    if !back_off(&mut delay, shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// The next batch: up to `max_events`, or what arrived within `max_wait`
    /// of its first message. `None` on shutdown with nothing in hand.
    async fn collect(&mut self, shutdown: &mut watch::Receiver<bool>) -> Option<Collected> {
        let mut events = Vec::new();
        let mut offsets = BTreeMap::new();
        let mut plan_changes = Vec::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut assignment_check = tokio::time::interval(Duration::from_millis(500));
        loop {
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => {
                    return if offsets.is_empty() { None } else { Some(Collected { events, offsets, plan_changes }) };
                }
                _ = timer => return Some(Collected { events, offsets, plan_changes }),
                Some(install) = self.plan_changes.recv() => {
                    plan_changes.push(install);
                    // Act on it soon even if no event comes (a blocked site sends none).
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.limits.max_wait);
                }
                _ = assignment_check.tick() => {
                    if let Ok(assigned) = self.consumer.assignment() {
                        self.metrics.assigned_partitions.set(assigned.count() as i64);
                    }
                    // Here, not after batches: idle installations are the
                    // ones no batch comes for.
                    self.governance.evict_idle();
                }
                received = self.consumer.recv() => {
                    let msg = match received {
                        Ok(msg) => msg,
                        Err(err) => {
                            tracing::warn!(%err, "Kafka consumer error");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    };
                    offsets.insert(msg.partition(), msg.offset());
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.limits.max_wait);
                    match msg.payload().map(UsageEvent::from_wire) {
                        Some(Ok(event)) => events.push(event),
                        Some(Err(err)) => {
                            self.metrics.undecodable.inc();
                            tracing::error!(partition = msg.partition(), offset = msg.offset(), %err, "undecodable event skipped");
                        }
                        None => {}
                    }
                    self.metrics.consumed.inc();
                    if events.len() >= self.limits.max_events {
                        return Some(Collected { events, offsets, plan_changes });
                    }
                }
            }
        }
    }

    /// Writes the batch, retrying with backoff until it succeeds. `None` if
    /// shutdown came first (the batch stays uncommitted).
    async fn write(
        &self,
        events: &[UsageEvent],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<FlushReport> {
        let mut delay = Duration::from_millis(100);
        loop {
            let prices = self
                .prices
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let timer = self.metrics.flush_seconds.start_timer();
            match rollup::flush(&self.clickhouse, events, &prices).await {
                Ok(report) => {
                    timer.observe_duration();
                    self.metrics.inserted.inc_by(report.inserted as u64);
                    // Every event of the batch is one of the three, so the
                    // counters add up to the events consumed (less the
                    // messages that did not decode).
                    let duplicates = events.len().saturating_sub(report.inserted + report.erased);
                    self.metrics.duplicates.inc_by(duplicates as u64);
                    self.metrics.erased.inc_by(report.erased as u64);
                    tracing::debug!(inserted = report.inserted, duplicates, "batch written");
                    return Some(report);
                }
                Err(err) => {
                    timer.stop_and_discard();
                    self.metrics.flush_errors.inc();
                    tracing::warn!(%err, retry_in = ?delay, events = events.len(), "ClickHouse write failed; retrying the same batch");
                    if !back_off(&mut delay, shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    fn commit(&self, offsets: &BTreeMap<i32, i64>) {
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in offsets {
            if let Err(err) =
                tpl.add_partition_offset(&self.topic, *partition, Offset::Offset(offset + 1))
            {
                tracing::warn!(%err, "cannot build offset list");
                return;
            }
        }
        // A failed commit (e.g. the partition moved to another instance in a
        // rebalance) only means the batch is read again: harmless by design.
        if let Err(err) = self.consumer.commit(&tpl, CommitMode::Sync) {
            self.metrics.commit_errors.inc();
            tracing::warn!(%err, "offset commit failed; the batch will be re-read and recomputed");
        }
    }
}

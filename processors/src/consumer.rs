//! The events-topic consumer: batches bounded by size and time, recorded in
//! the batch ledger, written by `rollup::flush`, governed, and committed
//! only once ClickHouse and Kafka have everything.
//!
//! While ClickHouse is down the loop stops consuming and retries the same
//! batch with backoff (up to 5 s between tries), then resumes; nothing is
//! committed until it succeeds, so nothing is lost, and the deduplication
//! tokens make the retry add nothing twice. On taking over partitions (at
//! start, after a crash, in a rebalance) it first redoes the batches of
//! those partitions the ledger holds as unfinished, with their recorded
//! offsets, and skips them afterwards (`ledger`). A message that does not
//! decode is logged with its partition and offset, counted, and skipped (a
//! poison message must not stop billing for everyone).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use usage_schemas::wire::AvroRecord;
use usage_schemas::UsageEvent;
use usage_service_kit::retry::{clickhouse_verdict, message_verdict, Backoff, Stalls, Verdict};

use crate::governance::engine::Engine;
use crate::ledger::{Ledger, Range, RecordedBatch};
use crate::metrics::ProcessorMetrics;
use crate::pricing::PriceTable;
use crate::rollup::{self, FlushReport};

/// Notes rebalances: on a revocation, governance state the next owner may
/// change is dropped before this instance governs again; on an assignment,
/// the new owner catches up with plan changes nobody acted on meanwhile.
///
/// Also exports each owned partition's consumer lag (messages between the
/// committed offset and the partition's end) from librdkafka's statistics.
#[derive(Clone, Default)]
pub struct RebalanceWatch {
    revoked: Arc<AtomicBool>,
    assigned: Arc<AtomicBool>,
    /// When the latest assignment came (ms, wall clock; 0 before any).
    assigned_at: Arc<AtomicI64>,
    lag: Option<(String, prometheus::IntGaugeVec)>,
    /// Which worker of the process exports each partition's lag: a worker
    /// drops a partition's label when it stops owning it only if no other
    /// worker has taken the label over since.
    exporters: Exporters,
    worker: usize,
}

/// Partition to the worker exporting its lag, shared by a process's workers.
pub type Exporters = Arc<std::sync::Mutex<BTreeMap<i32, usize>>>;

impl RebalanceWatch {
    /// A watch that also sets `lag` (labelled by partition) for `topic`,
    /// as `worker` of the workers sharing `exporters`.
    pub fn with_lag(
        topic: &str,
        lag: prometheus::IntGaugeVec,
        exporters: Exporters,
        worker: usize,
    ) -> Self {
        Self {
            lag: Some((topic.to_string(), lag)),
            exporters,
            worker,
            ..Self::default()
        }
    }

    /// True once after every revocation.
    fn take_revoked(&self) -> bool {
        self.revoked.swap(false, Ordering::SeqCst)
    }

    /// True once after every assignment.
    fn take_assigned(&self) -> bool {
        self.assigned.swap(false, Ordering::SeqCst)
    }

    /// When the latest assignment came (ms), if any came.
    fn assigned_at(&self) -> Option<i64> {
        Some(self.assigned_at.load(Ordering::SeqCst)).filter(|t| *t > 0)
    }
}

impl ClientContext for RebalanceWatch {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some((topic, gauge)) = &self.lag else {
            return;
        };
        let Some(topic) = statistics.topics.get(topic) else {
            return;
        };
        let mut exporters = self.exporters.lock().unwrap_or_else(|p| p.into_inner());
        for (partition, p) in &topic.partitions {
            if *partition < 0 {
                continue; // librdkafka's internal "unassigned" partition
            }
            let label = partition.to_string();
            let lag = partition_lag(p.consumer_lag, p.committed_offset, p.lo_offset, p.hi_offset);
            if let (true, Some(lag)) = (p.desired, lag) {
                gauge.with_label_values(&[&label]).set(lag);
                exporters.insert(*partition, self.worker);
            } else if exporters.get(partition) == Some(&self.worker) {
                exporters.remove(partition);
                let _ = gauge.remove_label_values(&[&label]);
            }
        }
    }
}

impl ConsumerContext for RebalanceWatch {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(worker = self.worker, partitions = ?partitions_of(tpl), "partitions revoked");
            self.revoked.store(true, Ordering::SeqCst);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(worker = self.worker, partitions = ?partitions_of(tpl), "partitions assigned");
            self.assigned_at
                .store(chrono::Utc::now().timestamp_millis(), Ordering::SeqCst);
            self.assigned.store(true, Ordering::SeqCst);
        }
    }
}

/// A partition's lag: librdkafka's (its end less the committed offset) once
/// the group has committed one; before that (a partition that never had
/// traffic, or none since the group began) librdkafka says -1, and the lag
/// is what a consumer starting at the earliest offset would read: the end
/// less the log's start, 0 for an empty partition. `None` while the
/// watermarks are not known yet.
fn partition_lag(consumer_lag: i64, committed: i64, lo: i64, hi: i64) -> Option<i64> {
    if consumer_lag >= 0 {
        Some(consumer_lag)
    } else if committed < 0 && lo >= 0 && hi >= lo {
        Some(hi - lo)
    } else {
        None
    }
}

/// The partitions of a rebalance's list, for its log line.
fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
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
    /// Abort the process in the N-th flush, once its rollup deltas are
    /// written and before its raw events are: the redone batch must add
    /// nothing to the rollups and store the raw events.
    pub crash_after_deltas: Option<u64>,
    /// Wait this long after each batch is written and governed, before the
    /// erasure's second look: a test records an erasure in that window, the
    /// race `settle_erasures` closes.
    pub pause_before_erasure_check: Option<Duration>,
}

pub struct EventsConsumer {
    /// Shared with the blocking threads that run librdkafka's synchronous
    /// calls (see `kafka_call`).
    pub consumer: Arc<EventsStream>,
    pub topic: String,
    pub clickhouse: clickhouse::Client,
    pub prices: Arc<RwLock<PriceTable>>,
    /// Stored event ids of the installations owned (`rollup::seen`).
    pub seen: tokio::sync::Mutex<rollup::seen::SeenIds>,
    pub limits: BatchLimits,
    pub metrics: ProcessorMetrics,
    pub faults: FaultInjection,
    pub governance: Engine,
    /// Installations whose plan changed (from the registry follower).
    pub plan_changes: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub ledger: Ledger,
    /// The Kafka client settings, for the reader that fetches the offsets
    /// of a batch to redo.
    pub kafka: rdkafka::ClientConfig,
    /// Stages held up by a permanent fault (shown by `/ready`).
    pub stalls: Stalls,
    /// The wait between retries of a permanent fault.
    pub permanent_retry: Duration,
}

/// What `collect` gathered: a batch, and plan changes to re-evaluate.
#[derive(Default)]
struct Collected {
    events: Vec<UsageEvent>,
    /// The partition and offset of each event.
    positions: Vec<(i32, i64)>,
    /// Each partition's first and last offset read (undecodable messages
    /// included).
    ranges: BTreeMap<i32, (i64, i64)>,
    plan_changes: Vec<String>,
}

impl Collected {
    fn add(&mut self, partition: i32, offset: i64, event: Option<UsageEvent>) {
        let range = self.ranges.entry(partition).or_insert((offset, offset));
        range.1 = offset;
        if let Some(event) = event {
            self.events.push(event);
            self.positions.push((partition, offset));
        }
    }

    /// Keeps only what `keep` accepts (by partition and offset); ranges
    /// shrink to the offsets kept, dropping a partition left empty.
    fn retain(&mut self, keep: impl Fn(i32, i64) -> bool) {
        let mut kept_events = Vec::with_capacity(self.events.len());
        let mut kept_positions = Vec::with_capacity(self.positions.len());
        for (e, (p, o)) in self.events.drain(..).zip(self.positions.drain(..)) {
            if keep(p, o) {
                kept_events.push(e);
                kept_positions.push((p, o));
            }
        }
        self.events = kept_events;
        self.positions = kept_positions;
        let ranges = std::mem::take(&mut self.ranges);
        for (p, (first, last)) in ranges {
            let kept: Vec<i64> = (first..=last).filter(|o| keep(p, *o)).collect();
            if let (Some(f), Some(l)) = (kept.first(), kept.last()) {
                self.ranges.insert(p, (*f, *l));
            }
        }
    }

    fn ledger_ranges(&self) -> Vec<Range> {
        self.ranges
            .iter()
            .map(|(p, (first, last))| Range {
                partition: *p,
                first: *first,
                last: *last,
            })
            .collect()
    }
}

impl EventsConsumer {
    /// After a failed step of `stage`: counts and logs it, marks the stage
    /// stalled while no retry can cure the fault (a metric and `/ready`,
    /// so an operator is paged: nothing is skipped, the partition waits),
    /// and waits before the retry. False when shutdown came first.
    async fn retry_after(
        &self,
        stage: &'static str,
        err: &(dyn std::fmt::Display + Sync),
        verdict: Verdict,
        backoff: &mut Backoff,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        self.metrics
            .errors
            .with_label_values(&[stage, verdict.as_str()])
            .inc();
        match verdict {
            Verdict::Transient => {
                tracing::warn!(%err, stage, "failed; retrying");
            }
            Verdict::Permanent => {
                tracing::error!(%err, stage, "failed for a reason no retry cures (schema, grants): the partition waits for an operator; nothing is skipped");
                self.stalls.stalled(stage, err.to_string());
                self.metrics.stalled.set(self.stalls.count() as i64);
            }
        }
        backoff.wait_unless(verdict, shutdown).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::default().with_permanent(self.permanent_retry)
    }

    /// `stage` succeeded: it is no longer stalled.
    fn moving(&self, stage: &'static str) {
        self.stalls.moving(stage);
        self.metrics.stalled.set(self.stalls.count() as i64);
    }

    /// Consumes until `shutdown` turns true; the batch in hand is finished first.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut flushes = 0u64;
        // The last batch written and committed, marked done in the ledger
        // with the next one's record (or at shutdown).
        let mut last_done: Option<RecordedBatch> = None;
        // Per partition, the last offset of a batch redone on taking it
        // over: the consumer skips up to there.
        let mut redone_through: BTreeMap<i32, i64> = BTreeMap::new();
        loop {
            let Some(mut batch) = self.collect(&mut shutdown).await else {
                break;
            };
            if self.consumer.context().take_revoked() {
                self.governance.forget_all();
                // Another owner may write those installations from now on.
                self.seen.lock().await.clear();
                // Events of partitions another instance owns now are its
                // to write: nothing of them was recorded or written yet.
                if let Ok(assigned) = self.consumer.assignment() {
                    let owned: std::collections::HashSet<i32> = assigned
                        .elements_for_topic(&self.topic)
                        .iter()
                        .map(|e| e.partition())
                        .collect();
                    batch.retain(|p, _| owned.contains(&p));
                }
            }
            let assigned = self.consumer.context().take_assigned();
            if assigned {
                match self.redo_unfinished(&mut shutdown, &mut flushes).await {
                    Some(through) => redone_through.extend(through),
                    None => break,
                }
            }
            if !redone_through.is_empty() {
                batch.retain(|p, o| redone_through.get(&p).is_none_or(|t| o > *t));
            }
            if !batch.events.is_empty() {
                let recorded = RecordedBatch::new(batch.ledger_ranges());
                if !self
                    .record(&recorded, last_done.as_ref(), &mut shutdown)
                    .await
                {
                    break;
                }
                if !self
                    .process(&recorded, &batch.events, None, &mut shutdown, &mut flushes)
                    .await
                {
                    break;
                }
                last_done = Some(recorded);
            }
            let mut plan_changes = batch.plan_changes;
            if assigned {
                plan_changes.extend(self.governance.plans_not_yet_applied());
            }
            self.act_on_plan_changes(plan_changes).await;
            if !batch.ranges.is_empty() {
                let offsets = batch
                    .ranges
                    .iter()
                    .map(|(p, (_, last))| (*p, *last))
                    .collect();
                self.commit(&offsets).await;
            }
            if *shutdown.borrow() {
                break;
            }
        }
        if let Some(done) = last_done {
            if let Err(err) = self.ledger.done(&done).await {
                tracing::warn!(%err, "could not mark the last batch done; the next owner redoes it (harmless)");
            }
        }
    }

    /// Records `batch` in the ledger (and `done` as done), retrying until it
    /// is; false on shutdown.
    async fn record(
        &self,
        batch: &RecordedBatch,
        done: Option<&RecordedBatch>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut backoff = self.backoff();
        loop {
            match self.ledger.record(batch, done).await {
                Ok(()) => {
                    self.moving("ledger");
                    return true;
                }
                Err(err) => {
                    self.metrics.flush_errors.inc();
                    let verdict = clickhouse_verdict(&err);
                    if !self
                        .retry_after("ledger", &err, verdict, &mut backoff, shutdown)
                        .await
                    {
                        return false;
                    }
                }
            }
        }
    }

    /// Writes, governs and settles one batch: everything but the commit.
    /// `owned`: for a batch redone on taking over partitions, the
    /// partitions of the events this instance governs (the others' owners
    /// govern theirs); `None` for a batch read live, all governed here.
    async fn process(
        &mut self,
        batch: &RecordedBatch,
        events: &[UsageEvent],
        owned: Option<&[bool]>,
        shutdown: &mut watch::Receiver<bool>,
        flushes: &mut u64,
    ) -> bool {
        *flushes += 1;
        let abort_after_deltas = self.faults.crash_after_deltas == Some(*flushes);
        let Some(mut report) = self
            .write(batch, events, abort_after_deltas, shutdown)
            .await
        else {
            return false;
        };
        if self.faults.crash_after_flush == Some(*flushes) {
            tracing::error!("crash-after-flush fault injection: aborting before the offset commit");
            std::process::abort();
        }
        if let Some(owned) = owned {
            let mine = |i: &usize| owned.get(*i).copied().unwrap_or(false);
            report.fresh.retain(mine);
            report.stored.retain(mine);
        }
        if !self.govern(events, &report, shutdown).await {
            return false;
        }
        if let Some(pause) = self.faults.pause_before_erasure_check {
            tokio::time::sleep(pause).await;
        }
        self.settle_erasures(events, &report, shutdown).await
    }

    /// Redoes the ledger's unfinished batches of the partitions just
    /// assigned, each with exactly its recorded offsets, and returns, per
    /// partition, the last offset redone. `None` on shutdown.
    async fn redo_unfinished(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        flushes: &mut u64,
    ) -> Option<BTreeMap<i32, i64>> {
        let mut backoff = self.backoff();
        let (owned, batches) = loop {
            match self.unfinished().await {
                Ok(found) => break found,
                Err(err) => {
                    let verdict = message_verdict(&err);
                    if !self
                        .retry_after("ledger", &err, verdict, &mut backoff, shutdown)
                        .await
                    {
                        return None;
                    }
                }
            }
        };
        self.moving("ledger");
        let mut through = BTreeMap::new();
        for batch in batches {
            tracing::info!(batch = %batch.id, ranges = ?batch.ranges, "redoing an unfinished batch with its recorded offsets");
            let mut backoff = self.backoff();
            let read = loop {
                let reader = self.kafka.clone();
                let topic = self.topic.clone();
                let ranges = batch.ranges.clone();
                let fetched =
                    tokio::task::spawn_blocking(move || read_ranges(&reader, &topic, &ranges))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r);
                match fetched {
                    Ok(read) => break read,
                    Err(err) => {
                        let verdict = Verdict::Transient;
                        if !self
                            .retry_after("redo-read", &err, verdict, &mut backoff, shutdown)
                            .await
                        {
                            return None;
                        }
                    }
                }
            };
            let mine: Vec<bool> = read.iter().map(|(p, _)| owned.contains(p)).collect();
            let events: Vec<UsageEvent> = read.into_iter().map(|(_, e)| e).collect();
            self.metrics.redone_batches.inc();
            if !events.is_empty()
                && !self
                    .process(&batch, &events, Some(&mine), shutdown, flushes)
                    .await
            {
                return None;
            }
            if let Err(err) = self.ledger.done_in(&batch, |p| owned.contains(&p)).await {
                tracing::warn!(%err, "could not mark a redone batch done; the next owner redoes it (harmless)");
            }
            for r in batch.ranges.iter().filter(|r| owned.contains(&r.partition)) {
                let t = through.entry(r.partition).or_insert(r.last);
                *t = (*t).max(r.last);
            }
        }
        if !through.is_empty() {
            // Committed at once: the consumer's position may already be past
            // them, and nothing else commits a partition with no new event.
            self.commit(&through).await;
        }
        Some(through)
    }

    /// The partitions owned now, and the ledger's unfinished batches in them.
    async fn unfinished(
        &self,
    ) -> Result<(std::collections::HashSet<i32>, Vec<RecordedBatch>), String> {
        let assigned = self.consumer.assignment().map_err(|e| e.to_string())?;
        let owned: std::collections::HashSet<i32> = assigned
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        if owned.is_empty() {
            return Ok((owned, Vec::new()));
        }
        let committed = self
            .kafka_call(move |c| c.committed_offsets(assigned, Duration::from_secs(10)))
            .await?
            .map_err(|e| e.to_string())?;
        let next: BTreeMap<i32, i64> = committed
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => (e.partition(), o),
                _ => (e.partition(), 0),
            })
            .collect();
        let batches = self
            .ledger
            .unfinished(&next)
            .await
            .map_err(|e| e.to_string())?;
        Ok((owned, batches))
    }

    /// Re-evaluates installations whose plan changed (a failure is retried
    /// in a second, through the registry follower).
    async fn act_on_plan_changes(&mut self, plan_changes: Vec<String>) {
        if plan_changes.is_empty() {
            return;
        }
        let ownership = self.ownership().await;
        for install in &plan_changes {
            let partition = ownership.as_ref().and_then(|o| o.partition_owned(install));
            // A plan change is acted on once every event the gateways
            // received before it is counted: live, at once; in a replay,
            // only when the replay has caught up (before that, the events
            // that arrive after the change apply it at its own time, as
            // they did live).
            let since = self.governance.plan_changed_at(install);
            let behind = match partition {
                Some(p) => !self.caught_up(p, since).await,
                None => false,
            };
            if let Some(p) = partition.filter(|_| behind) {
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

    /// The partitions this instance owns now. Plan changes and rebalances
    /// are rare: the metadata call is cheap enough there.
    async fn ownership(&self) -> Option<Ownership> {
        let assigned = self.consumer.assignment().ok()?;
        let topic = self.topic.clone();
        let metadata = self
            .kafka_call(move |c| c.fetch_metadata(Some(&topic), Duration::from_secs(2)))
            .await
            .ok()?;
        let partitions = match metadata {
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
    async fn caught_up(&self, partition: i32, since: i64) -> bool {
        let topic = self.topic.clone();
        self.kafka_call(move |c| caught_up(c, &topic, partition, since))
            .await
            .unwrap_or(false)
    }

    /// Runs a blocking librdkafka call (offsets, metadata, a synchronous
    /// commit) on a blocking thread: with Kafka down each can wait for
    /// seconds, and the async threads meanwhile serve everything else of
    /// the process (`/health`, `/metrics`; in the tests, the gateway too).
    async fn kafka_call<T: Send + 'static>(
        &self,
        call: impl FnOnce(&EventsStream) -> T + Send + 'static,
    ) -> Result<T, String> {
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || call(&consumer))
            .await
            .map_err(|e| format!("Kafka call did not finish: {e}"))
    }

    /// Counts the batch's new events in governance and publishes, retrying
    /// until it succeeds (before the offsets are committed).
    async fn govern(
        &mut self,
        events: &[UsageEvent],
        report: &FlushReport,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut backoff = self.backoff();
        self.governance
            .assigned_at(self.consumer.context().assigned_at());
        let governed = self
            .governance
            .to_govern(events, &report.fresh, &report.stored);
        // Counting happens once; only publishing is retried (see Engine).
        let mut result = self.governance.on_batch(events, &governed).await;
        while let Err(err) = result {
            let verdict = err.verdict();
            if !self
                .retry_after("governance", &err, verdict, &mut backoff, shutdown)
                .await
            {
                return false;
            }
            result = if self.governance.has_unpublished() {
                self.governance.retry_publish().await
            } else {
                // It failed before counting anything: run it whole again.
                self.governance.on_batch(events, &governed).await
            };
        }
        self.moving("governance");
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
        let mut backoff = self.backoff();
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
                    self.moving("erasure-check");
                    for install in &deleted {
                        if let Err(err) = self.governance.erased(install).await {
                            tracing::warn!(%err, %install, "governance tombstone after an erasure failed");
                        }
                    }
                    return true;
                }
                Err(err) => {
                    let verdict = clickhouse_verdict(&err);
                    if !self
                        .retry_after("erasure-check", &err, verdict, &mut backoff, shutdown)
                        .await
                    {
                        return false;
                    }
                }
            }
        }
    }

    /// The next batch: up to `max_events`, or what arrived within `max_wait`
    /// of its first message. `None` on shutdown with nothing in hand.
    async fn collect(&mut self, shutdown: &mut watch::Receiver<bool>) -> Option<Collected> {
        let mut batch = Collected::default();
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
                    return if batch.ranges.is_empty() && batch.plan_changes.is_empty() { None } else { Some(batch) };
                }
                _ = timer => return Some(batch),
                Some(install) = self.plan_changes.recv() => {
                    batch.plan_changes.push(install);
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
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.limits.max_wait);
                    let event = match msg.payload().map(UsageEvent::from_wire) {
                        Some(Ok(event)) => Some(event),
                        Some(Err(err)) => {
                            self.metrics.undecodable.inc();
                            tracing::error!(partition = msg.partition(), offset = msg.offset(), %err, "undecodable event skipped");
                            None
                        }
                        None => None,
                    };
                    batch.add(msg.partition(), msg.offset(), event);
                    self.metrics.consumed.inc();
                    if batch.events.len() >= self.limits.max_events {
                        return Some(batch);
                    }
                }
            }
        }
    }

    /// Writes the batch, retrying with backoff until it succeeds. `None` if
    /// shutdown came first (the batch stays uncommitted).
    async fn write(
        &self,
        batch: &RecordedBatch,
        events: &[UsageEvent],
        abort_after_deltas: bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<FlushReport> {
        let mut backoff = self.backoff();
        loop {
            let prices = self
                .prices
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let timer = self.metrics.flush_seconds.start_timer();
            let mut seen = self.seen.lock().await;
            seen.assigned_at(self.consumer.context().assigned_at());
            let flushed = rollup::flush(
                &self.clickhouse,
                &batch.id,
                events,
                &prices,
                &mut seen,
                abort_after_deltas,
            )
            .await;
            self.metrics.seen_ids.set(seen.ids() as i64);
            self.metrics.seen_days.set(seen.days() as i64);
            drop(seen);
            match flushed {
                Ok(report) => {
                    timer.observe_duration();
                    for (phase, took) in [
                        ("lookup", report.phases.lookup),
                        ("deltas", report.phases.deltas),
                        ("raw", report.phases.raw),
                    ] {
                        self.metrics
                            .flush_phase_seconds
                            .with_label_values(&[phase])
                            .observe(took.as_secs_f64());
                    }
                    self.metrics.inserted.inc_by(report.inserted as u64);
                    for (how, n) in [
                        ("read", report.days_read),
                        ("known", report.days_known_empty),
                    ] {
                        self.metrics
                            .seen_days_loaded
                            .with_label_values(&[how])
                            .inc_by(n as u64);
                    }
                    // Every event of the batch is one of the three, so the
                    // counters add up to the events consumed (less the
                    // messages that did not decode).
                    let duplicates = events.len().saturating_sub(report.inserted + report.erased);
                    self.metrics.duplicates.inc_by(duplicates as u64);
                    self.metrics.erased.inc_by(report.erased as u64);
                    tracing::debug!(inserted = report.inserted, duplicates, "batch written");
                    self.moving("write");
                    return Some(report);
                }
                Err(err) => {
                    timer.stop_and_discard();
                    self.metrics.flush_errors.inc();
                    // The same batch again: its tokens make a retry add nothing twice.
                    let verdict = clickhouse_verdict(&err);
                    if !self
                        .retry_after("write", &err, verdict, &mut backoff, shutdown)
                        .await
                    {
                        return None;
                    }
                }
            }
        }
    }

    async fn commit(&self, offsets: &BTreeMap<i32, i64>) {
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
        let committed = self
            .kafka_call(move |c| c.commit(&tpl, CommitMode::Sync).map_err(|e| e.to_string()))
            .await
            .and_then(|r| r);
        if let Err(err) = committed {
            self.metrics.commit_errors.inc();
            tracing::warn!(%err, "offset commit failed; the batch will be re-read and recomputed");
        }
    }
}

/// `EventsConsumer::caught_up`, blocking.
fn caught_up(consumer: &EventsStream, topic: &str, partition: i32, since: i64) -> bool {
    let timeout = Duration::from_secs(2);
    let offset_of =
        |tpl: &TopicPartitionList| match tpl.find_partition(topic, partition).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
    let mut at = TopicPartitionList::new();
    if at
        .add_partition_offset(topic, partition, Offset::Offset(since))
        .is_err()
    {
        return false;
    }
    let target = match consumer.offsets_for_times(at, timeout) {
        Ok(found) => match offset_of(&found) {
            Some(o) => o,
            None => match consumer.fetch_watermarks(topic, partition, timeout) {
                Ok((_, high)) => high,
                Err(_) => return false,
            },
        },
        Err(_) => return false,
    };
    let next = consumer
        .position()
        .ok()
        .and_then(|p| offset_of(&p))
        .or_else(|| {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(topic, partition);
            consumer
                .committed_offsets(tpl, timeout)
                .ok()
                .and_then(|c| offset_of(&c))
        });
    next.unwrap_or(0) >= target
}

/// Reads exactly these offsets of `topic` (a batch to redo): each
/// partition's events in offset order, partitions in the order given.
/// Blocking: run it off the async threads.
fn read_ranges(
    config: &rdkafka::ClientConfig,
    topic: &str,
    ranges: &[Range],
) -> Result<Vec<(i32, UsageEvent)>, String> {
    use rdkafka::consumer::BaseConsumer;
    let consumer: BaseConsumer = config
        .clone()
        .set("group.id", "usage-processors-redo")
        .set("enable.auto.commit", "false")
        // Offsets gone by retention: read from the oldest left.
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| format!("redo reader: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    for r in ranges {
        tpl.add_partition_offset(topic, r.partition, Offset::Offset(r.first))
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let mut left: BTreeMap<i32, i64> = ranges.iter().map(|r| (r.partition, r.last)).collect();
    let mut read: BTreeMap<i32, Vec<UsageEvent>> = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !left.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(format!("timed out reading partitions {:?}", left.keys()));
        }
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let msg = msg.map_err(|e| e.to_string())?;
        let (partition, offset) = (msg.partition(), msg.offset());
        let Some(last) = left.get(&partition).copied() else {
            continue;
        };
        if offset <= last {
            match msg.payload().map(UsageEvent::from_wire) {
                Some(Ok(event)) => read.entry(partition).or_default().push(event),
                Some(Err(err)) => {
                    tracing::error!(partition, offset, %err, "undecodable event skipped")
                }
                None => {}
            }
        }
        if offset >= last {
            left.remove(&partition);
        }
    }
    Ok(read
        .into_iter()
        .flat_map(|(p, events)| events.into_iter().map(move |e| (p, e)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::partition_lag;

    #[test]
    fn a_committed_partition_has_librdkafkas_lag() {
        assert_eq!(partition_lag(7, 93, 0, 100), Some(7));
        assert_eq!(partition_lag(0, 100, 0, 100), Some(0));
    }

    #[test]
    fn a_partition_never_committed_lags_by_what_it_holds() {
        // -1001: librdkafka's invalid offset; the consumer starts at the earliest.
        assert_eq!(partition_lag(-1, -1001, 0, 0), Some(0));
        assert_eq!(partition_lag(-1, -1001, 40, 100), Some(60));
    }

    #[test]
    fn unknown_watermarks_export_nothing() {
        assert_eq!(partition_lag(-1, -1001, -1, -1), None);
        assert_eq!(partition_lag(-1, -1001, 0, -1), None);
        // Committed but the end not known yet.
        assert_eq!(partition_lag(-1, 50, 0, -1), None);
    }
}

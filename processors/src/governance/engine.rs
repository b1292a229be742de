//! Runs governance for the installations whose partitions this processor
//! owns, after each batch is stored, and publishes what changed.
//!
//! - Only events stored for the first time (`FlushReport::fresh`) are counted:
//!   retries, redeliveries and replays move no counter. The exception is a
//!   batch stored by an attempt that died before governing it: its events
//!   are found stored, yet no state holds them (`to_govern`).
//! - Every event counts at its governance time (created_at clamped to its
//!   arrival, `usage_service_kit::periods`) and toward the billing month
//!   the gateway stamped on it, with the plan in force when it arrived (the
//!   registry keeps each installation's plan history, and plan changes and
//!   arrivals share the gateways' clock, so a replay decides with the plans
//!   the live run had). A plan change between two arrivals is decided at
//!   its own time, before the later event, as the live run did when the
//!   change came.
//! - An installation's state is built on first sight from ClickHouse (its raw
//!   events that arrived in the last hour and grace, in arrival order, its
//!   hourly counts of the spike baseline, its first event, today's cap
//!   alerts, and its state after the last stored event), so after a
//!   restart, a partition move or an eviction the owner resumes with the
//!   counts it would have had. When the published state is the one that
//!   counted the installation's last stored event, it is taken as is, so
//!   open episodes go on rather than start again. The reads run at once.
//!   An installation registered after this instance took its partitions
//!   over, whose state never left memory since, is started empty without
//!   a read: every event it has went through this engine (`unseen`); so is
//!   one whose only stored events are the batch's own (its monthly rollup
//!   total equals them and no state of it was published: `stored_events`),
//!   a new installation met after a restart.
//! - The governance topic, followed by every instance, tells what was last
//!   published (nothing unchanged is published again) and what a plan
//!   change re-evaluates.
//! - State is dropped when the consumer's partitions are revoked (the next
//!   owner rebuilds it; if they come back, so do we) and when an
//!   installation has been idle for `idle_after`: memory holds the active
//!   installations only.
//! - The monthly cap uses the exact monthly rollup, summed by billing
//!   month, read once when the installation is rebuilt (minus the batch's
//!   own events), then kept in memory: plus one per event as they are
//!   evaluated in order. Every event of an installation in memory passes
//!   through this engine exactly once (first-seen or recovered), so the
//!   count stays the rollup's.
//! - Decisions go to the `governance_decisions` table, then to the
//!   decisions topic, then the states that changed to the compacted
//!   governance topic, all before the batch's offsets are committed (why in
//!   that order: `publish`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clickhouse::{Client, Row};
use rdkafka::producer::FutureProducer;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use usage_schemas::wire::AvroRecord;
use usage_schemas::UsageEvent;
use usage_service_kit::kafka::KafkaArgs;
use usage_service_kit::produce::{send_acknowledged, Outgoing};

use usage_service_kit::periods;

use super::policy::{Level, Policy};
use super::state::{Counted, Decision, GovernanceState, Installation, BASELINE_HOURS, HOUR_MS};
use super::tables::{Plans, Published};
use super::window::{Applied, WindowConfig};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("kafka: {0}")]
    Kafka(String),
}

impl EngineError {
    /// Whether a retry can cure it (Kafka faults always pass).
    pub fn verdict(&self) -> usage_service_kit::retry::Verdict {
        match self {
            EngineError::ClickHouse(e) => usage_service_kit::retry::clickhouse_verdict(e),
            EngineError::Kafka(_) => usage_service_kit::retry::Verdict::Transient,
        }
    }
}

#[derive(Debug, Row, Serialize)]
struct DecisionRow {
    decision_id: String,
    install_id: String,
    kind: String,
    reason: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    at: DateTime<Utc>,
    phase: String,
    episode_id: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis::option")]
    until: Option<DateTime<Utc>>,
}

#[derive(Debug, Row, Deserialize)]
struct RawCount {
    install_id: String,
    event_id: String,
    created_at: i64,
    received_at: i64,
    total_tokens: u32,
    billing_month: String,
}

/// A governed event of a batch, with the clocks governance reads it by.
struct Item<'a> {
    event: &'a UsageEvent,
    /// Governance time.
    t: i64,
    /// Billing month, `YYYY-MM`.
    month: String,
}

#[derive(Clone, Default)]
pub struct GovernanceMetrics {
    pub too_late: Option<prometheus::IntCounter>,
    pub decisions: Option<prometheus::IntCounter>,
    /// This engine's share of the installations in memory.
    pub installations: Option<crate::metrics::GaugeShare>,
    pub evicted: Option<prometheus::IntCounter>,
    /// Installations rebuilt from ClickHouse, and the time their queries took.
    pub rebuilt: Option<prometheus::IntCounter>,
    /// Installations started without reading ClickHouse (`Engine::unseen`).
    pub started: Option<prometheus::IntCounter>,
    /// Stored events an earlier attempt never governed, counted later.
    pub recovered: Option<prometheus::IntCounter>,
    pub rebuild_seconds: Option<prometheus::Histogram>,
    /// Time to govern one batch (rebuilds, counting, publishing).
    pub batch_seconds: Option<prometheus::Histogram>,
}

/// What an engine is made of.
pub struct EngineSetup {
    pub policy: Policy,
    pub windows: WindowConfig,
    /// An installation with no fresh event for this long leaves memory.
    pub idle_after: Duration,
    pub plans: Arc<Plans>,
    pub published: Arc<Published>,
    pub producer: FutureProducer,
    pub kafka: KafkaArgs,
    pub clickhouse: Client,
    pub metrics: GovernanceMetrics,
    /// TEST ONLY: abort right after the N-th write of decisions to
    /// ClickHouse, before the decisions and states go to Kafka (proves a
    /// redelivery publishes them). Never set in production.
    pub crash_after_decisions_stored: Option<u64>,
}

/// One installation's state in memory and when a batch last touched it.
struct Held {
    state: Installation,
    touched: Instant,
    /// Generations stored per billing month (`YYYY-MM`), this batch's
    /// governed events aside until they are counted: loaded on rebuild for
    /// every month from `months_from` on, then kept by counting (so a batch
    /// reads no monthly total back from ClickHouse).
    months: HashMap<String, u64>,
    months_from: String,
}

/// The events of a batch governance counts (`Engine::to_govern`).
#[derive(Debug, Default)]
pub struct Governed {
    /// Indices into the batch, in topic order.
    pub indices: Vec<usize>,
    /// The latest arrival of each installation's events in the batch,
    /// counted or found counted already (a plugin's resend): the published
    /// state's `received_through` moves past them, so that a gateway stops
    /// counting them as pending.
    seen_through: HashMap<String, i64>,
    /// Installations with recovered events (stored by an attempt that died
    /// before governing them), and the earliest of those events' times.
    recovered_from: HashMap<String, i64>,
}

pub struct Engine {
    setup: EngineSetup,
    installs: HashMap<String, Held>,
    /// What the last batch decided but could not publish yet.
    unpublished: Option<(Vec<GovernanceState>, Vec<Decision>)>,
    last_sweep: Instant,
    decision_batches_stored: u64,
    /// When the consumer took its partitions over (ms, this clock).
    assigned_at: Option<i64>,
    /// Installations registered after the takeover whose state left
    /// memory since (idle, erased): those are rebuilt from ClickHouse.
    lost: HashSet<String>,
}

/// Installation ids per ClickHouse query: they travel as a query parameter
/// in the URL, which ClickHouse caps (`http_max_uri_size`, 1 MiB).
const IDS_PER_QUERY: usize = 2_000;

/// The first billing month a rebuild loads: events reach at most a few
/// months back (the gateway refuses events older than 80 days) and bill
/// to the month they arrive in.
fn months_from(since: i64) -> String {
    periods::month_key(
        periods::month_start(since.min(chrono::Utc::now().timestamp_millis()))
            .checked_sub_months(chrono::Months::new(3))
            .unwrap_or_default(),
    )
}

fn month_date(key: &str) -> chrono::NaiveDate {
    periods::parse_month_key(key).unwrap_or_default()
}

const DAY_MS: i64 = 86_400_000;

/// The raw rows with each event once, by the table's key (installation,
/// day, event id): a copy stored twice (two owners during a rebalance)
/// counts once until a merge drops it, at its first arrival.
fn distinct_events(rows: Vec<RawCount>) -> Vec<RawCount> {
    let keep: Vec<bool> = {
        let mut seen: HashSet<(&str, i64, &str)> = HashSet::with_capacity(rows.len());
        rows.iter()
            .map(|r| {
                seen.insert((
                    r.install_id.as_str(),
                    r.created_at.div_euclid(DAY_MS),
                    r.event_id.as_str(),
                ))
            })
            .collect()
    };
    rows.into_iter()
        .zip(keep)
        .filter_map(|(r, keep)| keep.then_some(r))
        .collect()
}

/// The earliest governance time among the events of each installation's
/// first day (`first_days`: its start, in ms), taken from `rows`, which
/// hold every event of these installations.
fn first_event_of(
    installs: &[&String],
    rows: &[RawCount],
    first_days: &HashMap<String, i64>,
    grace: i64,
) -> Vec<(String, i64)> {
    let wanted: HashSet<&str> = installs.iter().map(|i| i.as_str()).collect();
    let mut first: HashMap<&str, i64> = HashMap::new();
    for r in rows {
        let id = r.install_id.as_str();
        if !wanted.contains(id) {
            continue;
        }
        let Some(day) = first_days.get(id) else {
            continue;
        };
        if r.created_at.div_euclid(DAY_MS) * DAY_MS != *day {
            continue;
        }
        let t = periods::governance_time(r.created_at, r.received_at, grace);
        let f = first.entry(id).or_insert(t);
        *f = (*f).min(t);
    }
    first.into_iter().map(|(i, t)| (i.to_string(), t)).collect()
}

impl Engine {
    pub fn new(setup: EngineSetup) -> Self {
        Self {
            setup,
            installs: HashMap::new(),
            unpublished: None,
            decision_batches_stored: 0,
            last_sweep: Instant::now(),
            assigned_at: None,
            lost: HashSet::new(),
        }
    }

    /// The time of the consumer's latest assignment (see `unseen`).
    pub fn assigned_at(&mut self, at: Option<i64>) {
        if at != self.assigned_at {
            self.assigned_at = at;
            self.lost.clear();
        }
    }

    /// True when `install_id` was registered after this instance took its
    /// partitions over (with the gateways' clock margin) and its state never
    /// left memory since: every event it has went through this engine, so
    /// ClickHouse holds nothing to rebuild it from but the batch's own.
    fn unseen(&self, install_id: &str) -> bool {
        let Some(since) = self.assigned_at else {
            return false;
        };
        !self.lost.contains(install_id)
            && self
                .setup
                .plans
                .registered_at(install_id)
                .is_some_and(|r| r >= since.saturating_add(self.setup.windows.skew_ms))
    }

    /// Remembers that a young installation's state left memory.
    fn lose(&mut self, install_id: &str) {
        if self.unseen(install_id) {
            self.lost.insert(install_id.to_string());
        }
    }

    /// Installations with state in memory (the ones this instance owns and saw).
    pub fn installations(&self) -> usize {
        self.installs.len()
    }

    /// The plan in force at `at` on the gateways' clock (the policy's
    /// default plan for an installation the registry does not know).
    fn plan_at(&self, install_id: &str, at: i64) -> String {
        self.setup
            .plans
            .plan_at(install_id, at)
            .unwrap_or_else(|| "free".into())
    }

    /// An event's governance time.
    fn time_of(&self, e: &UsageEvent) -> i64 {
        periods::governance_time(e.created_at, e.received_at, self.setup.windows.grace_ms)
    }

    fn report_size(&self) {
        if let Some(g) = &self.setup.metrics.installations {
            g.set(self.installs.len() as i64);
        }
    }

    /// Drops every installation's state: the consumer's partitions were
    /// revoked, and whoever owns them next may count events we never see.
    pub fn forget_all(&mut self) {
        if !self.installs.is_empty() {
            tracing::info!(
                installations = self.installs.len(),
                "partitions revoked: governance state dropped, rebuilt on next sight"
            );
        }
        self.installs.clear();
        self.assigned_at = None;
        self.lost.clear();
        self.report_size();
    }

    /// Forgets an installation erased while its batch was being written:
    /// its state leaves memory, and a tombstone follows on the governance
    /// topic any state this batch published after the erasure's own.
    pub async fn erased(&mut self, install_id: &str) -> Result<(), EngineError> {
        self.lose(install_id);
        self.installs.remove(install_id);
        self.report_size();
        let tombstone = [Outgoing::tombstone(install_id)];
        let topic = &self.setup.kafka.governance_topic;
        send_acknowledged(&self.setup.producer, topic, &tombstone, kafka_deadline())
            .await
            .map_err(|e| EngineError::Kafka(e.to_string()))
    }

    /// Drops the state of installations idle for `idle_after` (looked at
    /// most every few seconds). Rebuilding them later gives the same counts.
    pub fn evict_idle(&mut self) {
        let every =
            (self.setup.idle_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        if self.last_sweep.elapsed() < every {
            return;
        }
        self.last_sweep = Instant::now();
        let before = self.installs.len();
        let idle_after = self.setup.idle_after;
        let idle: Vec<String> = self
            .installs
            .iter()
            .filter(|(_, held)| held.touched.elapsed() >= idle_after)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &idle {
            self.lose(id);
            self.installs.remove(id);
        }
        let evicted = before - self.installs.len();
        if evicted > 0 {
            tracing::debug!(evicted, "idle installations left memory");
            if let Some(c) = &self.setup.metrics.evicted {
                c.inc_by(evicted as u64);
            }
        }
        self.report_size();
    }

    /// Builds the state of installations not in memory (first sight since
    /// start, a rebalance or an eviction) from what ClickHouse already holds,
    /// minus this batch's own events (`batch`), which the caller counts.
    async fn rebuild(
        &mut self,
        installs: &[&str],
        batch: &HashMap<&str, Vec<Item<'_>>>,
        since: i64,
        recovered_from: &HashMap<String, i64>,
    ) -> Result<(), EngineError> {
        let (unseen, new): (Vec<String>, Vec<String>) = installs
            .iter()
            .filter(|i| !self.installs.contains_key(**i))
            .map(|i| i.to_string())
            .partition(|i| self.unseen(i));
        for id in &unseen {
            self.start_unseen(id, batch, since);
        }
        let mut started = unseen.len();
        // Those whose only stored events are this batch's own (a new
        // installation after a restart): nothing to rebuild from either.
        let mut to_read = Vec::new();
        for chunk in new.chunks(IDS_PER_QUERY) {
            let stored = self.stored_events(chunk).await?;
            for id in chunk {
                let own = batch.get(id.as_str()).map_or(0, |items| items.len() as u64);
                let only_own = stored.get(id).copied().unwrap_or(0) == own
                    && self.setup.published.get(id).is_none();
                if only_own {
                    self.start_unseen(id, batch, since);
                    started += 1;
                } else {
                    to_read.push(id.clone());
                }
            }
        }
        if let Some(c) = &self.setup.metrics.started {
            c.inc_by(started as u64);
        }
        let new = to_read;
        if new.is_empty() {
            return Ok(());
        }
        let timer = self
            .setup
            .metrics
            .rebuild_seconds
            .as_ref()
            .map(|h| h.start_timer());
        for chunk in new.chunks(IDS_PER_QUERY) {
            self.rebuild_some(chunk, batch, since, recovered_from)
                .await?;
        }
        if let Some(c) = &self.setup.metrics.rebuilt {
            c.inc_by(new.len() as u64);
        }
        drop(timer);
        Ok(())
    }

    /// Events stored per installation, all months (the monthly rollup is
    /// summed: exact without `FINAL`, and sorted by installation).
    async fn stored_events(&self, ids: &[String]) -> Result<HashMap<String, u64>, EngineError> {
        let rows: Vec<(String, u64)> = self
            .setup
            .clickhouse
            .query(
                "SELECT install_id, sum(requests) FROM usage_monthly
                 WHERE install_id IN {ids:Array(String)} GROUP BY install_id",
            )
            .param("ids", ids)
            .fetch_all()
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// The state of an installation whose only stored events are this
    /// batch's governed ones (`unseen`, or found so by `stored_events`),
    /// as `rebuild_some` would build it from them: empty, its first event
    /// the earliest of the batch's on their first day, or its registration.
    /// (Its alerts, if an attempt that died made some, are those of its
    /// recovered events, which a rebuild leaves out too.)
    fn start_unseen(&mut self, id: &str, batch: &HashMap<&str, Vec<Item<'_>>>, since: i64) {
        let items = batch.get(id).map(Vec::as_slice).unwrap_or_default();
        let first_day = items
            .iter()
            .map(|i| i.event.created_at.div_euclid(DAY_MS))
            .min();
        let first_event = items
            .iter()
            .filter(|i| Some(i.event.created_at.div_euclid(DAY_MS)) == first_day)
            .map(|i| i.t)
            .min();
        let registered = self.setup.plans.registered_at(id);
        let first_seen = match (first_event, registered) {
            (Some(f), Some(r)) => Some(f.min(r)),
            (f, r) => f.or(r),
        };
        let mut state = Installation::default();
        state.restore(BTreeMap::new(), first_seen);
        self.installs.insert(
            id.to_string(),
            Held {
                state,
                touched: Instant::now(),
                months: HashMap::new(),
                months_from: months_from(since),
            },
        );
    }

    async fn rebuild_some(
        &mut self,
        new: &[String],
        batch: &HashMap<&str, Vec<Item<'_>>>,
        since: i64,
        recovered_from: &HashMap<String, i64>,
    ) -> Result<(), EngineError> {
        let ch = &self.setup.clickhouse;
        let grace = self.setup.windows.grace_ms;
        // Governance time in SQL, as `periods::governance_time` computes it.
        const T: &str = "greatest(least(toUnixTimestamp64Milli(created_at), toUnixTimestamp64Milli(received_at)),
                                   toUnixTimestamp64Milli(received_at) - {grace:Int64})";
        // Installations registered after `since` (with a grace's margin
        // for the gateways' clocks) have every event in the raw rows read
        // below: their first event comes from those rows, not from a query.
        let (young, old): (Vec<&String>, Vec<&String>) = new.iter().partition(|id| {
            self.setup
                .plans
                .registered_at(id)
                .is_some_and(|r| r.saturating_sub(grace) >= since)
        });
        // The published states that counted an event still stored, outside
        // this batch: those are this installation's own timeline (not that
        // of another run over other data, as in a replay into an empty
        // database), so they are taken as they are.
        let published: HashMap<String, GovernanceState> = new
            .iter()
            .filter_map(|id| self.setup.published.get(id))
            .filter(|s| s.received_through > 0)
            .map(|s| (s.install_id.clone(), s))
            .collect();
        let marks: Vec<(String, i64)> = published
            .values()
            .map(|s| (s.install_id.clone(), s.received_through))
            .collect();
        // Events reach at most a few months back (the gateway refuses
        // events older than 80 days) and bill to the month they arrive in.
        let months_from = months_from(since);
        // ClickHouse's last Date: every month from `months_from` on.
        let last_date = chrono::NaiveDate::from_ymd_opt(2149, 6, 6).unwrap_or_default();
        let baseline_since = since.div_euclid(HOUR_MS) * HOUR_MS - (BASELINE_HOURS + 1) * HOUR_MS;

        // Independent reads, run at once: the rebuild waits for the slowest
        // rather than their sum. None reads `FINAL`: the raw rows are
        // deduplicated here and the hourly counts by the table's key, and
        // the monthly rollup sums (a SummingMergeTree's parts add up).
        let rows = async {
            ch.query(
                "SELECT install_id, event_id, toUnixTimestamp64Milli(created_at) AS created_at,
                        toUnixTimestamp64Milli(received_at) AS received_at, total_tokens,
                        formatDateTime(billing_month, '%Y-%m') AS billing_month
                 FROM usage_events
                 WHERE install_id IN {ids:Array(String)} AND received_at >= fromUnixTimestamp64Milli({since:Int64})
                 ORDER BY install_id, received_at, created_at, event_id",
            )
            .param("ids", new)
            .param("since", since)
            .fetch_all::<RawCount>()
            .await
            .map_err(EngineError::from)
        };
        let hourly = async {
            ch.query(&format!(
                "SELECT install_id, intDiv({T}, 3600000) * 3600000 AS hour,
                        uniqExact(toDate(created_at), event_id)
                 FROM usage_events
                 WHERE install_id IN {{ids:Array(String)}} AND received_at >= fromUnixTimestamp64Milli({{since:Int64}})
                 GROUP BY install_id, hour"
            ))
            .param("ids", new)
            .param("since", baseline_since)
            .param("grace", grace)
            .fetch_all::<(String, i64, u64)>()
            .await
            .map_err(EngineError::from)
        };
        // The first day (its start once raw events have expired) and the
        // first event on it (cheap: the sorting key starts with install_id
        // and day); the young installations' first events are in `rows`.
        let first_days = async {
            ch.query(
                "SELECT install_id, toInt64(toUnixTimestamp(toDateTime(min(date)))) * 1000
                 FROM usage_daily WHERE install_id IN {ids:Array(String)} GROUP BY install_id",
            )
            .param("ids", new)
            .fetch_all::<(String, i64)>()
            .await
            .map_err(EngineError::from)
        };
        let first_events = async {
            if old.is_empty() {
                return Ok(Vec::new());
            }
            ch.query(&format!(
                "SELECT install_id, min({T}) FROM usage_events
                 WHERE install_id IN {{ids:Array(String)}}
                   AND (install_id, toDate(created_at)) IN
                       (SELECT install_id, min(date) FROM usage_daily
                        WHERE install_id IN {{ids:Array(String)}} GROUP BY install_id)
                 GROUP BY install_id"
            ))
            .param("ids", &old)
            .param("grace", grace)
            .fetch_all::<(String, i64)>()
            .await
            .map_err(EngineError::from)
        };
        let alerts = async {
            ch.query(
                "SELECT install_id, kind, toUnixTimestamp64Milli(at) FROM governance_decisions FINAL
                 WHERE install_id IN {ids:Array(String)} AND kind IN ('cap_warning', 'cap_critical', 'blocked')
                   AND at >= now64(3) - INTERVAL 2 DAY",
            )
            .param("ids", new)
            .fetch_all::<(String, String, i64)>()
            .await
            .map_err(EngineError::from)
        };
        let found = async {
            if marks.is_empty() {
                return Ok(Vec::new());
            }
            ch.query(
                "SELECT install_id, event_id FROM usage_events
                 WHERE (install_id, toUnixTimestamp64Milli(received_at)) IN {marks:Array(Tuple(String, Int64))}",
            )
            .param("marks", &marks)
            .fetch_all::<(String, String)>()
            .await
            .map_err(EngineError::from)
        };
        let totals = self.billed_months(new, month_date(&months_from), last_date);
        let (rows, hourly, first_days, first_events, alerts, found, mut totals) = tokio::try_join!(
            rows,
            hourly,
            first_days,
            first_events,
            alerts,
            found,
            totals
        )?;

        let mut continued: HashSet<String> = HashSet::new();
        for (install, event) in found {
            let in_batch = batch
                .get(install.as_str())
                .is_some_and(|items| items.iter().any(|i| i.event.event_id == event));
            if !in_batch {
                continued.insert(install);
            }
        }
        let rows = distinct_events(rows);
        let first_days: HashMap<String, i64> = first_days.into_iter().collect();
        let mut first_events: HashMap<String, i64> = first_events.into_iter().collect();
        first_events.extend(first_event_of(&young, &rows, &first_days, grace));

        let mut rebuilt: HashMap<String, Installation> = new
            .iter()
            .map(|id| (id.clone(), Installation::default()))
            .collect();
        // Event ids are unique per installation only.
        let batch_ids: HashSet<(&str, &str)> = batch
            .values()
            .flatten()
            .map(|i| (i.event.install_id.as_str(), i.event.event_id.as_str()))
            .collect();
        // The billing month and arrival of each one's latest stored event.
        let mut latest: HashMap<String, (String, i64)> = HashMap::new();
        for r in rows {
            if batch_ids.contains(&(r.install_id.as_str(), r.event_id.as_str())) {
                continue;
            }
            if let Some(state) = rebuilt.get_mut(&r.install_id) {
                let t = periods::governance_time(r.created_at, r.received_at, grace);
                state
                    .windows
                    .apply(&self.setup.windows, t, u64::from(r.total_tokens));
                latest.insert(r.install_id, (r.billing_month, r.received_at));
            }
        }
        let mut baselines: HashMap<String, BTreeMap<i64, u64>> = HashMap::new();
        for (install, hour, n) in hourly {
            baselines.entry(install).or_default().insert(hour, n);
        }
        for (id, state) in &mut rebuilt {
            let mut hourly = baselines.remove(id).unwrap_or_default();
            for i in batch.get(id.as_str()).into_iter().flatten() {
                if let Some(n) = hourly.get_mut(&(i.t.div_euclid(HOUR_MS) * HOUR_MS)) {
                    *n = n.saturating_sub(1);
                }
            }
            // Never later than its registration: one event dated long ago,
            // sent after an eviction, must not make the installation look
            // new (and switch spike detection off for a day).
            let first_seen = first_events.get(id).or(first_days.get(id)).copied();
            let registered = self.setup.plans.registered_at(id);
            let first_seen = match (first_seen, registered) {
                (Some(f), Some(r)) => Some(f.min(r)),
                (f, r) => f.or(r),
            };
            state.restore(hourly, first_seen);
        }
        for (install, kind, at) in alerts {
            // Alerts made by recovered events are not remembered: an
            // attempt that stored them and died before Kafka had them is
            // made good by deriving them again (same ids).
            if recovered_from.get(&install).is_some_and(|from| at >= *from) {
                continue;
            }
            let level = match kind.as_str() {
                "cap_warning" => Level::Warning,
                "cap_critical" => Level::Critical,
                _ => Level::Blocked,
            };
            if let Some(state) = rebuilt.get_mut(&install) {
                let day = DateTime::<Utc>::from_timestamp_millis(at)
                    .unwrap_or_default()
                    .date_naive();
                let month = periods::month_key(periods::month_start(at));
                state.remember_alert(level, month, day);
            }
        }
        // The state as it was after the installation's last stored event
        // (this batch aside), so decisions already made are not made again:
        // the published one when it is this timeline's, else derived from
        // ClickHouse alone (a replay into an empty database starts from
        // nothing, exactly as the original run did).
        let mut before_batch: BTreeSet<(String, String)> = BTreeSet::new();
        for (id, state) in &mut rebuilt {
            if let Some(s) = published.get(id).filter(|_| continued.contains(id)) {
                state.last = Some(s.clone());
                continue;
            }
            let Some((month, _)) = latest.get(id) else {
                continue;
            };
            before_batch.insert((id.clone(), month.clone()));
        }
        // This batch's events are counted by the caller, as they are evaluated.
        for (id, items) in batch {
            for i in items {
                if let Some(n) = totals.get_mut(&(id.to_string(), i.month.clone())) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        for (id, month) in &before_batch {
            let at = rebuilt
                .get(id)
                .map_or(i64::MIN, |s| s.windows.max_event_time);
            let received = latest.get(id).map_or(0, |(_, r)| *r);
            let plan = self.plan_at(id, received);
            if let Some(state) = rebuilt.get_mut(id) {
                let used = totals
                    .get(&(id.clone(), month.clone()))
                    .copied()
                    .unwrap_or_default();
                // Its decisions were made (and published) when it happened.
                let _ = state.evaluate(
                    Counted {
                        install_id: id,
                        plan: &plan,
                        at,
                        received,
                        month,
                        month_used: used,
                    },
                    &self.setup.policy,
                    &self.setup.windows,
                );
            }
        }
        let mut months: HashMap<String, HashMap<String, u64>> = HashMap::new();
        for ((id, month), n) in totals {
            months.entry(id).or_default().insert(month, n);
        }
        let now = Instant::now();
        for (id, state) in rebuilt {
            let months = months.remove(&id).unwrap_or_default();
            self.installs.insert(
                id,
                Held {
                    state,
                    touched: now,
                    months,
                    months_from: months_from.clone(),
                },
            );
        }
        Ok(())
    }

    /// Exact generations per (install_id, billing month `YYYY-MM`) from the
    /// monthly rollup: the rows of the month itself, and the rows of
    /// earlier months billed to it (`late_billing_month`, migration 0011).
    async fn monthly(
        &self,
        keys: &BTreeMap<(String, String), u64>,
    ) -> Result<HashMap<(String, String), u64>, EngineError> {
        let (Some(first), Some(last)) = (
            keys.keys().map(|(_, m)| month_date(m)).min(),
            keys.keys().map(|(_, m)| month_date(m)).max(),
        ) else {
            return Ok(HashMap::new());
        };
        // Late events reach at most a few months back (the gateway refuses
        // events older than 80 days); their rows sit in those months. An
        // event dated a few minutes ahead at a month's end is billed to the
        // month it arrived in, but its rows sit in the next one.
        let from = first
            .checked_sub_months(chrono::Months::new(3))
            .unwrap_or(first);
        let last = last
            .checked_add_months(chrono::Months::new(1))
            .unwrap_or(last);
        let ids: Vec<&str> = keys
            .keys()
            .map(|(i, _)| i.as_str())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut totals = HashMap::new();
        for ids in ids.chunks(IDS_PER_QUERY) {
            totals.extend(
                self.billed_months(ids, from, last)
                    .await?
                    .into_iter()
                    .filter(|(k, _)| keys.contains_key(k)),
            );
        }
        Ok(totals)
    }

    /// Generations per (install_id, billing month `YYYY-MM`) of these
    /// installations, from the monthly rows of months `from..=to`.
    async fn billed_months<S: AsRef<str> + serde::Serialize>(
        &self,
        ids: &[S],
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
    ) -> Result<HashMap<(String, String), u64>, EngineError> {
        let rows: Vec<(String, String, u64)> = self
            .setup
            .clickhouse
            .query(
                "SELECT install_id,
                        formatDateTime(if(late_billing_month = toDate(0), month, late_billing_month), '%Y-%m') AS billed,
                        sum(requests)
                 FROM usage_monthly
                 WHERE install_id IN {ids:Array(String)} AND month >= {from:Date} AND month <= {to:Date}
                 GROUP BY install_id, billed",
            )
            .param("ids", ids)
            .param("from", from.to_string())
            .param("to", to.to_string())
            .fetch_all()
            .await?;
        Ok(rows.into_iter().map(|(i, m, n)| ((i, m), n)).collect())
    }

    /// The events of a batch governance must count: the fresh ones, and
    /// the already stored ones that were never governed.
    ///
    /// A processor that dies between writing a batch and publishing its
    /// decisions leaves the batch stored and uncommitted. Its redelivery
    /// finds every event stored, yet no state counted them: the
    /// installation is not in memory (the instance restarted, or the
    /// partition moved), and its published state counted only events that
    /// arrived before them (`received_through`; governance time `as_of` for
    /// a state published before that field existed). Those are counted now,
    /// so the block or the alert they cause is published (with the decision
    /// ids it would have had). A resend, or a replay into the same
    /// database, finds them governed and leaves them out. An event stored
    /// out of arrival order (before the mark) is left out too; the rebuild
    /// still counts it from ClickHouse.
    ///
    /// Decided once per batch, before any rebuild: a failed attempt can
    /// leave some installations rebuilt in memory.
    pub fn to_govern(&self, events: &[UsageEvent], fresh: &[usize], stored: &[usize]) -> Governed {
        let mut governed_until: HashMap<&str, Option<(i64, i64)>> = HashMap::new();
        let mut chosen = Governed {
            indices: fresh.to_vec(),
            seen_through: HashMap::new(),
            recovered_from: HashMap::new(),
        };
        for e in fresh.iter().chain(stored).filter_map(|i| events.get(*i)) {
            let r = chosen
                .seen_through
                .entry(e.install_id.clone())
                .or_insert(e.received_at);
            *r = (*r).max(e.received_at);
        }
        for &i in stored {
            let Some(e) = events.get(i) else { continue };
            let install = e.install_id.as_str();
            if self.installs.contains_key(install) {
                continue;
            }
            let mark = *governed_until.entry(install).or_insert_with(|| {
                self.setup
                    .published
                    .get(install)
                    .map(|s| (s.received_through, s.as_of))
            });
            let t = self.time_of(e);
            let governed = match mark {
                None => false,
                Some((received_through, _)) if received_through > 0 => {
                    e.received_at <= received_through
                }
                Some((_, as_of)) => t <= as_of,
            };
            if !governed {
                chosen.indices.push(i);
                let from = chosen
                    .recovered_from
                    .entry(install.to_string())
                    .or_insert(t);
                *from = (*from).min(t);
            }
        }
        let recovered = chosen.indices.len() - fresh.len();
        if recovered > 0 {
            if let Some(c) = &self.setup.metrics.recovered {
                c.inc_by(recovered as u64);
            }
            tracing::info!(
                events = recovered,
                "stored events never governed (an earlier attempt died): counting them now"
            );
            // Topic order, as they were written.
            chosen.indices.sort_unstable();
        }
        chosen
    }

    /// Counts the events `to_govern` chose and publishes what changed.
    pub async fn on_batch(
        &mut self,
        events: &[UsageEvent],
        governed: &Governed,
    ) -> Result<(), EngineError> {
        if governed.indices.is_empty() {
            let changed = self.seen_through(governed, &HashSet::new());
            if changed.is_empty() {
                return Ok(());
            }
            self.unpublished = Some((changed, Vec::new()));
            return self.retry_publish().await;
        }
        let _timer = self
            .setup
            .metrics
            .batch_seconds
            .as_ref()
            .map(|h| h.start_timer());
        // Each installation's events, in topic order, grouped once.
        let mut installs: Vec<&str> = Vec::new();
        let mut by_install: HashMap<&str, Vec<Item<'_>>> = HashMap::new();
        let mut batch_months: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut earliest = i64::MAX;
        for e in governed.indices.iter().filter_map(|i| events.get(*i)) {
            let item = Item {
                event: e,
                t: self.time_of(e),
                month: periods::month_key(crate::rollup::billing_month(e)),
            };
            earliest = earliest.min(item.t);
            *batch_months
                .entry((e.install_id.clone(), item.month.clone()))
                .or_default() += 1;
            let items = by_install.entry(e.install_id.as_str()).or_default();
            if items.is_empty() {
                installs.push(&e.install_id);
            }
            items.push(item);
        }
        // Every accepted event's installation was registered on the registry
        // topic before the gateway accepted it, so the plans follower will
        // know it: wait for that rather than govern with a guessed plan.
        // One deadline for the whole batch, so unknown installations (e.g.
        // erased meanwhile) cannot stall it for long.
        let deadline = Instant::now() + Duration::from_secs(10);
        for install in &installs {
            while self.setup.plans.plan(install).is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if self.setup.plans.plan(install).is_none() {
                tracing::warn!(%install, "plan still unknown; governing with the default plan");
            }
        }
        let since =
            earliest - self.setup.windows.long.length_ms() - self.setup.windows.lateness_ms();
        self.rebuild(&installs, &by_install, since, &governed.recovered_from)
            .await?;
        // Monthly counts come from memory; a month before what the rebuild
        // loaded (rare: an event billed months back) is read from ClickHouse.
        let mut base: HashMap<(String, String), u64> = HashMap::new();
        let mut unknown: BTreeMap<(String, String), u64> = BTreeMap::new();
        for (key, n) in &batch_months {
            let (install, month) = key;
            match self.installs.get(install.as_str()) {
                Some(held) if *month >= held.months_from => {
                    base.insert(key.clone(), held.months.get(month).copied().unwrap_or(0));
                }
                _ => {
                    unknown.insert(key.clone(), *n);
                }
            }
        }
        if !unknown.is_empty() {
            let totals = self.monthly(&unknown).await?;
            for (key, n) in &unknown {
                let total = totals.get(key).copied().unwrap_or_default();
                base.insert(key.clone(), total.saturating_sub(*n));
            }
        }

        let mut counted: HashMap<(String, String), u64> = HashMap::new();
        let mut changed: Vec<GovernanceState> = Vec::new();
        let mut decisions: Vec<Decision> = Vec::new();
        let now = Instant::now();
        for install in installs {
            let plans = self.setup.plans.clone();
            let Some(held) = self.installs.get_mut(install) else {
                continue;
            };
            held.touched = now;
            let state = &mut held.state;
            for item in by_install.get(install).into_iter().flatten() {
                let e = item.event;
                let tokens = u64::try_from(e.total_tokens).unwrap_or_default();
                if state.count(&self.setup.windows, item.t, tokens) == Applied::TooLate {
                    if let Some(c) = &self.setup.metrics.too_late {
                        c.inc();
                    }
                }
                // Plans change on the gateways' clock: a change between the
                // last evaluation and this event's arrival is decided at its
                // own time first, as the live run did when it happened.
                if let Some(last) = state.last.clone() {
                    let arrived = e.received_at.max(last.as_of);
                    if let Some((since, plan)) = plans.change_between(install, last.as_of, arrived)
                    {
                        if plan != last.plan {
                            let (_, d) = state.evaluate(
                                Counted {
                                    install_id: install,
                                    plan: &plan,
                                    at: since,
                                    received: 0,
                                    month: &last.month,
                                    month_used: u64::try_from(last.monthly_used).unwrap_or(0),
                                },
                                &self.setup.policy,
                                &self.setup.windows,
                            );
                            decisions.extend(d);
                        }
                    }
                }
                let key = (install.to_string(), item.month.clone());
                let k = counted.entry(key.clone()).or_default();
                *k += 1;
                let used = base.get(&key).copied().unwrap_or_default() + *k;
                // The plan in force when it arrived (never one older than
                // a change already acted on).
                let plan_time = e
                    .received_at
                    .max(state.last.as_ref().map_or(i64::MIN, |s| s.as_of));
                let plan = plans
                    .plan_at(install, plan_time)
                    .unwrap_or_else(|| "free".into());
                let (_, d) = state.evaluate(
                    Counted {
                        install_id: install,
                        plan: &plan,
                        at: item.t,
                        received: e.received_at,
                        month: &item.month,
                        month_used: used,
                    },
                    &self.setup.policy,
                    &self.setup.windows,
                );
                decisions.extend(d);
            }
            if let Some(last) = state.last.as_mut() {
                let through = governed.seen_through.get(install).copied().unwrap_or(0);
                last.received_through = last.received_through.max(through);
                if !self.setup.published.holds(last) {
                    changed.push(last.clone());
                }
            }
        }
        for ((install, month), k) in &counted {
            if let Some(held) = self.installs.get_mut(install.as_str()) {
                let n = base
                    .get(&(install.clone(), month.clone()))
                    .copied()
                    .unwrap_or(0)
                    + k;
                held.months.insert(month.clone(), n);
            }
        }
        let counted: HashSet<&str> = by_install.keys().copied().collect();
        changed.extend(self.seen_through(governed, &counted));
        self.report_size();
        self.unpublished = Some((changed, decisions));
        self.retry_publish().await
    }

    /// The states of installations whose events in this batch were all
    /// counted already (resends), moved past them (`Governed::seen_through`).
    fn seen_through(
        &mut self,
        governed: &Governed,
        counted: &HashSet<&str>,
    ) -> Vec<GovernanceState> {
        let mut changed = Vec::new();
        for (install, through) in &governed.seen_through {
            if counted.contains(install.as_str()) {
                continue;
            }
            let held = self
                .installs
                .get_mut(install)
                .and_then(|h| h.state.last.as_mut());
            let state = match held {
                Some(last) => {
                    last.received_through = last.received_through.max(*through);
                    Some(last.clone())
                }
                None => self.setup.published.get(install).map(|mut s| {
                    s.received_through = s.received_through.max(*through);
                    s
                }),
            };
            if let Some(s) = state.filter(|s| !self.setup.published.holds(s)) {
                changed.push(s);
            }
        }
        changed
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

    /// Acts on this installation's plan change again in a second: acting
    /// on it failed (e.g. Kafka refused the new state).
    pub fn retry_plan_change(&self, install_id: &str) {
        self.setup
            .plans
            .retry_later(install_id.to_string(), Duration::from_secs(1));
    }

    /// When `install_id`'s current plan took effect (0 when unknown).
    pub fn plan_changed_at(&self, install_id: &str) -> i64 {
        self.setup.plans.current_since(install_id).unwrap_or(0)
    }

    /// Installations whose published state predates their current plan (a
    /// plan change no owner acted on, e.g. during a rebalance).
    pub fn plans_not_yet_applied(&self) -> Vec<String> {
        self.setup.published.stale_plans(&self.setup.plans)
    }

    /// Re-evaluates an installation whose plan changed (an upgrade unblocks it
    /// at once, without waiting for its next event), at the time the plan
    /// took effect, as a replay of its events will. Only the owner of its
    /// partition (`owned`) acts; an owner that no longer holds it in memory
    /// (it went idle, or the processor restarted) rebuilds it first.
    pub async fn on_plan_change(
        &mut self,
        install_id: &str,
        owned: bool,
    ) -> Result<(), EngineError> {
        let Some(previous) = self.setup.published.get(install_id) else {
            return Ok(());
        };
        let (Some(plan), Some(since)) = (
            self.setup.plans.plan(install_id),
            self.setup.plans.current_since(install_id),
        ) else {
            return Ok(());
        };
        if !owned || plan == previous.plan {
            return Ok(());
        }
        let from =
            previous.as_of - self.setup.windows.long.length_ms() - self.setup.windows.lateness_ms();
        self.rebuild(&[install_id], &HashMap::new(), from, &HashMap::new())
            .await?;
        let Some(held) = self.installs.get_mut(install_id) else {
            return Ok(());
        };
        held.touched = Instant::now();
        // Decisions are relative to what the gateways enforce now.
        held.state.last = Some(previous.clone());
        let (s, d) = held.state.evaluate(
            Counted {
                install_id,
                plan: &plan,
                at: since.max(previous.as_of),
                received: 0,
                month: &previous.month,
                month_used: u64::try_from(previous.monthly_used).unwrap_or_default(),
            },
            &self.setup.policy,
            &self.setup.windows,
        );
        self.publish(vec![s], d).await
    }

    async fn publish(
        &mut self,
        states: Vec<GovernanceState>,
        decisions: Vec<Decision>,
    ) -> Result<(), EngineError> {
        // In this order: the history, the decisions topic, then the states.
        // The published state is what marks the batch governed
        // (`to_govern`): an attempt that dies before it is acknowledged
        // leaves the redelivered batch to be governed again, deriving the
        // same decisions (same ids; the history deduplicates them), so
        // nothing written before the death is missing after it.
        if !decisions.is_empty() {
            let mut insert = self
                .setup
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
                        phase: d.phase.clone(),
                        episode_id: d.episode_id.clone().unwrap_or_default(),
                        until: d.until.and_then(DateTime::<Utc>::from_timestamp_millis),
                    })
                    .await?;
            }
            insert.end().await?;
            self.decision_batches_stored += 1;
            if self.setup.crash_after_decisions_stored == Some(self.decision_batches_stored) {
                tracing::error!(
                    "crash-after-decisions-stored fault injection: aborting before Kafka"
                );
                std::process::abort();
            }
        }
        let topics = &self.setup.kafka;
        self.send_acknowledged(&topics.decisions_topic, &decisions, |d| &d.install_id)
            .await?;
        self.send_acknowledged(&topics.governance_topic, &states, |s| &s.install_id)
            .await?;
        if let Some(c) = &self.setup.metrics.decisions {
            c.inc_by(decisions.len() as u64);
        }
        for d in &decisions {
            // Starts, ends and alerts are news; an extension is not.
            if d.phase == "extended" {
                tracing::debug!(install_id = %d.install_id, kind = %d.kind, reason = %d.reason, "governance episode extended");
            } else {
                tracing::info!(install_id = %d.install_id, kind = %d.kind, phase = %d.phase, reason = %d.reason, "governance decision");
            }
        }
        for s in states {
            self.setup.published.insert(s);
        }
        Ok(())
    }

    /// Sends `records` to `topic`, each keyed by its installation, and waits
    /// until Kafka has acknowledged every one of them.
    async fn send_acknowledged<R: AvroRecord>(
        &self,
        topic: &str,
        records: &[R],
        key: fn(&R) -> &str,
    ) -> Result<(), EngineError> {
        let encoded = records
            .iter()
            .map(|r| r.to_wire().map(|bytes| (key(r), bytes)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Kafka(e.to_string()))?;
        let outgoing: Vec<Outgoing<'_>> =
            encoded.iter().map(|(k, v)| Outgoing::new(k, v)).collect();
        send_acknowledged(&self.setup.producer, topic, &outgoing, kafka_deadline())
            .await
            .map_err(|e| EngineError::Kafka(e.to_string()))
    }
}

/// How long one governance send may wait for Kafka before the batch's
/// publication is retried. A resend after a timeout repeats the same
/// states (a compacted topic) and decisions with the same ids, which
/// readers take once.
fn kafka_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(install: &str, event: &str, created_at: i64, received_at: i64) -> RawCount {
        RawCount {
            install_id: install.into(),
            event_id: event.into(),
            created_at,
            received_at,
            total_tokens: 1,
            billing_month: "2026-12".into(),
        }
    }

    #[test]
    fn an_event_stored_twice_counts_once_at_its_first_arrival() {
        let day = 20_000 * DAY_MS;
        let rows = vec![
            raw("a", "e1", day + 10, day + 10),
            raw("a", "e2", day + 20, day + 20),
            raw("a", "e1", day + 10, day + 30),
            // The same id on another day is another event (the table's key).
            raw("a", "e1", day + DAY_MS + 5, day + DAY_MS + 5),
            // Ids are unique per installation only.
            raw("b", "e1", day + 10, day + 10),
        ];
        let kept: Vec<(String, String, i64)> = distinct_events(rows)
            .into_iter()
            .map(|r| (r.install_id, r.event_id, r.received_at))
            .collect();
        assert_eq!(
            kept,
            vec![
                ("a".into(), "e1".into(), day + 10),
                ("a".into(), "e2".into(), day + 20),
                ("a".into(), "e1".into(), day + DAY_MS + 5),
                ("b".into(), "e1".into(), day + 10),
            ]
        );
    }

    #[test]
    fn the_first_event_is_the_earliest_governance_time_of_the_first_day() {
        let day = 20_000 * DAY_MS;
        let grace = 60_000;
        let rows = vec![
            // Dated an hour before it arrived: clamped to arrival - grace.
            raw("a", "e1", day + 3_600_000, day + 7_200_000),
            raw("a", "e2", day + 7_000_000, day + 7_000_000),
            // Next day: earlier governance time, yet not on the first day
            // (as ClickHouse's query over the first day has it).
            raw("a", "e3", day + DAY_MS + 1, day + 6_000_000),
            raw("b", "e1", day + 5, day + 5),
            raw("c", "e1", day + 5, day + 5),
        ];
        let first_days: HashMap<String, i64> =
            [("a".to_string(), day), ("b".to_string(), day)].into();
        let a = "a".to_string();
        let c = "c".to_string();
        let mut first = first_event_of(&[&a, &c], &rows, &first_days, grace);
        first.sort();
        // b is not asked for; c has no first day (no daily row yet).
        assert_eq!(first, vec![("a".to_string(), day + 7_000_000)]);
    }
}

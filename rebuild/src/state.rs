//! Where a rebuild is: one JSON document in `<shadow>.rebuild_state`,
//! written after every step that must not be done twice, so that a
//! rebuild killed at any point (`kill -9` included) resumes from it.
//!
//! The document only ever grows a new version (ReplacingMergeTree by
//! `version`); reading takes the highest. Each step is either idempotent
//! by construction (a month partition dropped and written again; rows
//! of an interrupted partition deleted and read again) or recorded before it writes, with
//! deduplication tokens derived from what was recorded (catch-up chunks).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use crate::config::Source;
use crate::error::RebuildError;
use crate::scope::Scope;

/// The tables a rebuild replaces, in the order they are swapped.
pub const TABLES: [&str; 4] = [
    "usage_events",
    "usage_daily",
    "usage_install_daily",
    "usage_monthly",
];

/// The build's phases, in order.
pub const PHASE_RAW: &str = "raw";
pub const PHASE_DAILY: &str = "daily";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildState {
    /// In every deduplication token, so tokens of two rebuilds never meet.
    pub id: String,
    pub scope: Scope,
    pub source: Source,
    pub started_at: DateTime<Utc>,
    /// Per partition of the events topic, the first offset the build
    /// covers: the log start (topic source), or the live group's committed
    /// offset when the raw table was read (table source: every event
    /// before it was in the table).
    pub from: BTreeMap<i32, i64>,
    /// Topic source: the end offsets sampled at the start; the bulk phase
    /// reads `[from, to)`.
    pub to: BTreeMap<i32, i64>,
    /// Topic source: the next offset the bulk phase reads, per partition.
    pub position: BTreeMap<i32, i64>,
    /// Per phase, the month partitions (`YYYYMM`) finished.
    pub months_done: BTreeMap<String, Vec<u32>>,
    /// The phases finished.
    pub phases_done: Vec<String>,
    /// The next offset applied to the shadow tables by catch-up, per
    /// partition (starts at `to`, or `from` for the table source).
    pub applied: BTreeMap<i32, i64>,
    /// A catch-up chunk recorded before its writes: redone with exactly
    /// these ranges (inclusive) if the rebuild died mid-way.
    pub pending: Option<BTreeMap<i32, (i64, i64)>>,
    pub swap: Option<SwapState>,
    /// Events stored by the raw phase (first copies in the scope).
    pub events_staged: u64,
    /// Messages the raw phase read and did not store: copies, other
    /// installations or days, erased installations.
    pub events_skipped: u64,
    /// Inserts of the raw phase (of at least one event).
    #[serde(default)]
    pub chunks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapState {
    /// 1 for the first attempt; an interrupted swap starts again with the
    /// next, after cleaning what the earlier one assembled.
    pub attempt: u32,
    /// Per partition, the next offset the live tables hold nothing of at
    /// the fence (the live group's committed offsets once quiet).
    pub target: BTreeMap<i32, i64>,
    /// Per table, the UUID of the shadow table before the exchange: after
    /// it, the live name carries it, which is how a resumed swap knows
    /// which tables were exchanged already.
    pub shadow_uuids: BTreeMap<String, String>,
    pub swapped_at: Option<DateTime<Utc>>,
    pub keep_until: Option<DateTime<Utc>>,
    pub rollback: Option<RollbackState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackState {
    pub target: BTreeMap<i32, i64>,
    /// UUIDs of the kept tables before they are exchanged back.
    pub kept_uuids: BTreeMap<String, String>,
    pub done_at: Option<DateTime<Utc>>,
}

impl RebuildState {
    pub fn new(scope: Scope, source: Source) -> Self {
        Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            scope,
            source,
            started_at: Utc::now(),
            from: BTreeMap::new(),
            to: BTreeMap::new(),
            position: BTreeMap::new(),
            months_done: BTreeMap::new(),
            phases_done: Vec::new(),
            applied: BTreeMap::new(),
            pending: None,
            swap: None,
            events_staged: 0,
            events_skipped: 0,
            chunks: 0,
        }
    }

    pub fn phase_done(&self, phase: &str) -> bool {
        self.phases_done.iter().any(|p| p == phase)
    }

    pub fn finish_phase(&mut self, phase: &str) {
        if !self.phase_done(phase) {
            self.phases_done.push(phase.to_string());
        }
    }

    pub fn month_done(&self, phase: &str, month: u32) -> bool {
        self.months_done
            .get(phase)
            .is_some_and(|m| m.contains(&month))
    }

    pub fn finish_month(&mut self, phase: &str, month: u32) {
        let months = self.months_done.entry(phase.to_string()).or_default();
        if !months.contains(&month) {
            months.push(month);
        }
    }

    pub fn built(&self) -> bool {
        self.phase_done(PHASE_DAILY)
    }

    pub fn swapped(&self) -> bool {
        self.swap.as_ref().is_some_and(|s| s.swapped_at.is_some())
    }

    pub fn rolled_back(&self) -> bool {
        self.swap
            .as_ref()
            .and_then(|s| s.rollback.as_ref())
            .is_some_and(|r| r.done_at.is_some())
    }
}

#[derive(Debug, Row, Serialize, Deserialize)]
struct StateRow {
    version: u64,
    doc: String,
}

/// The state table, in the shadow database.
pub const STATE_DDL: &str = "CREATE TABLE IF NOT EXISTS rebuild_state
(
    version UInt64,
    doc     String,
    at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY tuple()";

/// Reads and writes the state of the rebuild in one shadow database.
pub struct StateStore {
    client: Client,
    database: String,
    version: u64,
}

impl StateStore {
    pub fn new(shadow: Client, database: &str) -> Self {
        Self {
            client: shadow,
            database: database.to_string(),
            version: 0,
        }
    }

    /// The latest state, if a rebuild was started in this database.
    pub async fn load(&mut self) -> Result<Option<RebuildState>, RebuildError> {
        // Asked of the server: the shadow database may not exist yet.
        let exists: u64 = self
            .client
            .clone()
            .with_database("system")
            .query("SELECT count() FROM system.tables WHERE database = {db:String} AND name = 'rebuild_state'")
            .param("db", &self.database)
            .fetch_one()
            .await?;
        if exists == 0 {
            return Ok(None);
        }
        let row: Option<StateRow> = self
            .client
            .query("SELECT version, doc FROM rebuild_state ORDER BY version DESC LIMIT 1")
            .fetch_optional()
            .await?;
        let Some(row) = row else { return Ok(None) };
        self.version = row.version;
        serde_json::from_str(&row.doc)
            .map(Some)
            .map_err(|source| RebuildError::State {
                database: self.database.clone(),
                source,
            })
    }

    pub async fn save(&mut self, state: &RebuildState) -> Result<(), RebuildError> {
        self.version += 1;
        let doc = serde_json::to_string(state).map_err(|source| RebuildError::State {
            database: self.database.clone(),
            source,
        })?;
        let mut insert = self.client.insert::<StateRow>("rebuild_state").await?;
        insert
            .write(&StateRow {
                version: self.version,
                doc,
            })
            .await?;
        insert.end().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips_through_json() {
        let mut s = RebuildState::new(Scope::default(), Source::Topic);
        s.from.insert(0, 5);
        s.finish_month(PHASE_DAILY, 202611);
        s.finish_month(PHASE_DAILY, 202611);
        s.finish_phase(PHASE_RAW);
        s.pending = Some(BTreeMap::from([(3, (10, 19))]));
        let back: RebuildState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.months_done[PHASE_DAILY], vec![202611]);
        assert!(back.phase_done(PHASE_RAW));
        assert!(!back.built());
        assert!(!back.swapped());
    }
}

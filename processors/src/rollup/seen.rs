//! The event ids already in `usage_events`, per (installation, day), kept
//! by the processor that owns the installation's partition.
//!
//! Why: telling first-seen events from duplicates is the write path's one
//! read. Asked of ClickHouse for every batch, it re-reads every stored event
//! of each (installation, day) the batch touches, so a busy installation's
//! day costs its whole history again at every batch (BENCHMARKS.md, issue
//! 13). Every event of an installation goes to one partition, and every
//! partition has one owner, so the owner can read an (installation, day)
//! once and then keep it up to date itself with what it writes.
//!
//! Exact as long as the cache equals what ClickHouse holds for each kept
//! (installation, day):
//! - an (installation, day) is read whole from ClickHouse the first time a
//!   batch touches it, and again after it was forgotten;
//! - the ids of a batch are added only once its raw events were inserted;
//!   when any step of a flush fails, every (installation, day) of the batch
//!   is forgotten, since ClickHouse may hold more than the cache knows;
//! - on a rebalance the consumer forgets everything ([`SeenIds::clear`]);
//! - an installation whose erasure time changed since it was read is
//!   forgotten before the batch is looked up (its rows were deleted).
//!
//! Some (installation, day) pairs need no read at all: those no event
//! received before this instance took its partitions over can have, of an
//! installation none of whose days was forgotten since ([`Ownership`]). Every event of them went
//! through this instance, so the ids it keeps are all there are: an
//! installation registered after the takeover (a new site's first day, or
//! a bench's fleet), and a day that began an hour or more after it (every
//! installation's new day at midnight UTC).
//!
//! Two writers of one installation at once (two consumer groups on the same
//! tables) are not exact with or without the cache: the ledger orders one
//! group's batches only. Rows that disappear behind the processors' back
//! other than by an erasure (an operator's DELETE, `usage_events` swapped
//! for a rebuilt table) are not seen either: restart the processors after
//! such an operation, so that they read the days again.
//!
//! The key is `(install_id, day of created_at, event_id)`, the sorting key
//! of `usage_events`, whose ReplacingMergeTree keeps one row per key: the
//! plugin resends an event with its stored `created_at`, so a resend has the
//! same key.

use std::collections::{HashMap, HashSet};

use chrono::NaiveDate;
use clickhouse::Client;
use sha2::{Digest, Sha256};

/// Bytes of (installation, day) pairs per query parameter (ClickHouse caps
/// one at 128 KiB, `http_max_field_value_size`).
const PARAM_BYTES: usize = 100_000;

/// An event id in 16 bytes: the contract's `evt_` + 32 lowercase hex digits
/// are that number exactly; any other id (older data, another spelling) is
/// its SHA-256, truncated.
pub type IdKey = u128;

pub fn id_key(event_id: &str) -> IdKey {
    if let Some(hex) = event_id.strip_prefix("evt_") {
        if hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            if let Ok(n) = u128::from_str_radix(hex, 16) {
                return n;
            }
        }
    }
    // 128 bits of SHA-256: a collision with another id is as unlikely as
    // one of SHA-256 truncated to 128 bits (nobody can aim for one).
    let digest = Sha256::digest(event_id.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(first)
}

/// One (installation, day) of stored events.
struct Day {
    ids: HashSet<IdKey>,
    /// The installation's erasure time (ms) when this was read, if any.
    erased_at: Option<i64>,
    /// When it was last used (the flush counter): the least recently used
    /// are forgotten first.
    used: u64,
}

/// An (installation, day) pair, borrowed from the batch's events.
pub type DayKey<'a> = (&'a str, NaiveDate);

/// An installation's registration time (ms), from the registry.
pub type RegisteredAt = std::sync::Arc<dyn Fn(&str) -> Option<i64> + Send + Sync>;

/// A day that begins this long after the takeover holds no event read by
/// an earlier owner: the gateway accepts `created_at` at most
/// `max_future_secs` (300 s by default) ahead of its clock.
const NEW_DAY_MARGIN_MS: i64 = 3_600_000;

/// What tells an (installation, day) that only this instance wrote.
pub struct Ownership {
    pub registered_at: RegisteredAt,
    /// How far the gateways' clocks (which stamp registrations) may be
    /// from this processor's.
    pub clock_margin_ms: i64,
}

pub struct SeenIds {
    /// Installation, then day: looked up with the events' borrowed ids,
    /// no allocation per event.
    installs: HashMap<String, HashMap<NaiveDate, Day>>,
    /// Ids kept over all days, bounded by `max_ids`.
    ids: usize,
    max_ids: usize,
    clock: u64,
    ownership: Option<Ownership>,
    /// When this instance took its partitions over (ms, its clock).
    assigned_at: Option<i64>,
    /// Installations with days forgotten since `assigned_at` (a failed
    /// flush, the memory bound, an erasure): ClickHouse may hold ids of
    /// theirs that are not kept, so their days are read.
    lost: HashSet<String>,
    /// Pairs kept empty without a read, since start.
    known_empty: usize,
}

impl SeenIds {
    pub fn new(max_ids: usize) -> Self {
        Self {
            installs: HashMap::new(),
            ids: 0,
            max_ids,
            clock: 0,
            ownership: None,
            assigned_at: None,
            lost: HashSet::new(),
            known_empty: 0,
        }
    }

    /// Tells which pairs need no read (module docs); without it every pair
    /// not kept is read.
    pub fn with_ownership(mut self, ownership: Ownership) -> Self {
        self.ownership = Some(ownership);
        self
    }

    /// The time of the consumer's latest assignment: a new one starts a
    /// new stretch of sole ownership.
    pub fn assigned_at(&mut self, at: Option<i64>) {
        if at != self.assigned_at {
            self.assigned_at = at;
            self.lost.clear();
        }
    }

    /// Whether every stored event of `(install, day)` was written by this
    /// instance since it took the partitions over.
    fn only_ours(&self, (install, day): DayKey<'_>) -> bool {
        let (Some(ownership), Some(since)) = (&self.ownership, self.assigned_at) else {
            return false;
        };
        if self.lost.contains(install) {
            return false;
        }
        let day_start = day
            .and_hms_opt(0, 0, 0)
            .map_or(i64::MIN, |t| t.and_utc().timestamp_millis());
        day_start >= since.saturating_add(NEW_DAY_MARGIN_MS)
            || (ownership.registered_at)(install)
                .is_some_and(|r| r >= since.saturating_add(ownership.clock_margin_ms))
    }

    fn day(&self, (install, day): DayKey<'_>) -> Option<&Day> {
        self.installs.get(install)?.get(&day)
    }

    /// (installation, day) pairs kept.
    pub fn days(&self) -> usize {
        self.installs.values().map(HashMap::len).sum()
    }

    /// Pairs kept empty without a read (only this instance wrote them), since start.
    pub fn known_empty(&self) -> usize {
        self.known_empty
    }

    /// Ids kept.
    pub fn ids(&self) -> usize {
        self.ids
    }

    pub fn clear(&mut self) {
        self.installs.clear();
        self.ids = 0;
        self.assigned_at = None;
        self.lost.clear();
    }

    pub fn forget<'a>(&mut self, keys: impl IntoIterator<Item = DayKey<'a>>) {
        for (install, day) in keys {
            // ClickHouse may hold ids of this day that are not kept.
            if self.assigned_at.is_some() && !self.lost.contains(install) {
                self.lost.insert(install.to_string());
            }
            let Some(days) = self.installs.get_mut(install) else {
                continue;
            };
            if let Some(kept) = days.remove(&day) {
                self.ids -= kept.ids.len();
            }
            if days.is_empty() {
                self.installs.remove(install);
            }
        }
    }

    /// Forgets every kept day of an installation whose erasure time is not
    /// the one it was read with (`erased`: install id to erasure time, for
    /// the installations of the batch).
    pub fn forget_erased(&mut self, erased: &HashMap<String, i64>) {
        for (install, at) in erased {
            let stale = self
                .installs
                .get(install)
                .is_some_and(|days| days.values().any(|d| d.erased_at != Some(*at)));
            if let Some(days) = stale.then(|| self.installs.remove(install)).flatten() {
                self.ids -= days.values().map(|d| d.ids.len()).sum::<usize>();
                if self.assigned_at.is_some() {
                    self.lost.insert(install.clone());
                }
            }
        }
    }

    /// Which of `keys` are not kept and must be read from ClickHouse; those
    /// only this instance wrote are kept, empty, at once (`erased`: the
    /// erasure times of the batch's installations).
    pub fn missing<'a>(
        &mut self,
        keys: impl IntoIterator<Item = DayKey<'a>>,
        erased: &HashMap<String, i64>,
    ) -> Vec<(String, NaiveDate)> {
        let mut to_read = Vec::new();
        for key in keys {
            if self.day(key).is_some() {
                continue;
            }
            let (install, day) = (key.0.to_string(), key.1);
            if self.only_ours(key) {
                let erased_at = erased.get(&install).copied();
                self.insert_read((install, day), HashSet::new(), erased_at);
                self.known_empty += 1;
            } else {
                to_read.push((install, day));
            }
        }
        to_read
    }

    /// Keeps an (installation, day) read whole from ClickHouse.
    pub fn insert_read(
        &mut self,
        (install, day): (String, NaiveDate),
        ids: HashSet<IdKey>,
        erased_at: Option<i64>,
    ) {
        self.ids += ids.len();
        let used = self.clock;
        let kept = Day {
            ids,
            erased_at,
            used,
        };
        if let Some(old) = self.installs.entry(install).or_default().insert(day, kept) {
            self.ids -= old.ids.len();
        }
    }

    /// Whether the event is stored. `None` when its day is not kept.
    pub fn contains(&self, key: DayKey<'_>, id: IdKey) -> Option<bool> {
        self.day(key).map(|d| d.ids.contains(&id))
    }

    /// Records a batch's stored events (after its raw insert succeeded).
    pub fn add(&mut self, (install, day): DayKey<'_>, id: IdKey) {
        let kept = self.installs.get_mut(install).and_then(|d| d.get_mut(&day));
        if kept.is_some_and(|d| d.ids.insert(id)) {
            self.ids += 1;
        }
    }

    /// Marks `keys` used by the flush that just ran, then forgets the least
    /// recently used days while more than `max_ids` ids are kept (down to
    /// nine tenths, so trimming is not needed at every flush).
    pub fn touch_and_trim<'a>(&mut self, keys: impl IntoIterator<Item = DayKey<'a>>) {
        self.clock += 1;
        for (install, day) in keys {
            if let Some(kept) = self.installs.get_mut(install).and_then(|d| d.get_mut(&day)) {
                kept.used = self.clock;
            }
        }
        if self.ids <= self.max_ids {
            return;
        }
        let mut by_use: Vec<(u64, String, NaiveDate)> = self
            .installs
            .iter()
            .flat_map(|(install, days)| {
                days.iter()
                    .map(move |(day, d)| (d.used, install.clone(), *day))
            })
            .collect();
        by_use.sort_unstable();
        let target = self.max_ids / 10 * 9;
        for (_, install, day) in by_use {
            if self.ids <= target {
                break;
            }
            self.forget([(install.as_str(), day)]);
        }
    }
}

/// `keys` as query parameters of at most `PARAM_BYTES` each: every pair
/// as ('<install>','YYYY-MM-DD'), with room for escapes.
fn param_chunks(keys: &[(String, NaiveDate)]) -> Vec<Vec<(&str, String)>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < keys.len() {
        let mut bytes = 0;
        let mut end = start;
        while end < keys.len() {
            let install = &keys[end].0;
            let len = install.len()
                + install
                    .bytes()
                    .filter(|b| matches!(b, b'\\' | b'\''))
                    .count()
                + 20;
            if end > start && bytes + len > PARAM_BYTES {
                break;
            }
            bytes += len;
            end += 1;
        }
        chunks.push(
            keys[start..end]
                .iter()
                .map(|(i, d)| (i.as_str(), d.format("%Y-%m-%d").to_string()))
                .collect(),
        );
        start = end;
    }
    chunks
}

fn from_days(days: u16) -> NaiveDate {
    NaiveDate::default() + chrono::Days::new(u64::from(days))
}

/// Reads every stored event id of these (installation, day) pairs.
///
/// Only the pairs that have a `usage_install_daily` row can have stored
/// events: a flush writes its rollup deltas before its raw events, and an
/// erasure deletes both. That table is ordered by day then installation,
/// so asking it first is several times cheaper than looking for events
/// that are not there (a new installation, a new day): one granule of
/// `usage_events` read per absent pair otherwise.
pub async fn read_days(
    client: &Client,
    keys: &[(String, NaiveDate)],
) -> Result<HashMap<(String, NaiveDate), HashSet<IdKey>>, clickhouse::error::Error> {
    let mut found: HashMap<(String, NaiveDate), HashSet<IdKey>> =
        keys.iter().map(|k| (k.clone(), HashSet::new())).collect();
    let mut present: Vec<(String, NaiveDate)> = Vec::new();
    for chunk in param_chunks(keys) {
        let mut cursor = client
            .query(
                "SELECT DISTINCT install_id, toUInt16(date) FROM usage_install_daily
                 WHERE (install_id, date) IN {keys:Array(Tuple(String, Date))}",
            )
            .param("keys", chunk)
            .fetch::<(String, u16)>()?;
        while let Some((install, day)) = cursor.next().await? {
            present.push((install, from_days(day)));
        }
    }
    for chunk in param_chunks(&present) {
        let mut cursor = client
            .query(
                "SELECT install_id, toUInt16(toDate(created_at)), event_id FROM usage_events
                 WHERE (install_id, toDate(created_at)) IN {keys:Array(Tuple(String, Date))}",
            )
            .param("keys", chunk)
            .fetch::<(String, u16, String)>()?;
        while let Some((install, day, id)) = cursor.next().await? {
            if let Some(ids) = found.get_mut(&(install, from_days(day))) {
                ids.insert(id_key(&id));
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(d: &str) -> NaiveDate {
        d.parse().unwrap()
    }

    #[test]
    fn contract_ids_are_their_number_and_others_are_hashed_apart() {
        assert_eq!(id_key("evt_00000000000000000000000000000001"), 1);
        assert_eq!(id_key("evt_ffffffffffffffffffffffffffffffff"), u128::MAX);
        // Upper case is another string for ClickHouse: another key here.
        let upper = id_key("evt_0000000000000000000000000000000A");
        assert_ne!(upper, 10);
        assert_ne!(upper, id_key("evt_0000000000000000000000000000000a"));
        assert_ne!(id_key("legacy-1"), id_key("legacy-2"));
        assert_eq!(id_key("legacy-1"), id_key("legacy-1"));
    }

    #[test]
    fn a_day_not_read_is_unknown_and_a_read_one_answers() {
        let mut seen = SeenIds::new(100);
        let key = ("i1", day("2026-12-01"));
        assert_eq!(seen.contains(key, 7), None);
        let none = HashMap::new();
        assert_eq!(seen.missing([key], &none), vec![("i1".to_string(), key.1)]);
        seen.insert_read(("i1".to_string(), key.1), HashSet::from([7]), None);
        assert_eq!(seen.contains(key, 7), Some(true));
        assert_eq!(seen.contains(key, 8), Some(false));
        assert!(seen.missing([key], &none).is_empty());
        seen.add(key, 8);
        seen.add(key, 8);
        assert_eq!(seen.contains(key, 8), Some(true));
        assert_eq!(seen.ids(), 2);
        // Adding to a day not kept keeps nothing (it is read whole later).
        seen.add(("i2", key.1), 9);
        assert_eq!(seen.contains(("i2", key.1), 9), None);
        seen.forget([key]);
        assert_eq!(seen.contains(key, 7), None);
        assert_eq!(seen.ids(), 0);
        assert_eq!(seen.days(), 0);
    }

    fn at(t: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(t)
            .unwrap()
            .timestamp_millis()
    }

    /// Owner since 2026-12-01 10:00; "new" registered at 10:05, "old" at 09:00.
    fn owned() -> SeenIds {
        let registered: RegisteredAt = std::sync::Arc::new(|install: &str| match install {
            "new" => Some(at("2026-12-01T10:05:00Z")),
            "old" => Some(at("2026-12-01T09:00:00Z")),
            _ => None,
        });
        let mut seen = SeenIds::new(100).with_ownership(Ownership {
            registered_at: registered,
            clock_margin_ms: 10_000,
        });
        seen.assigned_at(Some(at("2026-12-01T10:00:00Z")));
        seen
    }

    #[test]
    fn what_only_this_owner_wrote_needs_no_read() {
        let mut seen = owned();
        let none = HashMap::new();
        let today = day("2026-12-01");
        let tomorrow = day("2026-12-02");
        // Registered after the takeover: known empty, kept at once.
        assert!(seen.missing([("new", today)], &none).is_empty());
        assert_eq!(seen.contains(("new", today), 1), Some(false));
        // Registered before: its day may hold an earlier owner's rows.
        assert_eq!(
            seen.missing([("old", today), ("unknown", today)], &none),
            vec![("old".to_string(), today), ("unknown".to_string(), today)]
        );
        // A day that begins well after the takeover is everyone's own.
        assert!(seen.missing([("old", tomorrow)], &none).is_empty());
        assert_eq!(seen.known_empty(), 2);
    }

    #[test]
    fn registered_within_the_clock_margin_of_the_takeover_is_read() {
        let mut seen = owned();
        seen.assigned_at(Some(at("2026-12-01T10:04:55Z")));
        let today = day("2026-12-01");
        assert_eq!(
            seen.missing([("new", today)], &HashMap::new()),
            vec![("new".to_string(), today)]
        );
    }

    #[test]
    fn an_installation_with_a_day_forgotten_is_read_until_the_next_takeover() {
        let mut seen = owned();
        let none = HashMap::new();
        let today = day("2026-12-01");
        let tomorrow = day("2026-12-02");
        assert!(seen.missing([("new", today)], &none).is_empty());
        // A failed flush (or the memory bound) forgets its days: ClickHouse
        // may hold more of that installation than is kept, on any day.
        seen.forget([("new", today)]);
        assert_eq!(
            seen.missing([("new", today), ("new", tomorrow)], &none),
            vec![("new".to_string(), today), ("new".to_string(), tomorrow)]
        );
        // Other installations are not concerned.
        assert!(seen.missing([("old", tomorrow)], &none).is_empty());
        seen.forget([("new", today), ("new", tomorrow)]);
        seen.assigned_at(Some(at("2026-12-01T10:00:00Z")));
        assert_eq!(
            seen.missing([("new", today)], &none).len(),
            1,
            "same takeover"
        );
        seen.forget([("new", today)]);
        seen.assigned_at(Some(at("2026-12-01T09:59:00Z")));
        // A new takeover, which the registration follows too.
        assert!(seen.missing([("new", today)], &none).is_empty());
        // A rebalance clears everything, ownership included.
        seen.clear();
        assert_eq!(seen.missing([("new", day("2026-12-03"))], &none).len(), 1);
    }

    #[test]
    fn a_new_erasure_forgets_the_installation() {
        let mut seen = SeenIds::new(100);
        let a = ("a".to_string(), day("2026-12-01"));
        let b = ("b".to_string(), day("2026-12-01"));
        seen.insert_read(a.clone(), HashSet::from([1]), Some(5));
        seen.insert_read(b.clone(), HashSet::from([1]), None);
        // The same erasure it was read with: kept.
        seen.forget_erased(&HashMap::from([("a".to_string(), 5)]));
        assert_eq!(seen.days(), 2);
        seen.forget_erased(&HashMap::from([("a".to_string(), 9), ("b".to_string(), 9)]));
        assert_eq!(seen.days(), 0);
        assert_eq!(seen.ids(), 0);
    }

    #[test]
    fn the_least_recently_used_days_go_first_when_over_the_bound() {
        let mut seen = SeenIds::new(10);
        let keys: Vec<(String, NaiveDate)> = (0..4)
            .map(|i| (format!("i{i}"), day("2026-12-01")))
            .collect();
        for (n, key) in keys.iter().enumerate() {
            seen.insert_read(
                key.clone(),
                (0..4).map(|x| x + 10 * n as u128).collect(),
                None,
            );
            seen.touch_and_trim([(key.0.as_str(), key.1)]);
        }
        // 16 ids > 10: the oldest go until at most 9 are left.
        assert!(seen.ids() <= 9, "{}", seen.ids());
        assert_eq!(seen.contains(("i3", keys[3].1), 30), Some(true));
        assert_eq!(seen.contains(("i0", keys[0].1), 0), None);
    }
}

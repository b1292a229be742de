//! Catch-up: the events that arrived after the bulk phase's offsets,
//! applied to a set of rebuilt tables in the live processors' own
//! exactly-once order (`usage_processors::rollup`): the stored ids read
//! first, the rollup sums of the first-seen events inserted next, each
//! under a deduplication token made of the chunk's offsets, the raw events
//! last. A chunk is recorded in the state before its first write and
//! redone with exactly its offsets after a crash, so its sums are added
//! once.
//!
//! Catch-up never reads past the live group's committed offsets: the
//! rebuilt tables never hold an event the live tables do not hold yet, so
//! after the swap the processors (whose stored-id memory follows the live
//! tables) meet no event they have not seen stored.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::ControlFlow;

use chrono::NaiveDate;
use clickhouse::Client;
use usage_processors::pricing::PriceTable;
use usage_processors::rollup::{day_of, deltas, erased_at, insert_deltas, to_row};
use usage_schemas::rows::UsageEventRow;
use usage_schemas::{AvroRecord, UsageEvent};

use crate::error::RebuildError;
use crate::progress::Progress;
use crate::state::{RebuildState, StateStore};
use crate::{topic, Ctx};

/// Offsets per partition in one chunk.
const CHUNK_OFFSETS: i64 = 100_000;

/// (installation, day) pairs per stored-ids query (each travels as a
/// query parameter, capped at 128 KiB).
const KEYS_PER_QUERY: usize = 1_000;

/// Which rollups a catch-up adds to: before the swap only `usage_daily`
/// (the other two are derived from it at the swap); after the derivation
/// and into the kept tables, all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollups {
    DailyOnly,
    All,
}

/// Catches the shadow tables up to the live group's committed offsets.
pub async fn to_live(
    ctx: &Ctx,
    state: &mut RebuildState,
    store: &mut StateStore,
    prices: &PriceTable,
    rollups: Rollups,
) -> Result<u64, RebuildError> {
    let (target, _) = topic::live_offsets(&ctx.kafka, &ctx.group).await?;
    let shadow = ctx.shadow.clone();
    apply(
        ctx, &shadow, state, store, prices, &target, rollups, "catchup",
    )
    .await
}

/// Applies every event of the scope in `[state.applied, target)` to the
/// tables of `client`'s database; returns the events stored. `tag` names
/// the step in the deduplication tokens.
#[allow(clippy::too_many_arguments)]
pub async fn apply(
    ctx: &Ctx,
    client: &Client,
    state: &mut RebuildState,
    store: &mut StateStore,
    prices: &PriceTable,
    target: &BTreeMap<i32, i64>,
    rollups: Rollups,
    tag: &str,
) -> Result<u64, RebuildError> {
    if !state.scope.installs.is_empty() && state.pending.is_none() {
        // Only the scope's installations' partitions can hold its events.
        let n = i32::try_from(target.len()).unwrap_or(i32::MAX);
        let wanted = state.scope.partitions(n).unwrap_or_default();
        for (p, t) in target {
            if !wanted.contains(p) && state.applied.get(p).is_none_or(|a| a < t) {
                state.applied.insert(*p, *t);
            }
        }
    }
    let total: u64 = target
        .iter()
        .map(|(p, t)| (t - state.applied.get(p).copied().unwrap_or(*t)).max(0) as u64)
        .sum();
    let progress = Progress::new(tag, total, "messages");
    let mut stored = 0u64;
    loop {
        let chunk = match state.pending.clone() {
            Some(pending) => pending,
            None => {
                let next: BTreeMap<i32, (i64, i64)> = target
                    .iter()
                    .filter_map(|(p, t)| {
                        let from = state.applied.get(p).copied().unwrap_or(*t);
                        (from < *t).then(|| (*p, (from, (from + CHUNK_OFFSETS).min(*t) - 1)))
                    })
                    .collect();
                if next.is_empty() {
                    break;
                }
                // Recorded before the first write: a redo reads exactly these.
                state.pending = Some(next.clone());
                store.save(state).await?;
                next
            }
        };
        let batch_id = format!(
            "rebuild:{}:{tag}:{}",
            state.id,
            chunk
                .iter()
                .map(|(p, (a, b))| format!("{p}:{a}-{b}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let events = read_chunk(ctx, &state.id, &chunk).await?;
        let messages: u64 = chunk.values().map(|(a, b)| (b - a + 1) as u64).sum();
        stored += write_chunk(ctx, client, &batch_id, state, &events, prices, rollups).await?;
        for (p, (_, last)) in &chunk {
            state.applied.insert(*p, last + 1);
        }
        state.pending = None;
        store.save(state).await?;
        progress.inc(messages);
    }
    progress.finish(&format!("{stored} events stored"));
    Ok(stored)
}

async fn read_chunk(
    ctx: &Ctx,
    id: &str,
    chunk: &BTreeMap<i32, (i64, i64)>,
) -> Result<Vec<UsageEvent>, RebuildError> {
    let ranges: BTreeMap<i32, (i64, i64)> =
        chunk.iter().map(|(p, (a, b))| (*p, (*a, b + 1))).collect();
    let kafka = ctx.kafka.clone();
    let group = format!("usage-rebuild-{id}");
    tokio::task::spawn_blocking(move || {
        let mut events = Vec::new();
        topic::read_ranges(&kafka, &group, &ranges, |_, _, _, payload| {
            if let Some(Ok(e)) = payload.map(UsageEvent::from_wire) {
                events.push(e);
            }
            ControlFlow::Continue(())
        })?;
        Ok::<_, RebuildError>(events)
    })
    .await
    .map_err(|e| RebuildError::refused(format!("the Kafka reader failed: {e}")))?
}

/// The processors' write order for one chunk (module docs).
async fn write_chunk(
    ctx: &Ctx,
    client: &Client,
    batch_id: &str,
    state: &RebuildState,
    events: &[UsageEvent],
    prices: &PriceTable,
    rollups: Rollups,
) -> Result<u64, RebuildError> {
    let scoped: Vec<&UsageEvent> = events
        .iter()
        .filter(|e| state.scope.contains(&e.install_id, day_of(e.created_at)))
        .collect();
    if scoped.is_empty() {
        return Ok(0);
    }
    let erased = erased_at(&ctx.live, scoped.iter().map(|e| e.install_id.as_str())).await?;
    let mut in_chunk = HashSet::new();
    let unique: Vec<&UsageEvent> = scoped
        .into_iter()
        .filter(|e| {
            erased
                .get(&e.install_id)
                .is_none_or(|at| e.received_at > *at)
                && in_chunk.insert((
                    e.install_id.as_str(),
                    day_of(e.created_at),
                    e.event_id.as_str(),
                ))
        })
        .collect();
    let keys: BTreeSet<(String, NaiveDate)> = unique
        .iter()
        .map(|e| (e.install_id.clone(), day_of(e.created_at)))
        .collect();
    let found = stored_ids(client, &keys.into_iter().collect::<Vec<_>>()).await?;
    let fresh: Vec<UsageEventRow> = unique
        .into_iter()
        .filter(|e| {
            !found
                .get(&(e.install_id.clone(), day_of(e.created_at)))
                .is_some_and(|ids| ids.contains(&e.event_id))
        })
        .map(|e| to_row(e, prices))
        .collect();
    if fresh.is_empty() {
        return Ok(0);
    }
    let sums = deltas::deltas(&fresh);
    insert_deltas(client, batch_id, "usage_daily", &sums.daily).await?;
    if rollups == Rollups::All {
        insert_deltas(client, batch_id, "usage_install_daily", &sums.install_daily).await?;
        insert_deltas(client, batch_id, "usage_monthly", &sums.monthly).await?;
    }
    let mut insert = client.insert::<UsageEventRow>("usage_events").await?;
    for row in &fresh {
        insert.write(row).await?;
    }
    insert.end().await?;
    Ok(fresh.len() as u64)
}

/// The event ids stored per (installation, day).
async fn stored_ids(
    client: &Client,
    keys: &[(String, NaiveDate)],
) -> Result<HashMap<(String, NaiveDate), HashSet<String>>, RebuildError> {
    let mut found: HashMap<(String, NaiveDate), HashSet<String>> = HashMap::new();
    for chunk in keys.chunks(KEYS_PER_QUERY) {
        let param: Vec<(String, String)> = chunk
            .iter()
            .map(|(i, d)| (i.clone(), d.to_string()))
            .collect();
        let rows: Vec<(String, u16, String)> = client
            .query(
                "SELECT install_id, toUInt16(toDate(created_at)), event_id FROM usage_events
                 WHERE (install_id, toDate(created_at)) IN {keys:Array(Tuple(String, Date))}",
            )
            .param("keys", param)
            .fetch_all()
            .await?;
        for (install, day, id) in rows {
            let day =
                NaiveDate::from_num_days_from_ce_opt(719_163 + i32::from(day)).unwrap_or_default();
            found.entry((install, day)).or_default().insert(id);
        }
    }
    Ok(found)
}

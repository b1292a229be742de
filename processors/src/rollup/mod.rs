//! How ClickHouse stays exact: raw events deduplicated, rollups added to
//! exactly once per event, whatever fails, is retried or is read again.
//!
//! 1. Deduplication: an event is stored once per (install_id, day of
//!    created_at, event_id), the sorting key of `usage_events` (a resend
//!    carries the stored `created_at`). The batch's first copy of each id
//!    wins; ids already in `usage_events` are duplicates (a plugin's resend,
//!    a gateway retry, a redelivery). What is left is the batch's
//!    *first-seen* events. The owner of an installation's partition keeps
//!    its stored ids per day in memory ([`seen`]) and reads a day from
//!    ClickHouse only the first time it needs it.
//! 2. Rollups by delta: the first-seen events are priced and summed per key of
//!    `usage_daily`, `usage_install_daily` and `usage_monthly` ([`deltas`]),
//!    and the sums are inserted into those SummingMergeTree tables, which add
//!    them to what the keys held. Each insert covers one table partition and
//!    carries an `insert_deduplication_token` made of the batch's id (from the
//!    batch ledger, `crate::ledger`), the table and the partition: ClickHouse
//!    drops an insert whose token it has seen, so writing the same batch
//!    twice adds once.
//! 3. The order makes every attempt at a batch write the same deltas: the
//!    stored ids are read first, the deltas are written next, and the raw
//!    events last, only once every delta insert succeeded. So until the raw
//!    events of a batch are visible, any attempt finds the same first-seen
//!    events and computes the same deltas under the same tokens; once they
//!    are visible, every delta insert of the batch has succeeded, and a later
//!    attempt's (smaller) deltas carry tokens already seen and are dropped.
//!    An attempt is the same batch only if it covers exactly the same
//!    offsets: the ledger records them before the first write, and a
//!    processor taking over partitions redoes the unfinished batches with
//!    them before it reads on (`consumer`).
//! 4. Offsets are committed only after all of this returned (`consumer`), so
//!    nothing is lost when ClickHouse or the processor fails mid-way.
//! 5. Events of an erased installation received before its erasure
//!    (`erased_installations`) are dropped, so a replay cannot restore them.
//!    An erasure can also begin while a batch is being written, after the
//!    batch looked for erasures: its deletes may then run before this
//!    batch's inserts and miss them. So once everything of the batch is
//!    written, governance decisions included, the consumer looks again
//!    ([`delete_erased_meanwhile`]) and deletes the rows of any installation
//!    erased meanwhile itself. Either that second look sees the erasure, or
//!    the erasure was recorded after this batch's writes and its own
//!    deletes, which follow the record, remove them. If the processor dies
//!    between its writes and the second look, the redelivered batch finds
//!    its events erased but stored, and deletes them then.

pub mod deltas;
pub mod seen;

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use clickhouse::Client;
use clickhouse::Row;
use serde::Serialize;
use usage_schemas::rows::UsageEventRow;
use usage_schemas::UsageEvent;
use usage_service_kit::periods;

use crate::pricing::PriceTable;
use seen::{id_key, IdKey, SeenIds};

/// Bytes of event ids per existence query: they travel as a query
/// parameter, and ClickHouse caps one at 128 KiB (`http_max_field_value_size`).
const PARAM_BYTES: usize = 100_000;

/// Installation ids per query (under that cap at the contract's id length).
const INSTALLS_PER_QUERY: usize = 1_000;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlushReport {
    /// Indices (into the flushed slice) of the events stored for the first
    /// time by this flush: the only ones governance may count.
    pub fresh: Vec<usize>,
    /// Indices of the events found already stored (first copy in the
    /// batch): governance counts those an earlier attempt stored but never
    /// governed (`Engine::to_govern`).
    pub stored: Vec<usize>,
    pub inserted: usize,
    /// Events of erased installations, dropped.
    pub erased: usize,
    /// Installations erased between an earlier attempt at this batch and
    /// this one, whose rows that attempt had written: deleted now.
    pub erased_after_earlier_attempt: usize,
    /// The erasures seen before writing (install_id to erasure time in ms):
    /// the first look, to compare the second with.
    pub erased_before: std::collections::HashMap<String, i64>,
    /// Rows inserted into the three rollup tables (before deduplication).
    pub rollup_rows: usize,
    /// (installation, day) pairs first touched by this flush: read from
    /// ClickHouse, or known empty without a read (`seen::Ownership`).
    pub days_read: usize,
    pub days_known_empty: usize,
    /// Where the flush's time went.
    pub phases: FlushPhases,
}

/// Wall time of a flush's three steps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlushPhases {
    /// Erasures and the stored ids looked up.
    pub lookup: std::time::Duration,
    /// The rollup deltas computed and inserted.
    pub deltas: std::time::Duration,
    /// The raw events inserted.
    pub raw: std::time::Duration,
}

fn millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

pub fn day_of(ms: i64) -> NaiveDate {
    millis(ms).date_naive()
}

/// The row of `usage_events` for one event, priced.
pub fn to_row(e: &UsageEvent, prices: &PriceTable) -> UsageEventRow {
    into_row(e.clone(), prices)
}

/// [`to_row`], taking the event: its strings move into the row (the
/// rebuild's bulk path converts tens of millions).
pub fn into_row(e: UsageEvent, prices: &PriceTable) -> UsageEventRow {
    let prompt = u32::try_from(e.prompt_tokens).unwrap_or(u32::MAX);
    let completion = u32::try_from(e.completion_tokens).unwrap_or(u32::MAX);
    let cost = prices
        .cost(&e.model, day_of(e.created_at), prompt, completion)
        .unwrap_or_else(|| {
            tracing::error!(model = %e.model, "no price in force; cost recorded as 0");
            0
        });
    let billing_month = billing_month(&e);
    UsageEventRow {
        event_id: e.event_id,
        install_id: e.install_id,
        account_id: e.account_id,
        wp_site_id: e.wp_site_id.and_then(|s| u64::try_from(s).ok()),
        user_hash: e.wp_user_id_hash,
        source: e.source,
        model: e.model,
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: u32::try_from(e.total_tokens).unwrap_or(u32::MAX),
        cost_usd: cost,
        context: e.context_json.unwrap_or_default(),
        created_at: millis(e.created_at),
        processed_at: e.processed_at.map(millis),
        batch_sent_at: e.batch_sent_at.map(millis),
        received_at: millis(e.received_at),
        signature_scheme: e.signature_scheme,
        gateway_instance: e.gateway_instance,
        over_limit: e.over_limit.unwrap_or_default(),
        billing_month,
    }
}

/// The month an event counts toward for caps and billing: what the gateway
/// stamped, or (v1 events) the month of its created_at.
pub fn billing_month(e: &UsageEvent) -> NaiveDate {
    e.billing_month
        .as_deref()
        .and_then(periods::parse_month_key)
        .unwrap_or_else(|| periods::month_start(e.created_at))
}

/// Writes `events` (in topic order), the batch recorded as `batch_id` in
/// the ledger: rollup deltas first, raw events last (module docs, point 3).
/// `abort_after_deltas` is a test's fault injection, never set in
/// production.
pub async fn flush(
    client: &Client,
    batch_id: &str,
    events: &[UsageEvent],
    prices: &PriceTable,
    seen: &mut SeenIds,
    abort_after_deltas: bool,
) -> Result<FlushReport, clickhouse::error::Error> {
    let mut report = FlushReport::default();
    if events.is_empty() {
        return Ok(report);
    }
    let phase = std::time::Instant::now();

    let erased = erased_at(client, events.iter().map(|e| e.install_id.as_str())).await?;
    let gone = |e: &UsageEvent| {
        erased
            .get(e.install_id.as_str())
            .is_some_and(|at| e.received_at <= *at)
    };
    report.erased = events.iter().filter(|e| gone(e)).count();
    // First occurrence in the batch wins, like first write wins across batches.
    let mut in_batch = HashSet::with_capacity(events.len());
    let unique: Vec<(usize, &UsageEvent)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            !gone(e)
                && in_batch.insert((
                    e.install_id.as_str(),
                    day_of(e.created_at),
                    e.event_id.as_str(),
                ))
        })
        .collect();
    if report.erased > 0 {
        tracing::info!(
            dropped = report.erased,
            "events of erased installations dropped"
        );
        // Stored anyway: an earlier attempt at this batch wrote them after
        // the erasure's deletes and died before its second look.
        let dropped: Vec<&UsageEvent> = events.iter().filter(|e| gone(e)).collect();
        let left: BTreeSet<String> = stored_ids(client, &dropped)
            .await?
            .into_iter()
            .map(|(install, _)| install)
            .collect();
        for install in &left {
            tracing::warn!(%install, "rows written before an erasure by an earlier attempt; deleting them");
            usage_schemas::erasure::delete_rows(client, install).await?;
        }
        report.erased_after_earlier_attempt = left.len();
    }

    // Which events are stored already: asked of the ids kept per
    // (installation, day) (`seen`), reading from ClickHouse only the days
    // not kept yet.
    seen.forget_erased(&erased);
    let touched: BTreeSet<(&str, NaiveDate)> = unique
        .iter()
        .map(|(_, e)| (e.install_id.as_str(), day_of(e.created_at)))
        .collect();
    let known_before = seen.known_empty();
    let missing = seen.missing(touched.iter().copied(), &erased);
    report.days_known_empty = seen.known_empty() - known_before;
    report.days_read = missing.len();
    if !missing.is_empty() {
        for (key, ids) in seen::read_days(client, &missing).await? {
            let erased_at = erased.get(&key.0).copied();
            seen.insert_read(key, ids, erased_at);
        }
    }
    let keyed: Vec<(usize, &UsageEvent, NaiveDate, IdKey)> = unique
        .iter()
        .map(|(i, e)| (*i, *e, day_of(e.created_at), id_key(&e.event_id)))
        .collect();
    let (found, new): (Vec<_>, Vec<_>) = keyed
        .into_iter()
        .partition(|(_, e, day, id)| seen.contains((&e.install_id, *day), *id) == Some(true));
    let added: Vec<(&str, NaiveDate, IdKey)> = new
        .iter()
        .map(|(_, e, day, id)| (e.install_id.as_str(), *day, *id))
        .collect();
    let (fresh_idx, fresh): (Vec<usize>, Vec<&UsageEvent>) =
        new.into_iter().map(|(i, e, _, _)| (i, e)).unzip();
    report.stored = found.into_iter().map(|(i, ..)| i).collect();
    report.fresh = fresh_idx;
    report.phases.lookup = phase.elapsed();

    let written = write_batch(
        client,
        batch_id,
        &fresh,
        prices,
        abort_after_deltas,
        &mut report,
    )
    .await;
    if let Err(err) = written {
        // ClickHouse may hold more of these days than known: read them
        // again at the next attempt.
        seen.forget(touched.iter().copied());
        return Err(err);
    }
    for (install, day, id) in added {
        seen.add((install, day), id);
    }
    seen.touch_and_trim(touched.iter().copied());
    report.erased_before = erased;
    Ok(report)
}

/// The deltas of the first-seen events, then the raw events (module docs,
/// point 3); `report` gets the rows written and the time of each step.
async fn write_batch(
    client: &Client,
    batch_id: &str,
    fresh: &[&UsageEvent],
    prices: &PriceTable,
    abort_after_deltas: bool,
    report: &mut FlushReport,
) -> Result<(), clickhouse::error::Error> {
    let mut phase = std::time::Instant::now();
    let rows: Vec<UsageEventRow> = fresh.iter().map(|e| to_row(e, prices)).collect();
    let deltas = deltas::deltas(&rows);
    // Side by side; all three are awaited even if one fails, so that none
    // is still running when the batch is tried again.
    let (daily, install_daily, monthly) = tokio::join!(
        insert_deltas(client, batch_id, "usage_daily", &deltas.daily),
        insert_deltas(
            client,
            batch_id,
            "usage_install_daily",
            &deltas.install_daily
        ),
        insert_deltas(client, batch_id, "usage_monthly", &deltas.monthly),
    );
    report.rollup_rows = daily? + install_daily? + monthly?;
    report.phases.deltas = phase.elapsed();
    phase = std::time::Instant::now();
    if abort_after_deltas {
        tracing::error!("crash-after-deltas fault injection: aborting before the raw events");
        std::process::abort();
    }

    if !rows.is_empty() {
        let mut insert = client.insert::<UsageEventRow>("usage_events").await?;
        for row in &rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        report.inserted = rows.len();
    }
    report.phases.raw = phase.elapsed();
    Ok(())
}

/// Inserts a batch's rows of one rollup table, one insert per table
/// partition, each under its deduplication token (module docs, point 2).
pub async fn insert_deltas<R>(
    client: &Client,
    batch_id: &str,
    table: &str,
    parts: &std::collections::BTreeMap<u32, Vec<R>>,
) -> Result<usize, clickhouse::error::Error>
where
    R: Serialize + Send + Sync + for<'r> Row<Value<'r> = R>,
{
    let mut rows = 0;
    for (partition, part) in parts {
        let token = dedup_token(batch_id, table, *partition);
        let mut insert = client
            .insert::<R>(table)
            .await?
            .with_setting("insert_deduplicate", "1")
            .with_setting("insert_deduplication_token", token);
        for row in part {
            insert.write(row).await?;
        }
        insert.end().await?;
        rows += part.len();
    }
    Ok(rows)
}

/// The deduplication token of a batch's insert into one partition of one
/// rollup table.
pub fn dedup_token(batch_id: &str, table: &str, partition: u32) -> String {
    format!("{batch_id}/{table}/{partition}")
}

/// The latest erasure time (ms) of each of these installations that was
/// ever erased: what they sent before it must never be stored again.
pub async fn erased_at<'a>(
    client: &Client,
    installs: impl Iterator<Item = &'a str>,
) -> Result<std::collections::HashMap<String, i64>, clickhouse::error::Error> {
    let installs: Vec<&str> = installs.collect::<BTreeSet<_>>().into_iter().collect();
    let mut erased = std::collections::HashMap::new();
    for chunk in installs.chunks(INSTALLS_PER_QUERY) {
        let rows: Vec<(String, i64)> = client
            .query(
                "SELECT install_id, toUnixTimestamp64Milli(max(erased_at)) FROM erased_installations
                 WHERE install_id IN {ids:Array(String)} GROUP BY install_id",
            )
            .param("ids", chunk)
            .fetch_all()
            .await?;
        erased.extend(rows);
    }
    Ok(erased)
}

/// The second look of point 4 (module docs): deletes the rows of every one
/// of `installs` erased since `before` was read, and returns them.
pub async fn delete_erased_meanwhile<'a>(
    client: &Client,
    before: &std::collections::HashMap<String, i64>,
    installs: impl Iterator<Item = &'a str>,
) -> Result<HashSet<String>, clickhouse::error::Error> {
    let mut deleted = HashSet::new();
    for (install, at) in erased_at(client, installs).await? {
        if before.get(&install) != Some(&at) {
            tracing::info!(%install, "installation erased during the write; deleting its rows again");
            usage_schemas::erasure::delete_rows(client, &install).await?;
            deleted.insert(install);
        }
    }
    Ok(deleted)
}

/// Bytes of `s` as an element of an array parameter: quoted, escaped
/// (backslash and quote), followed by a comma.
fn quoted_len(s: &str) -> usize {
    s.len() + s.bytes().filter(|b| matches!(b, b'\\' | b'\'')).count() + 3
}

/// Consecutive runs of `events` whose event ids and installation ids each
/// stay under `budget` bytes as a parameter ([`quoted_len`]).
fn chunks_by_bytes<'a, 'e>(
    events: &'a [&'e UsageEvent],
    budget: usize,
) -> impl Iterator<Item = &'a [&'e UsageEvent]> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= events.len() {
            return None;
        }
        let (mut ids, mut installs) = (0, 0);
        let mut end = start;
        while end < events.len() {
            let e = events[end];
            let (i, n) = (quoted_len(&e.event_id), quoted_len(&e.install_id));
            if end > start && (ids + i > budget || installs + n > budget) {
                break;
            }
            ids += i;
            installs += n;
            end += 1;
        }
        let chunk = &events[start..end];
        start = end;
        Some(chunk)
    })
}

/// The (install_id, event_id) of these events already in `usage_events`.
async fn stored_ids(
    client: &Client,
    events: &[&UsageEvent],
) -> Result<HashSet<(String, String)>, clickhouse::error::Error> {
    let mut stored = HashSet::new();
    for chunk in chunks_by_bytes(events, PARAM_BYTES) {
        let installs: BTreeSet<&str> = chunk.iter().map(|e| e.install_id.as_str()).collect();
        let ids: BTreeSet<&str> = chunk.iter().map(|e| e.event_id.as_str()).collect();
        let rows: Vec<(String, String)> = client
            .query(
                "SELECT install_id, event_id FROM usage_events
                 WHERE install_id IN {installs:Array(String)} AND event_id IN {ids:Array(String)}",
            )
            .param("installs", installs.into_iter().collect::<Vec<_>>())
            .param("ids", ids.into_iter().collect::<Vec<_>>())
            .fetch_all()
            .await?;
        stored.extend(rows);
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_days() {
        assert_eq!(
            day_of(1_762_165_800_000),
            "2025-11-03".parse::<NaiveDate>().unwrap()
        );
    }

    fn event(install: &str, id: &str) -> UsageEvent {
        UsageEvent {
            event_id: id.to_string(),
            install_id: install.to_string(),
            account_id: "acc_1".into(),
            wp_site_id: None,
            wp_user_id_hash: "u".into(),
            source: "bulk".into(),
            model: "gpt-4o".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            total_tokens: 2,
            context_json: None,
            created_at: 0,
            processed_at: None,
            batch_sent_at: None,
            received_at: 0,
            signature_scheme: "v2".into(),
            gateway_instance: "g".into(),
            billing_month: None,
            over_limit: None,
        }
    }

    #[test]
    fn quoted_length_counts_quotes_comma_and_escapes() {
        assert_eq!(quoted_len("evt_ab"), 9);
        assert_eq!(quoted_len("a'b\\c"), 5 + 2 + 3);
    }

    #[test]
    fn chunks_cover_every_event_in_order_within_the_budget() {
        let events: Vec<UsageEvent> = (0..1_000)
            .map(|i| event(&format!("inst-{}", i / 7), &format!("evt_{i:032x}")))
            .collect();
        let refs: Vec<&UsageEvent> = events.iter().collect();
        for budget in [1, 40, 500, 4_096, 1_000_000] {
            let chunks: Vec<&[&UsageEvent]> = chunks_by_bytes(&refs, budget).collect();
            let flat: Vec<&str> = chunks
                .iter()
                .flat_map(|c| c.iter().map(|e| e.event_id.as_str()))
                .collect();
            let all: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
            assert_eq!(flat, all, "budget {budget}");
            for chunk in &chunks {
                assert!(!chunk.is_empty());
                let ids: usize = chunk.iter().map(|e| quoted_len(&e.event_id)).sum();
                let installs: usize = chunk.iter().map(|e| quoted_len(&e.install_id)).sum();
                // A single event always fits (it cannot be split further).
                assert!(chunk.len() == 1 || (ids <= budget && installs <= budget));
            }
        }
    }

    #[test]
    fn tokens_name_the_batch_table_and_partition() {
        assert_eq!(
            dedup_token("b-1", "usage_daily", 202511),
            "b-1/usage_daily/202511"
        );
        assert_ne!(
            dedup_token("b-1", "usage_daily", 202511),
            dedup_token("b-1", "usage_daily", 202512)
        );
    }
}

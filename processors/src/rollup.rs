//! Writing a batch of events to ClickHouse so every aggregate counts each
//! event exactly once, whatever Kafka redelivers or ops replay.
//!
//! The mechanism, and the failures it covers:
//! 1. Raw events are keyed (install_id, created day, event_id) in a
//!    ReplacingMergeTree, and before inserting, the batch drops event_ids
//!    already stored for its installations (first write wins). A plugin
//!    retry, a gateway retry or a Kafka redelivery of a stored event adds no
//!    row; a crash between insert and offset commit re-reads the batch and
//!    finds its events stored. Two writers racing on the same event (a
//!    rebalance) insert identical keys, which ReplacingMergeTree collapses and
//!    every reader below reads with FINAL.
//! 2. Rollups are never incremented. For every (install_id, day) the batch
//!    touches, stored or not, the daily rows are recomputed from the raw
//!    events (FINAL) and inserted with a higher version; then the same, from
//!    the daily rows, for the (install_id, day) rows of `usage_install_daily`
//!    and the (install_id, month) rows of `usage_monthly`. A rollup row is
//!    thus a pure function of the deduplicated raw events: a crash anywhere between
//!    the steps is repaired by the redelivered batch, and replaying the topic
//!    from any offset recomputes the same numbers instead of adding to them.
//! 3. Offsets are committed only after all of this returned (`consumer`), so
//!    nothing is lost when ClickHouse or the processor fails mid-way.
//! 4. Events of an erased installation received before its erasure
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

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use clickhouse::Client;
use usage_schemas::rows::UsageEventRow;
use usage_schemas::UsageEvent;
use usage_service_kit::periods;

use crate::pricing::PriceTable;

/// Event ids per existence query and keys per recompute, so that no query
/// exceeds ClickHouse's default 256 KiB max_query_size.
const CHUNK: usize = 2000;

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
    pub days_recomputed: usize,
    pub months_recomputed: usize,
}

/// Quotes a string for a ClickHouse SQL literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

pub fn day_of(ms: i64) -> NaiveDate {
    millis(ms).date_naive()
}

fn month_of(day: NaiveDate) -> NaiveDate {
    day.with_day(1).unwrap_or(day)
}

/// The row of `usage_events` for one event, priced.
pub fn to_row(e: &UsageEvent, prices: &PriceTable) -> UsageEventRow {
    let prompt = u32::try_from(e.prompt_tokens).unwrap_or(u32::MAX);
    let completion = u32::try_from(e.completion_tokens).unwrap_or(u32::MAX);
    let cost = prices
        .cost(&e.model, day_of(e.created_at), prompt, completion)
        .unwrap_or_else(|| {
            tracing::error!(model = %e.model, "no price in force; cost recorded as 0");
            0
        });
    UsageEventRow {
        event_id: e.event_id.clone(),
        install_id: e.install_id.clone(),
        account_id: e.account_id.clone(),
        wp_site_id: e.wp_site_id.and_then(|s| u64::try_from(s).ok()),
        user_hash: e.wp_user_id_hash.clone(),
        source: e.source.clone(),
        model: e.model.clone(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: u32::try_from(e.total_tokens).unwrap_or(u32::MAX),
        cost_usd: cost,
        context: e.context_json.clone().unwrap_or_default(),
        created_at: millis(e.created_at),
        processed_at: e.processed_at.map(millis),
        batch_sent_at: e.batch_sent_at.map(millis),
        received_at: millis(e.received_at),
        signature_scheme: e.signature_scheme.clone(),
        gateway_instance: e.gateway_instance.clone(),
        over_limit: e.over_limit.clone().unwrap_or_default(),
        billing_month: billing_month(e),
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

/// Writes `events` (in topic order) and recomputes every rollup they touch.
pub async fn flush(
    client: &Client,
    events: &[UsageEvent],
    prices: &PriceTable,
) -> Result<FlushReport, clickhouse::error::Error> {
    let mut report = FlushReport::default();
    if events.is_empty() {
        return Ok(report);
    }

    let erased = erased_at(client, events.iter().map(|e| e.install_id.as_str())).await?;
    let gone = |e: &UsageEvent| {
        erased
            .get(e.install_id.as_str())
            .is_some_and(|at| e.received_at <= *at)
    };
    report.erased = events.iter().filter(|e| gone(e)).count();
    // First occurrence in the batch wins, like first write wins across batches.
    let mut seen = HashSet::with_capacity(events.len());
    let unique: Vec<(usize, &UsageEvent)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| !gone(e) && seen.insert((e.install_id.as_str(), e.event_id.as_str())))
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

    let stored = stored_ids(client, &unique.iter().map(|(_, e)| *e).collect::<Vec<_>>()).await?;
    // Borrowed keys: no allocation per event to test membership.
    let stored: HashSet<(&str, &str)> = stored
        .iter()
        .map(|(i, e)| (i.as_str(), e.as_str()))
        .collect();
    let (found, new): (Vec<_>, Vec<_>) = unique
        .iter()
        .copied()
        .partition(|(_, e)| stored.contains(&(e.install_id.as_str(), e.event_id.as_str())));
    let (fresh_idx, fresh): (Vec<usize>, Vec<&UsageEvent>) = new.into_iter().unzip();
    report.stored = found.into_iter().map(|(i, _)| i).collect();
    report.fresh = fresh_idx;

    if !fresh.is_empty() {
        let mut insert = client.insert::<UsageEventRow>("usage_events").await?;
        for e in &fresh {
            insert.write(&to_row(e, prices)).await?;
        }
        insert.end().await?;
        report.inserted = fresh.len();
    }

    let days: BTreeSet<(String, NaiveDate)> = unique
        .iter()
        .map(|(_, e)| (e.install_id.clone(), day_of(e.created_at)))
        .collect();
    let months: BTreeSet<(String, NaiveDate)> = days
        .iter()
        .map(|(i, d)| (i.clone(), month_of(*d)))
        .collect();
    recompute(client, RECOMPUTE_DAILY, &days).await?;
    // Both read only the daily rows: side by side, the batch waits for one.
    // Both are awaited even if one fails, so that no insert of this batch is
    // still running once it returns (see point 4).
    let (install_daily, monthly) = tokio::join!(
        recompute(client, RECOMPUTE_INSTALL_DAILY, &days),
        recompute(client, RECOMPUTE_MONTHLY, &months),
    );
    install_daily?;
    monthly?;
    report.days_recomputed = days.len();
    report.months_recomputed = months.len();
    report.erased_before = erased;
    Ok(report)
}

/// The latest erasure time (ms) of each of these installations that was
/// ever erased: what they sent before it must never be stored again.
pub async fn erased_at<'a>(
    client: &Client,
    installs: impl Iterator<Item = &'a str>,
) -> Result<std::collections::HashMap<String, i64>, clickhouse::error::Error> {
    let installs: Vec<&str> = installs.collect::<BTreeSet<_>>().into_iter().collect();
    let mut erased = std::collections::HashMap::new();
    for chunk in installs.chunks(CHUNK) {
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

async fn stored_ids(
    client: &Client,
    events: &[&UsageEvent],
) -> Result<HashSet<(String, String)>, clickhouse::error::Error> {
    let mut stored = HashSet::new();
    for chunk in events.chunks(CHUNK) {
        let installs: BTreeSet<&str> = chunk.iter().map(|e| e.install_id.as_str()).collect();
        let installs: Vec<String> = installs.into_iter().map(quote).collect();
        let ids: Vec<String> = chunk.iter().map(|e| quote(&e.event_id)).collect();
        let sql = format!(
            "SELECT install_id, event_id FROM usage_events WHERE install_id IN ({}) AND event_id IN ({})",
            installs.join(","),
            ids.join(",")
        );
        let rows: Vec<(String, String)> = client.query(&sql).fetch_all().await?;
        stored.extend(rows);
    }
    Ok(stored)
}

fn key_list(keys: &[(String, NaiveDate)]) -> String {
    keys.iter()
        .map(|(install, day)| format!("({}, toDate('{day}'))", quote(install)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Recomputes the daily rows of every (install_id, day) in `days` from the
/// deduplicated raw events. Events billed to a later month than their own
/// (they arrived after it closed) get rows of their own (`late_billing_month`,
/// migration 0011); the others have zero there.
const RECOMPUTE_DAILY: &str = "INSERT INTO usage_daily
        (install_id, date, user_hash, source, model, late_billing_month, account_id,
         requests, prompt_tokens, completion_tokens, total_tokens, cost_usd,
         over_limit_requests, over_limit_tokens, version)
     SELECT install_id, toDate(created_at) AS day, user_hash, source, model,
            if(billing_month = toStartOfMonth(created_at), toDate(0), billing_month) AS late,
            any(account_id), count(), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens),
            sum(cost_usd), countIf(over_limit != ''), sumIf(total_tokens, over_limit != ''),
            toUnixTimestamp64Nano(now64(9))
     FROM usage_events FINAL
     WHERE (install_id, toDate(created_at)) IN ({keys})
     GROUP BY install_id, day, user_hash, source, model, late";

/// Recomputes the one row of every (install_id, day) in `days` from its
/// daily rows, just recomputed.
const RECOMPUTE_INSTALL_DAILY: &str = "INSERT INTO usage_install_daily
        (date, install_id, requests, prompt_tokens, completion_tokens, total_tokens, cost_usd,
         over_limit_requests, over_limit_tokens, version)
     SELECT date, install_id, sum(requests), sum(prompt_tokens), sum(completion_tokens),
            sum(total_tokens), sum(cost_usd), sum(over_limit_requests), sum(over_limit_tokens),
            toUnixTimestamp64Nano(now64(9))
     FROM usage_daily FINAL
     WHERE (install_id, date) IN ({keys})
     GROUP BY install_id, date";

/// Recomputes the monthly rows of every (install_id, month) from the daily ones.
const RECOMPUTE_MONTHLY: &str = "INSERT INTO usage_monthly
        (install_id, month, user_hash, source, model, late_billing_month, account_id,
         requests, prompt_tokens, completion_tokens, total_tokens, cost_usd,
         over_limit_requests, over_limit_tokens, version)
     SELECT install_id, toStartOfMonth(date) AS m, user_hash, source, model, late_billing_month,
            any(account_id), sum(requests), sum(prompt_tokens), sum(completion_tokens),
            sum(total_tokens), sum(cost_usd), sum(over_limit_requests), sum(over_limit_tokens),
            toUnixTimestamp64Nano(now64(9))
     FROM usage_daily FINAL
     WHERE (install_id, toStartOfMonth(date)) IN ({keys})
     GROUP BY install_id, m, user_hash, source, model, late_billing_month";

async fn recompute(
    client: &Client,
    template: &str,
    keys: &BTreeSet<(String, NaiveDate)>,
) -> Result<(), clickhouse::error::Error> {
    let keys: Vec<_> = keys.iter().cloned().collect();
    for chunk in keys.chunks(CHUNK) {
        let sql = template.replace("{keys}", &key_list(chunk));
        client.query(&sql).execute().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_quotes_and_backslashes() {
        assert_eq!(quote("a'b\\c"), "'a\\'b\\\\c'");
        assert_eq!(quote("evt_00"), "'evt_00'");
    }

    #[test]
    fn months_start_on_the_first() {
        assert_eq!(
            month_of("2025-11-30".parse().unwrap()),
            "2025-11-01".parse::<NaiveDate>().unwrap()
        );
        assert_eq!(
            day_of(1_762_165_800_000),
            "2025-11-03".parse::<NaiveDate>().unwrap()
        );
    }
}

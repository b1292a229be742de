//! The bulk path: the scope's events into the shadow tables as fast as the
//! machine allows, with none of the live path's per-batch lookups.
//!
//! Topic source, *raw*: one partition at a time (an installation's events
//! are all in one partition), every message of `[from, to)` (the log
//! start to the live group's committed offsets at the start) is decoded;
//! the first copy of each (installation, day, event id) in offset order is
//! kept (first write wins, as on the live path), events of erased
//! installations received before their erasure are dropped, and the rest
//! are priced with today's `model_prices` and inserted into the shadow
//! `usage_events` in inserts of half a million rows, the position saved
//! after each. A partition interrupted mid-way is read again from its
//! start, after its rows are deleted (`CRC32(install_id) % partitions`,
//! the gateway's partitioner), so its copies are told apart again.
//!
//! Table source: *raw* reads the live `usage_events FINAL` in the scope,
//! month by month, and re-prices each row.
//!
//! Then *daily*: per month partition, ClickHouse sums the shadow raw
//! events into `usage_daily`, exactly as the processors' deltas add up
//! (`usage_processors::rollup::deltas`). The per-installation daily and
//! monthly rollups are derived from it at the swap, once the rows outside
//! the scope are copied (`swap`). A month partition of a phase is dropped
//! before it is written, so a phase killed mid-month redoes that month
//! whole.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::ControlFlow;

use usage_processors::pricing::PriceTable;
use usage_processors::rollup::into_row;
use usage_schemas::rows::UsageEventRow;
use usage_schemas::{AvroRecord, UsageEvent};

use crate::config::{BuildArgs, Source};
use crate::error::RebuildError;
use crate::plan::{Plan, RAW_COLUMNS};
use crate::progress::Progress;
use crate::scope::Scope;
use crate::state::{RebuildState, StateStore, PHASE_DAILY, PHASE_RAW, STATE_DDL};
use crate::{catchup, topic, Ctx};

/// Creates the shadow database from the current migrations, with the
/// rebuild's own tables.
pub async fn prepare(ctx: &Ctx) -> Result<(), RebuildError> {
    usage_schemas::migrations::migrate(&ctx.server, &ctx.shadow_db).await?;
    ctx.shadow.query(STATE_DDL).execute().await?;
    Ok(())
}

/// `usage-rebuild build` (and `plan`, which is a build with `--dry-run`).
pub async fn run(ctx: &Ctx, args: &BuildArgs) -> Result<(), RebuildError> {
    let asked = args.scope.scope();
    let mut store = StateStore::new(ctx.shadow.clone(), &ctx.shadow_db);
    let existing = store.load().await?;
    if let Some(state) = &existing {
        if state.swapped() && !state.rolled_back() {
            return Err(RebuildError::refused(format!(
                "`{}` holds the tables a swap replaced, kept for rollback; run `usage-rebuild drop` first",
                ctx.shadow_db
            )));
        }
        if state.swap.is_some() && !state.swapped() {
            return Err(RebuildError::refused(
                "a swap of this rebuild was interrupted: run `usage-rebuild swap` again to finish it, or `usage-rebuild drop`",
            ));
        }
    }
    let plan = Plan::make(ctx, &asked, args.source).await?;
    if args.dry_run || existing.is_none() {
        println!("{}", plan.render());
    }
    if args.dry_run {
        println!("dry run: nothing written");
        return Ok(());
    }
    let mut state = match existing {
        Some(state) if state.scope == plan.scope && state.source == args.source => {
            if state.built() {
                println!("already built; catching up with what arrived since");
            } else {
                println!("resuming the build started at {}", state.started_at);
            }
            state
        }
        Some(state) if !state.rolled_back() => {
            return Err(RebuildError::refused(format!(
                "`{}` holds a rebuild of another scope ({}, from the {:?} source); drop it first (`usage-rebuild drop`)",
                ctx.shadow_db,
                state.scope.describe(),
                state.source
            )))
        }
        _ => {
            if ctx.shadow_db_exists().await? {
                ctx.server
                    .query(&format!("DROP DATABASE IF EXISTS {} SYNC", ctx.shadow_db))
                    .execute()
                    .await?;
            }
            prepare(ctx).await?;
            let mut state = RebuildState::new(plan.scope.clone(), args.source);
            match args.source {
                Source::Topic => {
                    state.from = plan.marks.iter().map(|(p, (lo, _))| (*p, *lo)).collect();
                    // Not past what the live tables hold: the shadow never
                    // gets ahead of them (`catchup`).
                    state.to = plan.committed.clone();
                    state.position = state.from.clone();
                    state.applied = state.to.clone();
                }
                Source::Table => {
                    // Every event before these offsets is in the live table.
                    state.from = plan.committed.clone();
                    state.applied = state.from.clone();
                }
            }
            store.save(&state).await?;
            state
        }
    };
    prepare(ctx).await?;
    let prices = PriceTable::load(&ctx.live).await?;
    if prices.is_empty() {
        return Err(RebuildError::refused(
            "the live model_prices table is empty: nothing to price events with",
        ));
    }
    let started = std::time::Instant::now();
    match state.source {
        Source::Topic => {
            if !state.phase_done(PHASE_RAW) {
                raw_from_topic(ctx, &mut state, &mut store, &prices, args.insert_rows).await?;
            }
        }
        Source::Table => {
            if !state.phase_done(PHASE_RAW) {
                copy_from_table(ctx, &mut state, &mut store, &prices, args.insert_rows).await?;
            }
        }
    }
    if !state.phase_done(PHASE_DAILY) {
        sum_daily(ctx, &mut state, &mut store).await?;
    }
    let caught = catchup::to_live(
        ctx,
        &mut state,
        &mut store,
        &prices,
        catchup::Rollups::DailyOnly,
    )
    .await?;
    println!(
        "built in {:.1} s: {} events stored, {} copies and messages outside the scope skipped; caught up {} events since; \
         next: `usage-rebuild compare`, then `usage-rebuild swap`",
        started.elapsed().as_secs_f64(),
        state.events_staged,
        state.events_skipped,
        caught
    );
    Ok(())
}

impl Ctx {
    pub async fn shadow_db_exists(&self) -> Result<bool, RebuildError> {
        let n: u64 = self
            .server
            .query("SELECT count() FROM system.databases WHERE name = {db:String}")
            .param("db", &self.shadow_db)
            .fetch_one()
            .await?;
        Ok(n > 0)
    }
}

/// What the Kafka thread hands the inserter: first copies, and where the
/// partition's read got to once they are stored.
struct Chunk {
    rows: Vec<UsageEventRow>,
    position: i64,
    messages: u64,
    skipped: u64,
}

impl Chunk {
    fn new(capacity: usize) -> Self {
        Self {
            rows: Vec::with_capacity(capacity),
            position: 0,
            messages: 0,
            skipped: 0,
        }
    }
}

/// Every erased installation (a few): when it was last erased, in ms.
async fn erasures(ctx: &Ctx) -> Result<HashMap<String, i64>, RebuildError> {
    let rows: Vec<(String, i64)> = ctx
        .live
        .query(
            "SELECT install_id, toUnixTimestamp64Milli(max(erased_at)) FROM erased_installations
             GROUP BY install_id",
        )
        .fetch_all()
        .await?;
    Ok(rows.into_iter().collect())
}

async fn raw_from_topic(
    ctx: &Ctx,
    state: &mut RebuildState,
    store: &mut StateStore,
    prices: &PriceTable,
    insert_rows: usize,
) -> Result<(), RebuildError> {
    // An installation's events are all in the partition its id hashes to
    // (the gateway pins the partitioner): a scope of some installations
    // reads only theirs, and skips other keys before decoding.
    let partition_count = i32::try_from(state.to.len()).unwrap_or(i32::MAX);
    let wanted = state.scope.partitions(partition_count);
    let todo: Vec<(i32, i64, i64)> = state
        .to
        .iter()
        .filter(|(p, _)| wanted.as_ref().is_none_or(|w| w.contains(p)))
        .map(|(p, to)| (*p, state.from.get(p).copied().unwrap_or(*to), *to))
        .filter(|(p, _, to)| state.position.get(p).is_none_or(|at| at < to))
        .collect();
    let total: u64 = todo
        .iter()
        .map(|(p, from, to)| (to - state.position.get(p).copied().unwrap_or(*from)).max(0) as u64)
        .sum();
    let progress = Progress::new("raw", total, "messages");
    let erased = erasures(ctx).await?;
    for (p, from, to) in todo {
        if state.position.get(&p).is_some_and(|at| *at > from) {
            // Interrupted mid-partition: its first copies are told apart
            // again from its start.
            ctx.shadow
                .query("ALTER TABLE usage_events DELETE WHERE CRC32(install_id) % {n:UInt32} = {p:UInt32}")
                .param("n", partition_count)
                .param("p", p)
                .with_setting("mutations_sync", "2")
                .execute()
                .await?;
            state.position.insert(p, from);
            store.save(state).await?;
        }
        progress.set_message(format!("partition {p}"));
        read_partition(
            ctx,
            state,
            store,
            prices,
            insert_rows,
            &erased,
            p,
            (from, to),
            &progress,
        )
        .await?;
    }
    // Exact also when a partition was read twice.
    state.events_staged = ctx
        .shadow
        .query("SELECT count() FROM usage_events FINAL")
        .fetch_one()
        .await?;
    let read: u64 = state
        .to
        .iter()
        .filter(|(p, _)| wanted.as_ref().is_none_or(|w| w.contains(p)))
        .map(|(p, to)| (to - state.from.get(p).copied().unwrap_or(*to)).max(0) as u64)
        .sum();
    state.events_skipped = read.saturating_sub(state.events_staged);
    state.finish_phase(PHASE_RAW);
    store.save(state).await?;
    progress.finish(&format!(
        "{} first copies stored, {} copies and events outside the scope skipped",
        state.events_staged, state.events_skipped
    ));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn read_partition(
    ctx: &Ctx,
    state: &mut RebuildState,
    store: &mut StateStore,
    prices: &PriceTable,
    insert_rows: usize,
    erased: &HashMap<String, i64>,
    p: i32,
    range: (i64, i64),
    progress: &Progress,
) -> Result<(), RebuildError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(2);
    let kafka = ctx.kafka.clone();
    let group = format!("usage-rebuild-{}", state.id);
    let scope = state.scope.clone();
    let prices = prices.clone();
    let erased = erased.clone();
    let reader = tokio::task::spawn_blocking(move || {
        // The partition's first copies: (installation, day, event id).
        let mut seen: HashSet<(String, i64, String)> = HashSet::new();
        let mut chunk = Chunk::new(insert_rows);
        let mut undecodable = 0u64;
        let mut closed = false;
        let ranges = BTreeMap::from([(p, range)]);
        let read = topic::read_ranges(&kafka, &group, &ranges, |_, offset, key, payload| {
            chunk.messages += 1;
            chunk.position = offset + 1;
            let other_key = !scope.installs.is_empty()
                && key.is_some_and(|k| !scope.installs.iter().any(|i| i.as_bytes() == k));
            if other_key {
                chunk.skipped += 1;
                return ControlFlow::Continue(());
            }
            match payload.map(UsageEvent::from_wire) {
                Some(Ok(e)) => {
                    let day = usage_processors::rollup::day_of(e.created_at);
                    let gone = erased
                        .get(&e.install_id)
                        .is_some_and(|at| e.received_at <= *at);
                    if gone
                        || !scope.contains(&e.install_id, day)
                        || !seen.insert((
                            e.install_id.clone(),
                            e.created_at.div_euclid(86_400_000),
                            e.event_id.clone(),
                        ))
                    {
                        chunk.skipped += 1;
                    } else {
                        chunk.rows.push(into_row(e, &prices));
                    }
                }
                // The live path skips what does not decode too (logged there).
                _ => undecodable += 1,
            }
            if chunk.rows.len() >= insert_rows {
                let full = std::mem::replace(&mut chunk, Chunk::new(insert_rows));
                if tx.blocking_send(full).is_err() {
                    closed = true;
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        });
        if !closed && chunk.messages > 0 {
            let _ = tx.blocking_send(chunk);
        }
        read.map(|()| undecodable)
    });
    let mut insert_error = None;
    let abort_after: Option<u64> = std::env::var("USAGE_REBUILD_ABORT_AFTER_CHUNKS")
        .ok()
        .and_then(|v| v.parse().ok());
    while let Some(chunk) = rx.recv().await {
        if let Err(err) = insert_raw(ctx, &chunk.rows).await {
            insert_error = Some(err);
            break;
        }
        state.position.insert(p, chunk.position);
        state.events_staged += chunk.rows.len() as u64;
        state.events_skipped += chunk.skipped;
        state.chunks += u64::from(!chunk.rows.is_empty());
        store.save(state).await?;
        if abort_after == Some(state.chunks) {
            // Tests' fault injection (never set in production): dies like kill -9.
            eprintln!(
                "USAGE_REBUILD_ABORT_AFTER_CHUNKS: aborting after {} inserts",
                state.chunks
            );
            std::process::abort();
        }
        progress.inc(chunk.messages);
    }
    drop(rx);
    let undecodable = reader
        .await
        .map_err(|e| RebuildError::refused(format!("the Kafka reader failed: {e}")))??;
    if let Some(err) = insert_error {
        return Err(err);
    }
    if undecodable > 0 {
        tracing::warn!(
            partition = p,
            undecodable,
            "messages that do not decode were skipped, as the processors skip them"
        );
    }
    Ok(())
}

async fn insert_raw(ctx: &Ctx, rows: &[UsageEventRow]) -> Result<(), RebuildError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = ctx.shadow.insert::<UsageEventRow>("usage_events").await?;
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await?;
    Ok(())
}

/// The active partitions of a table, oldest first.
pub async fn partitions(
    client: &clickhouse::Client,
    table: &str,
) -> Result<Vec<String>, RebuildError> {
    Ok(client
        .query(
            "SELECT DISTINCT partition_id FROM system.parts
             WHERE database = currentDatabase() AND table = {t:String} AND active
             ORDER BY partition_id",
        )
        .param("t", table)
        .fetch_all()
        .await?)
}

fn month_id(partition: &str) -> Option<u32> {
    partition.parse().ok()
}

async fn drop_partition(ctx: &Ctx, table: &str, id: &str) -> Result<(), RebuildError> {
    ctx.shadow
        .query(&format!(
            "ALTER TABLE {table} DROP PARTITION ID {{id:String}}"
        ))
        .param("id", id)
        .execute()
        .await?;
    Ok(())
}

/// Runs `sql` (an INSERT into `table` with an `{id:String}` partition
/// parameter) once per month partition not done yet in `phase`, each time
/// dropping what an interrupted run left in that partition first; the
/// phase is done after the last; the progress ends with the table's rows,
/// `what` they are.
#[allow(clippy::too_many_arguments)]
async fn per_month(
    ctx: &Ctx,
    state: &mut RebuildState,
    store: &mut StateStore,
    phase: &str,
    table: &str,
    months: &[String],
    sql: &str,
    progress: &Progress,
    what: &str,
) -> Result<(), RebuildError> {
    for id in months {
        let Some(month) = month_id(id) else { continue };
        progress.set_message(format!("month {id}"));
        if !state.month_done(phase, month) {
            drop_partition(ctx, table, id).await?;
            ctx.shadow.query(sql).param("id", id).execute().await?;
            state.finish_month(phase, month);
            store.save(state).await?;
        }
        progress.inc(1);
    }
    state.finish_phase(phase);
    store.save(state).await?;
    let rows: u64 = ctx
        .shadow
        .query(&format!("SELECT count() FROM {table}"))
        .fetch_one()
        .await?;
    progress.finish(&format!("{rows} {what}"));
    Ok(())
}

async fn copy_from_table(
    ctx: &Ctx,
    state: &mut RebuildState,
    store: &mut StateStore,
    prices: &PriceTable,
    insert_rows: usize,
) -> Result<(), RebuildError> {
    let months: Vec<String> = partitions(&ctx.live, "usage_events")
        .await?
        .into_iter()
        .filter(|id| {
            month_id(id)
                .and_then(crate::scope::month_of_partition)
                .is_some_and(|m| state.scope.touches_month(m))
        })
        .collect();
    let total: u64 = state
        .scope
        .bind(ctx.live.query(&format!(
            "SELECT count() FROM usage_events FINAL WHERE {}",
            Scope::sql("toDate(created_at)")
        )))
        .fetch_one()
        .await?;
    let progress = Progress::new("raw", total, "events");
    let sql = format!(
        "SELECT {} FROM usage_events FINAL WHERE _partition_id = {{id:String}} AND {}",
        RAW_COLUMNS.join(", "),
        Scope::sql("toDate(created_at)")
    );
    for id in &months {
        let Some(month) = month_id(id) else { continue };
        progress.set_message(format!("month {id}"));
        if state.month_done(PHASE_RAW, month) {
            continue;
        }
        drop_partition(ctx, "usage_events", id).await?;
        let mut cursor = state
            .scope
            .bind(ctx.live.query(&sql).param("id", id))
            .fetch::<UsageEventRow>()?;
        let mut insert = ctx.shadow.insert::<UsageEventRow>("usage_events").await?;
        let mut in_insert = 0usize;
        while let Some(mut row) = cursor.next().await? {
            row.cost_usd = prices
                .cost(
                    &row.model,
                    row.created_at.date_naive(),
                    row.prompt_tokens,
                    row.completion_tokens,
                )
                .unwrap_or(0);
            insert.write(&row).await?;
            in_insert += 1;
            state.events_staged += 1;
            if in_insert >= insert_rows {
                insert.end().await?;
                insert = ctx.shadow.insert::<UsageEventRow>("usage_events").await?;
                progress.inc(in_insert as u64);
                in_insert = 0;
            }
        }
        insert.end().await?;
        progress.inc(in_insert as u64);
        state.finish_month(PHASE_RAW, month);
        store.save(state).await?;
    }
    state.finish_phase(PHASE_RAW);
    store.save(state).await?;
    progress.finish("re-priced with today's model_prices");
    Ok(())
}

/// The SQL that sums raw events into `usage_daily` rows, as the
/// processors' deltas do: the key, the account, the sums.
pub const DAILY_COLUMNS: &str = "install_id, date, user_hash, source, model, late_billing_month, account_id, \
     requests, prompt_tokens, completion_tokens, total_tokens, cost_usd, over_limit_requests, over_limit_tokens";

pub const DAILY_FROM_RAW: &str = "SELECT install_id, toDate(created_at) AS date, user_hash, source, model,
       if(billing_month = toStartOfMonth(created_at), toDate(0), billing_month) AS late_billing_month,
       any(account_id), count(), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens),
       sum(cost_usd), countIf(over_limit != ''), sumIf(total_tokens, over_limit != '')
FROM usage_events FINAL";

async fn sum_daily(
    ctx: &Ctx,
    state: &mut RebuildState,
    store: &mut StateStore,
) -> Result<(), RebuildError> {
    let months = partitions(&ctx.shadow, "usage_events").await?;
    let progress = Progress::new("daily", months.len() as u64, "months");
    let sql = format!(
        "INSERT INTO usage_daily ({DAILY_COLUMNS}) {DAILY_FROM_RAW}
         WHERE _partition_id = {{id:String}}
         GROUP BY install_id, date, user_hash, source, model, late_billing_month"
    );
    per_month(
        ctx,
        state,
        store,
        PHASE_DAILY,
        "usage_daily",
        &months,
        &sql,
        &progress,
        "daily rows",
    )
    .await
}

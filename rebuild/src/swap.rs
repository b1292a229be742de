//! The swap and the rollback, while the processors keep running.
//!
//! The processors write a batch only after recording it in the batch
//! ledger (`processor_batches`), and commit its offsets only after every
//! write. So the swap *fences* them by adding a constraint to the ledger
//! that no row satisfies: every new batch's record fails (a transient
//! error: the processors retry it every few seconds and lose nothing),
//! and the batches already recorded finish. Once every recorded batch is
//! committed, the live tables hold exactly the events before the live
//! group's committed offsets, and nothing writes them. Then, fenced:
//!
//! 1. the rows outside the scope are copied from the live tables (whole
//!    month partitions hard-linked by `ATTACH PARTITION ... FROM`);
//! 2. the shadow tables catch up to those offsets (`catchup`);
//! 3. `usage_install_daily` and `usage_monthly` are derived from the
//!    complete `usage_daily` in the scope;
//! 4. the compare runs on still tables, and refuses unexplained
//!    differences unless forced;
//! 5. each table is exchanged with its shadow (`EXCHANGE TABLES`, atomic
//!    for every reader: a query sees the old table or the new one whole);
//! 6. installations erased since the rebuild began are erased again;
//! 7. the fence is lifted: the processors write on, into the new tables.
//!
//! The replaced tables stay in the shadow database. `rollback` fences
//! again, catches them up with what the processors wrote since the swap
//! (all three rollups: they are complete tables), and exchanges back.
//!
//! A swap killed at any step is finished by running it again: the fence
//! stays up meanwhile (the processors wait, nothing is lost), a new
//! attempt first removes what the last one assembled, and the tables'
//! UUIDs tell which exchanges happened.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use usage_processors::pricing::PriceTable;

use crate::build::{partitions, DAILY_COLUMNS};
use crate::catchup::{self, Rollups};
use crate::compare;
use crate::config::SwapArgs;
use crate::error::RebuildError;
use crate::scope::{month_of_partition, Scope};
use crate::state::{RebuildState, RollbackState, StateStore, SwapState, TABLES};
use crate::{topic, Ctx};

pub const FENCE: &str = "rebuild_swap_fence";

const SUMS: &str = "sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), \
                    sum(cost_usd), sum(over_limit_requests), sum(over_limit_tokens)";

pub async fn fence(ctx: &Ctx) -> Result<(), RebuildError> {
    ctx.live
        .query(&format!(
            "ALTER TABLE processor_batches ADD CONSTRAINT IF NOT EXISTS {FENCE} \
             CHECK batch_id = 'writes fenced by usage-rebuild swap'"
        ))
        .execute()
        .await?;
    Ok(())
}

pub async fn unfence(ctx: &Ctx) -> Result<(), RebuildError> {
    ctx.live
        .query(&format!(
            "ALTER TABLE processor_batches DROP CONSTRAINT IF EXISTS {FENCE}"
        ))
        .execute()
        .await?;
    Ok(())
}

pub async fn fenced(ctx: &Ctx) -> Result<bool, RebuildError> {
    let n: u64 = ctx
        .live
        .query(
            "SELECT count() FROM system.tables WHERE database = currentDatabase()
             AND name = 'processor_batches' AND position(create_table_query, {f:String}) > 0",
        )
        .param("f", FENCE)
        .fetch_one()
        .await?;
    Ok(n > 0)
}

/// The rebuild in the shadow database, refused when there is none.
pub async fn load(ctx: &Ctx) -> Result<(StateStore, RebuildState), RebuildError> {
    let mut store = StateStore::new(ctx.shadow.clone(), &ctx.shadow_db);
    if !ctx.shadow_db_exists().await? {
        return Err(RebuildError::refused(format!(
            "no rebuild in `{}`: run `usage-rebuild build` first",
            ctx.shadow_db
        )));
    }
    let state = store.load().await?.ok_or_else(|| {
        RebuildError::refused(format!(
            "no rebuild in `{}`: run `usage-rebuild build` first",
            ctx.shadow_db
        ))
    })?;
    Ok((store, state))
}

async fn committed_now(ctx: &Ctx) -> Result<(BTreeMap<i32, i64>, i32), RebuildError> {
    topic::live_offsets(&ctx.kafka, &ctx.group).await
}

/// Waits until no batch the processors recorded is still uncommitted,
/// and returns the committed offsets then: what the still live tables hold.
async fn quiesce(ctx: &Ctx, timeout: Duration) -> Result<BTreeMap<i32, i64>, RebuildError> {
    let deadline = Instant::now() + timeout;
    loop {
        let (committed, _) = committed_now(ctx).await?;
        let open: Vec<(i32, i64)> = ctx
            .live
            .query(
                "SELECT partition, max(last_offset) FROM processor_batches
                 WHERE topic = {topic:String} AND consumer_group = {group:String} AND state = 'recorded'
                 GROUP BY partition",
            )
            .param("topic", &ctx.kafka.events_topic)
            .param("group", &ctx.group)
            .fetch_all()
            .await?;
        let busy: Vec<String> = open
            .iter()
            .filter(|(p, last)| committed.get(p).is_some_and(|c| last >= c))
            .map(|(p, last)| format!("partition {p} up to offset {last}"))
            .collect();
        let inserting: u64 = ctx
            .live
            .query(
                "SELECT count() FROM system.processes WHERE current_database = currentDatabase()
                 AND match(query, '^\\\\s*INSERT\\\\s+INTO\\\\s+(usage_events|usage_daily|usage_install_daily|usage_monthly)\\\\b')",
            )
            .fetch_one()
            .await?;
        if busy.is_empty() && inserting == 0 {
            return Ok(committed);
        }
        if Instant::now() >= deadline {
            return Err(RebuildError::refused(format!(
                "the processors did not finish their batches in {} s ({}{}): a processor may be down \
                 with a batch half written; once it is back (or its partitions moved) run the command again",
                timeout.as_secs(),
                busy.join(", "),
                if inserting > 0 { "; inserts still running" } else { "" }
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the live processors are at least where the shadow is.
async fn live_not_behind(
    ctx: &Ctx,
    applied: &BTreeMap<i32, i64>,
    timeout: Duration,
) -> Result<(), RebuildError> {
    let deadline = Instant::now() + timeout;
    loop {
        let (committed, _) = committed_now(ctx).await?;
        let behind: Vec<String> = applied
            .iter()
            .filter(|(p, a)| committed.get(p).is_none_or(|c| c < a))
            .map(|(p, a)| {
                format!(
                    "partition {p}: live at {}, shadow at {a}",
                    committed.get(p).copied().unwrap_or(0)
                )
            })
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(RebuildError::refused(format!(
                "the live processors are behind the shadow tables ({}); wait for them to catch up",
                behind.join("; ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn table_uuid(client: &clickhouse::Client, table: &str) -> Result<String, RebuildError> {
    Ok(client
        .query("SELECT toString(uuid) FROM system.tables WHERE database = currentDatabase() AND name = {t:String}")
        .param("t", table)
        .fetch_one()
        .await?)
}

/// Exchanges each table whose live name does not carry `uuids[table]` yet.
async fn exchange(ctx: &Ctx, uuids: &BTreeMap<String, String>) -> Result<(), RebuildError> {
    for table in TABLES {
        let live = table_uuid(&ctx.live, table).await?;
        if uuids.get(table) == Some(&live) {
            continue;
        }
        ctx.server
            .query(&format!(
                "EXCHANGE TABLES {} AND {}",
                ctx.live_table(table),
                ctx.shadow_table(table)
            ))
            .execute()
            .await?;
        println!("  exchanged {table}");
    }
    Ok(())
}

/// Erases again, from the live tables, every installation erased since
/// `since` (an erasure may have run on the tables just replaced).
async fn erase_again(ctx: &Ctx, since: chrono::DateTime<Utc>) -> Result<usize, RebuildError> {
    let installs: Vec<String> = ctx
        .live
        .query("SELECT DISTINCT install_id FROM erased_installations WHERE erased_at >= fromUnixTimestamp64Milli({since:Int64})")
        .param("since", since.timestamp_millis())
        .fetch_all()
        .await?;
    for install in &installs {
        usage_schemas::erasure::delete_rows(&ctx.live, install).await?;
    }
    Ok(installs.len())
}

/// `usage-rebuild swap`.
pub async fn swap(ctx: &Ctx, args: &SwapArgs) -> Result<(), RebuildError> {
    let (mut store, mut state) = load(ctx).await?;
    if !state.built() {
        return Err(RebuildError::refused(
            "the build has not finished: run `usage-rebuild build` again (it resumes)",
        ));
    }
    if state.swapped() {
        return Err(RebuildError::refused(format!(
            "already swapped at {}: `usage-rebuild rollback` swaps back, `usage-rebuild drop` forgets it",
            state.swap.as_ref().and_then(|s| s.swapped_at).map_or(String::new(), |t| t.to_string())
        )));
    }
    if let Some(s) = state.swap.as_ref().filter(|s| !s.shadow_uuids.is_empty()) {
        // Killed between exchanges: the fence is still up; finish them.
        println!("finishing the exchanges of an interrupted swap");
        let uuids = s.shadow_uuids.clone();
        return finish_swap(ctx, args, &mut store, &mut state, &uuids).await;
    }
    let prices = PriceTable::load(&ctx.live).await?;
    let timeout = Duration::from_secs(args.quiesce_timeout_secs);
    // Unfenced first, so that the fenced catch-up is short.
    catchup::to_live(ctx, &mut state, &mut store, &prices, Rollups::DailyOnly).await?;
    live_not_behind(ctx, &state.applied, timeout).await?;

    fence(ctx).await?;
    let fenced_at = Instant::now();
    println!("fenced: the processors finish their batches in flight and wait");
    let result = fenced_swap(ctx, args, &mut store, &mut state, &prices, timeout).await;
    if result.is_err()
        && state
            .swap
            .as_ref()
            .is_some_and(|s| !s.shadow_uuids.is_empty())
    {
        // Some tables may be exchanged and others not: the processors stay
        // fenced until a new `swap` finishes the exchanges.
        println!("the swap stopped while exchanging: the processors stay fenced; run `usage-rebuild swap` again");
        return result;
    }
    // Otherwise lifted whatever happened: a swap that stopped before the
    // exchanges leaves the live tables as they were, and the processors go on.
    let lifted = unfence(ctx).await;
    println!(
        "fence lifted after {:.1} s",
        fenced_at.elapsed().as_secs_f64()
    );
    result?;
    lifted?;
    Ok(())
}

async fn fenced_swap(
    ctx: &Ctx,
    args: &SwapArgs,
    store: &mut StateStore,
    state: &mut RebuildState,
    prices: &PriceTable,
    timeout: Duration,
) -> Result<(), RebuildError> {
    let target = quiesce(ctx, timeout).await?;
    if let Some(ms) = std::env::var("USAGE_REBUILD_HOLD_FENCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        // Tests' fault injection (never set in production): a long fence,
        // so that a batch surely arrives while it is up.
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let attempt = state.swap.as_ref().map_or(0, |s| s.attempt) + 1;
    if attempt > 1 {
        println!("attempt {attempt}: removing what the interrupted attempt assembled");
        clean_assembly(ctx, &state.scope).await?;
    }
    state.swap = Some(SwapState {
        attempt,
        target: target.clone(),
        shadow_uuids: BTreeMap::new(),
        swapped_at: None,
        keep_until: None,
        rollback: None,
    });
    store.save(state).await?;

    let step = Instant::now();
    copy_outside(ctx, &state.scope).await?;
    println!(
        "  copied the rows outside the scope ({:.1} s)",
        step.elapsed().as_secs_f64()
    );
    let shadow = ctx.shadow.clone();
    catchup::apply(
        ctx,
        &shadow,
        state,
        store,
        prices,
        &target,
        Rollups::DailyOnly,
        "catchup",
    )
    .await?;
    let step = Instant::now();
    derive(ctx, &state.scope).await?;
    println!(
        "  derived usage_install_daily and usage_monthly ({:.1} s)",
        step.elapsed().as_secs_f64()
    );

    let report = compare::compare(ctx, state, true).await?;
    print!("{}", report.render(20));
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&report).map_err(std::io::Error::other)?,
        )?;
    }
    if !report.clean() && !args.force {
        return Err(RebuildError::refused(
            "unexplained differences: not swapped (see the report; --force swaps anyway)",
        ));
    }

    let mut uuids = BTreeMap::new();
    for table in TABLES {
        uuids.insert(table.to_string(), table_uuid(&ctx.shadow, table).await?);
    }
    if let Some(s) = state.swap.as_mut() {
        s.shadow_uuids = uuids.clone();
    }
    store.save(state).await?;
    finish_swap(ctx, args, store, state, &uuids).await
}

/// The exchanges, the erasures since the build began, and the record.
async fn finish_swap(
    ctx: &Ctx,
    args: &SwapArgs,
    store: &mut StateStore,
    state: &mut RebuildState,
    uuids: &BTreeMap<String, String>,
) -> Result<(), RebuildError> {
    exchange(ctx, uuids).await?;
    let now = Utc::now();
    if let Some(s) = state.swap.as_mut() {
        s.swapped_at = Some(now);
        s.keep_until =
            Some(now + chrono::Duration::hours(i64::try_from(args.keep_hours).unwrap_or(24)));
    }
    store.save(state).await?;
    let erased = erase_again(ctx, state.started_at).await?;
    println!(
        "swapped: the live tables are the rebuilt ones; the replaced ones are kept in `{}` until {} \
         (`usage-rebuild rollback` swaps them back){}",
        ctx.shadow_db,
        state.swap.as_ref().and_then(|s| s.keep_until).map_or(String::new(), |t| t.to_string()),
        if erased > 0 { format!("; {erased} installation(s) erased meanwhile erased again") } else { String::new() }
    );
    if fenced(ctx).await? {
        unfence(ctx).await?;
    }
    Ok(())
}

/// Removes from the shadow tables what an interrupted swap assembled: the
/// rows outside the scope and the derived tables (the rebuilt rows of the
/// scope, and what catch-up added to them, stay).
async fn clean_assembly(ctx: &Ctx, scope: &Scope) -> Result<(), RebuildError> {
    for (table, day) in [
        ("usage_events", "toDate(created_at)"),
        ("usage_daily", "date"),
    ] {
        for id in partitions(&ctx.shadow, table).await? {
            let Some(month) = id.parse().ok().and_then(month_of_partition) else {
                continue;
            };
            if !scope.touches_month(month) {
                ctx.shadow
                    .query(&format!(
                        "ALTER TABLE {table} DROP PARTITION ID {{id:String}}"
                    ))
                    .param("id", &id)
                    .execute()
                    .await?;
            } else {
                scope
                    .bind(ctx.shadow.query(&format!(
                        "ALTER TABLE {table} DELETE WHERE _partition_id = {{id:String}} AND NOT {}",
                        Scope::sql(day)
                    )))
                    .param("id", &id)
                    .with_setting("mutations_sync", "2")
                    .execute()
                    .await?;
            }
        }
    }
    for table in ["usage_install_daily", "usage_monthly"] {
        ctx.shadow
            .query(&format!("TRUNCATE TABLE {table}"))
            .execute()
            .await?;
    }
    Ok(())
}

/// Copies, partition by partition, the live rows outside the scope of a
/// table partitioned by month (`day`: the row's day expression).
async fn copy_month_partitions(
    ctx: &Ctx,
    scope: &Scope,
    table: &str,
    day: &str,
) -> Result<(), RebuildError> {
    for id in partitions(&ctx.live, table).await? {
        let Some(month) = id.parse().ok().and_then(month_of_partition) else {
            continue;
        };
        if !scope.touches_month(month) {
            attach_from_live(ctx, table, &id).await?;
        } else if !(scope.installs.is_empty() && scope.spans_month(month)) {
            scope
                .bind(ctx.server.query(&format!(
                    "INSERT INTO {} SELECT * FROM {} WHERE _partition_id = {{id:String}} AND NOT {}",
                    ctx.shadow_table(table),
                    ctx.live_table(table),
                    Scope::sql(day)
                )))
                .param("id", &id)
                .execute()
                .await?;
        }
    }
    Ok(())
}

async fn attach_from_live(ctx: &Ctx, table: &str, id: &str) -> Result<(), RebuildError> {
    ctx.server
        .query(&format!(
            "ALTER TABLE {} ATTACH PARTITION ID {{id:String}} FROM {}",
            ctx.shadow_table(table),
            ctx.live_table(table)
        ))
        .param("id", id)
        .execute()
        .await?;
    Ok(())
}

async fn copy_outside(ctx: &Ctx, scope: &Scope) -> Result<(), RebuildError> {
    copy_month_partitions(ctx, scope, "usage_events", "toDate(created_at)").await?;
    copy_month_partitions(ctx, scope, "usage_daily", "date").await
}

/// The two rollups summed from `usage_daily`: copied outside the scope,
/// derived from the shadow's complete `usage_daily` inside it.
async fn derive(ctx: &Ctx, scope: &Scope) -> Result<(), RebuildError> {
    copy_month_partitions(ctx, scope, "usage_install_daily", "date").await?;
    scope
        .bind(ctx.shadow.query(&format!(
            "INSERT INTO usage_install_daily (date, install_id, requests, prompt_tokens, completion_tokens,
                 total_tokens, cost_usd, over_limit_requests, over_limit_tokens)
             SELECT date, install_id, {SUMS} FROM usage_daily WHERE {} GROUP BY date, install_id",
            Scope::sql("date")
        )))
        .execute()
        .await?;
    // usage_monthly is partitioned by year.
    for id in partitions(&ctx.live, "usage_monthly").await? {
        let Some(year) = id.parse::<i32>().ok() else {
            continue;
        };
        let touched = (1..=12).any(|m| {
            chrono::NaiveDate::from_ymd_opt(year, m, 1).is_some_and(|d| scope.touches_month(d))
        });
        if !touched {
            attach_from_live(ctx, "usage_monthly", &id).await?;
        } else {
            scope
                .bind(ctx.server.query(&format!(
                    "INSERT INTO {} SELECT * FROM {} WHERE _partition_id = {{id:String}} AND NOT {}",
                    ctx.shadow_table("usage_monthly"),
                    ctx.live_table("usage_monthly"),
                    Scope::sql_month()
                )))
                .param("id", &id)
                .execute()
                .await?;
        }
    }
    let monthly_columns = DAILY_COLUMNS.replacen("date", "month", 1);
    scope
        .bind(ctx.shadow.query(&format!(
            "INSERT INTO usage_monthly ({monthly_columns})
             SELECT install_id, toStartOfMonth(date) AS month, user_hash, source, model, late_billing_month,
                    any(account_id), {SUMS}
             FROM usage_daily
             WHERE (empty({{scope_installs:Array(String)}}) OR has({{scope_installs:Array(String)}}, install_id))
               AND toStartOfMonth(date) BETWEEN toStartOfMonth({{scope_since:Date}}) AND toStartOfMonth({{scope_until:Date}})
             GROUP BY install_id, month, user_hash, source, model, late_billing_month"
        )))
        .execute()
        .await?;
    Ok(())
}

/// `usage-rebuild rollback`.
pub async fn rollback(ctx: &Ctx, args: &SwapArgs) -> Result<(), RebuildError> {
    let (mut store, mut state) = load(ctx).await?;
    if !state.swapped() {
        return Err(RebuildError::refused(
            "nothing to roll back: this rebuild was not swapped",
        ));
    }
    if state.rolled_back() {
        return Err(RebuildError::refused("already rolled back"));
    }
    let prices = PriceTable::load(&ctx.live).await?;
    let timeout = Duration::from_secs(args.quiesce_timeout_secs);
    // Unfenced first, then the rest fenced.
    let (target, _) = committed_now(ctx).await?;
    catch_up_kept(ctx, &mut state, &mut store, &prices, &target).await?;
    fence(ctx).await?;
    let fenced_at = Instant::now();
    let result = async {
        let target = quiesce(ctx, timeout).await?;
        catch_up_kept(ctx, &mut state, &mut store, &prices, &target).await?;
        let mut uuids = BTreeMap::new();
        for table in TABLES {
            uuids.insert(table.to_string(), table_uuid(&ctx.shadow, table).await?);
        }
        let swapped_at = state
            .swap
            .as_ref()
            .and_then(|s| s.swapped_at)
            .unwrap_or(state.started_at);
        if let Some(s) = state.swap.as_mut() {
            if s.rollback.is_none() {
                s.rollback = Some(RollbackState {
                    target: target.clone(),
                    kept_uuids: uuids.clone(),
                    done_at: None,
                });
            }
        }
        store.save(&state).await?;
        let kept = state
            .swap
            .as_ref()
            .and_then(|s| s.rollback.as_ref())
            .map(|r| r.kept_uuids.clone())
            .unwrap_or(uuids);
        exchange(ctx, &kept).await?;
        if let Some(r) = state.swap.as_mut().and_then(|s| s.rollback.as_mut()) {
            r.done_at = Some(Utc::now());
        }
        store.save(&state).await?;
        erase_again(ctx, swapped_at).await?;
        Ok::<_, RebuildError>(())
    }
    .await;
    let lifted = unfence(ctx).await;
    println!(
        "fence lifted after {:.1} s",
        fenced_at.elapsed().as_secs_f64()
    );
    result?;
    lifted?;
    println!(
        "rolled back: the live tables are the ones the swap replaced, with everything written since; \
         the rebuilt ones are in `{}` (`usage-rebuild drop` removes them)",
        ctx.shadow_db
    );
    Ok(())
}

/// The kept tables were complete at the swap: they catch up with all three
/// rollups.
async fn catch_up_kept(
    ctx: &Ctx,
    state: &mut RebuildState,
    store: &mut StateStore,
    prices: &PriceTable,
    target: &BTreeMap<i32, i64>,
) -> Result<u64, RebuildError> {
    let kept = ctx.shadow.clone();
    catchup::apply(
        ctx,
        &kept,
        state,
        store,
        prices,
        target,
        Rollups::All,
        "rollback",
    )
    .await
}

/// `usage-rebuild drop`.
pub async fn drop_shadow(ctx: &Ctx, force: bool) -> Result<(), RebuildError> {
    if ctx.shadow_db_exists().await? {
        let mut store = StateStore::new(ctx.shadow.clone(), &ctx.shadow_db);
        if let Some(state) = store.load().await? {
            let keep = state.swap.as_ref().and_then(|s| s.keep_until);
            if state.swapped()
                && !state.rolled_back()
                && keep.is_some_and(|k| Utc::now() < k)
                && !force
            {
                return Err(RebuildError::refused(format!(
                    "the replaced tables are kept for rollback until {}: --force drops them now",
                    keep.map_or(String::new(), |k| k.to_string())
                )));
            }
        }
        ctx.server
            .query(&format!("DROP DATABASE IF EXISTS {} SYNC", ctx.shadow_db))
            .execute()
            .await?;
        println!("dropped `{}`", ctx.shadow_db);
    }
    if fenced(ctx).await? {
        unfence(ctx).await?;
        println!("lifted the fence an interrupted swap left");
    }
    Ok(())
}

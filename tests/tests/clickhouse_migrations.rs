//! The migrations on the real ClickHouse: applied once, recorded, idempotent,
//! refused when edited, and the tables behave as their DDL promises (TTL,
//! dedup by event_id, activity view).

use usage_e2e::{clickhouse_args, drop_database, migrated_database, require_clickhouse};
use usage_schemas::migrations::{migrate, migrate_through, MigrationError, MIGRATIONS};
use usage_schemas::rows::{UsageEventRow, COST_SCALE};

async fn show_create(client: &clickhouse::Client, table: &str) -> String {
    client
        .query(&format!("SHOW CREATE TABLE {table}"))
        .fetch_one::<String>()
        .await
        .unwrap()
}

#[tokio::test]
async fn migrations_apply_once_and_are_recorded() {
    let ch = clickhouse_args();
    require_clickhouse(&ch).await;
    let all: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();

    let first = migrate(&ch.server_client(), &ch.database).await.unwrap();
    assert_eq!(first.applied, all);
    assert!(first.already_applied.is_empty());

    let second = migrate(&ch.server_client(), &ch.database).await.unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.already_applied, all);

    let recorded: Vec<u32> = ch
        .client()
        .query("SELECT version FROM schema_migrations FINAL ORDER BY version")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(recorded, all);
    drop_database(&ch).await;
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let ch = migrated_database().await;
    ch.client()
        .query("INSERT INTO schema_migrations (version, name, checksum) VALUES (2, '0002_usage_daily', 'stale')")
        .execute()
        .await
        .unwrap();
    match migrate(&ch.server_client(), &ch.database).await {
        Err(MigrationError::Edited { version: 2, .. }) => {}
        other => panic!("expected Edited for version 2, got {other:?}"),
    }
    drop_database(&ch).await;
}

#[tokio::test]
async fn retention_is_in_the_table_definitions() {
    let ch = migrated_database().await;
    let client = ch.client();
    let raw = show_create(&client, "usage_events").await;
    assert!(
        raw.contains("TTL toDateTime(created_at) + toIntervalDay(90)"),
        "{raw}"
    );
    assert!(raw.contains("ReplacingMergeTree"), "{raw}");
    let daily = show_create(&client, "usage_daily").await;
    assert!(daily.contains("TTL date + toIntervalYear(2)"), "{daily}");
    let monthly = show_create(&client, "usage_monthly").await;
    assert!(
        !monthly.contains("TTL"),
        "monthly aggregates are kept: {monthly}"
    );
    for table in ["installation_metadata", "installation_activity"] {
        assert!(show_create(&client, table).await.contains("CREATE TABLE"));
    }
    drop_database(&ch).await;
}

fn raw(event: u32, created_at: chrono::DateTime<chrono::Utc>) -> UsageEventRow {
    UsageEventRow {
        event_id: format!("evt_{event:032x}"),
        install_id: "inst_a".into(),
        account_id: "acc_1".into(),
        wp_site_id: None,
        user_hash: "u".repeat(64),
        source: "bulk".into(),
        model: "gpt-4o".into(),
        prompt_tokens: 100,
        completion_tokens: 10,
        total_tokens: 110,
        cost_usd: 350 * COST_SCALE / 1_000_000,
        context: r#"{"attachment_id":1}"#.into(),
        created_at,
        processed_at: None,
        batch_sent_at: Some(created_at),
        received_at: chrono::Utc::now(),
        signature_scheme: "install_sig_v1".into(),
        gateway_instance: "t".into(),
        over_limit: String::new(),
        billing_month: usage_service_kit::periods::month_start(created_at.timestamp_millis()),
    }
}

#[tokio::test]
async fn raw_events_dedup_by_event_id_and_feed_installation_activity() {
    let ch = migrated_database().await;
    let client = ch.client();
    let day = chrono::Utc::now() - chrono::Duration::days(1);
    let earlier = day - chrono::Duration::hours(3);

    // Two inserts: the second resends event 1 (a retry) next to a new event 2.
    for batch in [
        vec![raw(1, day), raw(3, earlier)],
        vec![raw(1, day), raw(2, day)],
    ] {
        let mut insert = client
            .insert::<UsageEventRow>("usage_events")
            .await
            .unwrap();
        for row in &batch {
            insert.write(row).await.unwrap();
        }
        insert.end().await.unwrap();
    }

    let (rows, tokens): (u64, u64) = client
        .query(
            "SELECT count(), sum(total_tokens) FROM usage_events FINAL WHERE install_id = 'inst_a'",
        )
        .fetch_one()
        .await
        .unwrap();
    assert_eq!((rows, tokens), (3, 330), "event 1 counted once");

    let back: Vec<UsageEventRow> = client
        .query(
            "SELECT ?fields FROM usage_events FINAL WHERE install_id = 'inst_a' ORDER BY event_id",
        )
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(back.len(), 3);
    // Every column comes back as written (timestamps at millisecond precision).
    let mut expected = raw(2, day);
    expected.created_at = chrono::DateTime::from_timestamp_millis(day.timestamp_millis()).unwrap();
    expected.batch_sent_at = Some(expected.created_at);
    expected.received_at = back[1].received_at;
    assert_eq!(back[1], expected);
    let cost: String = client
        .query("SELECT toString(sum(cost_usd)) FROM usage_events FINAL")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(cost, "0.00105", "3 x 0.00035 USD, exact");

    let (first, last): (i64, i64) = client
        .query(
            "SELECT toUnixTimestamp64Milli(min(first_seen)), toUnixTimestamp64Milli(max(last_seen))
             FROM installation_activity WHERE install_id = 'inst_a'",
        )
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(first, earlier.timestamp_millis());
    assert_eq!(last, day.timestamp_millis());
    drop_database(&ch).await;
}

/// Every row of usage_daily as text, sorted, as readers see it (FINAL:
/// inserts and merges may collapse replaced versions at any time).
async fn daily_rows(client: &clickhouse::Client) -> Vec<String> {
    client
        .query(
            "SELECT toString((install_id, date, user_hash, source, model, account_id, requests,
                    prompt_tokens, completion_tokens, total_tokens, cost_usd, version))
             FROM usage_daily FINAL ORDER BY 1",
        )
        .fetch_all()
        .await
        .unwrap()
}

/// `days_ago` before the day this test binary started (so that a test
/// crossing midnight still means the same days).
fn day(days_ago: u64) -> String {
    static TODAY: std::sync::OnceLock<chrono::NaiveDate> = std::sync::OnceLock::new();
    let today = *TODAY.get_or_init(|| chrono::Utc::now().date_naive());
    (today - chrono::Days::new(days_ago)).to_string()
}

/// One daily row of `install` (user u1, inline, gpt-4o-mini), `days_ago`.
async fn insert_daily(
    client: &clickhouse::Client,
    install: &str,
    days_ago: u64,
    requests: u64,
    version: u64,
) {
    client
        .query(
            "INSERT INTO usage_daily VALUES (?, toDate(?), 'u1', 'inline', 'gpt-4o-mini', 'acc',
             ?, 10, 2, 12, 0.000123456789, ?)",
        )
        .bind(install)
        .bind(day(days_ago))
        .bind(requests)
        .bind(version)
        .execute()
        .await
        .unwrap();
}

/// A database at migration 9, its usage_daily holding a day rewritten by a
/// second recompute (two versions of one key) beside other rows.
async fn daily_rollups_at_version_9() -> (usage_service_kit::clickhouse::ClickHouseArgs, Vec<String>)
{
    let ch = clickhouse_args();
    require_clickhouse(&ch).await;
    let report = migrate_through(&ch.server_client(), &ch.database, &MIGRATIONS[..9])
        .await
        .unwrap();
    assert_eq!(report.applied, (1..=9).collect::<Vec<u32>>());
    let client = ch.client();
    for (install, days_ago, requests, version) in [
        ("inst_a", 1, 3, 10),
        ("inst_a", 1, 4, 11),
        ("inst_a", 2, 1, 10),
        ("inst_b", 1, 7, 12),
    ] {
        insert_daily(&client, install, days_ago, requests, version).await;
    }
    let rows = daily_rows(&client).await;
    assert_eq!(rows.len(), 3);
    assert!(
        rows[1].contains(",4,10,2,12,"),
        "the newer recompute: {rows:?}"
    );
    (ch, rows)
}

async fn granularity(client: &clickhouse::Client, table: &str) -> Option<String> {
    client
        .query(
            "SELECT extract(engine_full, 'index_granularity = (\\\\d+)') FROM system.tables
             WHERE database = currentDatabase() AND name = ?",
        )
        .bind(table)
        .fetch_optional()
        .await
        .unwrap()
}

/// usage_daily has 1,024-row granules, and the old table is gone.
async fn assert_rebuilt(client: &clickhouse::Client) {
    assert_eq!(
        granularity(client, "usage_daily").await.as_deref(),
        Some("1024")
    );
    assert_eq!(
        granularity(client, "usage_daily_rebuild").await,
        None,
        "old table dropped"
    );
}

#[tokio::test]
async fn usage_daily_is_rebuilt_with_small_granules_and_keeps_every_row() {
    let (ch, before) = daily_rollups_at_version_9().await;
    let client = ch.client();
    assert_eq!(
        granularity(&client, "usage_daily").await.as_deref(),
        Some("8192")
    );

    let report = migrate_through(&ch.server_client(), &ch.database, &MIGRATIONS[..10])
        .await
        .unwrap();
    assert_eq!(report.applied, [10]);
    assert_rebuilt(&client).await;
    assert_eq!(
        daily_rows(&client).await,
        before,
        "every row, as read with FINAL"
    );
    let daily = show_create(&client, "usage_daily").await;
    assert!(daily.contains("TTL date + toIntervalYear(2)"), "{daily}");
    assert!(daily.contains("ReplacingMergeTree(version)"), "{daily}");
    drop_database(&ch).await;
}

#[tokio::test]
async fn the_rebuild_repeats_safely_after_dying_before_or_after_the_swap() {
    let (ch, before) = daily_rollups_at_version_9().await;
    let client = ch.client();
    let exec = |sql: String| {
        let client = client.clone();
        async move { client.query(&sql).execute().await.unwrap() }
    };
    let create = create_scratch_table();

    // Died during the copy: a half-filled new table, plus a row nobody wrote.
    exec(create.clone()).await;
    exec(
        "INSERT INTO usage_daily_rebuild SELECT * FROM usage_daily WHERE install_id = 'inst_b'"
            .into(),
    )
    .await;
    exec("INSERT INTO usage_daily_rebuild SELECT * REPLACE ('inst_ghost' AS install_id) FROM usage_daily".into()).await;
    let report = migrate_through(&ch.server_client(), &ch.database, &MIGRATIONS[..10])
        .await
        .unwrap();
    assert_eq!(report.applied, [10]);
    assert_eq!(
        daily_rows(&client).await,
        before,
        "copied again from the start"
    );
    assert_rebuilt(&client).await;

    // Died after the swap, before the old table was dropped (and before the
    // migration was recorded): the old table is still there, with 8,192-row
    // granules and rows that must not come back.
    exec(create.replace("index_granularity = 1024", "index_granularity = 8192")).await;
    exec("INSERT INTO usage_daily_rebuild SELECT * REPLACE ('inst_ghost' AS install_id) FROM usage_daily".into()).await;
    exec(
        "ALTER TABLE schema_migrations DELETE WHERE version = 10 SETTINGS mutations_sync = 1"
            .into(),
    )
    .await;
    let report = migrate_through(&ch.server_client(), &ch.database, &MIGRATIONS[..10])
        .await
        .unwrap();
    assert_eq!(report.applied, [10]);
    assert_eq!(daily_rows(&client).await, before, "not swapped back");
    assert_rebuilt(&client).await;
    drop_database(&ch).await;
}

/// A processor writing during the copy would lose its rows with the old
/// table: the check before the swap refuses, and the next run copies again.
#[tokio::test]
async fn the_rebuild_refuses_to_swap_when_usage_daily_was_written_during_the_copy() {
    let (ch, _) = daily_rollups_at_version_9().await;
    let client = ch.client();
    let (statements, check) = run_0010_until_the_version_check(&client).await;
    // A recompute lands in the old table after the copy.
    insert_daily(&client, "inst_a", 1, 5, 13).await;
    let err = client
        .query(&statements[check])
        .execute()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stop the processors"), "{err}");

    // Run whole (writers stopped), it copies the late row too.
    let with_late_row = daily_rows(&client).await;
    assert!(
        with_late_row[1].contains(",5,10,2,12,"),
        "{with_late_row:?}"
    );
    migrate_through(&ch.server_client(), &ch.database, &MIGRATIONS[..10])
        .await
        .unwrap();
    assert_eq!(daily_rows(&client).await, with_late_row);
    assert_rebuilt(&client).await;
    drop_database(&ch).await;
}

/// Runs 0010's statements before the one that compares the newest versions
/// of the two tables; answers them all and that one's index.
async fn run_0010_until_the_version_check(client: &clickhouse::Client) -> (Vec<String>, usize) {
    let statements = MIGRATIONS[9].statements();
    let check = statements
        .iter()
        .position(|s| s.contains("max(version)"))
        .unwrap();
    for s in &statements[..check] {
        client.query(s).execute().await.unwrap();
    }
    (statements, check)
}

/// 0010's statement creating the scratch table.
fn create_scratch_table() -> String {
    MIGRATIONS[9]
        .statements()
        .into_iter()
        .find(|s| s.starts_with("CREATE TABLE usage_daily_rebuild"))
        .unwrap()
}

/// The copy may drop rows the TTL expired meanwhile: those at the TTL's
/// edge must not make the check refuse.
#[tokio::test]
async fn the_write_check_ignores_rows_at_the_ttl_edge() {
    let (ch, _) = daily_rollups_at_version_9().await;
    let client = ch.client();
    client
        .query(
            "INSERT INTO usage_daily VALUES ('inst_old', today() - INTERVAL 2 YEAR + INTERVAL 1 DAY,
             'u1', 'inline', 'gpt-4o-mini', 'acc', 1, 10, 2, 12, 0.000123456789, 99)",
        )
        .execute()
        .await
        .unwrap();
    let (statements, check) = run_0010_until_the_version_check(&client).await;
    // As if the TTL had dropped it from the copy.
    client
        .query(
            "ALTER TABLE usage_daily_rebuild DELETE WHERE version = 99 SETTINGS mutations_sync = 1",
        )
        .execute()
        .await
        .unwrap();
    client.query(&statements[check]).execute().await.unwrap();
    drop_database(&ch).await;
}

/// A writer whose INSERT still runs (a processor killed mid-query leaves
/// its query running on the server) stops the rebuild before the copy and
/// before the swap; an INSERT into the scratch table does not.
#[tokio::test]
async fn the_rebuild_refuses_to_start_or_swap_while_an_insert_into_usage_daily_runs() {
    let (ch, _) = daily_rollups_at_version_9().await;
    let client = ch.client();
    let statements = MIGRATIONS[9].statements();
    let running_checks: Vec<&String> = statements
        .iter()
        .filter(|s| s.contains("system.processes"))
        .collect();
    assert_eq!(
        running_checks.len(),
        2,
        "before the copy and before the swap"
    );
    client
        .query(&create_scratch_table())
        .execute()
        .await
        .unwrap();
    for (table, refused) in [("usage_daily_rebuild", false), ("usage_daily", true)] {
        // About 10 s of INSERT, one row every 0.4 s.
        let slow = client.query(&format!(
            "INSERT INTO {table} SELECT 'inst_slow', today(), 'u', 'inline', 'm', 'acc', 1, 1, 1, 1, 0,
             sleepEachRow(0.4) + 1 FROM numbers(25) SETTINGS max_block_size = 1"
        ));
        let insert = tokio::spawn(async move { slow.execute().await });
        usage_e2e::eventually(
            "the slow insert shows in system.processes",
            std::time::Duration::from_secs(10),
            || {
                let client = client.clone();
                async move {
                let n: u64 = client
                    .query("SELECT count() FROM system.processes WHERE current_database = currentDatabase() AND query LIKE '%inst_slow%' AND query NOT LIKE '%system.processes%'")
                    .fetch_one()
                    .await
                    .unwrap();
                (n > 0).then_some(())
                }
            },
        )
        .await;
        for check in &running_checks {
            let result = client.query(check).execute().await;
            match (refused, result) {
                (true, Err(err)) => assert!(
                    err.to_string()
                        .contains("an INSERT into usage_daily is running"),
                    "{err}"
                ),
                (false, Ok(())) => {}
                (refused, result) => panic!("{table}: refused {refused}, got {result:?}"),
            }
        }
        client
            .query("KILL QUERY WHERE current_database = currentDatabase() AND query LIKE '%inst_slow%' AND query NOT LIKE '%KILL%' SYNC")
            .execute()
            .await
            .unwrap();
        let _ = insert.await;
    }
    drop_database(&ch).await;
}

/// Migrations 12-14 turn the three rollups into SummingMergeTree tables of
/// deltas: each key keeps the value of its newest recompute (not the sum of
/// its versions), and what is inserted afterwards adds to it.
#[tokio::test]
async fn rollups_become_summing_tables_keeping_the_newest_recompute() {
    let (ch, _) = daily_rollups_at_version_9().await;
    let client = ch.client();
    let report = migrate_through(&ch.server_client(), &ch.database, &MIGRATIONS[..11])
        .await
        .unwrap();
    assert_eq!(report.applied, [10, 11]);
    // The other two rollups as the recomputes left them: two versions of
    // one key each.
    for sql in [
        "INSERT INTO usage_install_daily (date, install_id, requests, version) VALUES (today() - 1, 'inst_a', 5, 1), (today() - 1, 'inst_a', 7, 2)",
        "INSERT INTO usage_monthly (install_id, month, user_hash, source, model, account_id, requests, version)
         VALUES ('inst_a', toStartOfMonth(today()), 'u1', 'inline', 'gpt-4o-mini', 'acc', 5, 1),
                ('inst_a', toStartOfMonth(today()), 'u1', 'inline', 'gpt-4o-mini', 'acc', 8, 2)",
    ] {
        client.query(sql).execute().await.unwrap();
    }

    let report = migrate_through(&ch.server_client(), &ch.database, MIGRATIONS)
        .await
        .unwrap();
    assert_eq!(
        report.applied,
        (12..=MIGRATIONS.len() as u32).collect::<Vec<_>>()
    );
    for table in ["usage_daily", "usage_install_daily", "usage_monthly"] {
        let create = show_create(&client, table).await;
        assert!(create.contains("SummingMergeTree"), "{create}");
        assert!(
            create.contains("non_replicated_deduplication_window = 100000"),
            "{create}"
        );
        assert!(!create.contains("version"), "{create}");
    }
    let requests = |sql: &'static str| {
        let client = client.clone();
        async move { client.query(sql).fetch_one::<u64>().await.unwrap() }
    };
    let daily_a = "SELECT sum(requests) FROM usage_daily FINAL WHERE install_id = 'inst_a'";
    let install_daily =
        "SELECT sum(requests) FROM usage_install_daily FINAL WHERE install_id = 'inst_a'";
    let monthly = "SELECT sum(requests) FROM usage_monthly FINAL WHERE install_id = 'inst_a'";
    // inst_a: day 1 recomputed to 4 (not 3 + 4), day 2 holds 1.
    assert_eq!(requests(daily_a).await, 5);
    assert_eq!(requests(install_daily).await, 7);
    assert_eq!(requests(monthly).await, 8);

    // A delta adds to the key; the same delta under the same token adds once.
    for _ in 0..2 {
        client
            .query(
                "INSERT INTO usage_install_daily (date, install_id, requests) VALUES (today() - 1, 'inst_a', 3)",
            )
            .with_setting("insert_deduplication_token", "batch-1/usage_install_daily/1")
            .execute()
            .await
            .unwrap();
    }
    assert_eq!(requests(install_daily).await, 10);
    client
        .query("OPTIMIZE TABLE usage_install_daily FINAL")
        .execute()
        .await
        .unwrap();
    let rows: u64 = client
        .query("SELECT count() FROM usage_install_daily WHERE install_id = 'inst_a'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(
        (rows, requests(install_daily).await),
        (1, 10),
        "merged into one row"
    );
    drop_database(&ch).await;
}

//! The migrations on the real ClickHouse: applied once, recorded, idempotent,
//! refused when edited, and the tables behave as their DDL promises (TTL,
//! dedup by event_id, activity view).

use usage_e2e::{clickhouse_args, drop_database, migrated_database, require_clickhouse};
use usage_schemas::migrations::{migrate, MigrationError, MIGRATIONS};
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

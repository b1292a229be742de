//! The right to erasure, end to end: an installation's rows leave every
//! ClickHouse table, the gateway forgets it, and a full replay of the events
//! topic by a new consumer group brings nothing back.

use std::time::Duration;

use serde_json::Value;
use usage_e2e::pipeline::{admin_token, event, scoped_token, token, Pipeline, Site};
use usage_e2e::processes::ProcessorProcess;
use usage_e2e::{eventually, http, unique};
use usage_query::erasure::TABLES;
use usage_service_kit::auth::Role;

const BIN: &str = env!("CARGO_BIN_EXE_e2e-processors");

async fn rows(p: &Pipeline, site: &Site) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for table in TABLES {
        let n: u64 = p
            .clickhouse
            .client()
            .query(&format!(
                "SELECT count() FROM {table} FINAL WHERE install_id = ?"
            ))
            .bind(&site.install_id)
            .fetch_one()
            .await
            .unwrap();
        out.push((table.to_string(), n));
    }
    out
}

async fn erase(p: &Pipeline, site: &Site, bearer: &str) -> (u16, Value) {
    let r = http()
        .delete(format!(
            "http://{}/api/usage/installations/{}",
            p.query_addr, site.install_id
        ))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn now_iso(offset_secs: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::seconds(offset_secs))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::test]
async fn an_erased_installation_is_gone_everywhere_and_a_replay_cannot_restore_it() {
    let p = Pipeline::start(true).await;
    let (a, b) = (Site::new(1), Site::new(2));
    assert_eq!(p.register(&a, "free").await.0, 201);
    assert_eq!(p.register(&b, "pro").await.0, 201);
    for (site, n) in [(&a, 40u128), (&b, 3)] {
        let events = (0..n)
            .map(|i| {
                event(
                    i,
                    &site.user_hash(1),
                    "bulk",
                    "gpt-4o-mini",
                    100,
                    10,
                    &now_iso(600 - i as i64),
                )
            })
            .collect();
        assert_eq!(p.send(site, site.batch(events)).await.0, 200);
    }
    let yesterday = (chrono::Utc::now() - chrono::Duration::days(1))
        .date_naive()
        .to_string();
    p.wait_for_requests(&a, &yesterday, 40).await;
    p.wait_for_requests(&b, &yesterday, 3).await;
    // The free plan's warning (38 of 50) is in the decisions too.
    let before = eventually("rows in every table", Duration::from_secs(10), || async {
        let r = rows(&p, &a).await;
        r.iter().all(|(_, n)| *n > 0).then_some(r)
    })
    .await;
    let b_before = rows(&p, &b).await;

    // Another account may not erase it, nor its own account's token that
    // every site holds (it lacks data:erase); its account's privacy tool may.
    let (status, body) = erase(&p, &a, &scoped_token(&b.account_id, "data:erase")).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = erase(&p, &a, &token(Role::Account, Some(&a.account_id))).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = erase(
        &p,
        &a,
        &scoped_token(&a.account_id, "usage:read data:erase"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["erased"]["install_id"], a.install_id.as_str());
    for (table, n) in &before {
        assert_eq!(body["erased"]["removed"][table], *n, "{table}: {body}");
    }
    assert_eq!(body["erased"]["removed"]["usage_events"], 40);
    assert_eq!(body["erased"]["tombstoned"].as_array().unwrap().len(), 2);

    assert!(rows(&p, &a).await.iter().all(|(_, n)| *n == 0));
    assert_eq!(
        rows(&p, &b).await,
        b_before,
        "the other installation is untouched"
    );
    let summary = p
        .summary(&format!(
            "install_id={}&date_from={yesterday}",
            a.install_id
        ))
        .await;
    assert_eq!(summary["data"].as_array().unwrap().len(), 0);

    // The gateway forgot it (once the tombstone reached it): its next batch
    // is refused. Sent only then, since an event accepted before would be
    // data received after the erasure, which a replay rightly keeps.
    let gateway = p.gateway.as_ref().unwrap();
    eventually(
        "the gateway to forget it",
        Duration::from_secs(10),
        || async { gateway.registry.get(&a.install_id).is_none().then_some(()) },
    )
    .await;
    let batch = a.batch(vec![event(
        99,
        &a.user_hash(1),
        "bulk",
        "gpt-4o-mini",
        1,
        1,
        &now_iso(5),
    )]);
    let status = p.send(&a, batch).await;
    assert_eq!(status.0, 403, "{}", status.1);
    assert_eq!(status.1["error"], "unknown_installation");

    // Ops replay the whole events topic into the same database.
    let replay = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &unique("replay"), &[]);
    // Until it has written every batch: B's 3 events found stored, A's 40
    // dropped as erased.
    eventually(
        "the replay to write every batch",
        Duration::from_secs(60),
        || async {
            let erased = replay.metric("usage_processor_events_erased_total").await;
            let stored = replay
                .metric("usage_processor_events_duplicate_total")
                .await;
            (erased == 40 && stored == 3).then_some(())
        },
    )
    .await;
    assert!(
        rows(&p, &a).await.iter().all(|(_, n)| *n == 0),
        "the replay restored data"
    );
    assert_eq!(rows(&p, &b).await, b_before);

    // Erasing again is harmless; other roles may not.
    let (status, body) = erase(&p, &a, &admin_token()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["erased"]["removed"]["usage_events"], 0);
    replay.kill().await;
    p.stop().await;
}

/// An erasure can begin while a processor is writing a batch of the same
/// installation: the batch looked for erasures before the erasure was
/// recorded, and its rows can land after the erasure's deletes ran. The
/// batch's second look, once it has written, must delete them, and only
/// for an erasure it had not seen.
#[tokio::test]
async fn a_batch_written_during_an_erasure_deletes_its_own_rows() {
    let db = usage_e2e::migrated_database().await;
    let client = db.client();
    let (late, known, other) = ("inst_late", "inst_known", "inst_other");
    let write_day = |install: &str| {
        let sql = format!(
            "INSERT INTO usage_daily (install_id, date, user_hash, source, model, account_id, requests,
                 prompt_tokens, completion_tokens, total_tokens, cost_usd)
             VALUES ('{install}', today(), 'u1', 'inline', 'gpt-4o-mini', 'acc', 3, 30, 6, 36, 0.01)"
        );
        let client = client.clone();
        async move { client.query(&sql).execute().await.unwrap() }
    };
    let mark_erased = |install: &str, at: &str| {
        let sql = format!(
            "INSERT INTO erased_installations VALUES ('{install}', '{at}', 'test', '{{}}')"
        );
        let client = client.clone();
        async move { client.query(&sql).execute().await.unwrap() }
    };
    // `known` was erased long ago and re-registered: the batch saw that
    // erasure before writing, so its new rows are legitimate.
    mark_erased(known, "2026-01-01 00:00:00.000").await;
    let before = usage_processors::rollup::erased_at(&client, [late, known, other].into_iter())
        .await
        .unwrap();
    assert_eq!(before.len(), 1);
    for install in [late, known, other] {
        write_day(install).await;
    }
    // The erasure of `late` is recorded after the batch's first look.
    mark_erased(late, "2026-11-28 12:00:00.000").await;

    let deleted = usage_processors::rollup::delete_erased_meanwhile(
        &client,
        &before,
        [late, known, other].into_iter(),
    )
    .await
    .unwrap();
    assert_eq!(deleted, [late.to_string()].into_iter().collect());
    let remaining: Vec<(String, u64)> = client
        .query("SELECT install_id, sum(requests) FROM usage_daily FINAL GROUP BY install_id ORDER BY install_id")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(remaining, [(known.to_string(), 3), (other.to_string(), 3)]);
    usage_e2e::drop_database(&db).await;
}

/// The same race through the running processor: an erasure recorded after
/// a batch looked for erasures and wrote its rows, whose own deletes ran
/// before those writes (simulated by recording it without deleting, while
/// the processor waits before its second look). The second look deletes the
/// rows everywhere and tombstones the installation's governance state.
#[tokio::test]
async fn the_processor_settles_an_erasure_recorded_while_it_wrote_the_batch() {
    let p = Pipeline::start(false).await;
    let processor = ProcessorProcess::spawn(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &unique("group"),
        &["--pause-before-erasure-check-ms", "4000"],
    );
    let (a, b) = (Site::new(1), Site::new(2));
    assert_eq!(p.register(&a, "pro").await.0, 201);
    assert_eq!(p.register(&b, "pro").await.0, 201);
    for site in [&a, &b] {
        let events = (0..5u128)
            .map(|i| {
                let at = now_iso(600 - i as i64);
                event(i, &site.user_hash(1), "bulk", "gpt-4o-mini", 100, 10, &at)
            })
            .collect();
        assert_eq!(p.send(site, site.batch(events)).await.0, 200);
    }
    eventually(
        "A's batch to be written",
        Duration::from_secs(20),
        || async { (p.raw_totals(&a).await.0 == 5).then_some(()) },
    )
    .await;
    p.clickhouse
        .client()
        .query("INSERT INTO erased_installations VALUES (?, now64(3), 'test', '{}')")
        .bind(&a.install_id)
        .execute()
        .await
        .unwrap();

    eventually(
        "the second look to delete A's rows",
        Duration::from_secs(20),
        || async {
            rows(&p, &a)
                .await
                .iter()
                .all(|(_, n)| *n == 0)
                .then_some(())
        },
    )
    .await;
    eventually(
        "B's batch to be written and rolled up",
        Duration::from_secs(20),
        || async { (p.rollup_requests(&b).await == [5, 5, 5]).then_some(()) },
    )
    .await;
    assert_eq!(p.raw_totals(&b).await, (5, 550), "B keeps its events");

    // Governance: A's last state is a tombstone, after the state its batch
    // published; B's is a state.
    let records = eventually(
        "A's governance tombstone",
        Duration::from_secs(20),
        || async {
            let records = usage_e2e::read_topic_records(&p.kafka, &p.kafka.governance_topic).await;
            let last = records
                .iter()
                .rev()
                .find(|(k, _)| *k == a.install_id.as_bytes());
            matches!(last, Some((_, None))).then_some(records)
        },
    )
    .await;
    let of = |site: &Site| -> Vec<bool> {
        records
            .iter()
            .filter(|(k, _)| *k == site.install_id.as_bytes())
            .map(|(_, payload)| payload.is_some())
            .collect()
    };
    assert_eq!(
        of(&a).first(),
        Some(&true),
        "A's batch published a state first"
    );
    assert_eq!(of(&b).last(), Some(&true), "B keeps its state");
    processor.kill().await;
    p.stop().await;
}

/// A processor that wrote a batch and died before its second look, while an
/// installation of the batch was being erased: the redelivered batch finds
/// those events erased but stored, and deletes them.
#[tokio::test]
async fn a_redelivered_batch_deletes_what_an_earlier_attempt_wrote_after_an_erasure() {
    use usage_processors::pricing::PriceTable;
    use usage_processors::rollup::flush;
    use usage_schemas::UsageEvent;

    let db = usage_e2e::migrated_database().await;
    let client = db.client();
    let now = chrono::Utc::now().timestamp_millis();
    let event = |n: u32, install: &str| UsageEvent {
        event_id: format!("evt_{n:032x}"),
        install_id: install.to_string(),
        account_id: "acc_test".into(),
        wp_site_id: None,
        wp_user_id_hash: "u".repeat(64),
        source: "inline".into(),
        model: "gpt-4o-mini".into(),
        prompt_tokens: 100,
        completion_tokens: 20,
        total_tokens: 120,
        context_json: None,
        created_at: now - 60_000,
        processed_at: None,
        batch_sent_at: None,
        received_at: now - 1_000,
        signature_scheme: "install_sig_v1".into(),
        gateway_instance: "test".into(),
        billing_month: None,
        over_limit: None,
    };
    let batch = vec![
        event(1, "inst_erased"),
        event(2, "inst_erased"),
        event(3, "inst_kept"),
    ];
    let prices = PriceTable::from_rows(Vec::new());
    // The same owner both times: the ids it keeps must not hide the erasure.
    let mut seen = usage_processors::rollup::seen::SeenIds::new(1_000);
    let first = flush(
        &client,
        "erasure-test-batch",
        &batch,
        &prices,
        &mut seen,
        false,
    )
    .await
    .unwrap();
    assert_eq!(first.inserted, 3);

    // The erasure is recorded (its deletes already ran) before the batch is
    // redelivered.
    client
        .query("INSERT INTO erased_installations VALUES ('inst_erased', fromUnixTimestamp64Milli(toInt64(?), 'UTC'), 'test', '{}')")
        .bind(now)
        .execute()
        .await
        .unwrap();
    let again = flush(
        &client,
        "erasure-test-batch",
        &batch,
        &prices,
        &mut seen,
        false,
    )
    .await
    .unwrap();
    assert_eq!((again.erased, again.erased_after_earlier_attempt), (2, 1));

    for table in TABLES {
        let left: Vec<(String, u64)> = client
            .query(&format!(
                "SELECT install_id, count() FROM {table} FINAL WHERE install_id LIKE 'inst_%' GROUP BY install_id ORDER BY install_id"
            ))
            .fetch_all()
            .await
            .unwrap();
        assert!(
            left.iter().all(|(install, _)| install == "inst_kept"),
            "{table}: {left:?}"
        );
    }
    let kept: u64 = client
        .query("SELECT count() FROM usage_events FINAL WHERE install_id = 'inst_kept'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(kept, 1);
    usage_e2e::drop_database(&db).await;
}

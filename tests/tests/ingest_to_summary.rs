//! Signed batches, exactly as the plugin sends them, become exact numbers in
//! the summary API; resending them changes nothing.

use serde_json::{json, Value};
use usage_e2e::pipeline::{event, Pipeline, Site};

/// The scenario's "now": a little in the past so that "today" stays today
/// and never lies in the future, whatever the time of day the test runs.
fn base() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - chrono::Duration::seconds(90)
}

fn at(days_ago: i64, _hour: u32) -> String {
    (base() - chrono::Duration::days(days_ago)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn earlier(days_ago: i64) -> String {
    (base() - chrono::Duration::days(days_ago))
        .date_naive()
        .to_string()
}

fn today() -> String {
    earlier(0)
}

/// Two sites, three days, every source, two models; returns the batches.
fn scenario(a: &Site, b: &Site) -> Vec<(Site, Vec<u8>)> {
    let (ua1, ua2, ub) = (a.user_hash(1), a.user_hash(2), b.user_hash(7));
    vec![
        // Site A, 2 days ago: an inline generation sent alone.
        (
            a.clone(),
            a.batch(vec![event(
                1,
                &ua1,
                "inline",
                "gpt-4o-mini",
                150,
                25,
                &at(2, 9),
            )]),
        ),
        // Site A, yesterday: a bulk batch from two users and two models.
        (
            a.clone(),
            a.batch(vec![
                event(2, &ua1, "bulk", "gpt-4o-mini", 100, 20, &at(1, 10)),
                event(3, &ua1, "bulk", "gpt-4o", 1000, 200, &at(1, 10)),
                event(4, &ua2, "bulk", "gpt-4o", 500, 100, &at(1, 11)),
                event(5, &ua2, "queue", "some-future-model", 300, 30, &at(1, 12)),
            ]),
        ),
        // Site A, today: manual.
        (
            a.clone(),
            a.batch(vec![event(
                6,
                &ua2,
                "manual",
                "gpt-4-turbo",
                50,
                10,
                &at(0, 0),
            )]),
        ),
        // Site B, yesterday: must never leak into A's numbers.
        (
            b.clone(),
            b.batch(vec![event(
                7,
                &ub,
                "inline",
                "gpt-4o",
                10_000,
                1_000,
                &at(1, 8),
            )]),
        ),
    ]
}

fn rows(summary: &Value) -> Vec<Value> {
    summary["data"].as_array().unwrap().clone()
}

fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[tokio::test]
async fn signed_batches_become_exact_summary_numbers_and_resends_change_nothing() {
    let p = Pipeline::start(true).await;
    let (a, b) = (Site::new(1), Site::new(2));
    assert_eq!(p.register(&a, "pro").await.0, 201);
    assert_eq!(p.register(&b, "free").await.0, 201);

    let batches = scenario(&a, &b);
    for (site, body) in &batches {
        let (status, resp) = p.send(site, body.clone()).await;
        assert_eq!(status, 200, "{resp}");
        let sent: Value = serde_json::from_slice(body).unwrap();
        let ids: Vec<&Value> = sent["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["event_id"])
            .collect();
        assert_eq!(resp["success"], true);
        assert_eq!(resp["received"], ids.len());
        assert_eq!(
            resp["event_ids"]
                .as_array()
                .unwrap()
                .iter()
                .collect::<Vec<_>>(),
            ids
        );
        assert_eq!(resp["message"], "Events recorded successfully");
    }

    let by_day = p.wait_for_requests(&a, &earlier(2), 6).await;
    // gpt-4o-mini: 0.00015 / 0.0006 per 1k; gpt-4o: 0.0025 / 0.01; gpt-4-turbo: 0.01 / 0.03;
    // the unknown model is priced as gpt-4o-mini.
    let cost1 = 150.0 * 0.00015 / 1000.0 + 25.0 * 0.0006 / 1000.0;
    let cost_y = (100.0 * 0.00015 + 20.0 * 0.0006) / 1000.0
        + (1000.0 * 0.0025 + 200.0 * 0.01) / 1000.0
        + (500.0 * 0.0025 + 100.0 * 0.01) / 1000.0
        + (300.0 * 0.00015 + 30.0 * 0.0006) / 1000.0;
    let cost6 = (50.0 * 0.01 + 10.0 * 0.03) / 1000.0;
    let expected_days = [
        (earlier(2), 1, 150, 25, cost1),
        (earlier(1), 4, 1900, 350, cost_y),
        (today(), 1, 50, 10, cost6),
    ];
    let got = rows(&by_day);
    assert_eq!(got.len(), 3, "{by_day}");
    for (row, (date, requests, prompt, completion, cost)) in got.iter().zip(expected_days.iter()) {
        assert_eq!(row["install_id"], a.install_id.as_str());
        assert_eq!(row["date"], date.as_str());
        assert_eq!(row["user_hash"], Value::Null);
        assert_eq!(row["source"], Value::Null);
        assert_eq!(row["total_requests"], *requests);
        assert_eq!(row["prompt_tokens"], *prompt);
        assert_eq!(row["completion_tokens"], *completion);
        assert_eq!(row["total_tokens"], prompt + completion);
        let c = row["estimated_cost_usd"].as_f64().unwrap();
        assert!(approx(c, *cost), "{date}: cost {c} != {cost}");
    }
    assert_eq!(
        by_day["meta"],
        json!({"total": 3, "limit": 100, "offset": 0})
    );

    let by_source = p
        .summary(&format!(
            "install_id={}&date_from={}&group_by=source",
            a.install_id,
            earlier(2)
        ))
        .await;
    let sources: Vec<(String, u64)> = rows(&by_source)
        .iter()
        .map(|r| {
            (
                r["source"].as_str().unwrap().to_string(),
                r["total_requests"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        sources,
        [
            ("bulk".into(), 3),
            ("inline".into(), 1),
            ("manual".into(), 1),
            ("queue".into(), 1)
        ]
    );

    let by_user = p
        .summary(&format!(
            "install_id={}&date_from={}&group_by=user&limit=1",
            a.install_id,
            earlier(2)
        ))
        .await;
    // Ordered by tokens: user 1 has 1495 tokens, user 2 has 990.
    assert_eq!(rows(&by_user).len(), 1);
    assert_eq!(rows(&by_user)[0]["user_hash"], a.user_hash(1).as_str());
    assert_eq!(rows(&by_user)[0]["total_tokens"], 1495);
    assert_eq!(by_user["meta"]["total"], 2);

    // The processors mirrored the registry into installation_metadata (no
    // secret anywhere in ClickHouse) and tracked first/last activity.
    let ch = p.clickhouse.client();
    // Written asynchronously by the processors' registry consumer.
    let (plan, account, revision): (String, String, u64) = usage_e2e::eventually(
        "installation_metadata to have the registration",
        std::time::Duration::from_secs(10),
        || {
            let (ch, id) = (ch.clone(), a.install_id.clone());
            async move {
                ch.query("SELECT plan, account_id, revision FROM installation_metadata FINAL WHERE install_id = ?")
                    .bind(&id)
                    .fetch_optional()
                    .await
                    .unwrap()
            }
        },
    )
    .await;
    assert_eq!(
        (plan.as_str(), account.as_str(), revision),
        ("pro", a.account_id.as_str(), 1)
    );
    let columns: Vec<String> = ch
        .query("SELECT name FROM system.columns WHERE database = currentDatabase() AND name ILIKE '%secret%'")
        .fetch_all()
        .await
        .unwrap();
    assert!(
        columns.is_empty(),
        "no secret column in ClickHouse: {columns:?}"
    );
    let (first, last): (String, String) = ch
        .query(
            "SELECT toString(toDate(min(first_seen))), toString(toDate(max(last_seen)))
             FROM installation_activity WHERE install_id = ?",
        )
        .bind(&a.install_id)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!((first, last), (earlier(2), today()));

    // Site B is counted on its own.
    let b_days = p.wait_for_requests(&b, &earlier(2), 1).await;
    assert_eq!(rows(&b_days)[0]["total_tokens"], 11_000);

    // The plugin retries: every batch again, twice. Nothing may change.
    let before_a = p.raw_totals(&a).await;
    const DUPLICATES: &str = "usage_processor_events_duplicate_total";
    let stored_before = p.processor_metric(DUPLICATES).await;
    for _ in 0..2 {
        for (site, body) in &batches {
            let (status, resp) = p.send(site, body.clone()).await;
            assert_eq!(status, 200, "{resp}");
        }
    }
    // Once the processor has written the resends (new Kafka messages, every
    // event found stored), compare.
    let events: u64 = 7;
    usage_e2e::eventually(
        "the processor to write the resends",
        std::time::Duration::from_secs(30),
        || async {
            let stored = p.processor_metric(DUPLICATES).await;
            // At least: a redelivery (a rebalance on a loaded machine) finds
            // more copies stored; the totals below must not move either way.
            (stored >= stored_before + 2 * events).then_some(())
        },
    )
    .await;
    assert_eq!(p.raw_totals(&a).await, before_a);
    assert_eq!(before_a, (6, 2485));
    let again = p
        .summary(&format!(
            "install_id={}&date_from={}&group_by=day",
            a.install_id,
            earlier(2)
        ))
        .await;
    assert_eq!(again, by_day);
    p.stop().await;
}

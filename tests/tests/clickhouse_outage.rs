//! ClickHouse stops (SIGKILL): ingestion goes on, the processors pause and
//! retry the same batch, the query API answers 503, and after ClickHouse
//! returns every event is counted exactly once. (Alone in its test binary: it
//! stops the shared ClickHouse.)

use std::time::Duration;

use serde_json::Value;
use usage_e2e::http;
use usage_e2e::pipeline::{admin_token, event, Pipeline, Site};
use usage_e2e::processes::{kill_engine, restart_engines};

fn created() -> String {
    (chrono::Utc::now() - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test]
async fn clickhouse_down_pauses_processing_without_loss_or_double_counting() {
    let p = Pipeline::start(true).await;
    let site = Site::new(1);
    assert_eq!(p.register(&site, "pro").await.0, 201);
    let u = site.user_hash(1);
    let day = (chrono::Utc::now() - chrono::Duration::days(1))
        .date_naive()
        .to_string();
    let first = site.batch(
        (0..10)
            .map(|i| event(i, &u, "bulk", "gpt-4o-mini", 100, 10, &created()))
            .collect(),
    );
    assert_eq!(p.send(&site, first).await.0, 200);
    p.wait_for_requests(&site, &day, 10).await;

    let outage = kill_engine("clickhouse").await;
    // Ingestion does not depend on ClickHouse.
    for b in 0..4u128 {
        let batch = site.batch(
            (0..10)
                .map(|i| {
                    event(
                        100 + b * 10 + i,
                        &u,
                        "queue",
                        "gpt-4o-mini",
                        100,
                        10,
                        &created(),
                    )
                })
                .collect(),
        );
        assert_eq!(p.send(&site, batch).await.0, 200);
    }
    // The query API says the store is unavailable, retryable.
    let r = http()
        .get(format!(
            "http://{}/provider/usage/summary?install_id={}",
            p.query_addr, site.install_id
        ))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "storage_unavailable"
    );
    // Let the processor fail and back off a few times.
    tokio::time::sleep(Duration::from_secs(3)).await;

    restart_engines(outage).await;
    p.wait_for_requests(&site, &day, 50).await;
    assert_eq!(p.raw_totals(&site).await, (50, 5500));
    usage_e2e::wait_ready_status(p.query_addr, 200, Duration::from_secs(10)).await;
    p.stop().await;
}

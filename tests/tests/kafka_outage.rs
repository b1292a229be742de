//! Kafka stops (SIGKILL): the gateway answers 503 with Retry-After and
//! acknowledges nothing; once Kafka is back, the plugin's retry is accepted
//! and every event is counted exactly once. (Alone in its test binary: it
//! stops the shared broker.)

use std::time::Duration;

use serde_json::Value;
use usage_e2e::pipeline::{event, Pipeline, Site};
use usage_e2e::processes::{kill_engine, restart_engines};
use usage_e2e::{eventually, http};

fn created() -> String {
    (chrono::Utc::now() - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test]
async fn kafka_down_means_503_and_nothing_is_lost_after_it_returns() {
    let p = Pipeline::start(true).await;
    let site = Site::new(1);
    assert_eq!(p.register(&site, "pro").await.0, 201);
    let u = site.user_hash(1);
    let before = site.batch(
        (0..10)
            .map(|i| event(i, &u, "bulk", "gpt-4o", 100, 10, &created()))
            .collect(),
    );
    assert_eq!(p.send(&site, before).await.0, 200);

    let outage = kill_engine("kafka").await;
    let during = site.batch(
        (10..30)
            .map(|i| event(i, &u, "queue", "gpt-4o", 100, 10, &created()))
            .collect(),
    );
    let started = std::time::Instant::now();
    let ts = chrono::Utc::now().timestamp();
    let r = http()
        .post(format!("http://{}/api/usage/event", p.ingest_addr))
        .bearer_auth(usage_e2e::pipeline::token(
            usage_service_kit::auth::Role::Account,
            Some(&site.account_id),
        ))
        .header("X-Install-Signature", site.legacy_signature(ts))
        .body(during.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], false);
    assert_eq!(body["error"], "storage_unavailable");
    assert_eq!(body["received"], 0);
    println!("503 after {:?} with Kafka down", started.elapsed());
    usage_e2e::wait_ready_status(p.ingest_addr, 503, Duration::from_secs(20)).await;

    restart_engines(outage).await;
    // The plugin retries the refused batch until it is accepted.
    eventually(
        "the retried batch to be accepted",
        Duration::from_secs(60),
        || {
            let during = during.clone();
            let p = &p;
            let site = &site;
            async move {
                let (status, _) = p.send(site, during).await;
                (status == 200).then_some(())
            }
        },
    )
    .await;
    p.wait_for_requests(
        &site,
        &(chrono::Utc::now() - chrono::Duration::days(1))
            .date_naive()
            .to_string(),
        30,
    )
    .await;
    assert_eq!(p.raw_totals(&site).await, (30, 3300));
    p.stop().await;
}

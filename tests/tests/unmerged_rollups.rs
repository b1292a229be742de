//! The query service reads the rollups (`usage_daily`, `usage_install_daily`,
//! `usage_monthly`: SummingMergeTrees of per-batch deltas) without `FINAL`,
//! summing the rows of a key itself. Until ClickHouse merges a table's parts,
//! a key has one row per batch that touched it; this test keeps them
//! unmerged (merges stopped) and checks that every figure is what it is once
//! the parts are merged, and what the events add up to.

use chrono::{Duration, Utc};
use serde_json::Value;
use usage_e2e::http;
use usage_e2e::pipeline::{admin_token, event, query_config, Pipeline, Site};
use usage_service_kit::service::Service;

const ROLLUPS: [&str; 3] = ["usage_daily", "usage_install_daily", "usage_monthly"];

async fn get(addr: std::net::SocketAddr, path: &str) -> Value {
    let r = http()
        .get(format!("http://{addr}{path}"))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    let mut v: Value = r.json().await.unwrap();
    forget_when(&mut v);
    v
}

/// Drops the fields that say when an answer was computed, which differ
/// between two services' answers of the same figures.
fn forget_when(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !matches!(k.as_str(), "computed_at" | "age_seconds" | "stale"));
            m.values_mut().for_each(forget_when);
        }
        Value::Array(a) => a.iter_mut().for_each(forget_when),
        _ => {}
    }
}

async fn csv_export(addr: std::net::SocketAddr, body: Value) -> String {
    let r = http()
        .post(format!("http://{addr}/api/usage/export"))
        .bearer_auth(admin_token())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// Every figure the query service derives from the rollups, for `site`.
async fn figures(addr: std::net::SocketAddr, site: &Site, from: &str) -> Vec<Value> {
    let id = &site.install_id;
    let mut all = Vec::new();
    for group_by in ["day", "month", "model", "billing_month"] {
        all.push(
            get(
                addr,
                &format!(
                    "/provider/usage/summary?install_id={id}&date_from={from}&group_by={group_by}"
                ),
            )
            .await,
        );
    }
    all.push(get(addr, &format!("/api/usage/installations?date_from={from}")).await);
    all.push(get(addr, &format!("/provider/installations/{id}")).await);
    for path in [
        "/provider/fleet/overview",
        "/provider/fleet/analytics",
        "/provider/fleet/anomalies",
    ] {
        all.push(get(addr, path).await);
    }
    for group_by in ["day", "model"] {
        all.push(Value::String(
            csv_export(
                addr,
                serde_json::json!({"install_id": id, "date_from": from, "group_by": group_by, "format": "csv"}),
            )
            .await,
        ));
    }
    all
}

#[tokio::test]
async fn every_figure_is_exact_while_the_rollups_parts_are_unmerged() {
    let p = Pipeline::start(true).await;
    let site = Site::new(1);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    p.wait_for_registry_mirror(1).await;
    let ch = p.clickhouse.client();
    for t in ROLLUPS {
        ch.query(&format!("SYSTEM STOP MERGES {t}"))
            .execute()
            .await
            .unwrap();
    }

    // Three batches with the same keys (one user, source and model; today
    // and yesterday), each stored before the next is sent, so that each
    // adds its own rows to the rollups.
    let now = Utc::now() - Duration::minutes(5);
    let from = (now - Duration::days(1)).date_naive().to_string();
    let user = site.user_hash(7);
    for b in 0..3u128 {
        let events = (0..3u128)
            .map(|i| {
                let created = if i == 2 { now - Duration::days(1) } else { now };
                event(
                    b * 10 + i + 1,
                    &user,
                    "bulk",
                    "gpt-4o-mini",
                    100,
                    20,
                    &created.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                )
            })
            .collect();
        let (status, body) = p.send(&site, site.batch(events)).await;
        assert_eq!(status, 200, "{body}");
        p.wait_for_requests(&site, &from, 3 * (b as u64 + 1)).await;
    }
    let rows = |final_: &'static str, t: &'static str| {
        let ch = ch.clone();
        async move {
            ch.query(&format!("SELECT count() FROM {t} {final_}"))
                .fetch_one::<u64>()
                .await
                .unwrap()
        }
    };
    // The test means something only if the keys have several rows.
    for t in ROLLUPS {
        assert!(rows("", t).await > rows("FINAL", t).await, "{t} is merged");
    }

    let unmerged = figures(p.query_addr, &site, &from).await;
    // What the events add up to.
    let list = &unmerged[4]["installations"][0];
    assert_eq!(list["total_requests"], 9, "{list}");
    assert_eq!(list["total_tokens"], 9 * 120, "{list}");
    assert_eq!(list["active_days"], 2, "{list}");
    assert_eq!(list["unique_users"], 1, "{list}");
    let by_day: Vec<u64> = unmerged[0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["total_requests"].as_u64().unwrap())
        .collect();
    let mut sorted = by_day.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [3, 6], "{}", unmerged[0]);
    assert_eq!(
        unmerged[5]["data"]["usage"]["all_time"]["generations"], 9,
        "{}",
        unmerged[5]
    );
    let by_day = unmerged[9].as_str().unwrap();
    assert_eq!(
        by_day.lines().count(),
        3,
        "a header and one line a day: {by_day}"
    );
    assert_eq!(
        unmerged[10],
        "Model,Requests,Prompt Tokens,Completion Tokens,Total Tokens,Cost USD\n\
         gpt-4o-mini,9,900,180,1080,0.000243\n"
    );

    // The same figures once every key has one row, from a query service
    // that has kept nothing.
    for t in ROLLUPS {
        ch.query(&format!("SYSTEM START MERGES {t}"))
            .execute()
            .await
            .unwrap();
        ch.query(&format!("OPTIMIZE TABLE {t} FINAL"))
            .execute()
            .await
            .unwrap();
        assert_eq!(rows("", t).await, rows("FINAL", t).await, "{t} merged");
    }
    let fresh = usage_query::QueryApi::start(query_config(&p.kafka, &p.clickhouse))
        .await
        .unwrap();
    p.wait_ready(fresh.http.addr).await;
    let merged = figures(fresh.http.addr, &site, &from).await;
    for (u, m) in unmerged.iter().zip(&merged) {
        assert_eq!(u, m);
    }
    p.stop().await;
}

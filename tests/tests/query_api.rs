//! The query API on a known data set that went through the whole pipeline:
//! exact JSON shapes, every summary grouping and filter, raw events with
//! offset and keyset paging (also while events keep arriving), and the
//! export's exact CSV bytes and JSON Lines.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{NaiveDate, Utc};
use serde_json::{json, Value};
use usage_e2e::http;
use usage_e2e::pipeline::{admin_token, event, Pipeline, Site};

fn day(days_ago: i64) -> NaiveDate {
    Utc::now().date_naive() - chrono::Duration::days(days_ago)
}

fn at(days_ago: i64, time: &str) -> String {
    format!("{}T{time}Z", day(days_ago))
}

/// One generation of the data set: (id, site, user, source, model, prompt,
/// completion, created_at).
type Row = (
    u128,
    usize,
    u32,
    &'static str,
    &'static str,
    u32,
    u32,
    String,
);

fn dataset() -> Vec<Row> {
    vec![
        (
            1,
            0,
            1,
            "inline",
            "gpt-4o-mini",
            150,
            25,
            at(3, "10:00:00.000"),
        ),
        (
            2,
            0,
            1,
            "bulk",
            "gpt-4o-mini",
            100,
            20,
            at(2, "11:00:00.000"),
        ),
        (3, 0, 1, "bulk", "gpt-4o", 1000, 200, at(2, "11:30:00.000")),
        (4, 0, 2, "bulk", "gpt-4o", 500, 100, at(2, "12:00:00.000")),
        (
            5,
            0,
            2,
            "queue",
            "gpt-4o-mini",
            300,
            30,
            at(1, "09:00:00.000"),
        ),
        (
            6,
            0,
            1,
            "manual",
            "gpt-4-turbo",
            50,
            10,
            at(1, "09:00:00.500"),
        ),
        (
            7,
            1,
            7,
            "inline",
            "gpt-4o",
            10_000,
            1_000,
            at(2, "08:00:00.000"),
        ),
    ]
}

/// Cost of one generation at the contract's prices, as ClickHouse prints it.
fn cost(model: &str, prompt: u32, completion: u32) -> f64 {
    let (p, c) = match model {
        "gpt-4o" => (0.0025, 0.01),
        "gpt-4-turbo" => (0.01, 0.03),
        _ => (0.00015, 0.0006),
    };
    (prompt as f64 * p + completion as f64 * c) / 1000.0
}

async fn loaded() -> (Pipeline, Vec<Site>) {
    let p = Pipeline::start(true).await;
    let sites = vec![Site::new(1), Site::new(2)];
    for s in &sites {
        assert_eq!(p.register(s, "agency").await.0, 201);
    }
    for (n, site) in sites.iter().enumerate() {
        let events = dataset()
            .into_iter()
            .filter(|r| r.1 == n)
            .map(
                |(id, _, user, source, model, prompt, completion, created)| {
                    event(
                        id,
                        &site.user_hash(user),
                        source,
                        model,
                        prompt,
                        completion,
                        &created,
                    )
                },
            )
            .collect();
        let (status, body) = p.send(site, site.batch(events)).await;
        assert_eq!(status, 200, "{body}");
    }
    p.wait_for_requests(&sites[0], &day(5).to_string(), 6).await;
    p.wait_for_requests(&sites[1], &day(5).to_string(), 1).await;
    (p, sites)
}

async fn get(p: &Pipeline, path_and_query: &str) -> (u16, Value) {
    let r = http()
        .get(format!("http://{}{path_and_query}", p.query_addr))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn close(a: &Value, b: f64) -> bool {
    (a.as_f64().unwrap() - b).abs() < 1e-12
}

#[tokio::test]
async fn the_summary_groups_by_model_and_month_filters_and_counts_exactly() {
    let (p, sites) = loaded().await;
    let a = &sites[0].install_id;

    let (status, by_model) = get(
        &p,
        &format!("/provider/usage/summary?install_id={a}&group_by=model"),
    )
    .await;
    assert_eq!(status, 200, "{by_model}");
    // Ordered by tokens: gpt-4o 1800, gpt-4o-mini 625, gpt-4-turbo 60.
    let models: Vec<(&str, u64, u64)> = by_model["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["model"].as_str().unwrap(),
                r["total_requests"].as_u64().unwrap(),
                r["total_tokens"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        models,
        [
            ("gpt-4o", 2, 1800),
            ("gpt-4o-mini", 3, 625),
            ("gpt-4-turbo", 1, 60)
        ]
    );
    let first = &by_model["data"][0];
    assert_eq!(
        (
            first["date"].clone(),
            first["user_hash"].clone(),
            first["source"].clone(),
            first["month"].clone()
        ),
        (Value::Null, Value::Null, Value::Null, Value::Null)
    );
    assert!(close(
        &first["estimated_cost_usd"],
        cost("gpt-4o", 1000, 200) + cost("gpt-4o", 500, 100)
    ));
    assert_eq!(
        by_model["meta"],
        json!({"total": 3, "limit": 100, "offset": 0})
    );

    // By month: one row per month the range touches (two near a month start).
    let (_, by_month) = get(
        &p,
        &format!(
            "/provider/usage/summary?install_id={a}&group_by=month&date_from={}",
            day(5)
        ),
    )
    .await;
    let months: Vec<String> = dataset()
        .iter()
        .filter(|r| r.1 == 0)
        .map(|r| r.7[..7].to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let got: Vec<&str> = by_month["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["month"].as_str().unwrap())
        .collect();
    assert_eq!(got, months);
    let requests: u64 = by_month["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["total_requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 6);

    // Filters combine; meta.total counts the groups that match, not the page.
    let ua1 = sites[0].user_hash(1);
    let (_, filtered) = get(
        &p,
        &format!("/provider/usage/summary?install_id={a}&group_by=day&source=bulk&user_hash={ua1}&limit=1"),
    )
    .await;
    assert_eq!(
        filtered["meta"],
        json!({"total": 1, "limit": 1, "offset": 0})
    );
    assert_eq!(filtered["data"][0]["date"], day(2).to_string());
    assert_eq!(filtered["data"][0]["total_requests"], 2);
    let (_, by_model_filter) = get(
        &p,
        &format!("/provider/usage/summary?install_id={a}&group_by=source&model=gpt-4o"),
    )
    .await;
    let sources: Vec<(&str, u64)> = by_model_filter["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["source"].as_str().unwrap(),
                r["total_requests"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(sources, [("bulk", 2)]);
    p.stop().await;
}

#[tokio::test]
async fn bad_parameters_are_400s_that_say_what_to_fix() {
    let (p, sites) = loaded().await;
    let a = &sites[0].install_id;
    for (query, message) in [
        (
            format!("/provider/usage/summary?install_id={a}&group_by=week"),
            "group_by must be day, user, source, model, month or billing_month, not \"week\"",
        ),
        (
            format!(
                "/provider/usage/summary?install_id={a}&date_from=2025-11-10&date_to=2025-11-01"
            ),
            "date_to (2025-11-01) is before date_from (2025-11-10)",
        ),
        (
            format!("/provider/usage/summary?install_id={a}&limit=5000"),
            "limit must be 1 to 1000, not 5000",
        ),
        (
            format!("/provider/usage/summary?install_id={a}&source=email"),
            "source must be one of inline, bulk, queue, manual, not \"email\"",
        ),
        (
            format!("/provider/usage/events?install_id={a}&cursor=bm9wZQ"),
            "cursor is malformed: pass meta.next_cursor as it came",
        ),
        (
            "/provider/usage/events?limit=10".to_string(),
            "install_id is required",
        ),
        (
            format!("/provider/usage/events?install_id={a}&model=x%27%20OR%201%3D1"),
            "",
        ),
    ] {
        let (status, body) = get(&p, &query).await;
        if message.is_empty() {
            // An injection attempt is just a model nobody used.
            assert_eq!(status, 200, "{query}: {body}");
            assert_eq!(body["events"], json!([]));
            assert_eq!(body["meta"]["total"], 0);
            continue;
        }
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(
            body,
            json!({"success": false, "error": "invalid_parameters", "message": message}),
            "{query}"
        );
    }
    p.stop().await;
}

#[tokio::test]
async fn raw_events_have_the_contract_shape_with_offset_paging() {
    let (p, sites) = loaded().await;
    let a = &sites[0];
    let (status, page) = get(
        &p,
        &format!(
            "/provider/usage/events?install_id={}&limit=2&offset=1",
            a.install_id
        ),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    // Newest first: 6, 5, 4, ...; the page skips one and holds 5 and 4.
    let expect = |id: u128| {
        let (_, _, user, source, model, prompt, completion, created) =
            dataset().into_iter().find(|r| r.0 == id).unwrap();
        json!({
            "event_id": format!("evt_{id:032x}"),
            "install_id": a.install_id,
            "user_hash": a.user_hash(user),
            "source": source,
            "model": model,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "created_at": created,
            "processed_at": created,
            "over_limit": null,
            "billing_month": billing_month(&created),
        })
    };
    assert_eq!(page["success"], true);
    assert_eq!(page["events"], json!([expect(5), expect(4)]));
    assert_eq!(page["meta"]["total"], 6);
    assert_eq!(page["meta"]["limit"], 2);
    assert_eq!(page["meta"]["offset"], 1);

    // Filters: one user's bulk events of gpt-4o.
    let (_, filtered) = get(
        &p,
        &format!(
            "/provider/usage/events?install_id={}&user_hash={}&source=bulk&model=gpt-4o&date_from={}&date_to={}",
            a.install_id,
            a.user_hash(1),
            day(2),
            day(2)
        ),
    )
    .await;
    assert_eq!(filtered["events"], json!([expect(3)]));
    assert_eq!(filtered["meta"]["next_cursor"], Value::Null);
    p.stop().await;
}

#[tokio::test]
async fn keyset_pages_have_no_duplicates_or_gaps_while_events_keep_arriving() {
    let p = Pipeline::start(true).await;
    let site = Site::new(3);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    let now = Utc::now().timestamp_millis();
    let iso = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    // 240 events, 10 s apart, ending 5 minutes ago; some share a timestamp.
    let start = now - 45 * 60_000;
    let events: Vec<Value> = (0..240u128)
        .map(|i| {
            event(
                i,
                &site.user_hash(1),
                "bulk",
                "gpt-4o-mini",
                10,
                5,
                &iso(start + (i as i64 / 2) * 20_000),
            )
        })
        .collect();
    for chunk in events.chunks(60) {
        assert_eq!(p.send(&site, site.batch(chunk.to_vec())).await.0, 200);
    }
    p.wait_for_requests(&site, &day(1).to_string(), 240).await;

    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut arriving = 1000u128;
    loop {
        // New generations arrive between pages.
        let fresh: Vec<Value> = (arriving..arriving + 5)
            .map(|i| {
                event(
                    i,
                    &site.user_hash(2),
                    "inline",
                    "gpt-4o-mini",
                    10,
                    5,
                    &iso(Utc::now().timestamp_millis() - 1000),
                )
            })
            .collect();
        arriving += 5;
        assert_eq!(p.send(&site, site.batch(fresh)).await.0, 200);
        tokio::time::sleep(Duration::from_millis(150)).await;

        let mut q = format!(
            "/provider/usage/events?install_id={}&limit=35&date_from={}",
            site.install_id,
            day(1)
        );
        if let Some(c) = &cursor {
            q.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = get(&p, &q).await;
        assert_eq!(status, 200, "{page}");
        let ids: Vec<String> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_string())
            .collect();
        if cursor.is_none() {
            // The first page starts at the newest events, arrivals included.
            seen.extend(
                ids.into_iter()
                    .filter(|id| id.as_str() < "evt_000000000000000000000000000003e8"),
            );
        } else {
            seen.extend(ids);
        }
        match page["meta"]["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a page repeated an event");
    let expected: HashSet<String> = (0..240u128).map(|i| format!("evt_{i:032x}")).collect();
    assert_eq!(
        unique.into_iter().cloned().collect::<HashSet<_>>(),
        expected
    );
    p.stop().await;
}

async fn export(p: &Pipeline, body: Value) -> reqwest::Response {
    http()
        .post(format!("http://{}/api/usage/export", p.query_addr))
        .bearer_auth(admin_token())
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_csv_export_is_the_contracts_bytes_and_json_lines_match_it() {
    let (p, sites) = loaded().await;
    let a = &sites[0];
    let r = export(
        &p,
        json!({"install_id": a.install_id, "date_from": day(5).to_string(), "date_to": day(0).to_string(), "group_by": "day", "format": "csv"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        r.headers()["content-disposition"],
        format!("attachment; filename=\"usage-export-{}.csv\"", day(0)).as_str()
    );
    let csv = r.text().await.unwrap();

    // One row per day, user hash and source, in that order.
    let mut rows: Vec<(String, String, &str, u64, u64, u64, f64)> = Vec::new();
    for (_, site, user, source, model, prompt, completion, created) in dataset() {
        if site != 0 {
            continue;
        }
        let key = (created[..10].to_string(), a.user_hash(user), source);
        match rows
            .iter_mut()
            .find(|r| (r.0.clone(), r.1.clone(), r.2) == key)
        {
            Some(r) => {
                r.3 += 1;
                r.4 += u64::from(prompt);
                r.5 += u64::from(completion);
                r.6 += cost(model, prompt, completion);
            }
            None => rows.push((
                key.0,
                key.1,
                key.2,
                1,
                prompt.into(),
                completion.into(),
                cost(model, prompt, completion),
            )),
        }
    }
    rows.sort_by(|x, y| (&x.0, &x.1, x.2).cmp(&(&y.0, &y.1, y.2)));
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "Date,User Hash,Source,Requests,Prompt Tokens,Completion Tokens,Total Tokens,Cost USD"
        )
    );
    let body: Vec<&str> = lines.collect();
    assert_eq!(body.len(), rows.len(), "{csv}");
    for (line, (date, user, source, n, prompt, completion, c)) in body.iter().zip(&rows) {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(
            fields[..7],
            [
                date.as_str(),
                user.as_str(),
                source,
                &n.to_string(),
                &prompt.to_string(),
                &completion.to_string(),
                &(prompt + completion).to_string()
            ],
            "{line}"
        );
        let got: f64 = fields[7].parse().unwrap();
        assert!((got - c).abs() < 1e-12, "{line}: cost {c}");
    }
    assert!(csv.ends_with('\n'));

    // The same export as JSON Lines: the same numbers, one object per line.
    let r = export(
        &p,
        json!({"install_id": a.install_id, "date_from": day(5).to_string(), "group_by": "day", "format": "jsonl"}),
    )
    .await;
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    let objects: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objects.len(), rows.len());
    for (o, (date, user, source, n, prompt, completion, _)) in objects.iter().zip(&rows) {
        assert_eq!(o["date"], date.as_str());
        assert_eq!(o["user_hash"], user.as_str());
        assert_eq!(o["source"], *source);
        assert_eq!(o["total_requests"], *n);
        assert_eq!(o["total_tokens"], prompt + completion);
    }

    // Two writers racing on one event during a rebalance leave an unmerged
    // copy in usage_events: the raw export must still list the event once.
    // Merges are held off until the exports below are read, so that the copy
    // is still there for them.
    let merges = |verb: &str| {
        let sql = format!("SYSTEM {verb} MERGES usage_events");
        let client = p.clickhouse.client();
        async move { client.query(&sql).execute().await.unwrap() }
    };
    merges("STOP").await;
    p.clickhouse
        .client()
        .query("INSERT INTO usage_events SELECT * FROM usage_events WHERE install_id = ? AND event_id = ?")
        .bind(&a.install_id)
        .bind(format!("evt_{:032x}", 1))
        .execute()
        .await
        .unwrap();
    let stored: u64 = p
        .clickhouse
        .client()
        .query("SELECT count() FROM usage_events WHERE install_id = ?")
        .bind(&a.install_id)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(stored, 7, "the copy is stored beside the original");

    // Raw events, CSV: a header and one line per event, by installation, day
    // and event id.
    let r = export(
        &p,
        json!({"install_id": a.install_id, "date_from": day(5).to_string(), "group_by": "events"}),
    )
    .await;
    let text = r.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "Event ID,Install ID,User Hash,Source,Model,Prompt Tokens,Completion Tokens,Total Tokens,Cost USD,Created At,Processed At");
    assert_eq!(lines.len(), 7);
    assert_eq!(
        lines[1],
        format!(
            "evt_{:032x},{},{},inline,gpt-4o-mini,150,25,175,0.0000375,{},{}",
            1,
            a.install_id,
            a.user_hash(1),
            at(3, "10:00:00.000"),
            at(3, "10:00:00.000")
        )
    );
    let ids: Vec<&str> = lines[1..].iter().map(|l| &l[..36]).collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids, unique, "each event once");

    // Raw events as JSON Lines: the same six events, with typed fields.
    let r = export(
        &p,
        json!({"install_id": a.install_id, "date_from": day(5).to_string(), "group_by": "events", "format": "jsonl"}),
    )
    .await;
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let objects: Vec<Value> = r
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objects.len(), 6);
    merges("START").await;
    assert_eq!(
        objects[0],
        json!({
            "event_id": format!("evt_{:032x}", 1), "install_id": a.install_id,
            "user_hash": a.user_hash(1), "source": "inline", "model": "gpt-4o-mini",
            "prompt_tokens": 150, "completion_tokens": 25, "total_tokens": 175,
            "estimated_cost_usd": 0.0000375,
            "created_at": at(3, "10:00:00.000"), "processed_at": at(3, "10:00:00.000"),
            "over_limit": null
        })
    );

    // Refusals in the contract's error shape.
    for (body, message) in [
        (
            json!({"install_id": a.install_id, "format": "xlsx"}),
            "format must be csv or jsonl, not \"xlsx\"",
        ),
        (
            json!({"install_id": a.install_id, "group_by": "week"}),
            "group_by must be day, user, source, model or events, not \"week\"",
        ),
    ] {
        let r = export(&p, body).await;
        assert_eq!(r.status(), 400);
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"success": false, "error": "invalid_parameters", "message": message})
        );
    }
    p.stop().await;
}

#[tokio::test]
async fn provider_admins_list_installations_with_totals_plan_and_level() {
    let (p, sites) = loaded().await;
    let (a, b) = (&sites[0], &sites[1]);
    p.wait_for_registry_mirror(2).await;
    let (status, list) = get(
        &p,
        &format!("/api/usage/installations?date_from={}", day(5)),
    )
    .await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list["installations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["install_id"].as_str().unwrap())
        .collect();
    // By tokens, descending: B's 11,000 before A's 2,485.
    assert_eq!(ids, [b.install_id.as_str(), a.install_id.as_str()]);
    let mut first = list["installations"][1].clone();
    let c = first["estimated_cost_usd"].take();
    let a_cost: f64 = dataset()
        .iter()
        .filter(|r| r.1 == 0)
        .map(|r| cost(r.4, r.5, r.6))
        .sum();
    assert!(close(&c, a_cost));
    assert_eq!(
        first,
        json!({
            "install_id": a.install_id, "account_id": a.account_id,
            "first_seen": at(3, "10:00:00.000"), "last_seen": at(1, "09:00:00.500"),
            "total_requests": 6, "prompt_tokens": 2100, "completion_tokens": 385, "total_tokens": 2485,
            "estimated_cost_usd": null, "unique_users": 2, "active_days": 3,
            "plan": "agency", "governance_level": "ok"
        })
    );
    assert_eq!(list["meta"], json!({"total": 2, "limit": 50, "offset": 0}));

    // By last activity, oldest first; paging.
    let (_, page) = get(
        &p,
        &format!(
            "/api/usage/installations?date_from={}&sort_by=date&order=asc&limit=1&offset=1",
            day(5)
        ),
    )
    .await;
    assert_eq!(
        page["installations"][0]["install_id"],
        a.install_id.as_str()
    );
    assert_eq!(page["meta"], json!({"total": 2, "limit": 1, "offset": 1}));

    // A search: part of the install id, or the whole account id.
    let part = &b.install_id[9..18];
    for q in [part, b.account_id.as_str()] {
        let (status, found) = get(
            &p,
            &format!("/api/usage/installations?date_from={}&q={q}", day(5)),
        )
        .await;
        assert_eq!(status, 200, "{found}");
        assert_eq!(
            found["installations"][0]["install_id"],
            b.install_id.as_str(),
            "{q}"
        );
        assert_eq!(found["meta"]["total"], 1, "{q}");
    }
    let (_, none) = get(
        &p,
        &format!("/api/usage/installations?date_from={}&q=zzzz", day(5)),
    )
    .await;
    assert_eq!(none["meta"]["total"], 0);

    // An account sees its own installations only.
    let r = http()
        .get(format!(
            "http://{}/api/usage/installations?date_from={}",
            p.query_addr,
            day(5)
        ))
        .bearer_auth(usage_e2e::pipeline::token(
            usage_service_kit::auth::Role::Account,
            Some(&a.account_id),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let own: Value = r.json().await.unwrap();
    assert_eq!(own["meta"]["total"], 1);
    assert_eq!(own["installations"][0]["install_id"], a.install_id.as_str());
    p.stop().await;
}

/// The month an event created at `created` and sent now counts toward.
fn billing_month(created: &str) -> String {
    use usage_service_kit::periods;
    let created = created.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    periods::month_key(periods::billing_month(
        created.timestamp_millis(),
        chrono::Utc::now().timestamp_millis(),
        48 * 3_600_000,
    ))
}

#[tokio::test]
async fn grouped_csv_quotes_only_the_fields_that_must_be() {
    let p = Pipeline::start(true).await;
    let site = Site::new(1);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    let created = at(1, "12:00:00.000");
    let events = [(1, "a,\"b\""), (2, "plain")]
        .into_iter()
        .map(|(id, model)| event(id, &site.user_hash(1), "bulk", model, 100, 20, &created))
        .collect();
    let (status, body) = p.send(&site, site.batch(events)).await;
    assert_eq!(status, 200, "{body}");
    p.wait_for_requests(&site, &day(2).to_string(), 2).await;
    let r = export(
        &p,
        json!({"install_id": site.install_id, "date_from": day(2).to_string(), "group_by": "model", "format": "csv"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let csv = r.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(
        lines[1].starts_with("\"a,\"\"b\"\"\",1,100,20,120,"),
        "{csv}"
    );
    assert!(lines[2].starts_with("plain,1,100,20,120,"), "{csv}");
    p.stop().await;
}

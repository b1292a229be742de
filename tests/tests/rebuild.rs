//! `usage-rebuild` against the real Kafka and ClickHouse, with the gateway,
//! the processors and the query API running throughout: a rebuild of a
//! topic holding duplicates, late events and an erased installation equals
//! the live tables to the token, also when killed mid-way and resumed; the
//! swap and the rollback are atomic for a reader that queries throughout,
//! lose nothing the processors write meanwhile, and keep the erased
//! installation erased; a retroactive price change rebuilds the costs only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use clickhouse::Client;
use serde_json::Value;
use usage_e2e::http;
use usage_e2e::pipeline::{admin_token, event, Pipeline, Site};

const BIN: &str = env!("CARGO_BIN_EXE_e2e-rebuild");

const TABLES: [&str; 4] = [
    "usage_events",
    "usage_daily",
    "usage_install_daily",
    "usage_monthly",
];

struct Rebuild {
    args: Vec<String>,
}

impl Rebuild {
    fn new(p: &Pipeline, group: &str) -> Self {
        let shadow = format!("{}_rebuild", p.clickhouse.database);
        Self {
            args: [
                "--clickhouse-url",
                &p.clickhouse.url,
                "--clickhouse-database",
                &p.clickhouse.database,
                "--kafka-brokers",
                &p.kafka.brokers,
                "--events-topic",
                &p.kafka.events_topic,
                "--shadow-database",
                &shadow,
                "--processors-group",
                group,
                "--log",
                "warn",
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    /// Runs a command; (exit code, None when killed by a signal; stdout and stderr).
    async fn run(&self, command: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
        let out = tokio::process::Command::new(BIN)
            .args(&self.args)
            .args(command)
            .envs(env.iter().copied())
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    async fn ok(&self, command: &[&str]) -> String {
        let (code, text) = self.run(command, &[]).await;
        assert_eq!(code, Some(0), "usage-rebuild {command:?}:\n{text}");
        text
    }
}

fn at(offset: chrono::Duration) -> String {
    (Utc::now() - offset).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `n` events of `site` from id `first`, dated `ago` back.
fn events(site: &Site, first: u128, n: u128, model: &str, ago: chrono::Duration) -> Vec<Value> {
    (first..first + n)
        .map(|i| {
            event(
                i,
                &site.user_hash((i % 3) as u32),
                if i % 2 == 0 { "bulk" } else { "inline" },
                model,
                100 + i as u32,
                20,
                &at(ago),
            )
        })
        .collect()
}

async fn send_twice(p: &Pipeline, site: &Site, events: Vec<Value>) {
    for _ in 0..2 {
        let (status, body) = p.send(site, site.batch(events.clone())).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// Every row of the rollups and every raw event, per key, as text: equal
/// sets mean equal to the token and to the 10^-12 USD.
async fn contents(ch: &Client, db: &str) -> Vec<Vec<String>> {
    let queries = [
        format!(
            "SELECT concat(event_id, '|', install_id, '|', toString(total_tokens), '|', toString(cost_usd), '|', toString(created_at))
             FROM {db}.usage_events FINAL ORDER BY install_id, event_id"
        ),
        format!(
            "SELECT concat(install_id, '|', toString(date), '|', user_hash, '|', source, '|', model, '|', toString(late_billing_month),
                    '|', toString(sum(requests)), '|', toString(sum(total_tokens)), '|', toString(sum(cost_usd)), '|', toString(sum(over_limit_requests)))
             FROM {db}.usage_daily GROUP BY install_id, date, user_hash, source, model, late_billing_month ORDER BY 1"
        ),
        format!(
            "SELECT concat(install_id, '|', toString(date), '|', toString(sum(requests)), '|', toString(sum(total_tokens)), '|', toString(sum(cost_usd)))
             FROM {db}.usage_install_daily GROUP BY install_id, date ORDER BY 1"
        ),
        format!(
            "SELECT concat(install_id, '|', toString(month), '|', user_hash, '|', source, '|', model, '|', toString(late_billing_month),
                    '|', toString(sum(requests)), '|', toString(sum(total_tokens)), '|', toString(sum(cost_usd)))
             FROM {db}.usage_monthly GROUP BY install_id, month, user_hash, source, model, late_billing_month ORDER BY 1"
        ),
    ];
    let mut out = Vec::new();
    for q in queries {
        out.push(ch.query(&q).fetch_all::<String>().await.unwrap());
    }
    out
}

/// Requests per table (raw: distinct events), as a reader sees them.
async fn totals(ch: &Client, db: &str) -> Result<[u64; 4], String> {
    let q = format!(
        "SELECT ifNull((SELECT count() FROM {db}.usage_events FINAL), 0),
                ifNull((SELECT sum(requests) FROM {db}.usage_daily), 0),
                ifNull((SELECT sum(requests) FROM {db}.usage_install_daily), 0),
                ifNull((SELECT sum(requests) FROM {db}.usage_monthly), 0)"
    );
    ch.query(&q)
        .fetch_one::<(u64, u64, u64, u64)>()
        .await
        .map(|(a, b, c, d)| [a, b, c, d])
        .map_err(|e| e.to_string())
}

/// Queries the totals over and over until stopped; every answer.
fn reader(
    ch: Client,
    db: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Result<[u64; 4], String>>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            seen.push(totals(&ch, &db).await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    })
}

async fn rows_of(ch: &Client, db: &str, install: &str) -> u64 {
    let mut n = 0;
    for t in TABLES {
        n += ch
            .query(&format!(
                "SELECT count() FROM {db}.{t} WHERE install_id = ?"
            ))
            .bind(install)
            .fetch_one::<u64>()
            .await
            .unwrap();
    }
    n
}

/// Waits until every table holds `n` events.
async fn wait_raw(ch: &Client, db: &str, n: u64) {
    let mut last = Err(String::new());
    for _ in 0..600 {
        last = totals(ch, db).await;
        if last == Ok([n; 4]) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the tables never held {n} events each: {last:?}");
}

#[tokio::test]
async fn a_rebuild_killed_and_resumed_equals_the_live_tables_and_swaps_and_rolls_back_atomically() {
    let group = usage_e2e::unique("group");
    let g = group.clone();
    let p = Pipeline::start_with(true, move |_, processors| processors.group = g).await;
    let (a, b, c) = (Site::new(1), Site::new(2), Site::new(3));
    for s in [&a, &b, &c] {
        assert_eq!(p.register(s, "agency").await.0, 201);
    }
    p.wait_for_registry_mirror(3).await;
    let server = p.clickhouse.server_client();
    let db = p.clickhouse.database.clone();
    let shadow = format!("{db}_rebuild");

    // Every batch twice; late events (dated 3 days back, arriving now);
    // two models priced differently.
    for (n, s) in [&a, &b, &c].into_iter().enumerate() {
        let base = (n as u128 + 1) * 1_000;
        send_twice(
            &p,
            s,
            events(s, base, 10, "gpt-4o-mini", chrono::Duration::minutes(2)),
        )
        .await;
        send_twice(
            &p,
            s,
            events(s, base + 100, 5, "gpt-4o", chrono::Duration::days(3)),
        )
        .await;
    }
    wait_raw(&server, &db, 45).await;
    // c is erased: its events stay in the topic, and must stay out.
    let r = http()
        .delete(format!(
            "http://{}/api/usage/installations/{}",
            p.query_addr, c.install_id
        ))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_raw(&server, &db, 30).await;

    let rb = Rebuild::new(&p, &group);
    let plan = rb.ok(&["plan"]).await;
    assert!(plan.contains("90 messages in all"), "{plan}");
    assert!(plan.contains("dry run: nothing written"), "{plan}");

    // Killed (abort, like kill -9) after its first insert of 2 events:
    // mid-partition (every live site has 15 events in its partition).
    let (code, text) = rb
        .run(
            &["build", "--insert-rows", "2"],
            &[("USAGE_REBUILD_ABORT_AFTER_CHUNKS", "1")],
        )
        .await;
    assert_eq!(code, None, "killed by a signal:\n{text}");
    let status = rb.ok(&["status"]).await;
    assert!(status.contains("phases:  none finished"), "{status}");
    assert!(status.contains("stored:  2 events"), "{status}");
    let built = rb.ok(&["build", "--insert-rows", "5"]).await;
    assert!(built.contains("resuming the build"), "{built}");
    // The interrupted partition was read again from its start (its first
    // rows deleted first): the rebuilt raw events and daily rows are the
    // live ones, row for row.
    assert_eq!(
        contents(&server, &shadow).await[..2],
        contents(&server, &db).await[..2]
    );

    // Arrives after the build: the swap's catch-up brings it.
    send_twice(
        &p,
        &a,
        events(&a, 1_200, 5, "gpt-4o-mini", chrono::Duration::minutes(1)),
    )
    .await;
    wait_raw(&server, &db, 35).await;
    let compare = rb.ok(&["compare"]).await;
    assert!(
        compare.contains("differences: 0 (0 re-priced, 0 in flight, 0 unexplained)"),
        "{compare}"
    );
    assert!(compare.contains("requests           35"), "{compare}");

    // The swap, with a reader throughout and a batch arriving during it.
    let before = contents(&server, &db).await;
    let stop = Arc::new(AtomicBool::new(false));
    let reading = reader(server.clone(), db.clone(), stop.clone());
    let swapping = async {
        let (code, text) = rb
            .run(&["swap"], &[("USAGE_REBUILD_HOLD_FENCE_MS", "2000")])
            .await;
        assert_eq!(code, Some(0), "usage-rebuild swap:\n{text}");
        text
    };
    let (swap, ()) = tokio::join!(swapping, async {
        // Sent once the processors are fenced: they wait, then write it
        // into the new tables.
        usage_e2e::eventually("the swap fences the processors", Duration::from_secs(60), || async {
            let n: u64 = server
                .query(
                    "SELECT count() FROM system.tables WHERE database = ? AND name = 'processor_batches'
                     AND position(create_table_query, 'rebuild_swap_fence') > 0",
                )
                .bind(&db)
                .fetch_one()
                .await
                .ok()?;
            (n > 0).then_some(())
        })
        .await;
        send_twice(
            &p,
            &b,
            events(&b, 2_300, 5, "gpt-4o", chrono::Duration::minutes(1)),
        )
        .await;
    });
    assert!(swap.contains("differences: 0"), "{swap}");
    assert!(swap.contains("exchanged usage_monthly"), "{swap}");
    wait_raw(&server, &db, 40).await;
    stop.store(true, Ordering::Relaxed);
    let seen = reading.await.unwrap();
    assert!(seen.len() > 10, "the reader read {} times", seen.len());
    for s in &seen {
        let t = s
            .as_ref()
            .unwrap_or_else(|e| panic!("a reader failed during the swap: {e}"));
        for v in t {
            assert!(*v == 35 || *v == 40, "a reader saw {t:?}");
        }
    }
    // The kept tables are the old ones, and the live ones hold the old
    // rows plus the batch the processors wrote through the swap.
    let kept = contents(&server, &shadow).await;
    assert_eq!(kept, before, "the replaced tables are kept as they were");
    let after = contents(&server, &db).await;
    assert_eq!(after[0].len(), 40);
    assert!(before[0].iter().all(|r| after[0].contains(r)));
    assert_eq!(
        rows_of(&server, &db, &c.install_id).await,
        0,
        "erased stays erased"
    );

    // More after the swap, then the rollback: the kept tables catch up.
    send_twice(
        &p,
        &a,
        events(&a, 1_300, 5, "gpt-4o-mini", chrono::Duration::minutes(1)),
    )
    .await;
    wait_raw(&server, &db, 45).await;
    let live_then = contents(&server, &db).await;
    let stop = Arc::new(AtomicBool::new(false));
    let reading = reader(server.clone(), db.clone(), stop.clone());
    let back = rb.ok(&["rollback"]).await;
    assert!(back.contains("rolled back"), "{back}");
    stop.store(true, Ordering::Relaxed);
    for s in reading.await.unwrap() {
        assert_eq!(s, Ok([45; 4]), "a reader during the rollback");
    }
    assert_eq!(
        contents(&server, &db).await,
        live_then,
        "the rollback lost nothing"
    );
    assert_eq!(
        rows_of(&server, &db, &c.install_id).await,
        0,
        "erased stays erased"
    );
    let status = rb.ok(&["status"]).await;
    assert!(status.contains("rolled back at"), "{status}");
    rb.ok(&["drop"]).await;
    p.stop().await;
}

#[tokio::test]
async fn a_retroactive_price_change_rebuilds_the_costs_and_nothing_else() {
    let group = usage_e2e::unique("group");
    let g = group.clone();
    let p = Pipeline::start_with(true, move |_, processors| processors.group = g).await;
    let site = Site::new(1);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    p.wait_for_registry_mirror(1).await;
    let server = p.clickhouse.server_client();
    let db = p.clickhouse.database.clone();
    send_twice(
        &p,
        &site,
        events(&site, 1, 4, "gpt-4o", chrono::Duration::days(2)),
    )
    .await;
    send_twice(
        &p,
        &site,
        events(&site, 10, 6, "gpt-4o", chrono::Duration::minutes(1)),
    )
    .await;
    wait_raw(&server, &db, 10).await;
    let since = (Utc::now() - chrono::Duration::days(2)).date_naive();
    let summary = |p: &Pipeline| {
        let q = format!(
            "install_id={}&date_from={since}&group_by=model",
            site.install_id
        );
        let addr = p.query_addr;
        async move {
            let r = http()
                .get(format!("http://{addr}/provider/usage/summary?{q}"))
                .bearer_auth(admin_token())
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()["data"][0].clone()
        }
    };
    let old = summary(&p).await;
    // Tokens: prompt 100+i for i in 1..=4 and 10..=15, completion 20 each.
    let prompt: u64 = (1..=4).chain(10..=15).map(|i| 100 + i).sum();
    assert_eq!(old["prompt_tokens"], prompt);
    // gpt-4o at 0.0025 / 0.01 per 1k tokens.
    let usd = |pp: f64, cp: f64| (prompt as f64 * pp + 200.0 * cp) / 1000.0;
    assert!(
        (old["estimated_cost_usd"].as_f64().unwrap() - usd(0.0025, 0.01)).abs() < 1e-12,
        "{old}"
    );

    // The provider halves gpt-4o's price from two days ago.
    p.clickhouse
        .client()
        .query("INSERT INTO model_prices (model, effective_from, prompt_usd_per_1k, completion_usd_per_1k) VALUES ('gpt-4o', ?, 0.00125, 0.005)")
        .bind(since.to_string())
        .execute()
        .await
        .unwrap();
    let rb = Rebuild::new(&p, &group);
    let since_arg = since.to_string();
    rb.ok(&["build", "--source", "table", "--since", &since_arg])
        .await;
    let (code, compare) = rb.run(&["compare"], &[]).await;
    assert_eq!(code, Some(0), "{compare}");
    assert!(
        compare.contains("(2 re-priced, 0 in flight, 0 unexplained)"),
        "{compare}"
    );
    rb.ok(&["swap"]).await;
    let new = summary(&p).await;
    assert_eq!(new["total_requests"], 10, "{new}");
    assert_eq!(new["total_tokens"], old["total_tokens"], "{new}");
    assert!(
        (new["estimated_cost_usd"].as_f64().unwrap() - usd(0.00125, 0.005)).abs() < 1e-12,
        "{new}"
    );
    // The raw events carry the new costs too.
    let raw: String = server
        .query(&format!(
            "SELECT toString(sum(cost_usd)) FROM {db}.usage_events FINAL"
        ))
        .fetch_one()
        .await
        .unwrap();
    assert!(
        (raw.parse::<f64>().unwrap() - usd(0.00125, 0.005)).abs() < 1e-12,
        "{raw}"
    );
    // A swapped rebuild is kept for rollback: drop refuses within the keep time.
    let (code, text) = rb.run(&["drop"], &[]).await;
    assert_eq!(code, Some(2), "{text}");
    rb.ok(&["drop", "--force"]).await;
    p.stop().await;
}

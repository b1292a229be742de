//! The processors under real failures: killed between the ClickHouse write
//! and the offset commit, killed between the rollup deltas and the raw
//! events and restarted with other batch sizes, killed at random
//! mid-stream, one of two instances killed while the survivor takes
//! over, workers of one process sharing its partitions and one of them
//! killed with it, and a table gone from under them (a fault no retry cures). Every
//! number stays exact.

use std::time::Duration;

use serde_json::Value;
use usage_e2e::pipeline::{event, Pipeline, Site};
use usage_e2e::processes::ProcessorProcess;
use usage_e2e::{eventually, unique};

const BIN: &str = env!("CARGO_BIN_EXE_e2e-processors");

fn created(minutes_ago: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::minutes(minutes_ago))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `batches` batches of `per_batch` events for `site`; event ids unique per
/// site via `seed`. Returns (events, tokens).
async fn send_batches(
    p: &Pipeline,
    site: &Site,
    seed: u128,
    batches: u128,
    per_batch: u128,
) -> (u64, u64) {
    let mut tokens = 0u64;
    for b in 0..batches {
        let events: Vec<Value> = (0..per_batch)
            .map(|i| {
                let n = seed * 1_000_000 + b * 1000 + i;
                let prompt = 100 + (n % 97) as u32;
                tokens += u64::from(prompt + 20);
                event(
                    n,
                    &site.user_hash((n % 5) as u32),
                    ["inline", "bulk", "queue", "manual"][(n % 4) as usize],
                    "gpt-4o-mini",
                    prompt,
                    20,
                    &created((n % 600) as i64),
                )
            })
            .collect();
        let (status, body) = p.send(site, site.batch(events)).await;
        assert_eq!(status, 200, "{body}");
    }
    ((batches * per_batch) as u64, tokens)
}

/// Requests and tokens in the summary (by day), in the raw table and in the
/// per-installation daily rollup.
async fn totals(p: &Pipeline, site: &Site) -> [(u64, u64); 3] {
    let from = (chrono::Utc::now() - chrono::Duration::days(2)).date_naive();
    let s = p
        .summary(&format!(
            "install_id={}&date_from={from}&group_by=day",
            site.install_id
        ))
        .await;
    let rows = s["data"].as_array().unwrap();
    let sum = |k: &str| rows.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>();
    let install_daily: (u64, u64) = p
        .clickhouse
        .client()
        .query("SELECT sum(requests), sum(total_tokens) FROM usage_install_daily FINAL WHERE install_id = ?")
        .bind(&site.install_id)
        .fetch_one()
        .await
        .unwrap();
    [
        (sum("total_requests"), sum("total_tokens")),
        p.raw_totals(site).await,
        install_daily,
    ]
}

async fn wait_exact(p: &Pipeline, site: &Site, expected: (u64, u64)) {
    eventually(
        "exact totals in summary, raw table and rollup",
        Duration::from_secs(60),
        || async { (totals(p, site).await == [expected; 3]).then_some(()) },
    )
    .await;
    // And they stay exact (nothing late adds to them).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(totals(p, site).await, [expected; 3]);
}

#[tokio::test]
async fn killed_between_clickhouse_write_and_offset_commit_counts_nothing_twice() {
    let p = Pipeline::start(false).await;
    let site = Site::new(1);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    let expected = send_batches(&p, &site, 1, 10, 50).await;
    let group = unique("group");

    // The first instance writes its first batch of 100 events, then aborts
    // before committing the offsets.
    ProcessorProcess::run_until_fault(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &group,
        &["--batch-events", "100", "--crash-after-flush", "1"],
    )
    .await;
    let (stored, _) = p.raw_totals(&site).await;
    assert!(
        stored >= 100,
        "the batch reached ClickHouse before the crash ({stored})"
    );

    // The replacement re-reads that batch (uncommitted) and everything after.
    let replacement = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    wait_exact(&p, &site, expected).await;
    replacement.kill().await;
    p.stop().await;
}

#[tokio::test]
async fn killed_between_rollup_deltas_and_raw_events_and_restarted_with_other_batches_counts_once()
{
    let p = Pipeline::start(false).await;
    let site = Site::new(3);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    let expected = send_batches(&p, &site, 3, 10, 50).await;
    let group = unique("group");

    // The first batch (100 events) adds its deltas to the rollups, then the
    // processor dies before storing the raw events or committing.
    ProcessorProcess::run_until_fault(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &group,
        &["--batch-events", "100", "--crash-after-deltas", "1"],
    )
    .await;
    let [_, raw, rollup] = totals(&p, &site).await;
    assert_eq!(raw.0, 0, "no raw event was stored before the crash");
    assert_eq!(rollup.0, 100, "the first batch's deltas were written");

    // A replacement cutting batches of 7 must redo the recorded batch of 100
    // as it was (same offsets, same tokens: its deltas are dropped as
    // copies), store its raw events, and only then read on.
    let replacement = ProcessorProcess::spawn(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &group,
        &["--batch-events", "7"],
    );
    wait_exact(&p, &site, expected).await;
    assert!(
        replacement
            .metric("usage_processor_batches_redone_total")
            .await
            >= 1
    );
    // Drained: every owned partition's lag is exported, and is zero.
    eventually("zero consumer lag", Duration::from_secs(30), || async {
        let lag = replacement.lag().await;
        (!lag.is_empty() && lag.values().all(|l| *l == 0)).then_some(())
    })
    .await;
    replacement.kill().await;
    p.stop().await;
}

#[tokio::test]
async fn killed_mid_stream_and_restarted_keeps_every_number_exact() {
    let p = Pipeline::start(false).await;
    let site = Site::new(2);
    assert_eq!(p.register(&site, "pro").await.0, 201);
    let group = unique("group");

    let first = ProcessorProcess::spawn(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &group,
        &["--batch-events", "40"],
    );
    let a = send_batches(&p, &site, 1, 8, 25).await;
    // Kill it as soon as it is busy with the stream.
    eventually(
        "the processor to consume",
        Duration::from_secs(30),
        || async { (first.consumed().await > 0).then_some(()) },
    )
    .await;
    first.kill().await;
    let b = send_batches(&p, &site, 2, 8, 25).await;
    let second = ProcessorProcess::spawn(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &group,
        &["--batch-events", "40"],
    );
    wait_exact(&p, &site, (a.0 + b.0, a.1 + b.1)).await;
    second.kill().await;
    p.stop().await;
}

#[tokio::test]
async fn two_instances_share_the_partitions_and_the_survivor_takes_over() {
    let p = Pipeline::start(false).await;
    // 16 keys over 4 partitions: both instances get traffic (all on one side: p < 1e-4).
    let sites: Vec<Site> = (10..26).map(Site::new).collect();
    for s in &sites {
        assert_eq!(p.register(s, "pro").await.0, 201);
    }
    let group = unique("group");
    let one = ProcessorProcess::spawn(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &group,
        &["--batch-events", "20"],
    );
    let two = ProcessorProcess::spawn(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &group,
        &["--batch-events", "20"],
    );
    // The group settles: the 4 partitions split between the two instances.
    eventually(
        "both instances to own partitions",
        Duration::from_secs(60),
        || async {
            let (a, b) = (one.partitions().await, two.partitions().await);
            (a > 0 && b > 0 && a + b == 4).then_some(())
        },
    )
    .await;

    let mut expected = vec![(0u64, 0u64); sites.len()];
    for round in 0..3u128 {
        for (i, s) in sites.iter().enumerate() {
            let (n, t) = send_batches(&p, s, 10 + round, 1, 10).await;
            expected[i].0 += n;
            expected[i].1 += t;
        }
    }
    // Both consumed their share.
    eventually(
        "both instances to consume",
        Duration::from_secs(30),
        || async { (one.consumed().await > 0 && two.consumed().await > 0).then_some(()) },
    )
    .await;

    one.kill().await;
    for round in 3..6u128 {
        for (i, s) in sites.iter().enumerate() {
            let (n, t) = send_batches(&p, s, 10 + round, 1, 10).await;
            expected[i].0 += n;
            expected[i].1 += t;
        }
    }
    for (s, e) in sites.iter().zip(&expected) {
        wait_exact(&p, s, *e).await;
    }
    two.kill().await;
    p.stop().await;
}

/// Workers of one process are members of the group like instances: three
/// of them split the 4 partitions, the process reports their sums (owned
/// partitions, every partition's lag), and when the process dies mid-stream
/// a replacement with another worker count finishes exactly.
/// Waits until `process` exports a lag for each of the 4 partitions, all 0.
async fn every_lag_zero(process: &ProcessorProcess, what: &str) {
    eventually(what, Duration::from_secs(30), || async {
        let lag = process.lag().await;
        (lag.len() == 4 && lag.values().all(|l| *l == 0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn workers_of_one_process_split_the_partitions_and_a_replacement_finishes_exactly() {
    let p = Pipeline::start(false).await;
    let sites: Vec<Site> = (40..56).map(Site::new).collect();
    for s in &sites {
        assert_eq!(p.register(s, "pro").await.0, 201);
    }
    let group = unique("group");
    let three = ProcessorProcess::spawn(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &group,
        &["--batch-events", "15", "--workers", "3"],
    );
    eventually(
        "the three workers to own the 4 partitions",
        Duration::from_secs(60),
        || async { (three.partitions().await == 4).then_some(()) },
    )
    .await;
    // Before any traffic every partition's lag is exported, and 0: a
    // partition the group never committed counts what it holds (nothing),
    // not "unknown", which left a partition without a label whenever no
    // site's key hashed to it.
    every_lag_zero(&three, "every partition's lag exported before any traffic").await;
    let mut expected = vec![(0u64, 0u64); sites.len()];
    for round in 0..3u128 {
        for (i, s) in sites.iter().enumerate() {
            let (n, t) = send_batches(&p, s, 60 + round, 1, 10).await;
            expected[i].0 += n;
            expected[i].1 += t;
        }
    }
    for (s, e) in sites.iter().zip(&expected) {
        wait_exact(&p, s, *e).await;
    }
    every_lag_zero(&three, "every partition's lag, exported once and zero").await;

    // More traffic, and the process killed while it consumes it.
    for round in 3..6u128 {
        for (i, s) in sites.iter().enumerate() {
            let (n, t) = send_batches(&p, s, 60 + round, 1, 10).await;
            expected[i].0 += n;
            expected[i].1 += t;
        }
    }
    three.kill().await;
    let one = ProcessorProcess::spawn(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &group,
        &["--batch-events", "7", "--workers", "1"],
    );
    for (s, e) in sites.iter().zip(&expected) {
        wait_exact(&p, s, *e).await;
    }
    one.kill().await;
    p.stop().await;
}

/// A table renamed away (schema drift: a fault no retry cures) stalls the
/// processors visibly, in `/ready` and the metrics, without skipping the
/// batch; once the table is back, every event is counted once.
#[tokio::test]
async fn a_missing_table_stalls_the_processors_visibly_and_nothing_is_lost_after_the_fix() {
    let p = Pipeline::start_with(true, |_, processors| {
        processors.permanent_retry_secs = 1;
    })
    .await;
    let site = Site::new(1);
    assert_eq!(p.register(&site, "pro").await.0, 201);
    let day = (chrono::Utc::now() - chrono::Duration::days(2))
        .date_naive()
        .to_string();
    let first = send_batches(&p, &site, 1, 1, 10).await;
    p.wait_for_requests(&site, &day, 10).await;
    let processors = p.processors.as_ref().unwrap().http.addr;
    usage_e2e::wait_ready_status(processors, 200, Duration::from_secs(10)).await;

    let ch = p.clickhouse.client();
    ch.query("RENAME TABLE usage_events TO usage_events_moved")
        .execute()
        .await
        .unwrap();
    let second = send_batches(&p, &site, 2, 2, 10).await;
    // Not ready, saying which stage waits and why (the write, or the
    // previous batch's look for erasures, whichever reads the table first).
    let detail = eventually(
        "the processors to report the stalled stage",
        Duration::from_secs(30),
        || async move {
            let r = usage_e2e::http()
                .get(format!("http://{processors}/ready"))
                .send()
                .await
                .ok()?;
            if r.status().as_u16() != 503 {
                return None;
            }
            let body: Value = r.json().await.ok()?;
            let detail = body["dependencies"]["pipeline"]["detail"]
                .as_str()?
                .to_string();
            detail.contains("stalled").then_some(detail)
        },
    )
    .await;
    assert!(detail.contains("UNKNOWN_TABLE"), "{detail}");
    assert_eq!(
        p.processor_metric("usage_processor_stalled_stages").await,
        1
    );
    let permanent_errors = usage_e2e::labelled_metric(
        processors,
        "usage_processor_errors_total",
        "kind=\"permanent\"",
    )
    .await;
    assert!(permanent_errors >= 1);

    ch.query("RENAME TABLE usage_events_moved TO usage_events")
        .execute()
        .await
        .unwrap();
    // The rollups were written before the raw events (their deltas went
    // in before the write stalled): the raw events follow within a retry.
    let expected = (30, first.1 + second.1);
    let (pipeline, stored_site) = (&p, &site);
    eventually(
        "the raw events to be stored",
        Duration::from_secs(30),
        || async move { (pipeline.raw_totals(stored_site).await == expected).then_some(()) },
    )
    .await;
    p.wait_for_requests(&site, &day, 30).await;
    assert_eq!(p.rollup_requests(&site).await, [30, 30, 30]);
    usage_e2e::wait_ready_status(processors, 200, Duration::from_secs(30)).await;
    assert_eq!(
        p.processor_metric("usage_processor_stalled_stages").await,
        0
    );
    p.stop().await;
}

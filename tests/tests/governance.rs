//! Live governance end to end: events with timestamps under the test's
//! control go through the real gateway, Kafka, processors and ClickHouse; the
//! processors' decisions come back to the gateway through the governance
//! topic and are enforced there.

use std::time::{Duration, Instant};

use serde_json::Value;
use usage_e2e::pipeline::{event, token, Pipeline, Site};
use usage_e2e::processes::ProcessorProcess;
use usage_e2e::{eventually, http, unique};
use usage_schemas::wire::AvroRecord;
use usage_service_kit::auth::Role;

const BIN: &str = env!("CARGO_BIN_EXE_e2e-processors");

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What a test's events must not straddle.
#[derive(Clone, Copy, Debug)]
enum Within {
    /// Nothing: the windows run on event time.
    Anything,
    /// A UTC month: the monthly count.
    Month,
    /// A UTC day: cap alerts are made at most once a day.
    Day,
}

/// The gateway refuses events more than 300 s ahead; tests stay under that.
const AHEAD_MS: i64 = 240_000;

/// A start time about `minutes` ago, on a 10 s bucket boundary, such that
/// `span_ms` of events from it stay `within` one UTC day or month and end
/// at most `AHEAD_MS` from now. Right after midnight that can mean waiting
/// (rare, and said).
async fn base(minutes: i64, span_ms: i64, within: Within) -> i64 {
    loop {
        match start_at(chrono::Utc::now(), minutes, span_ms, within) {
            Ok(t) => return t,
            Err(wait_ms) => {
                println!(
                    "waiting {} s so that the events stay within one UTC {within:?}",
                    wait_ms / 1000 + 1
                );
                tokio::time::sleep(Duration::from_millis(wait_ms as u64 + 1000)).await;
            }
        }
    }
}

/// `base` at `now`: the start, or how long to wait (ms) before asking again.
fn start_at(
    now: chrono::DateTime<chrono::Utc>,
    minutes: i64,
    span_ms: i64,
    within: Within,
) -> Result<i64, i64> {
    let today = now.date_naive();
    let (start, end) = match within {
        Within::Anything => (None, None),
        Within::Day => (Some(today), today.succ_opt()),
        Within::Month => {
            let first = today.with_day0(0).unwrap();
            (
                Some(first),
                first.checked_add_months(chrono::Months::new(1)),
            )
        }
    };
    let at = |d: Option<chrono::NaiveDate>| {
        d.map(|d| {
            d.and_hms_opt(0, 0, 10)
                .unwrap()
                .and_utc()
                .timestamp_millis()
        })
    };
    let now_ms = now.timestamp_millis();
    let mut t = now_ms - minutes * 60_000;
    if let Some(start) = at(start) {
        t = t.max(start);
    }
    t -= t.rem_euclid(10_000);
    let last = t + span_ms;
    let wait_ms = match at(end) {
        // Too close to the next day or month: start in it.
        Some(end) if last >= end - 10_000 => end - now_ms,
        _ => last - (now_ms + AHEAD_MS),
    };
    if wait_ms <= 0 {
        Ok(t)
    } else {
        Err(wait_ms)
    }
}

#[test]
fn test_start_times_keep_their_events_within_a_day_or_a_month() {
    let utc = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    let ms = |s: &str| utc(s).timestamp_millis();
    // Mid-day: simply `minutes` ago, rounded down to 10 s.
    let noon = utc("2026-11-15T12:00:05Z");
    assert_eq!(
        start_at(noon, 10, 500_000, Within::Day),
        Ok(ms("2026-11-15T11:50:00Z"))
    );
    // Two minutes into a day: 500 s from 00:00:10 would end too far ahead.
    let early = utc("2026-11-15T00:02:00Z");
    assert_eq!(
        start_at(early, 10, 500_000, Within::Day),
        Err(ms("2026-11-15T00:08:30Z") - ms("2026-11-15T00:06:00Z"))
    );
    // Five minutes in, it fits from 00:00:10.
    let later = utc("2026-11-15T00:05:00Z");
    assert_eq!(
        start_at(later, 10, 500_000, Within::Day),
        Ok(ms("2026-11-15T00:00:10Z"))
    );
    // A month boundary holds a month-scoped test, not an unscoped one.
    let first = utc("2026-12-01T00:10:00Z");
    assert!(start_at(first, 59, 3_000_000, Within::Month).is_err());
    assert_eq!(
        start_at(first, 59, 3_000_000, Within::Anything),
        Ok(ms("2026-11-30T23:11:00Z"))
    );
    assert_eq!(
        start_at(first, 20, 300_000, Within::Day),
        Ok(ms("2026-12-01T00:00:10Z"))
    );
    // Near the end of a day, a span that would cross midnight waits for it.
    let late = utc("2026-11-15T23:59:00Z");
    assert_eq!(
        start_at(late, 1, 500_000, Within::Day),
        Err(ms("2026-11-16T00:00:10Z") - ms("2026-11-15T23:59:00Z"))
    );
}

use chrono::Datelike;

/// Sends events `ids` created at `at(id)`, `per_batch` per request; returns the statuses.
async fn send(
    p: &Pipeline,
    site: &Site,
    ids: std::ops::Range<u128>,
    per_batch: usize,
    tokens: u32,
    at: impl Fn(u128) -> i64,
) -> Vec<(u16, Value)> {
    let ids: Vec<u128> = ids.collect();
    let mut out = vec![];
    for chunk in ids.chunks(per_batch) {
        let events = chunk
            .iter()
            .map(|i| {
                event(
                    *i,
                    &site.user_hash(1),
                    "bulk",
                    "gpt-4o-mini",
                    tokens - 10,
                    10,
                    &iso(at(*i)),
                )
            })
            .collect();
        out.push(p.send(site, site.batch(events)).await);
    }
    out
}

async fn report(p: &Pipeline, site: &Site) -> Value {
    let r = http()
        .get(format!(
            "http://{}/api/usage/governance?install_id={}",
            p.ingest_addr, site.install_id
        ))
        .bearer_auth(token(Role::Account, Some(&site.account_id)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["governance"].clone()
}

async fn wait_report(p: &Pipeline, site: &Site, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let last = std::sync::Mutex::new(Value::Null);
    let found = tokio::time::timeout(
        Duration::from_secs(30),
        eventually(what, Duration::from_secs(31), || async {
            let r = report(p, site).await;
            *last.lock().unwrap() = r.clone();
            ok(&r).then_some(r)
        }),
    )
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "timed out waiting for {what}; last report: {}",
            last.lock().unwrap()
        )
    })
}

async fn decisions(p: &Pipeline, site: &Site) -> Vec<(String, String)> {
    p.clickhouse
        .client()
        .query("SELECT kind, reason FROM governance_decisions FINAL WHERE install_id = ? ORDER BY at, kind")
        .bind(&site.install_id)
        .fetch_all()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_101st_request_in_5_minutes_is_refused_until_the_window_frees() {
    let p = Pipeline::start(true).await;
    let site = Site::new(1);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    let t0 = base(20, 300_000, Within::Month).await;
    // 100 requests, one a second.
    for (status, body) in send(&p, &site, 0..100, 25, 100, |i| t0 + i as i64 * 1000).await {
        assert_eq!(status, 200, "{body}");
    }
    let accepted = Instant::now();
    let r = wait_report(&p, &site, "the gateway to know the window is full", |r| {
        r["requests_left_in_window"] == 0
    })
    .await;
    println!(
        "decision to enforcement: {:?} after the 100th request was accepted",
        accepted.elapsed()
    );
    assert_eq!(r["monthly_used"], 100);

    // The 101st, 100 s later, is refused until the first 10 s bucket slides out.
    let (status, body) = send(&p, &site, 100..101, 1, 100, |_| t0 + 100_000)
        .await
        .remove(0);
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["success"], false);
    assert_eq!(body["received"], 0);
    // Once the window has freed (event time t0 + 300 s), it is accepted.
    let (status, body) = send(&p, &site, 101..102, 1, 100, |_| t0 + 300_000)
        .await
        .remove(0);
    assert_eq!(status, 200, "{body}");
    assert_kinds(&p, &site, &["rate_limited"]).await;
    p.stop().await;
}

#[tokio::test]
async fn the_token_limit_works_the_same_way() {
    let p = Pipeline::start(true).await;
    let site = Site::new(2);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    let t0 = base(20, 300_000, Within::Month).await;
    // 5 generations of 10,000 tokens reach the 50,000-token limit.
    for (status, body) in send(&p, &site, 0..5, 5, 10_000, |i| t0 + i as i64 * 1000).await {
        assert_eq!(status, 200, "{body}");
    }
    wait_report(&p, &site, "the token window to be full", |r| {
        r["tokens_left_in_window"] == 0
    })
    .await;
    let (status, body) = send(&p, &site, 5..6, 1, 20, |_| t0 + 60_000)
        .await
        .remove(0);
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "rate_limited");
    assert!(body["message"].as_str().unwrap().contains("tokens"));
    let (status, _) = send(&p, &site, 6..7, 1, 20, |_| t0 + 300_000)
        .await
        .remove(0);
    assert_eq!(status, 200);
    p.stop().await;
}

#[tokio::test]
async fn abuse_is_flagged_at_200_requests_in_an_hour() {
    let p = Pipeline::start(true).await;
    let site = Site::new(3);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    let t0 = base(59, 200 * 15_000, Within::Anything).await;
    // 200 requests over 50 minutes: 4 a minute, never rate limited.
    for (status, body) in send(&p, &site, 0..200, 50, 100, |i| t0 + i as i64 * 15_000).await {
        assert_eq!(status, 200, "{body}");
    }
    let r = wait_report(&p, &site, "abuse to be flagged", |r| {
        r["abuse_flagged"] == true
    })
    .await;
    assert!(r["abuse_reason"]
        .as_str()
        .unwrap()
        .starts_with("200 requests in one hour"));
    assert_kinds(&p, &site, &["abuse_flagged"]).await;
    p.stop().await;
}

#[tokio::test]
async fn the_free_plan_warns_at_38_and_45_blocks_at_50_and_an_upgrade_unblocks() {
    let p = Pipeline::start(true).await;
    let site = Site::new(4);
    assert_eq!(p.register(&site, "free").await.0, 201);
    let t0 = base(10, 500_000, Within::Day).await;
    for (status, body) in send(&p, &site, 0..50, 10, 100, |i| t0 + i as i64 * 10_000).await {
        assert_eq!(status, 200, "{body}");
    }
    let r = wait_report(&p, &site, "the block", |r| r["level"] == "blocked").await;
    assert_eq!(
        (r["monthly_used"].as_i64(), r["monthly_cap"].as_i64()),
        (Some(50), Some(50))
    );
    assert_eq!(r["usage_percent"], 100.0);
    // Each alert once, at the 38th, the 45th and the 50th generation.
    assert_kinds(&p, &site, &["cap_warning", "cap_critical", "blocked"]).await;
    let got = decisions(&p, &site).await;
    let alerts: Vec<(&str, &str)> = got
        .iter()
        .map(|(k, r)| (k.as_str(), r.split(' ').next().unwrap()))
        .collect();
    assert_eq!(
        alerts,
        [
            ("cap_warning", "38"),
            ("cap_critical", "45"),
            ("blocked", "50")
        ]
    );

    // The 51st generation is refused with the code the plugin shows.
    let (status, body) = send(&p, &site, 50..51, 1, 100, |_| t0 + 500_000)
        .await
        .remove(0);
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "plan_limit_reached");
    // Still refused on a resend; nothing counted.
    let (status, _) = send(&p, &site, 50..51, 1, 100, |_| t0 + 500_000)
        .await
        .remove(0);
    assert_eq!(status, 429);

    // Upgrading the plan unblocks without waiting for an event.
    assert_eq!(p.register(&site, "pro").await.0, 200);
    wait_report(&p, &site, "the upgrade to unblock", |r| {
        r["level"] == "ok" && r["plan"] == "pro"
    })
    .await;
    let (status, body) = send(&p, &site, 50..51, 1, 100, |_| t0 + 500_000)
        .await
        .remove(0);
    assert_eq!(status, 200, "{body}");
    // Each alert once; the unblock sorts after the block it lifts (same time).
    assert_kinds(
        &p,
        &site,
        &["cap_warning", "cap_critical", "blocked", "unblocked"],
    )
    .await;
    p.stop().await;
}

#[tokio::test]
async fn duplicates_move_no_counter_and_a_restarted_processor_keeps_its_counts() {
    let p = Pipeline::start(false).await;
    let site = Site::new(5);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    let group = unique("group");
    let first = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    let t0 = base(20, 40_000, Within::Month).await;
    let batch = |ids: std::ops::Range<u128>| {
        site.batch(
            ids.map(|i| {
                event(
                    i,
                    &site.user_hash(1),
                    "inline",
                    "gpt-4o-mini",
                    90,
                    10,
                    &iso(t0 + i as i64 * 1000),
                )
            })
            .collect(),
        )
    };
    assert_eq!(p.send(&site, batch(0..30)).await.0, 200);
    wait_report(&p, &site, "30 requests in the window", |r| {
        r["requests_left_in_window"] == 70
    })
    .await;

    // The plugin resends the same batch twice: nothing moves.
    assert_eq!(p.send(&site, batch(0..30)).await.0, 200);
    assert_eq!(p.send(&site, batch(10..30)).await.0, 200);
    wait_metric(&first, "usage_processor_events_duplicate_total", |n| {
        n == 50
    })
    .await;
    let r = report(&p, &site).await;
    assert_eq!(
        (
            r["requests_left_in_window"].as_i64(),
            r["monthly_used"].as_i64()
        ),
        (Some(70), Some(30))
    );

    // Killed mid-window; the replacement rebuilds the window from ClickHouse.
    first.kill().await;
    let second = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    assert_eq!(p.send(&site, batch(30..40)).await.0, 200);
    let r = wait_report(
        &p,
        &site,
        "40 requests in the window after the restart",
        |r| r["requests_left_in_window"] == 60,
    )
    .await;
    assert_eq!(r["monthly_used"], 40);
    second.kill().await;
    p.stop().await;
}

/// Decision kinds of an installation, in event-time order.
async fn kinds(p: &Pipeline, site: &Site) -> Vec<String> {
    decisions(p, site)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// Waits (10 s at most) until the installation's decision kinds are
/// `expected` (the processor writes them a moment after its batch).
async fn assert_kinds(p: &Pipeline, site: &Site, expected: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = kinds(p, site).await;
        if got == expected {
            return;
        }
        if Instant::now() > deadline {
            assert_eq!(got, expected);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_metric(process: &ProcessorProcess, name: &str, ok: impl Fn(u64) -> bool) {
    eventually(name, Duration::from_secs(30), || async {
        ok(process.metric(name).await).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_idle_installation_leaves_memory_and_comes_back_with_the_same_counts() {
    let p = Pipeline::start(false).await;
    let site = Site::new(6);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    let processor = ProcessorProcess::spawn(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &unique("group"),
        &["--governance-idle-secs", "1"],
    );
    let t0 = base(20, 100_000, Within::Month).await;
    for (status, body) in send(&p, &site, 0..60, 30, 100, |i| t0 + i as i64 * 1000).await {
        assert_eq!(status, 200, "{body}");
    }
    wait_report(&p, &site, "60 requests in the window", |r| {
        r["requests_left_in_window"] == 40
    })
    .await;
    // Idle for a second: its state leaves memory.
    wait_metric(
        &processor,
        "usage_governance_installations_evicted_total",
        |n| n >= 1,
    )
    .await;
    wait_metric(&processor, "usage_governance_installations{", |n| n == 0).await;

    // Its next events rebuild it from ClickHouse: the window still holds the
    // first 60, so the 100th fills it and the 101st is refused.
    for (status, body) in send(&p, &site, 60..100, 40, 100, |i| t0 + i as i64 * 1000).await {
        assert_eq!(status, 200, "{body}");
    }
    let r = wait_report(&p, &site, "the full window", |r| {
        r["requests_left_in_window"] == 0
    })
    .await;
    assert_eq!(r["monthly_used"], 100);
    let (status, body) = send(&p, &site, 100..101, 1, 100, |_| t0 + 100_000)
        .await
        .remove(0);
    assert_eq!(status, 429, "{body}");
    assert_kinds(&p, &site, &["rate_limited"]).await;
    processor.kill().await;
    p.stop().await;
}

#[tokio::test]
async fn an_upgrade_unblocks_a_site_whose_processor_restarted_since_the_block() {
    let p = Pipeline::start(false).await;
    let site = Site::new(7);
    assert_eq!(p.register(&site, "free").await.0, 201);
    let group = unique("group");
    let first = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    let t0 = base(10, 500_000, Within::Day).await;
    for (status, body) in send(&p, &site, 0..50, 25, 100, |i| t0 + i as i64 * 10_000).await {
        assert_eq!(status, 200, "{body}");
    }
    wait_report(&p, &site, "the block", |r| r["level"] == "blocked").await;
    // The history has the block too (written before the state is sent).
    assert_kinds(&p, &site, &["cap_warning", "cap_critical", "blocked"]).await;
    // A blocked site sends nothing the gateway accepts, so the restarted
    // processor never sees it again: the upgrade alone must unblock it.
    first.kill().await;
    let second = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    wait_metric(&second, "usage_processor_assigned_partitions", |n| n == 4).await;
    assert_eq!(p.register(&site, "pro").await.0, 200);
    let r = wait_report(&p, &site, "the upgrade to unblock", |r| {
        r["level"] == "ok" && r["plan"] == "pro"
    })
    .await;
    assert_eq!(r["monthly_used"], 50);
    assert_kinds(
        &p,
        &site,
        &["cap_warning", "cap_critical", "blocked", "unblocked"],
    )
    .await;
    second.kill().await;
    p.stop().await;
}

/// A free-plan site whose whole plan (50 generations) the gateway accepted
/// while no processor ran, then a first instance that ran with `fault` at
/// its first occasion and aborted: the pipeline, the site, its first
/// event's time and the consumer group.
async fn whole_free_plan_then_a_fault(n: u32, fault: &str) -> (Pipeline, Site, i64, String) {
    let p = Pipeline::start(false).await;
    let site = Site::new(n);
    assert_eq!(p.register(&site, "free").await.0, 201);
    let t0 = base(10, 500_000, Within::Day).await;
    for (status, body) in send(&p, &site, 0..50, 10, 100, |i| t0 + i as i64 * 10_000).await {
        assert_eq!(status, 200, "{body}");
    }
    let group = unique("group");
    ProcessorProcess::run_until_fault(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &group,
        &["--batch-events", "50", fault, "1"],
    )
    .await;
    (p, site, t0, group)
}

#[tokio::test]
async fn a_processor_that_dies_between_its_writes_and_its_decisions_still_blocks_on_redelivery() {
    // The first instance writes the 50 events (one batch), then dies
    // before governing them or committing.
    let (p, site, t0, group) = whole_free_plan_then_a_fault(11, "--crash-after-flush").await;
    assert_eq!(p.raw_totals(&site).await, (50, 5000));
    assert_eq!(kinds(&p, &site).await, Vec::<String>::new());

    // Its replacement finds the batch stored, yet never governed: it counts
    // it, blocks the site and records each alert once.
    let replacement = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    let r = wait_report(&p, &site, "the block", |r| r["level"] == "blocked").await;
    assert_eq!(r["monthly_used"], 50);
    assert_kinds(&p, &site, &["cap_warning", "cap_critical", "blocked"]).await;
    wait_metric(
        &replacement,
        "usage_governance_events_recovered_total",
        |n| n == 50,
    )
    .await;
    let (status, body) = send(&p, &site, 50..51, 1, 100, |_| t0 + 500_000)
        .await
        .remove(0);
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "plan_limit_reached");
    replacement.kill().await;
    p.stop().await;
}

#[tokio::test]
async fn a_processor_that_dies_between_the_history_and_kafka_publishes_on_redelivery() {
    // The first instance stores the batch and its three decisions in
    // ClickHouse, then dies before anything reaches Kafka.
    let (p, site, _, group) =
        whole_free_plan_then_a_fault(12, "--crash-after-decisions-stored").await;
    let stored = all_decisions(&p.clickhouse).await;
    assert_eq!(
        kinds(&p, &site).await,
        ["cap_warning", "cap_critical", "blocked"]
    );
    assert_eq!(report(&p, &site).await["level"], "ok");
    assert!(usage_e2e::read_topic(&p.kafka, &p.kafka.decisions_topic)
        .await
        .is_empty());

    // The replacement governs the batch again: the block reaches the
    // gateway, and the same three decisions (same ids) reach Kafka.
    let replacement = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    wait_report(&p, &site, "the block", |r| r["level"] == "blocked").await;
    let published: Vec<(String, String)> =
        usage_e2e::read_topic(&p.kafka, &p.kafka.decisions_topic)
            .await
            .iter()
            .map(|bytes| {
                let d = usage_schemas::GovernanceDecision::from_wire(bytes).unwrap();
                (d.decision_id, d.kind)
            })
            .collect();
    let expected: Vec<(String, String)> = stored
        .iter()
        .map(|(id, _, kind, _, _)| (id.clone(), kind.clone()))
        .collect();
    assert_eq!(published, expected);
    assert_eq!(all_decisions(&p.clickhouse).await, stored);
    replacement.kill().await;
    p.stop().await;
}

/// Every decision of the pipeline's database, as stored.
async fn all_decisions(
    clickhouse: &usage_service_kit::clickhouse::ClickHouseArgs,
) -> Vec<(String, String, String, String, i64)> {
    clickhouse
        .client()
        .query(
            "SELECT decision_id, install_id, kind, reason, toUnixTimestamp64Milli(at)
             FROM governance_decisions FINAL ORDER BY install_id, at, kind",
        )
        .fetch_all()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_replay_into_an_empty_database_makes_the_same_decisions() {
    let p = Pipeline::start(true).await;
    let (limited, abusive, capped) = (Site::new(8), Site::new(9), Site::new(10));
    assert_eq!(p.register(&limited, "agency").await.0, 201);
    assert_eq!(p.register(&abusive, "agency").await.0, 201);
    assert_eq!(p.register(&capped, "free").await.0, 201);
    // The capped site's alerts must fall on one day (this may wait, so first).
    let t_cap = base(25, 60 * 20_000, Within::Day).await;
    let t0 = base(59, 200 * 15_000, Within::Anything).await;
    // What the gateway accepted of each site: whole batches of 100-token events.
    let accepted = |site: &Site, replies: Vec<(u16, Value)>, per_batch: u64| {
        let n = replies.iter().filter(|(status, _)| *status == 200).count() as u64 * per_batch;
        (site.install_id.clone(), n, n * 100)
    };
    let mut expected = vec![
        // 100 requests in 100 s, then 10 more the gateway refuses.
        accepted(
            &limited,
            send(&p, &limited, 0..110, 10, 100, |i| t0 + i as i64 * 1000).await,
            10,
        ),
        // 200 requests over 50 minutes.
        accepted(
            &abusive,
            send(&p, &abusive, 0..200, 50, 100, |i| t0 + i as i64 * 15_000).await,
            50,
        ),
        // 60 generations on the free plan: refused once the block reaches the
        // gateway, which may be after the 50th.
        accepted(
            &capped,
            send(&p, &capped, 0..60, 5, 100, |i| t_cap + i as i64 * 20_000).await,
            5,
        ),
    ];
    expected.sort();
    wait_report(&p, &capped, "the block", |r| r["level"] == "blocked").await;
    wait_report(&p, &abusive, "the abuse flag", |r| {
        r["abuse_flagged"] == true
    })
    .await;
    let original = eventually("every decision stored", Duration::from_secs(30), || async {
        let d = all_decisions(&p.clickhouse).await;
        (d.len() == 5).then_some(d)
    })
    .await;
    let kinds_of = |d: &[(String, String, String, String, i64)], site: &Site| -> Vec<String> {
        d.iter()
            .filter(|r| r.1 == site.install_id)
            .map(|r| r.2.clone())
            .collect()
    };
    assert_eq!(kinds_of(&original, &limited), ["rate_limited"]);
    assert_eq!(kinds_of(&original, &abusive), ["abuse_flagged"]);
    assert_eq!(
        kinds_of(&original, &capped),
        ["cap_warning", "cap_critical", "blocked"]
    );

    // Ops rebuild everything: a new database, a new consumer group reading
    // the events topic from the start, with another batch size.
    let rebuilt = usage_e2e::migrated_database().await;
    let replay = ProcessorProcess::spawn(
        BIN,
        &p.kafka,
        &rebuilt,
        &unique("replay"),
        &["--batch-events", "7"],
    );
    let sums = |c: &usage_service_kit::clickhouse::ClickHouseArgs| {
        let c = c.client();
        async move {
            c.query("SELECT install_id, sum(requests), sum(total_tokens) FROM usage_daily FINAL GROUP BY install_id ORDER BY install_id")
                .fetch_all::<(String, u64, u64)>()
                .await
                .unwrap()
        }
    };
    let install_daily = |c: &usage_service_kit::clickhouse::ClickHouseArgs| {
        let c = c.client();
        async move {
            c.query("SELECT install_id, toString(date), requests, total_tokens, toString(cost_usd) FROM usage_install_daily FINAL ORDER BY install_id, date")
                .fetch_all::<(String, String, u64, u64, String)>()
                .await
                .unwrap()
        }
    };
    // The original counts every accepted event once, whenever the decisions
    // were made.
    eventually("the original rollups", Duration::from_secs(30), || async {
        (sums(&p.clickhouse).await == expected).then_some(())
    })
    .await;
    let original_days = install_daily(&p.clickhouse).await;
    assert!(!original_days.is_empty());
    // The replay has caught up once its rollups hold every accepted event;
    // its decisions may be stored before its last batches are. Then all is
    // compared, so that a difference shows in full.
    let deadline = Instant::now() + Duration::from_secs(60);
    let snapshot = || async {
        (
            all_decisions(&rebuilt).await,
            sums(&rebuilt).await,
            install_daily(&rebuilt).await,
        )
    };
    let mut replayed = snapshot().await;
    while (&replayed.0, &replayed.1, &replayed.2) != (&original, &expected, &original_days)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        replayed = snapshot().await;
    }
    assert_eq!(replayed.0, original);
    assert_eq!(replayed.1, expected);
    assert_eq!(replayed.2, original_days);
    replay.kill().await;
    usage_e2e::drop_database(&rebuilt).await;
    p.stop().await;
}

#[tokio::test]
async fn a_restarted_processor_keeps_the_spike_baseline() {
    let p = Pipeline::start(false).await;
    let site = Site::new(11);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    let group = unique("group");
    let first = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    let now = chrono::Utc::now().timestamp_millis();
    // A quiet day: 2 generations an hour for 25 hours...
    let start = now - 27 * 3_600_000;
    for (status, body) in send(&p, &site, 0..50, 25, 100, |i| start + i as i64 * 1_800_000).await {
        assert_eq!(status, 200, "{body}");
    }
    eventually("the quiet day counted", Duration::from_secs(30), || async {
        let (requests, _) = p.raw_totals(&site).await;
        (requests == 50).then_some(())
    })
    .await;
    // ...then the processor restarts, and knows that day only from ClickHouse.
    first.kill().await;
    let second = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    // 60 in the last half hour: 30 times the baseline, no fixed limit reached.
    let burst = now - 30 * 60_000;
    for (status, body) in send(&p, &site, 50..110, 20, 100, |i| {
        burst + (i as i64 - 50) * 30_000
    })
    .await
    {
        assert_eq!(status, 200, "{body}");
    }
    let r = wait_report(&p, &site, "the spike flag", |r| r["spike_flagged"] == true).await;
    assert_eq!(r["abuse_flagged"], false);
    assert_kinds(&p, &site, &["spike_flagged"]).await;
    second.kill().await;
    p.stop().await;
}

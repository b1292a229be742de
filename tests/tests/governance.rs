//! Live governance end to end: events go through the real gateway, Kafka,
//! processors and ClickHouse; the processors' decisions come back to the
//! gateway through the governance topic, where admission enforces them and
//! what arrives over a limit is recorded and marked.
//!
//! Windows run on the gateway's clock (an event counts at its created_at
//! clamped to [received - 60 s, received]), so most tests send events
//! created now. The spike test needs a day of history: its processors run
//! with a grace of two days, so that created_at counts as the site says.

use std::time::{Duration, Instant};

use serde_json::Value;
use usage_e2e::pipeline::{event, Pipeline, Site};
use usage_e2e::processes::ProcessorProcess;
use usage_e2e::{eventually, http, unique};
use usage_schemas::wire::AvroRecord;

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

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Sends events created in the last second, a millisecond apart in id
/// order (so that decisions sort as the events do); every batch must be
/// recorded.
async fn send_now(
    p: &Pipeline,
    site: &Site,
    ids: std::ops::Range<u128>,
    per_batch: usize,
    tokens: u32,
) {
    let base = now_ms() - 1000;
    for (status, body) in p
        .send_events(site, ids, per_batch, tokens, |i| base + (i % 1000) as i64)
        .await
    {
        assert_eq!(status, 200, "{body}");
    }
}

async fn wait_report(p: &Pipeline, site: &Site, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let last = std::sync::Mutex::new(Value::Null);
    let found = tokio::time::timeout(
        Duration::from_secs(30),
        eventually(what, Duration::from_secs(31), || async {
            let r = p.governance(site).await;
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

/// The installation's decisions but an ongoing episode's extensions: the
/// starts, ends and alerts, in governance-time order.
async fn decisions(p: &Pipeline, site: &Site) -> Vec<(String, String)> {
    p.clickhouse
        .client()
        .query(
            "SELECT kind, reason FROM governance_decisions FINAL
             WHERE install_id = ? AND phase != 'extended' ORDER BY at, kind",
        )
        .bind(&site.install_id)
        .fetch_all()
        .await
        .unwrap()
}

/// The installation's stored events that arrived over a limit, by reason.
async fn over_limit(p: &Pipeline, site: &Site) -> Vec<(String, u64)> {
    p.clickhouse
        .client()
        .query(
            "SELECT toString(over_limit) AS reason, count() FROM usage_events FINAL
             WHERE install_id = ? AND over_limit != '' GROUP BY reason ORDER BY reason",
        )
        .bind(&site.install_id)
        .fetch_all()
        .await
        .unwrap()
}

/// Waits until `n` of the installation's events are stored.
async fn wait_stored(p: &Pipeline, site: &Site, n: u64) {
    eventually("the events stored", Duration::from_secs(30), || async {
        (p.raw_totals(site).await.0 == n).then_some(())
    })
    .await;
}

/// Asks for admission of one generation; its answer.
async fn admit(p: &Pipeline, site: &Site) -> Value {
    let (status, body) = p.admit(site, 1, 200).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn the_100th_request_in_5_minutes_stops_admission_and_the_101st_is_recorded_over_the_limit() {
    let p = Pipeline::start(true).await;
    let site = Site::new(1);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    base(0, 60_000, Within::Month).await;
    assert_eq!(admit(&p, &site).await["allowed"], true);
    send_now(&p, &site, 0..100, 25, 100).await;
    let accepted = Instant::now();
    let r = wait_report(&p, &site, "the gateway to know the window is full", |r| {
        r["requests_left_in_window"] == 0 && r["rate_limited"] == true
    })
    .await;
    println!(
        "decision to enforcement: {:?} after the 100th request was accepted",
        accepted.elapsed()
    );
    assert_eq!(r["monthly_used"], 100);

    // The next generation is refused where it is decided, until the window frees.
    let a = admit(&p, &site).await;
    assert_eq!(
        (a["allowed"].clone(), a["reason"].clone()),
        (false.into(), "rate_limited".into())
    );
    let wait = a["retry_after_seconds"].as_u64().unwrap();
    assert!((200..=300).contains(&wait), "{a}");
    assert_eq!(a["governance"]["rate_limited"], true);

    // A generation made anyway is recorded, marked, and counted.
    let (status, body) = p
        .send_events(&site, 100..101, 1, 100, |_| now_ms())
        .await
        .remove(0);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["governance"]["rate_limited"], true);
    wait_stored(&p, &site, 101).await;
    assert_eq!(
        over_limit(&p, &site).await,
        [("rate_limited".to_string(), 1)]
    );
    // The rollups follow the raw events by a recompute: wait for them.
    let mut s = Value::Null;
    for _ in 0..100 {
        s = p
            .summary(&format!("install_id={}&group_by=month", site.install_id))
            .await;
        if s["data"][0]["total_requests"].as_u64() == Some(101) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        (
            s["data"][0]["total_requests"].as_u64(),
            s["data"][0]["over_limit_requests"].as_u64()
        ),
        (Some(101), Some(1))
    );
    assert_kinds(&p, &site, &["rate_limited"]).await;
    p.stop().await;
}

#[tokio::test]
async fn the_token_limit_works_the_same_way() {
    let p = Pipeline::start(true).await;
    let site = Site::new(2);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    base(0, 60_000, Within::Month).await;
    // 5 generations of 10,000 tokens reach the 50,000-token limit.
    send_now(&p, &site, 0..5, 5, 10_000).await;
    wait_report(&p, &site, "the token window to be full", |r| {
        r["tokens_left_in_window"] == 0 && r["rate_limited"] == true
    })
    .await;
    let a = admit(&p, &site).await;
    assert_eq!(
        (a["allowed"].clone(), a["reason"].clone()),
        (false.into(), "rate_limited".into())
    );
    let reason: Vec<String> = decisions(&p, &site)
        .await
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    assert!(
        reason[0].starts_with("5 requests, 50000 tokens in 5 minutes"),
        "{reason:?}"
    );
    p.stop().await;
}

#[tokio::test]
async fn abuse_is_flagged_at_200_requests_in_an_hour() {
    let p = Pipeline::start(true).await;
    let site = Site::new(3);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    base(0, 60_000, Within::Month).await;
    send_now(&p, &site, 0..200, 50, 100).await;
    let r = wait_report(&p, &site, "abuse to be flagged", |r| {
        r["abuse_flagged"] == true
    })
    .await;
    assert!(r["abuse_reason"]
        .as_str()
        .unwrap()
        .starts_with("200 requests in one hour"));
    // One episode of each: the rate limit from the 100th, abuse from the 200th.
    assert_kinds(&p, &site, &["rate_limited", "abuse_flagged"]).await;
    p.stop().await;
}

#[tokio::test]
async fn a_free_site_past_its_cap_is_refused_admission_and_every_generation_is_still_recorded() {
    let p = Pipeline::start(true).await;
    let site = Site::new(4);
    assert_eq!(p.register(&site, "free").await.0, 201);
    base(0, 120_000, Within::Day).await;
    send_now(&p, &site, 0..50, 10, 100).await;
    let r = wait_report(&p, &site, "the block", |r| r["level"] == "blocked").await;
    assert_eq!(
        (r["monthly_used"].as_i64(), r["monthly_cap"].as_i64()),
        (Some(50), Some(50))
    );
    assert_eq!(r["usage_percent"], 100.0);
    // Each alert once, at the 38th, the 45th and the 50th generation.
    assert_kinds(&p, &site, &["cap_warning", "cap_critical", "blocked"]).await;
    let alerts: Vec<(String, String)> = decisions(&p, &site)
        .await
        .into_iter()
        .map(|(k, r)| (k, r.split(' ').next().unwrap().to_string()))
        .collect();
    assert_eq!(
        alerts,
        [
            ("cap_warning".to_string(), "38".to_string()),
            ("cap_critical".into(), "45".into()),
            ("blocked".into(), "50".into())
        ]
    );

    // Admission says no, until the next month.
    let a = admit(&p, &site).await;
    assert_eq!(
        (a["allowed"].clone(), a["reason"].clone()),
        (false.into(), "plan_limit_reached".into())
    );
    let next_month = usage_service_kit::periods::next_month_start_ms(now_ms());
    let wait = a["retry_after_seconds"].as_i64().unwrap();
    assert!(((next_month - now_ms()) / 1000 - wait).abs() <= 5, "{a}");

    // The site generates 10 more anyway (and resends them): every one is
    // recorded once, marked as overage, and nothing is lost.
    for _ in 0..2 {
        for (status, body) in p.send_events(&site, 50..60, 5, 100, |_| now_ms()).await {
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["governance"]["level"], "blocked");
        }
    }
    wait_stored(&p, &site, 60).await;
    assert_eq!(
        over_limit(&p, &site).await,
        [("plan_limit_reached".to_string(), 10)]
    );
    p.wait_for_requests(&site, &chrono::Utc::now().date_naive().to_string(), 60)
        .await;
    let s = p
        .summary(&format!("install_id={}&group_by=day", site.install_id))
        .await;
    assert_eq!(
        (
            s["data"][0]["total_requests"].as_u64(),
            s["data"][0]["over_limit_requests"].as_u64(),
            s["data"][0]["over_limit_tokens"].as_u64()
        ),
        (Some(60), Some(10), Some(1000))
    );
    // The export says so too: JSON Lines always, CSV when asked.
    let export = |body: Value| {
        let url = format!("http://{}/api/usage/export", p.query_addr);
        async move {
            let r = http()
                .post(url)
                .bearer_auth(usage_e2e::pipeline::admin_token())
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    };
    let today = chrono::Utc::now().date_naive().to_string();
    let lines = export(
        serde_json::json!({"install_id": site.install_id, "date_from": today,
        "date_to": today, "group_by": "source", "format": "jsonl"}),
    )
    .await;
    let row: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(
        (
            row["total_requests"].as_u64(),
            row["over_limit_requests"].as_u64()
        ),
        (Some(60), Some(10))
    );
    let csv = export(
        serde_json::json!({"install_id": site.install_id, "date_from": today,
        "date_to": today, "group_by": "source", "include_over_limit": true}),
    )
    .await;
    assert_eq!(
        csv,
        "Date,User Hash,Source,Requests,Prompt Tokens,Completion Tokens,Total Tokens,Cost USD,Over Limit Requests,Over Limit Tokens\n\
         ,,bulk,60,5400,600,6000,0.00117,10,1000\n"
    );
    let raw = export(
        serde_json::json!({"install_id": site.install_id, "date_from": today,
        "date_to": today, "group_by": "events", "format": "jsonl"}),
    )
    .await;
    let marked = raw
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).unwrap()["over_limit"] == "plan_limit_reached")
        .count();
    assert_eq!(marked, 10);

    // The provider upgrades the plan: unblocked without waiting for an event.
    assert_eq!(p.set_plan(&site, "pro").await.0, 200);
    wait_report(&p, &site, "the upgrade to unblock", |r| {
        r["level"] == "ok" && r["plan"] == "pro"
    })
    .await;
    assert_eq!(admit(&p, &site).await["allowed"], true);
    assert_kinds(
        &p,
        &site,
        &["cap_warning", "cap_critical", "blocked", "unblocked"],
    )
    .await;
    p.stop().await;
}

#[tokio::test]
async fn honest_queued_and_retried_batches_count_whole_in_every_window() {
    let p = Pipeline::start(true).await;
    let site = Site::new(13);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    base(20, 60_000, Within::Month).await;
    let now = now_ms();
    // A bulk run queued by the plugin: 50 generations over the last 5
    // minutes, sent in one batch as the queue flushes.
    for (status, body) in p
        .send_events(&site, 0..50, 50, 100, |i| now - 300_000 + i as i64 * 6_000)
        .await
    {
        assert_eq!(status, 200, "{body}");
    }
    // A batch that failed and is retried 15 minutes later: 49 generations
    // made 15 to 10 minutes ago.
    for (status, body) in p
        .send_events(&site, 50..99, 49, 100, |i| {
            now - 900_000 + (i as i64 - 50) * 6_000
        })
        .await
    {
        assert_eq!(status, 200, "{body}");
    }
    // Every one of them counts in the 5-minute window (at its arrival, at
    // most a minute back): 99 of 100.
    let r = wait_report(&p, &site, "99 requests in the window", |r| {
        r["requests_left_in_window"] == 1
    })
    .await;
    assert_eq!(
        (r["monthly_used"].as_u64(), r["rate_limited"].as_bool()),
        (Some(99), Some(false))
    );
    assert_eq!(
        p.processor_metric("usage_governance_events_too_late_total")
            .await,
        0
    );
    // And the 100th fills it.
    send_now(&p, &site, 99..100, 1, 100).await;
    wait_report(&p, &site, "the full window", |r| r["rate_limited"] == true).await;
    assert_eq!(admit(&p, &site).await["allowed"], false);
    p.stop().await;
}

#[tokio::test]
async fn duplicates_move_no_counter_and_a_restarted_processor_keeps_its_counts() {
    let p = Pipeline::start(false).await;
    let site = Site::new(5);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    let group = unique("group");
    let first = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    base(0, 120_000, Within::Month).await;
    let t0 = now_ms();
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
                    &iso(t0 + i as i64 * 100),
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
    // The processors' state has not moved; the gateway's own count of the
    // resends it accepted lasts until a state counts past them.
    let r = p.governance(&site).await;
    assert_eq!(r["requests_left_in_window"].as_i64(), Some(70));

    // Killed mid-window; the replacement rebuilds the window from ClickHouse.
    first.kill().await;
    let second = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    assert_eq!(p.send(&site, batch(30..40)).await.0, 200);
    let r = wait_report(
        &p,
        &site,
        "40 requests in the window after the restart",
        |r| r["requests_left_in_window"] == 60 && r["monthly_used"] == 40,
    )
    .await;
    assert_eq!(r["monthly_used"], 40);
    second.kill().await;
    p.stop().await;
}

/// Decision kinds of an installation, in governance-time order.
async fn kinds(p: &Pipeline, site: &Site) -> Vec<String> {
    decisions(p, site)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// Waits (30 s at most) until the installation's decision kinds are
/// `expected` (the processor writes them a moment after its batch). After
/// a crash that is longer: a replacement owns the partitions only once the
/// dead members' sessions expired, and a member that was still joining
/// when it died makes that two session timeouts (11 s measured under
/// load). The gateway's own report (`wait_report`) does not wait for it:
/// it counts what it accepted.
async fn assert_kinds(p: &Pipeline, site: &Site, expected: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
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
    base(0, 120_000, Within::Month).await;
    send_now(&p, &site, 0..60, 30, 100).await;
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
    // first 60, so the 100th fills it and admission stops.
    send_now(&p, &site, 60..100, 40, 100).await;
    let r = wait_report(&p, &site, "the full window", |r| {
        r["requests_left_in_window"] == 0 && r["rate_limited"] == true
    })
    .await;
    assert_eq!(r["monthly_used"], 100);
    assert_eq!(admit(&p, &site).await["reason"], "rate_limited");
    assert_kinds(&p, &site, &["rate_limited"]).await;
    processor.kill().await;
    p.stop().await;
}

/// The sum of a labelled metric's series whose labels contain `labels`.
async fn labelled(process: &ProcessorProcess, name: &str, labels: &str) -> u64 {
    usage_e2e::labelled_metric(([127, 0, 0, 1], process.port).into(), name, labels).await
}

/// A site registered after the processor took its partitions over starts
/// with no ClickHouse read (its stored ids and governance state are all
/// the processor's own); once its state left memory, or after a restart,
/// it is read back from ClickHouse with the same counts.
#[tokio::test]
async fn a_site_registered_after_the_takeover_is_started_without_reads_and_read_back_the_same() {
    let p = Pipeline::start(false).await;
    let group = unique("group");
    let args = [
        "--governance-idle-secs",
        "1",
        "--governance-arrival-skew-ms",
        "100",
    ];
    let first = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &args);
    wait_metric(&first, "usage_processor_assigned_partitions", |n| n == 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let site = Site::new(8);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    // The processor has read the registration: before that, it reads
    // ClickHouse to be safe.
    wait_metric(&first, "usage_processor_registry_installations", |n| n == 1).await;
    base(0, 120_000, Within::Month).await;
    send_now(&p, &site, 0..30, 30, 100).await;
    wait_report(&p, &site, "30 requests in the window", |r| {
        r["requests_left_in_window"] == 70
    })
    .await;
    assert_eq!(
        first
            .metric("usage_governance_installations_started_total")
            .await,
        1
    );
    assert_eq!(
        first
            .metric("usage_governance_installations_rebuilt_total")
            .await,
        0
    );
    let loaded = "usage_processor_seen_days_loaded_total";
    assert_eq!(
        (
            labelled(&first, loaded, "how=\"known\"").await,
            labelled(&first, loaded, "how=\"read\"").await
        ),
        (1, 0),
        "one day of the site, known empty"
    );
    // A resend is told from the ids kept: nothing moves.
    send_now(&p, &site, 0..30, 30, 100).await;
    wait_metric(&first, "usage_processor_events_duplicate_total", |n| {
        n == 30
    })
    .await;

    // Idle: its state leaves memory, and comes back from ClickHouse. With
    // a 1 s idle time a loaded machine may evict it before the resend
    // arrives too, and the resend brings it back: so the rebuilds are
    // counted from here, after more than the idle time without events.
    wait_metric(
        &first,
        "usage_governance_installations_evicted_total",
        |n| n >= 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let rebuilt = first
        .metric("usage_governance_installations_rebuilt_total")
        .await;
    send_now(&p, &site, 30..40, 10, 100).await;
    wait_report(&p, &site, "40 requests after the eviction", |r| {
        r["requests_left_in_window"] == 60 && r["monthly_used"] == 40
    })
    .await;
    assert_eq!(
        first
            .metric("usage_governance_installations_rebuilt_total")
            .await,
        rebuilt + 1
    );

    // A restarted processor reads both back: the same counts go on. Its
    // batches committed first, or the second one re-reads the last one
    // (more resends than counted below).
    eventually(
        "the first processor's offsets committed",
        Duration::from_secs(30),
        || async {
            let lag = first.lag().await;
            (!lag.is_empty() && lag.values().all(|l| *l == 0)).then_some(())
        },
    )
    .await;
    first.kill().await;
    let second = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &args);
    send_now(&p, &site, 30..45, 15, 100).await;
    let r = wait_report(&p, &site, "45 requests after the restart", |r| {
        r["requests_left_in_window"] == 55 && r["monthly_used"] == 45
    })
    .await;
    assert_eq!(r["monthly_used"], 45);
    assert_eq!(
        second
            .metric("usage_governance_installations_started_total")
            .await,
        0
    );
    assert!(labelled(&second, loaded, "how=\"read\"").await >= 1);
    assert_eq!(
        second
            .metric("usage_processor_events_duplicate_total")
            .await,
        10
    );
    second.kill().await;
    let [daily, install_daily, monthly] = p.rollup_requests(&site).await;
    assert_eq!((daily, install_daily, monthly), (45, 45, 45));
    p.stop().await;
}

#[tokio::test]
async fn an_upgrade_unblocks_a_site_whose_processor_restarted_since_the_block() {
    let p = Pipeline::start(false).await;
    let site = Site::new(7);
    assert_eq!(p.register(&site, "free").await.0, 201);
    let group = unique("group");
    let first = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    base(0, 120_000, Within::Day).await;
    send_now(&p, &site, 0..50, 25, 100).await;
    wait_report(&p, &site, "the block", |r| r["level"] == "blocked").await;
    // The history has the block too (written before the state is sent).
    assert_kinds(&p, &site, &["cap_warning", "cap_critical", "blocked"]).await;
    // A blocked site that stops sending is never seen again by the
    // restarted processor: the upgrade alone must unblock it.
    first.kill().await;
    let second = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    wait_metric(&second, "usage_processor_assigned_partitions", |n| n == 4).await;
    assert_eq!(p.set_plan(&site, "pro").await.0, 200);
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
/// its first occasion and aborted: the pipeline, the site and the consumer group.
async fn whole_free_plan_then_a_fault(n: u32, fault: &str) -> (Pipeline, Site, String) {
    let p = Pipeline::start(false).await;
    let site = Site::new(n);
    assert_eq!(p.register(&site, "free").await.0, 201);
    base(0, 120_000, Within::Day).await;
    send_now(&p, &site, 0..50, 10, 100).await;
    let group = unique("group");
    ProcessorProcess::run_until_fault(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &group,
        &["--batch-events", "50", fault, "1"],
    )
    .await;
    (p, site, group)
}

#[tokio::test]
async fn a_processor_that_dies_between_its_writes_and_its_decisions_still_blocks_on_redelivery() {
    // The first instance writes the 50 events (one batch), then dies
    // before governing them or committing.
    let (p, site, group) = whole_free_plan_then_a_fault(11, "--crash-after-flush").await;
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
    assert_eq!(admit(&p, &site).await["reason"], "plan_limit_reached");
    replacement.kill().await;
    p.stop().await;
}

#[tokio::test]
async fn a_dead_batch_over_partitions_that_two_workers_then_split_is_governed_by_both() {
    // One worker writes the events of two sites, on partitions that the
    // two workers of the replacement split between them (the range
    // assignor gives each half), in one batch, then dies before governing.
    let p = Pipeline::start(false).await;
    let partitions = p.kafka.events_partitions;
    let part =
        |s: &Site| usage_service_kit::kafka::partition_for_key(s.install_id.as_bytes(), partitions);
    let first_half = (30..).map(Site::new).find(|s| part(s) < partitions / 2);
    let second_half = (30..).map(Site::new).find(|s| part(s) >= partitions / 2);
    let sites = [first_half.unwrap(), second_half.unwrap()];
    for site in &sites {
        assert_eq!(p.register(site, "free").await.0, 201);
    }
    base(0, 120_000, Within::Day).await;
    for site in &sites {
        send_now(&p, site, 0..50, 10, 100).await;
    }
    let group = unique("group");
    ProcessorProcess::run_until_fault(
        BIN,
        &p.kafka,
        &p.clickhouse,
        &group,
        &[
            "--workers",
            "1",
            "--batch-events",
            "100",
            "--crash-after-flush",
            "1",
        ],
    )
    .await;
    let recorded: Vec<i32> = p
        .clickhouse
        .client()
        .query(
            "SELECT DISTINCT partition FROM processor_batches
             WHERE consumer_group = ? AND state = 'recorded' ORDER BY partition",
        )
        .bind(&group)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        recorded,
        [part(&sites[0]), part(&sites[1])],
        "one batch over both"
    );

    // Each worker of the replacement redoes the batch (its writes add
    // nothing twice) and governs its own site's events of it.
    let replacement =
        ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &["--workers", "2"]);
    for site in &sites {
        assert_kinds(&p, site, &["cap_warning", "cap_critical", "blocked"]).await;
        assert_eq!(p.raw_totals(site).await, (50, 5000));
        assert_eq!(p.rollup_requests(site).await, [50, 50, 50]);
    }
    wait_metric(
        &replacement,
        "usage_governance_events_recovered_total",
        |n| n == 100,
    )
    .await;
    // Every partition of the batch ends marked done, by its governor.
    eventually("the batch done", Duration::from_secs(30), || async {
        let undone: Vec<i32> = p
            .clickhouse
            .client()
            .query(
                "SELECT partition FROM processor_batches WHERE consumer_group = ?
                 GROUP BY partition HAVING countIf(state = 'done') = 0",
            )
            .bind(&group)
            .fetch_all()
            .await
            .unwrap();
        undone.is_empty().then_some(())
    })
    .await;
    replacement.kill().await;
    p.stop().await;
}

#[tokio::test]
async fn a_processor_that_dies_between_the_history_and_kafka_publishes_on_redelivery() {
    // The first instance stores the batch and its three decisions in
    // ClickHouse, then dies before anything reaches Kafka.
    let (p, site, group) = whole_free_plan_then_a_fault(12, "--crash-after-decisions-stored").await;
    let stored = all_decisions(&p.clickhouse).await;
    assert_eq!(
        kinds(&p, &site).await,
        ["cap_warning", "cap_critical", "blocked"]
    );
    assert!(usage_e2e::read_topic(&p.kafka, &p.kafka.decisions_topic)
        .await
        .is_empty());

    // The replacement governs the batch again: the same three decisions
    // (same ids) reach Kafka, then the state that blocks.
    let replacement = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &[]);
    let published: Vec<(String, String)> = eventually(
        "the decisions on Kafka",
        Duration::from_secs(30),
        || async {
            let on_topic = usage_e2e::read_topic(&p.kafka, &p.kafka.decisions_topic).await;
            (on_topic.len() == 3).then_some(on_topic)
        },
    )
    .await
    .iter()
    .map(|bytes| {
        let d = usage_schemas::GovernanceDecision::from_wire(bytes).unwrap();
        (d.decision_id, d.kind)
    })
    .collect();
    eventually(
        "the blocking state on Kafka",
        Duration::from_secs(30),
        || async {
            let states = usage_e2e::read_topic(&p.kafka, &p.kafka.governance_topic).await;
            states
                .iter()
                .any(|b| {
                    usage_schemas::GovernanceState::from_wire(b).is_ok_and(|s| s.level == "blocked")
                })
                .then_some(())
        },
    )
    .await;
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

/// What a replay must reproduce: every decision, the daily sums per
/// installation, and the per-installation days.
type Outcome = (
    Vec<(String, String, String, String, i64)>,
    Vec<(String, u64, u64, u64)>,
    Vec<(String, String, u64, u64, String)>,
);

async fn outcome(c: &usage_service_kit::clickhouse::ClickHouseArgs) -> Outcome {
    let client = c.client();
    (
        all_decisions(c).await,
        client
            .query("SELECT install_id, sum(requests), sum(total_tokens), sum(over_limit_requests) FROM usage_daily FINAL GROUP BY install_id ORDER BY install_id")
            .fetch_all()
            .await
            .unwrap(),
        client
            .query("SELECT install_id, toString(date), requests, total_tokens, toString(cost_usd) FROM usage_install_daily FINAL ORDER BY install_id, date")
            .fetch_all()
            .await
            .unwrap(),
    )
}

/// Replays the pipeline's events topic into an empty database (a new
/// consumer group, another batch size) until it holds `expected`'s sums,
/// and returns what it made.
async fn replay(p: &Pipeline, expected: &Outcome) -> Outcome {
    let rebuilt = usage_e2e::migrated_database().await;
    let replay = ProcessorProcess::spawn(
        BIN,
        &p.kafka,
        &rebuilt,
        &unique("replay"),
        &["--batch-events", "7"],
    );
    // The replay has caught up once its rollups hold every accepted event;
    // its decisions may be stored before its last batches are. Then all is
    // compared, so that a difference shows in full.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut replayed = outcome(&rebuilt).await;
    while &replayed != expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        replayed = outcome(&rebuilt).await;
    }
    replay.kill().await;
    usage_e2e::drop_database(&rebuilt).await;
    replayed
}

/// The original's outcome once it has stopped changing (every batch
/// written and governed).
async fn settled(p: &Pipeline, events: u64) -> Outcome {
    eventually("every event stored", Duration::from_secs(30), || async {
        let n: u64 = p
            .clickhouse
            .client()
            .query("SELECT count() FROM usage_events FINAL")
            .fetch_one()
            .await
            .unwrap();
        (n == events).then_some(())
    })
    .await;
    let mut last = outcome(&p.clickhouse).await;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = outcome(&p.clickhouse).await;
        let requests: u64 = now.1.iter().map(|r| r.1).sum();
        if now == last && requests == events {
            return now;
        }
        last = now;
    }
}

#[tokio::test]
async fn a_replay_into_an_empty_database_makes_the_same_decisions() {
    let p = Pipeline::start(true).await;
    let (limited, abusive, capped) = (Site::new(8), Site::new(9), Site::new(10));
    assert_eq!(p.register(&limited, "agency").await.0, 201);
    assert_eq!(p.register(&abusive, "agency").await.0, 201);
    assert_eq!(p.register(&capped, "free").await.0, 201);
    // The capped site's alerts must fall on one day.
    base(0, 120_000, Within::Day).await;
    // 110 requests, 100 of them in the window; 250 (rate limited, then
    // flagged); 60 generations on the free plan. Every one is recorded.
    send_now(&p, &limited, 0..110, 10, 100).await;
    send_now(&p, &abusive, 0..250, 50, 100).await;
    send_now(&p, &capped, 0..60, 5, 100).await;
    wait_report(&p, &capped, "the block", |r| r["level"] == "blocked").await;
    let original = settled(&p, 420).await;
    let kinds_of = |site: &Site| -> Vec<String> {
        original
            .0
            .iter()
            .filter(|r| r.1 == site.install_id)
            .map(|r| r.2.clone())
            .collect()
    };
    assert_eq!(kinds_of(&limited), ["rate_limited"]);
    assert_eq!(kinds_of(&abusive), ["rate_limited", "abuse_flagged"]);
    assert_eq!(
        kinds_of(&capped),
        ["cap_warning", "cap_critical", "blocked"]
    );
    let sums: Vec<(String, u64)> = original.1.iter().map(|r| (r.0.clone(), r.1)).collect();
    let mut want = vec![
        (limited.install_id.clone(), 110),
        (abusive.install_id.clone(), 250),
        (capped.install_id.clone(), 60),
    ];
    want.sort();
    assert_eq!(sums, want);

    // Ops rebuild everything into a new database: the same decisions (ids,
    // reasons, times), the same rollups.
    assert_eq!(replay(&p, &original).await, original);
    p.stop().await;
}

#[tokio::test]
async fn a_replay_after_a_plan_change_decides_with_the_plan_in_force_at_each_events_time() {
    let p = Pipeline::start(true).await;
    let site = Site::new(14);
    assert_eq!(p.register(&site, "free").await.0, 201);
    base(0, 120_000, Within::Day).await;
    // Free: blocked at 50; the provider upgrades to pro; 30 more pass.
    send_now(&p, &site, 0..50, 10, 100).await;
    assert_kinds(&p, &site, &["cap_warning", "cap_critical", "blocked"]).await;
    assert_eq!(p.set_plan(&site, "pro").await.0, 200);
    wait_report(&p, &site, "the upgrade", |r| {
        r["plan"] == "pro" && r["level"] == "ok"
    })
    .await;
    send_now(&p, &site, 50..80, 10, 100).await;
    let original = settled(&p, 80).await;
    let kinds: Vec<&str> = original.0.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(
        kinds,
        ["cap_warning", "cap_critical", "blocked", "unblocked"]
    );

    // The replay knows the plan history: free until the upgrade, pro after.
    // Decided with today's plan (pro) alone, nothing would be blocked.
    assert_eq!(replay(&p, &original).await, original);
    p.stop().await;
}

#[tokio::test]
async fn a_restarted_processor_keeps_the_spike_baseline() {
    let p = Pipeline::start(false).await;
    let site = Site::new(11);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    let group = unique("group");
    // A day of history is sent at once: the processors take created_at as
    // the site says for up to two days back (a grace only a test needs).
    let args = ["--governance-grace-ms", "172800000"];
    let first = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &args);
    let now = chrono::Utc::now().timestamp_millis();
    // A quiet day: 2 generations an hour for 25 hours...
    let start = now - 27 * 3_600_000;
    for (status, body) in p
        .send_events(&site, 0..50, 25, 100, |i| start + i as i64 * 1_800_000)
        .await
    {
        assert_eq!(status, 200, "{body}");
    }
    eventually("the quiet day counted", Duration::from_secs(30), || async {
        let (requests, _) = p.raw_totals(&site).await;
        (requests == 50).then_some(())
    })
    .await;
    // ...then the processor restarts, and knows that day only from ClickHouse.
    first.kill().await;
    let second = ProcessorProcess::spawn(BIN, &p.kafka, &p.clickhouse, &group, &args);
    // 60 in the last half hour: 30 times the baseline, no fixed limit reached.
    let burst = now - 30 * 60_000;
    for (status, body) in p
        .send_events(&site, 50..110, 20, 100, |i| {
            burst + (i as i64 - 50) * 30_000
        })
        .await
    {
        assert_eq!(status, 200, "{body}");
    }
    let r = wait_report(&p, &site, "the spike flag", |r| r["spike_flagged"] == true).await;
    assert_eq!(r["abuse_flagged"], false);
    assert_kinds(&p, &site, &["spike_flagged"]).await;
    // One episode: flagged at the 50th request of the burst's hour, then
    // extended at most once a minute of governance time while it lasts.
    let phases: Vec<(String, i64)> = p
        .clickhouse
        .client()
        .query("SELECT phase, toUnixTimestamp64Milli(at) FROM governance_decisions FINAL WHERE install_id = ? ORDER BY at")
        .bind(&site.install_id)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(phases[0].0, "start");
    assert!(
        phases[1..].iter().all(|(phase, _)| phase == "extended"),
        "{phases:?}"
    );
    assert!(
        phases.windows(2).all(|w| w[1].1 - w[0].1 >= 60_000),
        "{phases:?}"
    );
    second.kill().await;
    p.stop().await;
}

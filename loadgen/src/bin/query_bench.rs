//! Query API benchmark over a large generated data set.
//!
//! `--generate` fills a database of its own (default `usage_bench`, never the
//! stack's `usage`) straight through ClickHouse: about N events over a year
//! and over I installations (users, sources and models mixed; weekly rhythm,
//! growth, daily noise and installations of different sizes), then the
//! daily and monthly rollups and the registry mirror, the way the
//! processors would have built them. Then it starts the release
//! `usage-query` binary on that database and measures, with real HTTP
//! requests: summary latency over 30 days and a year, a raw-events page deep
//! into the range (offset and cursor), the installations list, and a
//! streamed CSV export (rows/s), with the query service's peak RSS.
//!
//! ```sh
//! cargo run --release -p usage-loadgen --bin usage-query-bench -- --generate --events 100000000
//! ```

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::Value;
use usage_service_kit::auth::{Claims, JwtVerifier, Role, DEV_SECRET};
use usage_service_kit::clickhouse::ClickHouseArgs;

#[derive(Debug, Parser)]
#[command(name = "usage-query-bench")]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8123")]
    clickhouse_url: String,
    /// The benchmark's own database (dropped and refilled by --generate).
    #[arg(long, default_value = "usage_bench")]
    database: String,
    /// Generate the data set first (otherwise reuse what the database holds).
    #[arg(long)]
    generate: bool,
    #[arg(long, default_value_t = 100_000_000)]
    events: u64,
    #[arg(long, default_value_t = 100_000)]
    installations: u64,
    /// Requests per latency figure.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// The usage-query binary to start.
    #[arg(long, default_value = "target/release/usage-query")]
    query_binary: String,
    #[arg(long, default_value = "127.0.0.1:8091")]
    listen: String,
    /// Seconds of dashboard page views after the first view of each page
    /// (0: only the first views).
    #[arg(long, default_value_t = 150)]
    dashboard_secs: u64,
    /// Replay the month-end projection on the data set's past months and
    /// print its errors and its intervals' coverage.
    #[arg(long)]
    backtest: bool,
    /// Only the backtest: no usage-query started, no latencies.
    #[arg(long)]
    backtest_only: bool,
}

const DAYS: u64 = 365;
/// Days generated per INSERT (about 8M events of 100M).
const DAYS_PER_CHUNK: u64 = 30;
/// The raw events' retention (their TTL).
const RAW_DAYS: u64 = 90;

/// The same expression in SQL, for `number % installations`.
const INSTALL_SQL: &str = "concat('00000000-0000-4000-8000-', leftPad(toString(number % {installs:UInt64}), 12, '0'), '_benchsite')";

/// The generated events of `numbers({from}, {n})`: event `number` belongs
/// to installation `number % installs` and to day `number * days / total`
/// (so a range of numbers is a range of days), at a pseudo-random time of
/// that day, with a mix of users, sources and models.
fn events_sql() -> String {
    format!(
        "SELECT concat('evt_', leftPad(lower(hex(number)), 32, '0')) AS event_id, {INSTALL_SQL} AS install_id,
                concat('acc_bench', toString(number % {{installs:UInt64}} % 1000)) AS account_id,
                lower(hex(SHA256(concat(toString(number % {{installs:UInt64}}), ':', toString(cityHash64(number, 0) % 5))))) AS user_hash,
                ['inline', 'bulk', 'queue', 'manual'][cityHash64(number, 1) % 4 + 1] AS source,
                ['gpt-4o-mini', 'gpt-4o-mini', 'gpt-4o', 'gpt-4-turbo'][cityHash64(number, 2) % 4 + 1] AS model,
                toUInt32(50 + cityHash64(number, 3) % 2000) AS prompt_tokens,
                toUInt32(10 + cityHash64(number, 4) % 300) AS completion_tokens,
                prompt_tokens + completion_tokens AS total_tokens,
                toDecimal64(multiIf(model = 'gpt-4o', prompt_tokens * 0.0025 + completion_tokens * 0.01,
                                    model = 'gpt-4-turbo', prompt_tokens * 0.01 + completion_tokens * 0.03,
                                    prompt_tokens * 0.00015 + completion_tokens * 0.0006) / 1000, 12) AS cost_usd,
                fromUnixTimestamp64Milli(toInt64(({{start:Int64}} + intDiv(number * {DAYS}, {{total:UInt64}}) * 86400
                    + cityHash64(number, 5) % 86400) * 1000 + number % 1000), 'UTC') AS created_at
         FROM (SELECT number FROM numbers({{from:UInt64}}, {{n:UInt64}}) WHERE {KEEP_SQL})"
    )
}

/// Which numbers become events: a fleet has a week (weekends at 65% and
/// 55% of a weekday), grows over the year (from 75% to 125% of its mean
/// rate), has day-to-day noise (+/- 7.5%), and installations of different
/// sizes (weights 0.25 to 1.75). The month-end projection is backtested on
/// this shape (`--backtest`); a flat data set would flatter it.
const KEEP_SQL: &str = "cityHash64(number, 13) % 1000000 < 1000000 / 2.4
    * multiIf(toDayOfWeek(toDateTime({start:Int64} + intDiv(number * 365, {total:UInt64}) * 86400, 'UTC')) = 6, 0.65,
              toDayOfWeek(toDateTime({start:Int64} + intDiv(number * 365, {total:UInt64}) * 86400, 'UTC')) = 7, 0.55, 1.0)
    * (0.75 + 0.5 * intDiv(number * 365, {total:UInt64}) / 365)
    * (0.925 + 0.15 * (cityHash64(intDiv(number * 365, {total:UInt64}), 11) % 1000) / 1000)
    * (0.25 + 1.5 * pow((cityHash64(number % {installs:UInt64}, 12) % 1000) / 1000, 2))";

/// The share of numbers [`KEEP_SQL`] keeps, on average: weekday 0.886 x
/// growth 1 x noise 1 x size 0.75, over 2.4.
const KEEP_RATE: f64 = (5.0 + 0.65 + 0.55) / 7.0 * 0.75 / 2.4;

async fn generate(
    ch: &clickhouse::Client,
    args: &Args,
    server: &clickhouse::Client,
) -> anyhow::Result<()> {
    server
        .query(&format!("DROP DATABASE IF EXISTS `{}` SYNC", args.database))
        .execute()
        .await?;
    usage_schemas::migrations::migrate(server, &args.database).await?;
    let today = chrono::Utc::now().date_naive();
    let start = (today - chrono::Duration::days(DAYS as i64 - 1))
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc()
        .timestamp();
    // Numbers drawn, so that about `events` of them are kept.
    let total = (args.events as f64 / KEEP_RATE).ceil() as u64;
    let first_of_day = |d: u64| (d * total).div_ceil(DAYS);
    let began = Instant::now();
    let mut raw = 0u64;
    // Chunks of whole days: no rollup key spans two chunks.
    for d0 in (0..DAYS).step_by(DAYS_PER_CHUNK as usize) {
        let d1 = (d0 + DAYS_PER_CHUNK).min(DAYS);
        let (from, n) = (first_of_day(d0), first_of_day(d1) - first_of_day(d0));
        let bind = |q: clickhouse::query::Query| {
            q.param("installs", args.installations)
                .param("start", start)
                .param("total", total)
                .param("from", from)
                .param("n", n)
        };
        // Raw events are kept 90 days (TTL): older ones are not written.
        if d1 + RAW_DAYS > DAYS {
            bind(ch.query(&format!(
                "INSERT INTO usage_events (event_id, install_id, account_id, wp_site_id, user_hash, source, model,
                     prompt_tokens, completion_tokens, total_tokens, cost_usd, context, created_at, processed_at,
                     batch_sent_at, received_at, signature_scheme, gateway_instance)
                 SELECT event_id, install_id, account_id, NULL, user_hash, source, model, prompt_tokens,
                        completion_tokens, total_tokens, cost_usd, '', created_at, created_at, NULL, created_at,
                        'install_sig_v1', 'bench'
                 FROM ({}) WHERE created_at >= now() - INTERVAL {RAW_DAYS} DAY",
                events_sql()
            )))
            .execute()
            .await?;
            raw += n;
        }
        bind(ch.query(&format!(
            "INSERT INTO usage_daily (install_id, date, user_hash, source, model, account_id, requests,
                 prompt_tokens, completion_tokens, total_tokens, cost_usd)
             SELECT install_id, toDate(created_at) AS day, user_hash, source, model, any(account_id), count(),
                    sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(cost_usd)
             FROM ({}) GROUP BY install_id, day, user_hash, source, model",
            events_sql()
        )))
        .execute()
        .await?;
        println!(
            "  days {d0:>3}..{d1:<3}: {:>3.0}% of about {} events generated ({:.0} s)",
            first_of_day(d1) as f64 * 100.0 / total as f64,
            args.events,
            began.elapsed().as_secs_f64()
        );
    }
    ch.query(
        "INSERT INTO usage_monthly (install_id, month, user_hash, source, model, account_id, requests,
             prompt_tokens, completion_tokens, total_tokens, cost_usd)
         SELECT install_id, toStartOfMonth(date) AS month, user_hash, source, model, any(account_id),
                sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(cost_usd)
         FROM usage_daily GROUP BY install_id, month, user_hash, source, model",
    )
    .with_setting("max_bytes_before_external_group_by", "2000000000")
    .execute()
    .await?;
    ch.query(
        "INSERT INTO usage_install_daily (date, install_id, requests, prompt_tokens, completion_tokens,
             total_tokens, cost_usd)
         SELECT date, install_id, sum(requests), sum(prompt_tokens), sum(completion_tokens),
                sum(total_tokens), sum(cost_usd)
         FROM usage_daily GROUP BY install_id, date",
    )
    .with_setting("max_bytes_before_external_group_by", "2000000000")
    .execute()
    .await?;
    ch.query(&format!(
        "INSERT INTO installation_metadata (install_id, account_id, plan, site_hash, wp_site_id, is_multisite,
             plugin_version, wordpress_version, php_version, signature_policy, registered_at, updated_at, revision)
         SELECT {INSTALL_SQL}, concat('acc_bench', toString(number % {{installs:UInt64}} % 1000)),
                ['free', 'pro', 'agency', 'credits'][number % 4 + 1], 'benchsite', NULL, false,
                '2.4.1', '6.8.3', '8.2.12', 'any', now64(3), now64(3), 1
         FROM numbers({{installs:UInt64}})"
    ))
    .param("installs", args.installations)
    .execute()
    .await?;
    println!(
        "generated in {:.0} s ({raw} events generated within the raw events' 90-day retention)",
        began.elapsed().as_secs_f64()
    );
    Ok(())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Starts `usage-query` on the data set with `extra` flags, and a client
/// for it with a provider admin's token, once it is ready.
async fn start_query(
    args: &Args,
    listen: &str,
    extra: &[&str],
) -> anyhow::Result<(tokio::process::Child, Bench)> {
    let child = tokio::process::Command::new(&args.query_binary)
        .args([
            "--listen",
            listen,
            "--clickhouse-url",
            &args.clickhouse_url,
            "--clickhouse-database",
            &args.database,
            "--log",
            "warn",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with cargo build --release)",
                args.query_binary
            )
        })?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let base = format!("http://{listen}");
    for _ in 0..100 {
        if http
            .get(format!("{base}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = JwtVerifier::new(DEV_SECRET.as_bytes()).sign(&Claims {
        sub: "bench".into(),
        role: Role::ProviderAdmin,
        account_id: None,
        install_ids: None,
        user_hash: None,
        exp: chrono::Utc::now().timestamp() + 86_400,
        nbf: None,
        iat: None,
        ..Default::default()
    });
    Ok((child, Bench { http, base, token }))
}

/// What each dashboard page's figures cost to compute, on a `usage-query`
/// that keeps nothing (`--dashboard-cache-secs 0`).
async fn compute_costs(args: &Args, pick: &dyn Fn(usize) -> String) -> anyhow::Result<()> {
    println!("\n== dashboard pages' data requests ==");
    let (mut child, b) =
        start_query(args, "127.0.0.1:8093", &["--dashboard-cache-secs", "0"]).await?;
    for (page, name) in PAGES.iter().enumerate() {
        let t = Instant::now();
        for path in page_requests(page, 0, pick) {
            b.get(&path).await?;
        }
        println!(
            "{:<44} {:>7.1} ms (computed; nothing kept)",
            format!("{name}, computed"),
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
    let _ = child.kill().await;
    Ok(())
}

struct Bench {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Bench {
    async fn get(&self, path: &str) -> anyhow::Result<(f64, Value)> {
        let t = Instant::now();
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !status.is_success() {
            bail!("{path}: {status} {body}");
        }
        Ok((ms, body))
    }

    /// p50/p99 of `n` requests made by `path(i)`.
    async fn latency(
        &self,
        what: &str,
        n: usize,
        path: impl Fn(usize) -> String,
    ) -> anyhow::Result<()> {
        let mut ms = Vec::with_capacity(n);
        for i in 0..n {
            ms.push(self.get(&path(i)).await?.0);
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "{what:<44} p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms   ({n} requests)",
            pct(&ms, 0.5),
            pct(&ms, 0.99),
            ms.last().copied().unwrap_or_default()
        );
        Ok(())
    }
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = ClickHouseArgs {
        url: args.clickhouse_url.clone(),
        database: args.database.clone(),
        user: "default".into(),
        password: String::new(),
        compression: "lz4".into(),
    };
    let ch = db.client();
    if args.generate {
        println!(
            "generating {} events over {} installations and {DAYS} days into `{}` ...",
            args.events, args.installations, args.database
        );
        generate(&ch, &args, &db.server_client()).await?;
    }
    let installs: u64 = ch
        .query("SELECT count() FROM installation_metadata FINAL")
        .fetch_one()
        .await?;
    let events: u64 = ch
        .query("SELECT count() FROM usage_events")
        .fetch_one()
        .await?;
    let represented: u64 = ch
        .query("SELECT sum(requests) FROM usage_monthly FINAL")
        .fetch_one()
        .await?;
    println!(
        "data set: {represented} events in the rollups, {events} raw events (90-day retention), {installs} installations in `{}`",
        args.database
    );
    if installs == 0 {
        bail!("the database is empty: run with --generate");
    }
    if args.backtest_only {
        return backtest(&ch).await;
    }

    let (mut child, b) = start_query(&args, &args.listen, &[]).await?;
    let pid = child.id().unwrap_or_default();
    let today = chrono::Utc::now().date_naive();
    let day = |n: i64| today - chrono::Duration::days(n);
    // Installations of the flat data set's size (about 250 events in 90
    // days), so that per-installation figures compare across data sets.
    let typical: Vec<String> = ch
        .query(
            "SELECT install_id FROM usage_install_daily
             WHERE date >= today() - 89 GROUP BY install_id
             HAVING sum(requests) BETWEEN 240 AND 400
             ORDER BY cityHash64(install_id) LIMIT 2000",
        )
        .fetch_all()
        .await?;
    if typical.is_empty() {
        bail!("no installation has 240 to 400 events in the last 90 days");
    }
    let pick = |i: usize| typical[i % typical.len()].clone();
    let n = args.requests;
    println!("\n== query API over {represented} events ==");
    b.latency("summary, 30 days, by day", n, |i| {
        format!(
            "/provider/usage/summary?install_id={}&date_from={}&group_by=day",
            pick(i),
            day(29)
        )
    })
    .await?;
    b.latency("summary, 1 year, by month", n, |i| {
        format!(
            "/provider/usage/summary?install_id={}&date_from={}&group_by=month",
            pick(i),
            day(364)
        )
    })
    .await?;
    b.latency("summary, 1 year, by day", n, |i| {
        format!(
            "/provider/usage/summary?install_id={}&date_from={}&group_by=day&limit=1000",
            pick(i),
            day(364)
        )
    })
    .await?;
    // Deep pages: the 10th page of 20 of an installation's 90 days of raw
    // events (~250 at 100M events a year over 100k installations).
    b.latency("events, 90 days, offset 180 (page 10 of 20)", n, |i| {
        format!(
            "/provider/usage/events?install_id={}&date_from={}&limit=20&offset=180",
            pick(i),
            day(89)
        )
    })
    .await?;
    let mut cursors = Vec::new();
    for i in 0..n {
        let mut cursor: Option<String> = None;
        for _ in 0..9 {
            let mut path = format!(
                "/provider/usage/events?install_id={}&date_from={}&limit=20",
                pick(i),
                day(89)
            );
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (_, body) = b.get(&path).await?;
            cursor = body["meta"]["next_cursor"].as_str().map(str::to_string);
        }
        if cursor.is_none() {
            bail!("{} has fewer than 10 pages of events", pick(i));
        }
        cursors.push(cursor);
    }
    b.latency("events, 90 days, cursor (page 10 of 20)", n, |i| {
        let mut path = format!(
            "/provider/usage/events?install_id={}&date_from={}&limit=20",
            pick(i),
            day(89)
        );
        if let Some(c) = &cursors[i] {
            path.push_str(&format!("&cursor={c}"));
        }
        path
    })
    .await?;
    b.latency("installations list, 30 days, by tokens", 20, |i| {
        format!(
            "/api/usage/installations?date_from={}&limit=50&offset={}",
            day(29),
            i * 50
        )
    })
    .await?;

    // A streamed CSV export of every raw event of 7 days, all installations.
    let t = Instant::now();
    let mut r = b
        .http
        .post(format!("{}/api/usage/export", b.base))
        .bearer_auth(&b.token)
        .json(&serde_json::json!({"group_by": "events", "format": "csv", "date_from": day(7), "date_to": day(1)}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("export: {}", r.status());
    }
    let (mut bytes, mut lines) = (0u64, 0u64);
    let mut first_byte = None;
    while let Some(chunk) = r.chunk().await? {
        first_byte.get_or_insert_with(|| t.elapsed());
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{:<44} {:>9} rows, {:.0} MiB in {secs:.1} s: {:.0} rows/s, {:.0} MiB/s, first byte after {:.0} ms",
        "CSV export, raw events, 7 days, all installs",
        lines.saturating_sub(1),
        bytes as f64 / 1048576.0,
        lines as f64 / secs,
        bytes as f64 / 1048576.0 / secs,
        first_byte.unwrap_or_default().as_secs_f64() * 1000.0
    );
    // The same rows as ClickHouse's own CSV, straight from it: what the
    // export is measured against.
    let raw_sql = format!(
        "SELECT event_id, install_id, user_hash, source, model, prompt_tokens, completion_tokens,
                total_tokens, cost_usd, created_at, processed_at
         FROM usage_events WHERE toDate(created_at) >= '{}' AND toDate(created_at) <= '{}'
         ORDER BY install_id, toDate(created_at), event_id FORMAT CSV",
        day(7),
        day(1)
    );
    clickhouse_csv(
        &b.http,
        &args,
        "ClickHouse's CSV of the same raw events",
        &raw_sql,
    )
    .await?;
    let t = Instant::now();
    let mut r = b
        .http
        .post(format!("{}/api/usage/export", b.base))
        .bearer_auth(&b.token)
        .json(&serde_json::json!({"group_by": "day", "format": "csv", "date_from": day(29)}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("export: {}", r.status());
    }
    // Streamed and counted chunk by chunk, as ClickHouse's own CSV below.
    let mut lines = 0u64;
    while let Some(chunk) = r.chunk().await? {
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    let rows = lines.saturating_sub(1);
    println!(
        "{:<44} {rows:>9} rows in {:.1} s: {:.0} rows/s",
        "CSV export, by day/user/source, 30 days, all",
        t.elapsed().as_secs_f64(),
        rows as f64 / t.elapsed().as_secs_f64()
    );
    let daily_sql = format!(
        "SELECT date, user_hash, source, sum(requests), sum(prompt_tokens), sum(completion_tokens),
                sum(total_tokens), sum(cost_usd)
         FROM usage_daily WHERE date >= '{}' AND date <= '{}'
         GROUP BY date, user_hash, source ORDER BY date, user_hash, source FORMAT CSV",
        day(29),
        day(0)
    );
    clickhouse_csv(
        &b.http,
        &args,
        "ClickHouse's CSV of the same daily rows",
        &daily_sql,
    )
    .await?;
    compute_costs(&args, &pick).await?;
    dashboard(&b, &pick, args.dashboard_secs).await?;
    println!("peak RSS of usage-query: {:.1} MiB", peak_rss_mib(pid));
    let _ = child.kill().await;
    if args.backtest {
        backtest(&ch).await?;
    }
    Ok(())
}

/// The data requests of each dashboard page, as the page makes them.
fn page_requests(page: usize, i: usize, pick: &dyn Fn(usize) -> String) -> Vec<String> {
    let today = chrono::Utc::now().date_naive();
    let day = |n: i64| today - chrono::Duration::days(n);
    match page {
        0 => vec![format!(
            "/provider/fleet/overview?date_from={}&date_to={today}",
            day(29)
        )],
        1 => {
            let sort = ["tokens", "cost", "date", "requests"][i % 4];
            let mut list = vec![format!(
                "/api/usage/installations?date_from={}&date_to={today}&sort_by={sort}&order=desc&limit=50&offset={}",
                day(29),
                (i * 7919 % 2000) * 50
            )];
            if i.is_multiple_of(5) {
                list.push(format!(
                    "/api/usage/installations?date_from={}&date_to={today}&sort_by=tokens&order=desc&limit=50&offset=0&q=acc_bench{}",
                    day(29),
                    i % 1000
                ));
            }
            list
        }
        2 => {
            let id = pick(i);
            let base = format!("install_id={id}&date_from={}&date_to={today}", day(89));
            vec![
                format!("/provider/installations/{id}"),
                format!("/provider/usage/summary?{base}&group_by=day&limit=1000"),
                format!("/provider/usage/summary?{base}&group_by=user&limit=20"),
                format!("/provider/usage/summary?{base}&group_by=source&limit=100"),
                format!("/provider/usage/summary?{base}&group_by=model&limit=100"),
                format!("/provider/usage/decisions?{base}&limit=1000"),
            ]
        }
        3 => vec![format!(
            "/provider/fleet/analytics?date_from={}&date_to={today}&months=12",
            day(29)
        )],
        4 => vec![format!(
            "/provider/fleet/projection?limit=20&offset={}",
            (i % 5) * 20
        )],
        _ => vec!["/provider/fleet/anomalies?days=7".to_string()],
    }
}

const PAGES: [&str; 6] = [
    "overview",
    "installations",
    "installation",
    "analytics",
    "projection",
    "anomalies",
];

/// The dashboard's pages over the data set: the first view of each (what
/// a figure costs to compute, once), then `secs` of page views, one every
/// 400 ms across the pages (the answers kept and recomputed in the
/// background, as in use).
async fn dashboard(b: &Bench, pick: &dyn Fn(usize) -> String, secs: u64) -> anyhow::Result<()> {
    for (page, name) in PAGES.iter().enumerate() {
        let t = Instant::now();
        for path in page_requests(page, 0, pick) {
            b.get(&path).await?;
        }
        println!(
            "{:<44} {:>7.1} ms (defaults computed ahead since the start)",
            format!("{name}, first view"),
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
    if secs == 0 {
        return Ok(());
    }
    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); PAGES.len()];
    let began = Instant::now();
    let mut i = 1;
    while began.elapsed() < Duration::from_secs(secs) {
        let page = i % PAGES.len();
        for path in page_requests(page, i, pick) {
            ms[page].push(b.get(&path).await?.0);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    for (page, name) in PAGES.iter().enumerate() {
        let v = &mut ms[page];
        v.sort_by(f64::total_cmp);
        println!(
            "{:<44} p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms   ({} requests)",
            format!("{name}, in use for {secs} s"),
            pct(v, 0.5),
            pct(v, 0.99),
            v.last().copied().unwrap_or_default(),
            v.len()
        );
    }
    Ok(())
}

/// One month's projection errors at one cutoff day.
struct CutoffError {
    day: u32,
    fleet_generations_ape: f64,
    fleet_cost_ape: f64,
    installation_wape: f64,
    installation_mdape: f64,
    installations_inside: u64,
    installations: u64,
    /// Of the fleet's two intervals (generations, cost).
    fleet_inside: u64,
}

/// The month-end projection replayed on the data set's past: for each
/// complete month with 28 days of history before it, standing at the start
/// of days 3, 8, 15, 22 and 27, the projection of the month's generations
/// and cost against what the month then held, for the fleet and for every
/// installation.
async fn backtest(ch: &clickhouse::Client) -> anyhow::Result<()> {
    use chrono::{Datelike, Months, NaiveDate};
    use usage_query::fleet::projection::{forecast, Clock, Weekdays, WEEKDAY_DAYS};
    use usage_query::fleet::{series, Fleet};

    println!("\n== month-end projection, backtest ==");
    let (first, last): (u16, u16) = ch
        .query("SELECT toUInt16(min(date)), toUInt16(max(date)) FROM usage_install_daily")
        .fetch_one()
        .await?;
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    let (first, last) = (
        epoch + chrono::Duration::days(first.into()),
        epoch + chrono::Duration::days(last.into()),
    );
    let mut month = (first + chrono::Duration::days(WEEKDAY_DAYS as i64))
        .with_day(1)
        .unwrap_or(first)
        + Months::new(1);
    println!(
        "{:<10} {:>4} {:>16} {:>16} {:>9} {:>9} {:>9} {:>9}",
        "month",
        "day",
        "fleet gen. APE",
        "fleet cost APE",
        "inst WAPE",
        "inst MdAPE",
        "inst in",
        "fleet in"
    );
    let mut totals: Vec<CutoffError> = Vec::new();
    while month + Months::new(1) <= last + chrono::Duration::days(1) {
        let end = month + Months::new(1) - chrono::Duration::days(1);
        let from = month - chrono::Duration::days(WEEKDAY_DAYS as i64);
        let fleet_days = series::totals(ch, &Fleet::All, from, end).await?;
        let offset = (month - from).num_days() as usize;
        let cutoffs = [3u32, 8, 15, 22, 27];
        // Per cutoff: (sum |err| gens, sum actual gens, APEs, inside count, installs).
        let mut inst: Vec<(f64, f64, Vec<f64>, u64, u64)> = cutoffs
            .iter()
            .map(|_| (0.0, 0.0, Vec::new(), 0, 0))
            .collect();
        let weekdays: Vec<Weekdays> = cutoffs
            .iter()
            .map(|c| {
                let today = offset + *c as usize - 1;
                Weekdays::estimate(
                    &fleet_days.generations[today - WEEKDAY_DAYS..today],
                    from + chrono::Duration::days((today - WEEKDAY_DAYS) as i64),
                )
            })
            .collect();
        let project = |values: &[f64], k: usize| {
            let today = offset + cutoffs[k] as usize - 1;
            let clock = Clock {
                today: from + chrono::Duration::days(today as i64),
                elapsed: 0.0,
            };
            let mtd: f64 = values[offset..today].iter().sum();
            forecast(
                mtd,
                &values[today - WEEKDAY_DAYS..today],
                clock.today - chrono::Duration::days(WEEKDAY_DAYS as i64),
                &weekdays[k],
                clock,
            )
        };
        series::scan(ch, &Fleet::All, from, end, |s| {
            let actual: f64 = s.generations[offset..].iter().sum();
            if actual == 0.0 {
                return;
            }
            for (k, acc) in inst.iter_mut().enumerate() {
                let f = project(&s.generations, k);
                acc.0 += (f.expected - actual).abs();
                acc.1 += actual;
                acc.2.push((f.expected - actual).abs() / actual);
                acc.3 += u64::from(f.low <= actual && actual <= f.high);
                acc.4 += 1;
            }
        })
        .await?;
        let actual_g: f64 = fleet_days.generations[offset..].iter().sum();
        let actual_c: f64 = fleet_days.cost[offset..].iter().sum();
        for (k, c) in cutoffs.iter().enumerate() {
            let g = project(&fleet_days.generations, k);
            let cost = project(&fleet_days.cost, k);
            let (abs_err, act, apes, inside, n) = &mut inst[k];
            apes.sort_by(f64::total_cmp);
            let fleet_in = u64::from(g.low <= actual_g && actual_g <= g.high)
                + u64::from(cost.low <= actual_c && actual_c <= cost.high);
            println!(
                "{:<10} {:>4} {:>15.2}% {:>15.2}% {:>8.1}% {:>8.1}% {:>8.1}% {:>9}",
                format!("{}-{:02}", month.year(), month.month()),
                c,
                100.0 * (g.expected - actual_g).abs() / actual_g,
                100.0 * (cost.expected - actual_c).abs() / actual_c,
                100.0 * *abs_err / *act,
                100.0 * pct(apes, 0.5),
                100.0 * *inside as f64 / (*n).max(1) as f64,
                format!("{fleet_in}/2"),
            );
            totals.push(CutoffError {
                day: *c,
                fleet_generations_ape: (g.expected - actual_g).abs() / actual_g,
                fleet_cost_ape: (cost.expected - actual_c).abs() / actual_c,
                installation_wape: *abs_err / *act,
                installation_mdape: pct(apes, 0.5),
                installations_inside: *inside,
                installations: *n,
                fleet_inside: fleet_in,
            });
        }
        month = month + Months::new(1);
    }
    println!("\nby day of the month, over every month:");
    println!(
        "{:>4} {:>16} {:>16} {:>9} {:>9} {:>14} {:>14}",
        "day",
        "fleet gen. MAPE",
        "fleet cost MAPE",
        "inst WAPE",
        "inst MdAPE",
        "inst coverage",
        "fleet coverage"
    );
    for c in [3u32, 8, 15, 22, 27] {
        let rows: Vec<_> = totals.iter().filter(|t| t.day == c).collect();
        let n = rows.len().max(1) as f64;
        let inside: u64 = rows.iter().map(|t| t.installations_inside).sum();
        let installs: u64 = rows.iter().map(|t| t.installations).sum();
        let fleet_in: u64 = rows.iter().map(|t| t.fleet_inside).sum();
        println!(
            "{:>4} {:>15.2}% {:>15.2}% {:>8.1}% {:>8.1}% {:>13.1}% {:>14}",
            c,
            100.0 * rows.iter().map(|t| t.fleet_generations_ape).sum::<f64>() / n,
            100.0 * rows.iter().map(|t| t.fleet_cost_ape).sum::<f64>() / n,
            100.0 * rows.iter().map(|t| t.installation_wape).sum::<f64>() / n,
            100.0 * rows.iter().map(|t| t.installation_mdape).sum::<f64>() / n,
            100.0 * inside as f64 / installs.max(1) as f64,
            format!("{fleet_in}/{}", rows.len() * 2),
        );
    }
    Ok(())
}

/// Streams `sql` (a `FORMAT CSV` query) straight from ClickHouse's HTTP
/// interface and prints its rows/s, for the exports to be compared with.
async fn clickhouse_csv(
    http: &reqwest::Client,
    args: &Args,
    label: &str,
    sql: &str,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut r = http
        .post(&args.clickhouse_url)
        .query(&[("database", args.database.as_str())])
        .body(sql.to_string())
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("{label}: {} {}", r.status(), r.text().await?);
    }
    let (mut bytes, mut lines) = (0u64, 0u64);
    while let Some(chunk) = r.chunk().await? {
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{label:<44} {lines:>9} rows, {:.0} MiB in {secs:.1} s: {:.0} rows/s",
        bytes as f64 / 1048576.0,
        lines as f64 / secs
    );
    Ok(())
}

//! Query API benchmark over a large generated data set.
//!
//! `--generate` fills a database of its own (default `usage_bench`, never the
//! stack's `usage`) straight through ClickHouse: N events spread over a year
//! and over I installations (users, sources and models mixed), then the
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
}

const DAYS: u64 = 365;
/// Days generated per INSERT (about 8M events of 100M).
const DAYS_PER_CHUNK: u64 = 30;
/// The raw events' retention (their TTL).
const RAW_DAYS: u64 = 90;

fn install_id(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012}_benchsite")
}

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
         FROM numbers({{from:UInt64}}, {{n:UInt64}})"
    )
}

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
    let total = args.events;
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
                 prompt_tokens, completion_tokens, total_tokens, cost_usd, version)
             SELECT install_id, toDate(created_at) AS day, user_hash, source, model, any(account_id), count(),
                    sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(cost_usd), 1
             FROM ({}) GROUP BY install_id, day, user_hash, source, model",
            events_sql()
        )))
        .execute()
        .await?;
        println!(
            "  days {d0:>3}..{d1:<3}: {:>11} of {total} events generated ({:.0} s)",
            first_of_day(d1),
            began.elapsed().as_secs_f64()
        );
    }
    ch.query(
        "INSERT INTO usage_monthly (install_id, month, user_hash, source, model, account_id, requests,
             prompt_tokens, completion_tokens, total_tokens, cost_usd, version)
         SELECT install_id, toStartOfMonth(date) AS month, user_hash, source, model, any(account_id),
                sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(cost_usd), 1
         FROM usage_daily GROUP BY install_id, month, user_hash, source, model",
    )
    .with_setting("max_bytes_before_external_group_by", "2000000000")
    .execute()
    .await?;
    ch.query(
        "INSERT INTO usage_install_daily (date, install_id, requests, prompt_tokens, completion_tokens,
             total_tokens, cost_usd, version)
         SELECT date, install_id, sum(requests), sum(prompt_tokens), sum(completion_tokens),
                sum(total_tokens), sum(cost_usd), 1
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

    let mut child = tokio::process::Command::new(&args.query_binary)
        .args([
            "--listen",
            &args.listen,
            "--clickhouse-url",
            &args.clickhouse_url,
            "--clickhouse-database",
            &args.database,
            "--log",
            "warn",
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with cargo build --release)",
                args.query_binary
            )
        })?;
    let pid = child.id().unwrap_or_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let base = format!("http://{}", args.listen);
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
    let b = Bench { http, base, token };
    let today = chrono::Utc::now().date_naive();
    let day = |n: i64| today - chrono::Duration::days(n);
    let pick = |i: usize| install_id((i as u64).wrapping_mul(7919) % installs);
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
    let t = Instant::now();
    let r = b
        .http
        .post(format!("{}/api/usage/export", b.base))
        .bearer_auth(&b.token)
        .json(&serde_json::json!({"group_by": "day", "format": "csv", "date_from": day(29)}))
        .send()
        .await?;
    let text = r.bytes().await?;
    let rows = text
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        .saturating_sub(1);
    println!(
        "{:<44} {rows:>9} rows in {:.1} s: {:.0} rows/s",
        "CSV export, by day/user/source, 30 days, all",
        t.elapsed().as_secs_f64(),
        rows as f64 / t.elapsed().as_secs_f64()
    );
    println!("peak RSS of usage-query: {:.1} MiB", peak_rss_mib(pid));
    let _ = child.kill().await;
    Ok(())
}

//! Load generator and benchmark for the metering pipeline.
//!
//! Simulates N plugin installations: registers them, then sends signed
//! batches (1..=50 events, like the plugin's bulk/queue sync) from C
//! concurrent connections for a fixed time, with a share of duplicate resends
//! (the plugin's retries) and of late events (created hours to days ago). It
//! keeps its own ground truth (every distinct event accepted, per
//! installation) and, at the end, checks the summary API against it.
//!
//! Reports, in one run:
//! - gateway events/s at saturation, p50/p99 batch latency;
//! - end-to-end freshness (HTTP 200 -> visible in the summary) p50/p99,
//!   measured with single-event probes after the load;
//! - processor events/s into ClickHouse while draining the load;
//! - peak RSS (VmHWM) of every process whose pid file is in --pid-dir;
//! - the ceiling: a bare rdkafka producer (same producer settings) sending
//!   the same Avro bytes to a scratch topic.

mod report;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};
use usage_ingest::signature::sign_legacy;
use usage_service_kit::auth::{Claims, JwtVerifier, Role, DEV_SECRET};

#[derive(Debug, Clone, Parser)]
#[command(name = "usage-loadgen", version)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    ingest: String,
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    query: String,
    #[arg(long, default_value = "http://127.0.0.1:8082")]
    processors: String,
    /// Where the processors write: the drain is over when ClickHouse holds
    /// every distinct event of the run (not the processors' own counter,
    /// which starts again at 0 when a processor restarts).
    #[command(flatten)]
    clickhouse: usage_service_kit::clickhouse::ClickHouseArgs,
    #[arg(long, env = "USAGE_JWT_SECRET", default_value = DEV_SECRET, hide_env_values = true)]
    jwt_secret: String,
    /// Simulated installations.
    #[arg(long, default_value_t = 200)]
    installations: usize,
    /// Concurrent HTTP connections sending batches.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    #[arg(long, default_value_t = 1)]
    batch_min: usize,
    #[arg(long, default_value_t = 50)]
    batch_max: usize,
    /// Share of batches that are resends of an earlier batch (plugin retries).
    #[arg(long, default_value_t = 0.05)]
    duplicate_share: f64,
    /// Share of events created 1 hour to 3 days before now.
    #[arg(long, default_value_t = 0.05)]
    late_share: f64,
    /// Freshness probes (single-event batches): after the load when the
    /// processors are paused (`--isolate`), during it otherwise.
    #[arg(long, default_value_t = 40)]
    freshness_probes: usize,
    /// The plan of the load's installations (a policy file that raises its
    /// limits lets an unpaused load run without being refused).
    #[arg(long, default_value = "agency")]
    plan: String,
    /// The plan of the probes' installations: its rate limit is the one the
    /// enforcement probes cross (keep it at the defaults).
    #[arg(long, default_value = "agency")]
    probe_plan: String,
    /// Folder of `<component>.pid` files (./stack's .data/run) for peak RSS.
    #[arg(long)]
    pid_dir: Option<std::path::PathBuf>,
    /// Decision-to-enforcement probes (after or during the load, as the
    /// freshness probes): each fills a fresh
    /// installation's rate-limit window with one batch of 100 events, then
    /// times how long until the processors' decision reaches the gateway
    /// (its governance report says rate limited: what every gateway, not
    /// only the one that took the batch, enforces at admission).
    #[arg(long, default_value_t = 30)]
    enforcement_probes: usize,
    /// Check at most this many installations (evenly spread) against their
    /// ground truth; by default every one.
    #[arg(long)]
    verify_sample: Option<usize>,
    /// Pause the processors (SIGSTOP, pid from --pid-dir) during the load, so
    /// the gateway phase measures ingest alone; they resume (SIGCONT) for the
    /// drain phase, which then measures the processors alone.
    #[arg(long, requires = "pid_dir")]
    isolate: bool,
    /// Also measure a bare rdkafka producer on this broker (the ceiling).
    #[arg(long)]
    bare_kafka: Option<String>,
}

/// A simulated installation and its ground truth.
struct Site {
    install_id: String,
    account_id: String,
    secret: String,
    token: String,
    users: Vec<String>,
    truth: Mutex<Truth>,
}

#[derive(Default)]
struct Truth {
    events: HashSet<u128>,
    tokens: u64,
    sent_bodies: Vec<Vec<u8>>,
}

/// A pre-rendered batch body whose event ids are patched in place before
/// each send, so generating load costs a copy, not JSON serialisation.
struct Template {
    body: Vec<u8>,
    /// Byte offsets of the 32 hex digits of every event_id.
    id_offsets: Vec<usize>,
    /// total_tokens of each event, in order.
    tokens: Vec<u64>,
}

const MAX_TEMPLATED_SITES: usize = 2_000;

const ID_PLACEHOLDER: &str = "################################";

impl Template {
    fn new(site: &Site, rng: &mut Rng, size: usize, late_share: f64) -> Self {
        let (body, truth) = batch(site, rng, size, late_share, |_| ID_PLACEHOLDER.to_string());
        let needle = ID_PLACEHOLDER.as_bytes();
        let id_offsets = body
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle)
            .map(|(i, _)| i)
            .collect();
        Self {
            body,
            id_offsets,
            tokens: truth.into_iter().map(|(_, t)| t).collect(),
        }
    }

    /// A body with fresh ids `first..first + n`.
    fn render(&self, first: u128) -> (Vec<u8>, Vec<(u128, u64)>) {
        let mut body = self.body.clone();
        let mut truth = Vec::with_capacity(self.id_offsets.len());
        for (i, (&at, &tokens)) in self.id_offsets.iter().zip(&self.tokens).enumerate() {
            let id = first + i as u128;
            body[at..at + 32].copy_from_slice(format!("{id:032x}").as_bytes());
            truth.push((id, tokens));
        }
        (body, truth)
    }
}

struct Counters {
    events_sent: AtomicU64,
    events_acked: AtomicU64,
    batches_ok: AtomicU64,
    batches_failed: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
}

fn token(verifier: &JwtVerifier, role: Role, account: Option<&str>) -> String {
    verifier.sign(&Claims {
        sub: "loadgen".into(),
        role,
        account_id: account.map(str::to_string),
        install_ids: None,
        user_hash: None,
        exp: chrono::Utc::now().timestamp() + 24 * 3600,
        nbf: None,
        iat: None,
        ..Default::default()
    })
}

/// A small xorshift generator: deterministic per worker, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }
}

/// Installations per account: far below the per-account limit even after
/// many runs against the same stack.
const SITES_PER_ACCOUNT: usize = 100;

fn new_site(verifier: &JwtVerifier, n: usize) -> Site {
    let uuid = uuid::Uuid::new_v4();
    let install_id = format!("{uuid}_{:012x}", n);
    let account_id = format!("acc_load{}", n / SITES_PER_ACCOUNT);
    let users = (0..5)
        .map(|u| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(format!("{install_id}:{u}:user")))
        })
        .collect();
    Site {
        token: token(verifier, Role::Account, Some(&account_id)),
        install_id,
        account_id,
        secret: format!("loadgen-secret-{uuid}"),
        users,
        truth: Mutex::default(),
    }
}

fn batch(
    site: &Site,
    rng: &mut Rng,
    size: usize,
    late_share: f64,
    mut id: impl FnMut(usize) -> String,
) -> (Vec<u8>, Vec<(String, u64)>) {
    let now = chrono::Utc::now();
    let mut events = Vec::with_capacity(size);
    let mut truth = Vec::with_capacity(size);
    for n in 0..size {
        let id = format!("evt_{}", id(n));
        let prompt = 50 + rng.below(2000);
        let completion = 10 + rng.below(300);
        let age = if rng.chance(late_share) {
            chrono::Duration::minutes(60 + rng.below(3 * 24 * 60) as i64)
        } else {
            chrono::Duration::seconds(rng.below(60) as i64)
        };
        let source = ["inline", "bulk", "queue", "manual"][rng.below(4) as usize];
        let model = ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "gpt-4-turbo"][rng.below(4) as usize];
        events.push(json!({
            "event_id": id,
            "wp_user_id_hash": site.users[rng.below(site.users.len() as u64) as usize],
            "source": source,
            "model": model,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "context": {"attachment_id": rng.below(100_000), "source_detail": "media_library"},
            "created_at": (now - age).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }));
        truth.push((id, prompt + completion));
    }
    let body = serde_json::to_vec(&json!({
        "install_id": site.install_id,
        "account_id": site.account_id,
        "events": events,
        "batch_sent_at": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    }))
    .unwrap_or_default();
    (body, truth)
}

async fn post(
    client: &reqwest::Client,
    args: &Args,
    site: &Site,
    body: Vec<u8>,
) -> anyhow::Result<u16> {
    let ts = chrono::Utc::now().timestamp();
    let r = client
        .post(format!("{}/api/usage/event", args.ingest))
        .bearer_auth(&site.token)
        .header(
            "X-Install-Signature",
            sign_legacy(site.secret.as_bytes(), &site.install_id, ts),
        )
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    let _ = r.bytes().await?;
    Ok(status)
}

/// The provider onboards `site` on the agency plan (plans are the provider's).
async fn register(
    client: &reqwest::Client,
    args: &Args,
    admin: &str,
    site: &Site,
    plan: &str,
) -> anyhow::Result<()> {
    let r = client
        .post(format!("{}/api/usage/installations", args.ingest))
        .bearer_auth(admin)
        .json(&json!({
            "install_id": site.install_id, "account_id": site.account_id, "secret": site.secret,
            "plan": plan, "site_hash": "a3b4c5d6e7f8", "is_multisite": false
        }))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!(
            "registration failed: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// Whether the gateway holds the processors' decision that `site` is rate
/// limited (`GET /api/usage/governance`).
async fn rate_limited(
    client: &reqwest::Client,
    args: &Args,
    admin: &str,
    site: &Site,
) -> anyhow::Result<bool> {
    let r = client
        .get(format!(
            "{}/api/usage/governance?install_id={}",
            args.ingest, site.install_id
        ))
        .bearer_auth(admin)
        .send()
        .await?;
    let status = r.status();
    let body: Value = r.json().await?;
    if !status.is_success() {
        bail!("governance report failed: {status} {body}");
    }
    Ok(body["governance"]["rate_limited"] == true)
}

async fn worker(
    id: usize,
    client: reqwest::Client,
    args: Arc<Args>,
    sites: Arc<Vec<Site>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    ready: Arc<tokio::sync::Barrier>,
) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    // Event ids: worker id in the high bits, a counter below: unique per run.
    let run = u128::from(rng.next()) << 80;
    let mut next_id: u128 = run | ((id as u128) << 48);
    // Pre-rendered bodies for a few hundred sites; with many more (100k),
    // templates would not fit in memory, so bodies are rendered per send.
    let templated = sites.len() <= MAX_TEMPLATED_SITES;
    let templates: Vec<Vec<Template>> = sites
        .iter()
        .take(if templated { sites.len() } else { 0 })
        .map(|site| {
            (0..4)
                .map(|_| {
                    let size = args.batch_min
                        + rng.below((args.batch_max - args.batch_min + 1) as u64) as usize;
                    Template::new(site, &mut rng, size, args.late_share)
                })
                .collect()
        })
        .collect();
    // The clock starts once every worker has its templates.
    ready.wait().await;
    let mut latencies = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let s = rng.below(sites.len() as u64) as usize;
        let site = &sites[s];
        let previous = if rng.chance(args.duplicate_share) {
            let t = site.truth.lock().unwrap_or_else(|p| p.into_inner());
            t.sent_bodies.last().cloned()
        } else {
            None
        };
        let (body, truth, events) = match previous {
            Some(b) => {
                let n = serde_json::from_slice::<Value>(&b)
                    .ok()
                    .and_then(|v| v["events"].as_array().map(Vec::len))
                    .unwrap_or(0);
                (b, Vec::new(), n as u64)
            }
            None if templated => {
                let template = &templates[s][rng.below(4) as usize];
                let (body, truth) = template.render(next_id);
                next_id += truth.len() as u128;
                let n = truth.len() as u64;
                (body, truth, n)
            }
            None => {
                let size = args.batch_min
                    + rng.below((args.batch_max - args.batch_min + 1) as u64) as usize;
                let first = next_id;
                let (body, tokens) = batch(site, &mut rng, size, args.late_share, |n| {
                    format!("{:032x}", first + n as u128)
                });
                let truth: Vec<(u128, u64)> = tokens
                    .into_iter()
                    .enumerate()
                    .map(|(n, (_, t))| (first + n as u128, t))
                    .collect();
                next_id += size as u128;
                (body, truth, size as u64)
            }
        };
        let started = Instant::now();
        let result = post(&client, &args, site, body.clone()).await;
        latencies.push(started.elapsed().as_micros() as u64);
        counters.events_sent.fetch_add(events, Ordering::Relaxed);
        match result {
            Ok(200) => {
                counters.batches_ok.fetch_add(1, Ordering::Relaxed);
                counters.events_acked.fetch_add(events, Ordering::Relaxed);
                if !truth.is_empty() {
                    let mut t = site.truth.lock().unwrap_or_else(|p| p.into_inner());
                    for (id, tokens) in truth {
                        if t.events.insert(id) {
                            t.tokens += tokens;
                        }
                    }
                    t.sent_bodies.push(body);
                    if t.sent_bodies.len() > 4 {
                        t.sent_bodies.remove(0);
                    }
                }
            }
            _ => {
                counters.batches_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    counters
        .latencies_us
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(latencies);
}

async fn summary_totals(
    client: &reqwest::Client,
    args: &Args,
    admin: &str,
    install_id: &str,
) -> Option<(u64, u64)> {
    let from = (chrono::Utc::now() - chrono::Duration::days(4)).date_naive();
    let r = client
        .get(format!(
            "{}/provider/usage/summary?install_id={install_id}&date_from={from}&group_by=source",
            args.query
        ))
        .bearer_auth(admin)
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    let rows = v["data"].as_array()?;
    Some((
        rows.iter()
            .filter_map(|r| r["total_requests"].as_u64())
            .sum(),
        rows.iter().filter_map(|r| r["total_tokens"].as_u64()).sum(),
    ))
}

async fn metrics_text(client: &reqwest::Client, base: &str) -> Option<String> {
    let r = client.get(format!("{base}/metrics")).send().await.ok()?;
    r.text().await.ok()
}

/// The value of the first sample whose line starts with `name`.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// The sum of every sample of `name` (e.g. a histogram's `_sum` over its
/// labels).
fn metric_sum(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| {
            l.split(['{', ' '].as_ref()).next() == Some(name)
                && label.is_none_or(|label| l.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How long a probe waits: one still waiting then is counted at this time.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Freshness probes (single-event batches: accepted -> visible in the
/// summary) then enforcement probes (a full window: accepted -> the
/// gateway holds the decision), in microseconds.
async fn probes(
    client: &reqwest::Client,
    args: &Args,
    verifier: &JwtVerifier,
    admin: &str,
) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    let probe = new_site(verifier, 999_999);
    register(client, args, admin, &probe, &args.probe_plan).await?;
    let mut freshness = Vec::new();
    let mut rng = Rng(42);
    let mut expected = 0u64;
    for _ in 0..args.freshness_probes {
        let (body, _) = batch(&probe, &mut rng, 1, 0.0, |_| {
            format!("{}", uuid::Uuid::new_v4().simple())
        });
        let t0 = Instant::now();
        if post(client, args, &probe, body).await? != 200 {
            continue;
        }
        let accepted = t0.elapsed();
        expected += 1;
        loop {
            if summary_totals(client, args, admin, &probe.install_id)
                .await
                .map(|t| t.0)
                == Some(expected)
            {
                break;
            }
            if t0.elapsed() > PROBE_TIMEOUT {
                // Behind a long lag: counted at the timeout (a lower bound).
                println!("freshness probe not visible within {PROBE_TIMEOUT:?}: counted as that");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        freshness.push((t0.elapsed() - accepted).as_micros() as u64);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut enforcement = Vec::new();
    for n in 0..args.enforcement_probes {
        let site = new_site(verifier, 2_000_000 + n);
        register(client, args, admin, &site, &args.probe_plan).await?;
        let t0 = chrono::Utc::now().timestamp_millis() - 60_000;
        let full = json!({
            "install_id": site.install_id, "account_id": site.account_id,
            "events": (0..100).map(|i| json!({
                "event_id": format!("evt_{}", uuid::Uuid::new_v4().simple()),
                "wp_user_id_hash": site.users[0], "source": "bulk", "model": "gpt-4o-mini",
                "prompt_tokens": 90, "completion_tokens": 10, "total_tokens": 100,
                "created_at": chrono::DateTime::from_timestamp_millis(t0 + i * 50).unwrap_or_default().to_rfc3339(),
            })).collect::<Vec<_>>(),
        });
        if post(client, args, &site, serde_json::to_vec(&full)?).await? != 200 {
            bail!("an enforcement probe's first batch was refused");
        }
        let accepted = Instant::now();
        loop {
            if rate_limited(client, args, admin, &site).await? {
                enforcement.push(accepted.elapsed().as_micros() as u64);
                break;
            }
            if accepted.elapsed() > PROBE_TIMEOUT {
                println!("rate limit not enforced within {PROBE_TIMEOUT:?}: counted as that");
                enforcement.push(accepted.elapsed().as_micros() as u64);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok((freshness, enforcement))
}

/// The processors' consumer lag over an unpaused load, one sample a second.
#[derive(Debug, PartialEq)]
struct LagReport {
    p50: u64,
    max: u64,
    /// The largest sample of the first and of the last third of the run:
    /// a lag that keeps growing is a processor falling behind.
    first_third_max: u64,
    last_third_max: u64,
    last: u64,
}

impl LagReport {
    fn of(samples: &[u64]) -> Option<Self> {
        let last = *samples.last()?;
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let third = samples.len().div_ceil(3);
        let max_of = |s: &[u64]| s.iter().copied().max().unwrap_or(0);
        Some(Self {
            p50: sorted[(sorted.len() - 1) / 2],
            max: max_of(&sorted),
            first_third_max: max_of(&samples[..third]),
            last_third_max: max_of(&samples[samples.len() - third..]),
            last,
        })
    }

    fn print(&self) {
        println!(
            "consumer lag (usage_processor_consumer_lag, all partitions, 1 s samples): p50 {}, max {}, \
             max of the first third {}, of the last third {}, at the end of the load {}",
            self.p50, self.max, self.first_third_max, self.last_third_max, self.last
        );
    }
}

/// Where the processors' time went, from their own histograms.
struct ProcessorTime {
    batches: f64,
    consumed: f64,
    /// (step, seconds)
    steps: Vec<(&'static str, f64)>,
}

impl ProcessorTime {
    const STEPS: [(&'static str, &'static str, Option<&'static str>); 4] = [
        (
            "lookup",
            "usage_processor_flush_phase_seconds_sum",
            Some("phase=\"lookup\""),
        ),
        (
            "deltas",
            "usage_processor_flush_phase_seconds_sum",
            Some("phase=\"deltas\""),
        ),
        (
            "raw",
            "usage_processor_flush_phase_seconds_sum",
            Some("phase=\"raw\""),
        ),
        ("governance", "usage_governance_batch_seconds_sum", None),
    ];

    fn read(text: &str) -> Self {
        Self {
            batches: metric_sum(text, "usage_processor_flush_seconds_count", None),
            consumed: metric_sum(text, "usage_processor_messages_consumed_total", None),
            steps: Self::STEPS
                .iter()
                .map(|(step, name, label)| (*step, metric_sum(text, name, *label)))
                .collect(),
        }
    }

    fn minus(&self, before: &Self) -> Self {
        Self {
            batches: self.batches - before.batches,
            consumed: self.consumed - before.consumed,
            steps: self
                .steps
                .iter()
                .zip(&before.steps)
                .map(|((step, now), (_, then))| (*step, now - then))
                .collect(),
        }
    }

    fn print(&self) {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(step, secs)| format!("{step} {secs:.1} s"))
            .collect();
        println!(
            "processors: {} batches of {:.0} events on average; time (summed over workers) in {}",
            self.batches,
            self.consumed / self.batches.max(1.0),
            steps.join(", ")
        );
    }
}

/// Raw events stored since `since_ms` (received_at), read from ClickHouse:
/// the processors store a batch's raw events last, after its rollups.
/// `distinct`: each event once by the table's key, even if two copies are
/// stored until a merge (two owners of a partition during a rebalance);
/// otherwise rows. `None` when ClickHouse does not answer.
async fn stored_since(ch: &clickhouse::Client, since_ms: i64, distinct: bool) -> Option<u64> {
    let counted = if distinct {
        "uniqExact(install_id, toDate(created_at), event_id)"
    } else {
        "count()"
    };
    ch.query(&format!(
        "SELECT {counted} FROM usage_events WHERE received_at >= fromUnixTimestamp64Milli({{since:Int64}})"
    ))
    .param("since", since_ms)
    .fetch_one::<u64>()
    .await
    .ok()
}

/// Rows in the active parts of `usage_events`: metadata only, so it can be
/// asked often during a drain without taking ClickHouse's CPU from the
/// processors (the exact count above scans every row it counts). It only
/// tells when the exact count is worth asking: merges may drop copies and
/// expired rows from it.
async fn rows_in_parts(ch: &clickhouse::Client) -> u64 {
    ch.query(
        "SELECT toUInt64(sum(rows)) FROM system.parts
         WHERE database = currentDatabase() AND table = 'usage_events' AND active",
    )
    .fetch_one::<u64>()
    .await
    .unwrap_or(0)
}

/// Runs `task(0..n)` with at most `concurrency` in flight; results in order.
async fn for_each_concurrently<T, F, Fut>(n: usize, concurrency: usize, task: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let task = Arc::new(task);
    let runners: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (next, task) = (next.clone(), task.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= n {
                        return done;
                    }
                    done.push((i, task(i).await));
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for r in runners {
        all.extend(r.await.unwrap_or_default());
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, t)| t).collect()
}

fn signal(pid: Option<&str>, sig: &str) -> anyhow::Result<()> {
    let pid = pid.context("no processors.pid in --pid-dir")?;
    let ok = std::process::Command::new("kill")
        .args([sig, pid])
        .status()?
        .success();
    if !ok {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let verifier = JwtVerifier::new(args.jwt_secret.as_bytes());
    let admin = token(&verifier, Role::ProviderAdmin, None);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .timeout(Duration::from_secs(30))
        .build()?;

    println!("registering {} installations ...", args.installations);
    let sites: Arc<Vec<Site>> = Arc::new(
        (0..args.installations)
            .map(|n| new_site(&verifier, n))
            .collect(),
    );
    let registered = Instant::now();
    // The gateway registers one account's installations one at a time
    // (its installation limit): concurrent requests go to different accounts.
    let mut order: Vec<usize> = (0..sites.len()).collect();
    order.sort_by_key(|&n| (n % SITES_PER_ACCOUNT, n / SITES_PER_ACCOUNT));
    let order = Arc::new(order);
    let failures = for_each_concurrently(sites.len(), args.concurrency, {
        let (client, args, sites, admin) = (
            client.clone(),
            args.clone(),
            sites.clone(),
            Arc::new(admin.clone()),
        );
        move |i| {
            let (client, args, sites, admin, order) = (
                client.clone(),
                args.clone(),
                sites.clone(),
                admin.clone(),
                order.clone(),
            );
            async move {
                register(&client, &args, &admin, &sites[order[i]], &args.plan)
                    .await
                    .is_err()
            }
        }
    })
    .await
    .into_iter()
    .filter(|failed| *failed)
    .count();
    if failures > 0 {
        bail!("{failures} installations could not be registered");
    }
    println!("registered in {:.1} s", registered.elapsed().as_secs_f64());
    // Every gateway must know them; one gateway here, which applied its own writes.

    let ch = args.clickhouse.client();
    // Events of this run are received from now on (the gateway stamps them).
    let run_began_ms = chrono::Utc::now().timestamp_millis() - 1_000;
    let stored_before = stored_since(&ch, run_began_ms, true).await.unwrap_or(0);
    let parts_before = rows_in_parts(&ch).await;
    let processors_pid = args
        .pid_dir
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join("processors.pid")).ok())
        .map(|p| p.trim().to_string());
    if args.isolate {
        signal(processors_pid.as_deref(), "-STOP")?;
        println!("processors paused for the gateway phase");
    }
    let counters = Arc::new(Counters {
        events_sent: AtomicU64::new(0),
        events_acked: AtomicU64::new(0),
        batches_ok: AtomicU64::new(0),
        batches_failed: AtomicU64::new(0),
        latencies_us: Mutex::new(Vec::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    println!(
        "load: {} connections for {} s, batches of {}..={} events, {:.0}% resends, {:.0}% late events",
        args.concurrency, args.duration, args.batch_min, args.batch_max,
        args.duplicate_share * 100.0, args.late_share * 100.0
    );
    let ready = Arc::new(tokio::sync::Barrier::new(args.concurrency + 1));
    let workers: Vec<_> = (0..args.concurrency)
        .map(|i| {
            tokio::spawn(worker(
                i,
                client.clone(),
                args.clone(),
                sites.clone(),
                counters.clone(),
                stop.clone(),
                ready.clone(),
            ))
        })
        .collect();
    ready.wait().await;
    // Unpaused, the processors work during the load too: count from here.
    let running_before = if args.isolate {
        None
    } else {
        metrics_text(&client, &args.processors).await
    };
    let started = Instant::now();
    // Unpaused, the probes measure freshness and enforcement under the load.
    let probes_during_load = (!args.isolate).then(|| {
        let (client, args, verifier, admin) = (
            client.clone(),
            args.clone(),
            verifier.clone(),
            admin.clone(),
        );
        tokio::spawn(async move { probes(&client, &args, &verifier, &admin).await })
    });
    let mut last = 0;
    // Unpaused, the processors' own lag metric (every owned partition) is
    // sampled each second: bounded lag is what keeping up means.
    let mut lags: Vec<u64> = Vec::new();
    for s in 1..=args.duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let acked = counters.events_acked.load(Ordering::Relaxed);
        let lag = if args.isolate {
            None
        } else {
            metrics_text(&client, &args.processors)
                .await
                .map(|t| metric_sum(&t, "usage_processor_consumer_lag", None) as u64)
        };
        match lag {
            Some(lag) => {
                lags.push(lag);
                println!(
                    "  {s:>3} s  {:>8} events/s accepted  consumer lag {lag:>8}",
                    acked - last
                );
            }
            None => println!("  {s:>3} s  {:>8} events/s accepted", acked - last),
        }
        last = acked;
    }
    if let Some(report) = LagReport::of(&lags) {
        report.print();
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let load_secs = started.elapsed().as_secs_f64();
    let drain_from = if args.isolate {
        signal(processors_pid.as_deref(), "-CONT")?;
        println!("processors resumed: draining");
        Instant::now()
    } else {
        started
    };
    // Read once they run again (paused, they answer nothing); they did
    // nothing in between.
    let spent_before = match running_before {
        Some(text) => Some(text),
        None => metrics_text(&client, &args.processors).await,
    }
    .map(|t| ProcessorTime::read(&t));

    // Drain: wait until the processors have every distinct event.
    let distinct: u64 = sites
        .iter()
        .map(|s| {
            s.truth
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .events
                .len() as u64
        })
        .sum();
    let drain_start = Instant::now();
    let mut drained_at = None;
    // The exact count decides; the parts' row count says when to ask it
    // (and it is asked every 2 s anyway, should merges have shrunk that).
    let mut exact_asked = Instant::now();
    while drain_start.elapsed() < Duration::from_secs(300) {
        let in_parts = rows_in_parts(&ch).await.saturating_sub(parts_before);
        if in_parts >= distinct || exact_asked.elapsed() >= Duration::from_secs(2) {
            exact_asked = Instant::now();
            let new_since = |n: u64| n.saturating_sub(stored_before);
            let rows = stored_since(&ch, run_began_ms, false).await.map(new_since);
            // Rows may count a copy twice: the distinct count decides.
            let stored = match rows {
                Some(rows) if rows >= distinct => {
                    stored_since(&ch, run_began_ms, true).await.map(new_since)
                }
                _ => None,
            };
            if stored.is_some_and(|stored| stored >= distinct) {
                drained_at = Some(drain_from.elapsed().as_secs_f64());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    if let Some(text) = metrics_text(&client, &args.processors).await {
        if let Some(before) = &spent_before {
            ProcessorTime::read(&text).minus(before).print();
        }
        for name in [
            "usage_governance_installations{",
            "usage_governance_decisions_total",
        ] {
            if let Some(v) = metric(&text, name) {
                println!("processors: {} = {v}", name.trim_end_matches('{'));
            }
        }
    }

    // Ground truth vs the summary API, per installation (or an even sample).
    let admin = Arc::new(admin);
    let step = args
        .verify_sample
        .map_or(1, |n| sites.len().div_ceil(n.max(1)));
    let verified = sites.len().div_ceil(step);
    let checks = for_each_concurrently(verified, args.concurrency, {
        let (client, args, sites, admin) =
            (client.clone(), args.clone(), sites.clone(), admin.clone());
        move |i| {
            let (client, args, sites, admin) =
                (client.clone(), args.clone(), sites.clone(), admin.clone());
            async move {
                let site = &sites[i * step];
                let want = {
                    let t = site.truth.lock().unwrap_or_else(|p| p.into_inner());
                    (t.events.len() as u64, t.tokens)
                };
                let mut got = None;
                for _ in 0..100 {
                    got = summary_totals(&client, &args, &admin, &site.install_id).await;
                    if got == Some(want) {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some((site.install_id.clone(), want, got))
            }
        }
    })
    .await;
    let mismatches: Vec<_> = checks.into_iter().flatten().collect();

    let (mut freshness, mut enforcement) = match probes_during_load {
        Some(running) => running.await??,
        None => probes(&client, &args, &verifier, &admin).await?,
    };

    let bare = match &args.bare_kafka {
        Some(brokers) => Some(report::bare_producer(brokers, load_secs.min(10.0)).await?),
        None => None,
    };

    let mut latencies = counters
        .latencies_us
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    report::print(&report::Figures {
        load_secs,
        events_acked: counters.events_acked.load(Ordering::Relaxed),
        events_sent: counters.events_sent.load(Ordering::Relaxed),
        batches_ok: counters.batches_ok.load(Ordering::Relaxed),
        batches_failed: counters.batches_failed.load(Ordering::Relaxed),
        distinct_events: distinct,
        latencies_us: &mut latencies,
        freshness_us: &mut freshness,
        enforcement_us: &mut enforcement,
        drained_at,
        processor_inserted: stored_since(&ch, run_began_ms, true)
            .await
            .unwrap_or(0)
            .saturating_sub(stored_before),
        bare,
        rss: report::peak_rss(args.pid_dir.as_deref()),
        mismatches: mismatches.len(),
        installations: verified,
    });
    if !mismatches.is_empty() {
        for (id, want, got) in mismatches.iter().take(5) {
            eprintln!("MISMATCH {id}: ground truth {want:?}, summary {got:?}");
        }
        bail!(
            "{} installations do not match their ground truth",
            mismatches.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_report_tells_a_bounded_lag_from_a_growing_one() {
        let bounded = LagReport::of(&[900, 40_000, 12_000, 30_000, 8_000, 35_000]).unwrap();
        assert_eq!(
            bounded,
            LagReport {
                p50: 12_000,
                max: 40_000,
                first_third_max: 40_000,
                last_third_max: 35_000,
                last: 35_000,
            }
        );
        let growing = LagReport::of(&[1_000, 2_000, 4_000, 8_000]).unwrap();
        assert_eq!(
            (growing.first_third_max, growing.last_third_max),
            (2_000, 8_000)
        );
        assert_eq!(LagReport::of(&[]), None);
    }
}

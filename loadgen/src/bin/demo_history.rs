//! Loads a demo fleet's history into the running stack, so that every page
//! of the dashboard has something to show: 24 installations of 6 accounts
//! over the last 60 days, with weekly rhythm, a spike, a site gone quiet,
//! free sites near and over their cap, and a multisite network.
//!
//! The installations are registered through the gateway like any other
//! (provider admin token). Their past generations are appended to the
//! events topic as the gateway would have accepted them then (received a
//! few seconds to five minutes after they were created), and the processors
//! do the rest: rollups, governance episodes, the registry mirror. Nothing
//! is written to ClickHouse directly.
//!
//! Idempotent: installations, event ids and times are fixed by the day, so
//! a second run adds only what is new since the first (today's later
//! hours, or the days since) and the processors count each event once.
//!
//! ```sh
//! ./stack demo     # or: target/release/usage-demo-history
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use clap::Parser;
use rdkafka::producer::FutureProducer;
use serde_json::json;
use sha2::Digest;
use usage_schemas::{AvroRecord, UsageEvent};
use usage_service_kit::auth::{Claims, JwtVerifier, Role, DEV_SECRET};
use usage_service_kit::clickhouse::ClickHouseArgs;
use usage_service_kit::kafka::KafkaArgs;
use usage_service_kit::produce::{send_acknowledged, Outgoing};

#[derive(Debug, Parser)]
#[command(name = "usage-demo-history")]
struct Args {
    /// The gateway (installations are registered through it).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    ingest: String,
    #[arg(long, env = "USAGE_JWT_SECRET", default_value = DEV_SECRET, hide_env_values = true)]
    jwt_secret: String,
    /// Days of history, today included.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=85))]
    days: u32,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    clickhouse: ClickHouseArgs,
}

/// What the demo's events say about where they came from.
const GATEWAY: &str = "demo-history";

/// One demo installation's habits.
struct Profile {
    n: u32,
    account: &'static str,
    plan: &'static str,
    /// Generations on an average weekday at the start of the history.
    per_day: f64,
    /// Daily growth (0.01 = 1% a day).
    growth: f64,
    users: u32,
    /// Share of gpt-4o and of gpt-4-turbo (the rest is gpt-4o-mini).
    big_models: (f64, f64),
    /// Days ago with a burst of this many generations within an hour.
    burst: Option<(i64, u32)>,
    /// Days ago since when it has been nearly silent.
    quiet_since: Option<i64>,
    /// A free plan's share of its cap to have used by now this month.
    cap_target: Option<f64>,
    multisite: Option<u64>,
}

fn fleet() -> Vec<Profile> {
    let p = |n, account, plan, per_day, growth, users| Profile {
        n,
        account,
        plan,
        per_day,
        growth,
        users,
        big_models: (0.2, 0.05),
        burst: None,
        quiet_since: None,
        cap_target: None,
        multisite: None,
    };
    let mut fleet = vec![
        p(1, "acc_northwind", "agency", 120.0, 0.004, 9),
        p(2, "acc_northwind", "agency", 80.0, 0.0, 6),
        p(3, "acc_northwind", "agency", 60.0, 0.006, 5),
        p(4, "acc_northwind", "agency", 45.0, -0.002, 4),
        p(5, "acc_bluebird", "pro", 25.0, 0.002, 3),
        p(6, "acc_bluebird", "pro", 18.0, 0.0, 3),
        p(7, "acc_bluebird", "pro", 40.0, 0.0, 4),
        p(8, "acc_bluebird", "pro", 12.0, 0.01, 2),
        p(9, "acc_corner", "free", 1.2, 0.0, 1),
        p(10, "acc_corner", "free", 0.8, 0.0, 1),
        p(11, "acc_corner", "free", 1.0, 0.0, 2),
        p(12, "acc_corner", "free", 1.0, 0.0, 1),
        p(13, "acc_corner", "free", 1.0, 0.0, 1),
        p(14, "acc_studio", "credits", 70.0, 0.003, 6),
        p(15, "acc_studio", "credits", 55.0, 0.0, 5),
        p(16, "acc_studio", "credits", 35.0, 0.0, 3),
        p(17, "acc_lighthouse", "pro", 15.0, 0.0, 3),
        p(18, "acc_lighthouse", "pro", 9.0, 0.0, 2),
        p(19, "acc_lighthouse", "pro", 6.0, 0.0, 2),
        p(20, "acc_orchard", "agency", 30.0, 0.0, 4),
        p(21, "acc_orchard", "agency", 40.0, 0.0, 5),
        p(22, "acc_orchard", "agency", 22.0, 0.012, 3),
        p(23, "acc_orchard", "agency", 28.0, 0.0, 3),
        p(24, "acc_orchard", "agency", 16.0, 0.0, 2),
    ];
    // Free sites: one warned, one critical, one blocked this month.
    fleet[10].cap_target = Some(0.8);
    fleet[11].cap_target = Some(0.94);
    fleet[12].cap_target = Some(1.3);
    // A spike two days ago (rate limits, abuse and spike flags follow) and
    // a site that went quiet four days ago.
    fleet[20].burst = Some((2, 420));
    fleet[22].quiet_since = Some(4);
    // The studio generates with the big models.
    fleet[13].big_models = (0.5, 0.15);
    fleet[14].big_models = (0.45, 0.1);
    // A multisite network of three sub-sites.
    for (i, site) in [(16usize, 1u64), (17, 2), (18, 3)] {
        fleet[i].multisite = Some(site);
    }
    fleet
}

fn install_id(n: u32) -> String {
    format!("d3e0f000-0000-4000-8000-{n:012}_{:012x}", 0xde000 + n)
}

fn secret(n: u32) -> String {
    format!("demo-history-secret-{n:04}")
}

/// A deterministic stream of numbers in [0, 1) (splitmix64).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        ((self.next() * n as f64) as u64).min(n.saturating_sub(1))
    }
}

/// Weekends are quieter.
fn weekday_factor(day: NaiveDate) -> f64 {
    match day.weekday().num_days_from_monday() {
        5 => 0.6,
        6 => 0.5,
        _ => 1.0,
    }
}

/// How many generations `p` made on `day` (`ago` days before today).
fn generations_on(
    p: &Profile,
    day: NaiveDate,
    ago: i64,
    days: i64,
    today: NaiveDate,
    rng: &mut Rng,
) -> u32 {
    if let Some(since) = p.quiet_since {
        if ago <= since {
            return rng.below(2) as u32;
        }
    }
    let noise = 0.75 + 0.5 * rng.next();
    let mut n =
        p.per_day * (1.0 + p.growth).powi((days - ago) as i32) * weekday_factor(day) * noise;
    if let Some(target) = p.cap_target {
        if day.month() == today.month() && day.year() == today.year() {
            // Spread the month's target over its days so far.
            n = target * 50.0 / f64::from(today.day()) * noise;
        }
    }
    let whole = n.floor();
    (whole + if rng.next() < n - whole { 1.0 } else { 0.0 }) as u32
}

/// The events of `p` on `day`, created no later than `now`.
fn events_of(
    p: &Profile,
    day: NaiveDate,
    ago: i64,
    days: i64,
    today: NaiveDate,
    now: DateTime<Utc>,
) -> Vec<UsageEvent> {
    let id = install_id(p.n);
    let mut rng = Rng::new(u64::from(p.n) << 32 ^ day.num_days_from_ce() as u64);
    let mut count = generations_on(p, day, ago, days, today, &mut rng);
    let burst = p.burst.filter(|(when, _)| *when == ago).map(|(_, n)| n);
    count += burst.unwrap_or(0);
    let start = day
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc().timestamp_millis())
        .unwrap_or(0);
    let mut out = Vec::with_capacity(count as usize);
    for k in 0..count {
        let mut r = Rng::new(hash64(&format!("{id}:{day}:{k}")));
        let in_burst = burst.is_some_and(|b| k >= count - b);
        // Sites work in office hours, mostly; a burst is one evening hour.
        let at = if in_burst {
            start + 19 * 3_600_000 + r.below(3_600_000) as i64
        } else {
            let hour = 6.0 + 14.0 * (r.next() + r.next()) / 2.0;
            start + (hour * 3_600_000.0) as i64 + r.below(60_000) as i64
        };
        let source = match r.next() {
            x if x < 0.45 => "inline",
            x if x < 0.75 => "bulk",
            x if x < 0.9 => "queue",
            _ => "manual",
        };
        // Bulk and queue events reach the gateway with the plugin's next
        // 5-minute batch; the others within seconds.
        let delay = if matches!(source, "bulk" | "queue") {
            30_000 + r.below(270_000) as i64
        } else {
            500 + r.below(4_000) as i64
        };
        if at + delay > now.timestamp_millis() {
            continue;
        }
        let model = match r.next() {
            x if x < p.big_models.1 => "gpt-4-turbo",
            x if x < p.big_models.0 + p.big_models.1 => "gpt-4o",
            _ => "gpt-4o-mini",
        };
        let prompt = 250 + r.below(1_200) as i64;
        let completion = 15 + r.below(110) as i64;
        let user = 1 + r.below(u64::from(p.users)) as u32;
        out.push(UsageEvent {
            event_id: format!(
                "evt_{:016x}{:016x}",
                hash64(&format!("{id}:{day}")),
                u64::from(k)
            ),
            install_id: id.clone(),
            account_id: p.account.to_string(),
            wp_site_id: p.multisite.map(|s| s as i64),
            wp_user_id_hash: hex::encode(sha2::Sha256::digest(format!("{id}:{user}:user"))),
            source: source.to_string(),
            model: model.to_string(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            context_json: Some(format!("{{\"attachment_id\":{}}}", 1000 + r.below(90_000))),
            created_at: at,
            processed_at: Some(at),
            batch_sent_at: Some(at + delay - 200),
            received_at: at + delay,
            signature_scheme: "body_sig_v2".to_string(),
            gateway_instance: GATEWAY.to_string(),
            billing_month: Some(format!("{:04}-{:02}", day.year(), day.month())),
            over_limit: None,
        });
    }
    out
}

fn hash64(text: &str) -> u64 {
    let digest = sha2::Sha256::digest(text.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

/// Marks what arrived over a capped plan's monthly cap, as the gateway
/// would have (`plan_limit_reached`); the events are recorded all the same.
fn mark_over_cap(plan_cap: Option<u64>, events: &mut [UsageEvent]) {
    let Some(cap) = plan_cap else { return };
    let mut used: HashMap<String, u64> = HashMap::new();
    for e in events.iter_mut() {
        let n = used
            .entry(e.billing_month.clone().unwrap_or_default())
            .or_default();
        if *n >= cap {
            e.over_limit = Some("plan_limit_reached".into());
        }
        *n += 1;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let now = Utc::now();
    let today = now.date_naive();
    let days = i64::from(args.days);
    let fleet = fleet();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let admin = JwtVerifier::new(args.jwt_secret.as_bytes()).sign(&Claims {
        sub: "demo-history".into(),
        role: Role::ProviderAdmin,
        exp: now.timestamp() + 3600,
        ..Default::default()
    });

    println!(
        "    registering {} demo installations of 6 accounts",
        fleet.len()
    );
    for p in &fleet {
        let body = json!({
            "install_id": install_id(p.n),
            "account_id": p.account,
            "secret": secret(p.n),
            "plan": p.plan,
            "site_hash": format!("{:012x}", 0xde000 + p.n),
            "wp_site_id": p.multisite,
            "plugin_version": if p.n % 3 == 0 { "2.3.9" } else { "2.4.1" },
            "wordpress_version": if p.n % 4 == 0 { "6.7.2" } else { "6.8.3" },
            "php_version": if p.n % 5 == 0 { "8.1.29" } else { "8.2.12" },
            "is_multisite": p.multisite.is_some(),
        });
        let response = http
            .post(format!("{}/api/usage/installations", args.ingest))
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("cannot reach the gateway at {}", args.ingest))?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "registering {}: HTTP {status}: {}",
                install_id(p.n),
                response.text().await.unwrap_or_default()
            );
        }
    }

    // The processors must know each installation's plan before its events.
    let clickhouse = args.clickhouse.client();
    let ids: Vec<String> = fleet.iter().map(|p| install_id(p.n)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let known: u64 = clickhouse
            .query("SELECT count() FROM installation_metadata FINAL WHERE install_id IN {ids:Array(String)}")
            .param("ids", &ids)
            .fetch_one()
            .await
            .context("cannot read ClickHouse")?;
        if known == ids.len() as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the processors mirrored {known} of {} demo installations within 60 s; are they running?", ids.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // What is already there: events per installation and day.
    let present: Vec<(String, String, u64)> = clickhouse
        .query(
            "SELECT install_id, toString(toDate(created_at)), count() FROM usage_events
             WHERE install_id IN {ids:Array(String)} AND created_at >= {from:Date}
             GROUP BY install_id, toDate(created_at)",
        )
        .param("ids", &ids)
        .param(
            "from",
            (today - chrono::Duration::days(days - 1)).to_string(),
        )
        .fetch_all()
        .await?;
    let present: HashMap<(String, String), u64> = present
        .into_iter()
        .map(|(id, day, n)| ((id, day), n))
        .collect();

    let policy = usage_service_kit::policy::Policy::default();
    let producer: FutureProducer = args
        .kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .create()
        .context("Kafka producer")?;
    let mut expected_total = 0u64;
    let mut sent = 0u64;
    for p in &fleet {
        let mut events = Vec::new();
        for ago in (0..days).rev() {
            let day = today - chrono::Duration::days(ago);
            events.extend(events_of(p, day, ago, days, today, now));
        }
        events.sort_by_key(|e| e.received_at);
        mark_over_cap(policy.plan(p.plan).monthly_cap, &mut events);
        expected_total += events.len() as u64;
        let mut per_day: HashMap<String, u64> = HashMap::new();
        for e in &events {
            let day = DateTime::from_timestamp_millis(e.created_at)
                .map(|t| t.date_naive().to_string())
                .unwrap_or_default();
            *per_day.entry(day).or_default() += 1;
        }
        let mut encoded: Vec<(&str, Vec<u8>)> = Vec::new();
        for e in &events {
            let day = DateTime::from_timestamp_millis(e.created_at)
                .map(|t| t.date_naive().to_string())
                .unwrap_or_default();
            let have = present
                .get(&(e.install_id.clone(), day.clone()))
                .copied()
                .unwrap_or(0);
            if have >= per_day.get(&day).copied().unwrap_or(0) {
                continue;
            }
            encoded.push((
                e.install_id.as_str(),
                e.to_wire().context("encoding an event")?,
            ));
        }
        let outgoing: Vec<Outgoing<'_>> =
            encoded.iter().map(|(k, v)| Outgoing::new(k, v)).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        send_acknowledged(&producer, &args.kafka.events_topic, &outgoing, deadline)
            .await
            .context("appending the demo's events to Kafka")?;
        sent += encoded.len() as u64;
    }
    println!(
        "    {sent} events appended to {} ({} in the demo's {days} days; the rest were there)",
        args.kafka.events_topic, expected_total
    );

    // Until the processors have counted them all.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last_print = Instant::now();
    loop {
        let counted: u64 = clickhouse
            .query(
                "SELECT sum(requests) FROM usage_install_daily FINAL
                 WHERE install_id IN {ids:Array(String)} AND date >= {from:Date}",
            )
            .param("ids", &ids)
            .param(
                "from",
                (today - chrono::Duration::days(days - 1)).to_string(),
            )
            .fetch_one()
            .await?;
        if counted >= expected_total {
            println!(
                "    the processors counted all {expected_total} demo events ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            println!("    counted {counted} of {expected_total} ...");
            last_print = Instant::now();
        }
        if Instant::now() > deadline {
            bail!("the processors counted {counted} of {expected_total} demo events within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_is_the_same_on_every_run_and_never_in_the_future() {
        let now: DateTime<Utc> = "2026-12-02T10:00:00Z".parse().unwrap();
        let today = now.date_naive();
        let fleet = fleet();
        let a = events_of(&fleet[0], today, 0, 60, today, now);
        let b = events_of(&fleet[0], today, 0, 60, today, now);
        assert_eq!(a, b);
        assert!(a.iter().all(|e| e.received_at <= now.timestamp_millis()));
        let later: DateTime<Utc> = "2026-12-02T23:00:00Z".parse().unwrap();
        let c = events_of(&fleet[0], today, 0, 60, today, later);
        assert!(c.len() > a.len(), "later the same day, more of it");
        assert!(a.iter().all(|e| c.iter().any(|x| x.event_id == e.event_id)));
        let ids: std::collections::HashSet<_> = c.iter().map(|e| &e.event_id).collect();
        assert_eq!(ids.len(), c.len());
    }

    #[test]
    fn the_blocked_free_site_goes_over_its_cap_and_is_marked() {
        let now: DateTime<Utc> = "2026-12-20T23:00:00Z".parse().unwrap();
        let today = now.date_naive();
        let fleet = fleet();
        let p = &fleet[12];
        let mut events: Vec<_> = (0..20)
            .rev()
            .flat_map(|ago| events_of(p, today - chrono::Duration::days(ago), ago, 60, today, now))
            .collect();
        mark_over_cap(Some(50), &mut events);
        let over = events.iter().filter(|e| e.over_limit.is_some()).count();
        assert!(
            events.len() > 50 && over == events.len() - 50,
            "{} {over}",
            events.len()
        );
    }
}

//! Admission benchmark against the running stack: how fast
//! `POST /api/usage/admit` answers, and how far a burst of concurrent
//! admissions from many connections overshoots a plan's cap.
//!
//! - **Overshoot**: `--rounds` fresh free-plan installations (cap 50); for
//!   each, `--connections` connections ask for one generation at a time as
//!   fast as they can until every one has been refused; the generations
//!   allowed beyond the cap are the overshoot. With `--second-gateway`, the
//!   connections alternate between two gateways (which share no counts).
//! - **Latency**: `--requests` admissions of a credits installation from
//!   `--connections` connections: HTTP round trip p50/p99/max
//!   and answers/s, and the handler's own time from the gateway's
//!   `usage_ingest_admission_seconds` histogram; asked with a provider
//!   service token, and with the site's own token and v2 signature.
//!
//! ```sh
//! cargo run --release -p usage-loadgen --bin usage-admit-bench
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};
use usage_ingest::signature::sign_v2;
use usage_service_kit::auth::{Claims, JwtVerifier, Role, DEV_SECRET};

#[derive(Debug, Clone, Parser)]
#[command(name = "usage-admit-bench")]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    ingest: String,
    /// A second gateway of the same stack (connections alternate).
    #[arg(long)]
    second_gateway: Option<String>,
    #[arg(long, env = "USAGE_JWT_SECRET", default_value = DEV_SECRET, hide_env_values = true)]
    jwt_secret: String,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Fresh free installations whose cap a burst tries to overshoot.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Admissions timed for the latency figures (per way of asking).
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
}

struct Site {
    install_id: String,
    account_id: String,
    secret: String,
}

fn sign(verifier: &JwtVerifier, claims: Claims) -> String {
    verifier.sign(&Claims {
        exp: chrono::Utc::now().timestamp() + 3600,
        ..claims
    })
}

async fn register(
    client: &reqwest::Client,
    args: &Args,
    admin: &str,
    plan: &str,
) -> anyhow::Result<Site> {
    let uuid = uuid::Uuid::new_v4();
    let site = Site {
        install_id: format!("{uuid}_{}", &uuid.simple().to_string()[..12]),
        account_id: format!("acc_admit{}", &uuid.simple().to_string()[..8]),
        secret: format!("admit-bench-secret-{uuid}"),
    };
    let r = client
        .post(format!("{}/api/usage/installations", args.ingest))
        .bearer_auth(admin)
        .json(
            &json!({"install_id": site.install_id, "account_id": site.account_id,
            "secret": site.secret, "plan": plan, "site_hash": "ab12cd34ef56"}),
        )
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("registration: {} {}", r.status(), r.text().await?);
    }
    Ok(site)
}

/// One admission of one generation; whether it was allowed, and how long
/// the round trip took.
async fn admit(
    client: &reqwest::Client,
    base: &str,
    bearer: &str,
    site: &Site,
    signed: bool,
) -> anyhow::Result<(bool, Duration)> {
    let body = serde_json::to_vec(
        &json!({"install_id": site.install_id, "generations": 1, "tokens": 200}),
    )?;
    let mut request = client
        .post(format!("{base}/api/usage/admit"))
        .bearer_auth(bearer)
        .header("Content-Type", "application/json");
    if signed {
        let ts = chrono::Utc::now().timestamp();
        request = request.header(
            "X-Usage-Signature",
            sign_v2(site.secret.as_bytes(), ts, &body),
        );
    }
    let started = Instant::now();
    let r = request.body(body).send().await?;
    let status = r.status();
    let answer: Value = r.json().await?;
    let took = started.elapsed();
    if !status.is_success() {
        bail!("admission: {status} {answer}");
    }
    Ok((answer["allowed"] == true, took))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// The gateway's admission-time histogram: (count, sum in seconds).
async fn handler_time(client: &reqwest::Client, base: &str) -> (f64, f64) {
    let text = match client.get(format!("{base}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("usage_ingest_admission_seconds_count"),
        value("usage_ingest_admission_seconds_sum"),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let verifier = JwtVerifier::new(args.jwt_secret.as_bytes());
    let admin = sign(
        &verifier,
        Claims {
            sub: "admit-bench".into(),
            role: Role::ProviderAdmin,
            ..Default::default()
        },
    );
    let service = sign(
        &verifier,
        Claims {
            sub: "generation-api".into(),
            role: Role::Service,
            scope: Some("usage:admit".into()),
            ..Default::default()
        },
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections * 2)
        .timeout(Duration::from_secs(30))
        .build()?;
    let gateways: Vec<String> = std::iter::once(args.ingest.clone())
        .chain(args.second_gateway.clone())
        .collect();

    println!(
        "overshoot: {} free installations (cap 50), {} connections each, over {} gateway(s)",
        args.rounds,
        args.connections,
        gateways.len()
    );
    let mut overshoots = Vec::new();
    for round in 0..args.rounds {
        let site = Arc::new(register(&client, &args, &admin, "free").await?);
        // Every gateway must know the installation before the burst.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let allowed = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..args.connections)
            .map(|c| {
                let (client, site, allowed, service) = (
                    client.clone(),
                    site.clone(),
                    allowed.clone(),
                    service.clone(),
                );
                let base = gateways[c % gateways.len()].clone();
                tokio::spawn(async move {
                    loop {
                        match admit(&client, &base, &service, &site, false).await {
                            Ok((true, _)) => {
                                allowed.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok((false, _)) => return Ok(()),
                            Err(e) => return Err(e),
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.context("a burst connection")??;
        }
        let n = allowed.load(Ordering::Relaxed);
        println!(
            "  round {round:>2}: {n} allowed of a cap of 50 (overshoot {})",
            n.saturating_sub(50)
        );
        overshoots.push(n.saturating_sub(50));
    }
    println!(
        "overshoot: max {}, total {} over {} rounds",
        overshoots.iter().max().copied().unwrap_or(0),
        overshoots.iter().sum::<u64>(),
        overshoots.len()
    );

    // The site's own way is subject to the gateway's flood limit per
    // installation (500 at once, 50/s): spread over enough installations.
    let sites = args.requests.div_ceil(400).max(1);
    let mut credits = Vec::with_capacity(sites);
    for _ in 0..sites {
        let site = register(&client, &args, &admin, "credits").await?;
        let token = sign(
            &verifier,
            Claims {
                sub: "site".into(),
                role: Role::Account,
                account_id: Some(site.account_id.clone()),
                ..Default::default()
            },
        );
        credits.push((site, token));
    }
    let credits = Arc::new(credits);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (way, signed) in [
        ("provider service token", false),
        ("site token + v2 signature", true),
    ] {
        let (count_before, sum_before) = handler_time(&client, &args.ingest).await;
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = (0..args.connections)
            .map(|_| {
                let (client, args, credits, service, next) = (
                    client.clone(),
                    args.clone(),
                    credits.clone(),
                    service.clone(),
                    next.clone(),
                );
                tokio::spawn(async move {
                    let mut took = Vec::new();
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if n >= args.requests {
                            break;
                        }
                        // A credits plan has no cap, but each rate window
                        // fills after 100: the answer time is measured,
                        // allowed or refused (the same work either way).
                        let (site, token) = &credits[n % credits.len()];
                        let bearer = if signed { token } else { &service };
                        let (_, t) = admit(&client, &args.ingest, bearer, site, signed).await?;
                        took.push(t);
                    }
                    anyhow::Ok(took)
                })
            })
            .collect();
        let mut all = Vec::with_capacity(args.requests);
        for t in tasks {
            all.extend(t.await.context("a latency connection")??);
        }
        let secs = started.elapsed().as_secs_f64();
        all.sort_unstable();
        let (count_after, sum_after) = handler_time(&client, &args.ingest).await;
        let handled = (count_after - count_before).max(1.0);
        println!(
            "latency ({way}, {} connections): {} answers in {secs:.1} s = {:.0}/s; round trip p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; in the handler {:.1} µs on average",
            args.connections,
            all.len(),
            all.len() as f64 / secs,
            percentile(&all, 0.50).as_secs_f64() * 1000.0,
            percentile(&all, 0.99).as_secs_f64() * 1000.0,
            all.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
            (sum_after - sum_before) / handled * 1e6,
        );
    }
    Ok(())
}

//! Governance throughput and state size, in memory (no Kafka, no ClickHouse):
//! the per-event work the processors add for governance, with 100k active
//! installations.
//!
//!     cargo run --release -p usage-processors --example governance_bench [installations] [events]

use std::collections::HashMap;
use std::time::Instant;

use usage_processors::governance::policy::Policy;
use usage_processors::governance::state::{Counted, Installation};
use usage_processors::governance::window::WindowConfig;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let installations: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let events: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(5_000_000);
    let policy = Policy::default();
    let windows = WindowConfig::default();
    let ids: Vec<String> = (0..installations)
        .map(|i| format!("{i:08x}-install"))
        .collect();
    let plans = ["free", "pro", "agency", "credits"];

    let before = rss_kib();
    let mut state: HashMap<&str, Installation> = HashMap::with_capacity(installations);
    let mut used: HashMap<&str, u64> = HashMap::with_capacity(installations);
    // An hour of traffic spread over every installation, in event-time order
    // with a little jitter (events arrive up to 5 s late).
    let t0: i64 = 1_764_547_200_000;
    let span_ms = 3_600_000i64;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut decisions = 0usize;
    let started = Instant::now();
    for n in 0..events {
        let r = next();
        let which = (r % installations as u64) as usize;
        let id = ids[which].as_str();
        let t = t0 + (n as i64 * span_ms) / events as i64 - (r >> 40) as i64 % 5000;
        let g = state.entry(id).or_default();
        g.count(&windows, t, 150 + r % 500);
        let u = used.entry(id).or_default();
        *u += 1;
        let (_, d) = g.evaluate(
            Counted {
                install_id: id,
                // Each installation keeps its plan.
                plan: plans[which % 4],
                at: t,
                received: t,
                month: "2025-12",
                month_used: *u,
            },
            &policy,
            &windows,
        );
        decisions += d.len();
    }
    let secs = started.elapsed().as_secs_f64();
    let after = rss_kib();
    let buckets: usize = state.values().map(|g| g.windows.buckets()).sum();
    println!("installations: {installations}, events: {events} over one hour of event time");
    println!(
        "governance:    {:.0} events/s (count + evaluate, one core), {decisions} decisions",
        events as f64 / secs
    );
    println!(
        "state:         {:.0} bytes per installation (RSS delta {:.1} MiB), {:.1} buckets per installation on average",
        (after.saturating_sub(before) * 1024) as f64 / installations as f64,
        after.saturating_sub(before) as f64 / 1024.0,
        buckets as f64 / installations as f64
    );
}

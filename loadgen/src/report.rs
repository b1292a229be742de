//! Figures: percentiles, the bare-producer ceiling, peak RSS, the printout.

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use usage_schemas::wire::AvroRecord;
use usage_schemas::UsageEvent;

pub struct Figures<'a> {
    pub load_secs: f64,
    pub events_acked: u64,
    pub events_sent: u64,
    pub batches_ok: u64,
    pub batches_failed: u64,
    pub distinct_events: u64,
    pub latencies_us: &'a mut Vec<u64>,
    pub freshness_us: &'a mut Vec<u64>,
    pub enforcement_us: &'a mut Vec<u64>,
    pub drained_at: Option<f64>,
    pub processor_inserted: u64,
    pub bare: Option<f64>,
    pub rss: Vec<(String, u64)>,
    pub mismatches: usize,
    pub installations: usize,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

pub fn print(f: &Figures<'_>) {
    let lat = {
        let mut v = f.latencies_us.clone();
        v.sort_unstable();
        v
    };
    let fresh = {
        let mut v = f.freshness_us.clone();
        v.sort_unstable();
        v
    };
    let rate = f.events_acked as f64 / f.load_secs;
    println!();
    println!("== results ==");
    println!(
        "gateway:    {:.0} events/s accepted ({} events in {} batches over {:.1} s; {} batches failed; {} distinct events)",
        rate, f.events_acked, f.batches_ok, f.load_secs, f.batches_failed, f.distinct_events
    );
    println!(
        "            batch latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    if let Some(at) = f.drained_at {
        println!(
            "processors: {:.0} events/s into ClickHouse ({} new events, all stored {:.1} s after the drain started)",
            f.processor_inserted as f64 / at,
            f.processor_inserted,
            at
        );
    } else {
        println!(
            "processors: did not drain within 300 s ({} stored)",
            f.processor_inserted
        );
    }
    println!(
        "freshness:  accepted -> visible in the summary p50 {:.0} ms, p99 {:.0} ms ({} probes)",
        pct(&fresh, 0.50),
        pct(&fresh, 0.99),
        fresh.len()
    );
    let enforce = {
        let mut v = f.enforcement_us.clone();
        v.sort_unstable();
        v
    };
    if !enforce.is_empty() {
        println!(
            "governance: limit crossed -> the gateway holds the decision p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} probes)",
            pct(&enforce, 0.50),
            pct(&enforce, 0.99),
            pct(&enforce, 1.0),
            enforce.len()
        );
    }
    if let Some(bare) = f.bare {
        println!(
            "ceiling:    bare rdkafka producer {:.0} events/s (same Avro bytes and settings); gateway = {:.0}% of it",
            bare,
            100.0 * rate / bare
        );
    }
    for (name, kib) in &f.rss {
        println!("peak RSS:   {name:<11} {:.1} MiB", *kib as f64 / 1024.0);
    }
    println!(
        "exactness:  {} of {} installations match their ground truth in the summary API",
        f.installations - f.mismatches,
        f.installations
    );
    let _ = f.events_sent;
}

/// VmHWM of every `<name>.pid` in `dir`.
pub fn peak_rss(dir: Option<&Path>) -> Vec<(String, u64)> {
    let Some(dir) = dir else { return vec![] };
    let mut out = Vec::new();
    for name in ["ingest", "processors", "query", "kafka", "clickhouse"] {
        let Ok(pid) = std::fs::read_to_string(dir.join(format!("{name}.pid"))) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())) else {
            continue;
        };
        if let Some(kib) = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
        {
            out.push((name.to_string(), kib));
        }
    }
    out
}

/// Events/s of a bare producer sending pre-encoded usage events for `secs`
/// to a scratch topic, with the gateway's producer settings.
pub async fn bare_producer(brokers: &str, secs: f64) -> anyhow::Result<f64> {
    let topic = format!(
        "bench_bare_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    admin
        .create_topics(
            [&NewTopic::new(&topic, 12, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    let producer: FutureProducer = config
        .clone()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "30000")
        .create()?;
    // 200 installations' worth of keys and realistic events.
    let payloads: Vec<(String, Vec<u8>)> = (0..2000)
        .map(|i| {
            let e = UsageEvent {
                event_id: format!("evt_{:032x}", i),
                install_id: format!("550e8400-e29b-41d4-a716-{:012x}_a3b4c5d6e7f8", i % 200),
                account_id: "acc_bench".into(),
                wp_site_id: None,
                wp_user_id_hash: format!("{:064x}", i % 7),
                source: "bulk".into(),
                model: "gpt-4o-mini".into(),
                prompt_tokens: 150,
                completion_tokens: 25,
                total_tokens: 175,
                context_json: Some(
                    r#"{"attachment_id":12345,"source_detail":"media_library"}"#.into(),
                ),
                created_at: 1_762_165_800_000,
                processed_at: None,
                batch_sent_at: Some(1_762_165_860_000),
                received_at: 1_762_165_861_000,
                signature_scheme: "install_sig_v1".into(),
                gateway_instance: "bench".into(),
                billing_month: None,
                over_limit: None,
            };
            (e.install_id.clone(), e.to_wire().unwrap_or_default())
        })
        .collect();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    let mut inflight = Vec::with_capacity(20_000);
    while Instant::now() < deadline {
        for (key, value) in payloads
            .iter()
            .cycle()
            .skip((sent % 2000) as usize)
            .take(1000)
        {
            let mut record = FutureRecord::to(&topic)
                .key(key.as_str())
                .payload(value.as_slice());
            loop {
                match producer.send_result(record) {
                    Ok(d) => {
                        inflight.push(d);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
            sent += 1;
        }
        if inflight.len() >= 20_000 {
            for d in inflight.drain(..) {
                let _ = d.await;
            }
        }
    }
    for d in inflight.drain(..) {
        let _ = d.await;
    }
    let rate = sent as f64 / started.elapsed().as_secs_f64();
    let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
    Ok(rate)
}

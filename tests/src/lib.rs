//! Shared helpers for the end-to-end and integration tests.
//!
//! The tests run against the real Kafka and ClickHouse that `./stack engines`
//! (or `./stack test`) starts. Every test isolates itself with its own
//! ClickHouse database and its own Kafka topics and consumer groups, so tests
//! run in parallel and never see each other's data, nor the data of a running
//! local stack.

pub mod browser;
pub mod pipeline;
pub mod processes;

use std::time::Duration;

use usage_service_kit::clickhouse::ClickHouseArgs;
use usage_service_kit::kafka::KafkaArgs;

pub const KAFKA_ENV: &str = "USAGE_TEST_KAFKA_BROKERS";
pub const CLICKHOUSE_ENV: &str = "USAGE_TEST_CLICKHOUSE_URL";

/// A name no other test run uses: `prefix_` + 12 hex chars.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

/// Kafka settings with fresh topics (created on first use by the services or
/// by [`create_topics`]).
pub fn kafka_args() -> KafkaArgs {
    KafkaArgs {
        brokers: std::env::var(KAFKA_ENV).unwrap_or_else(|_| "127.0.0.1:9092".into()),
        events_topic: unique("test_events"),
        installations_topic: unique("test_installations"),
        governance_topic: unique("test_governance"),
        accounts_topic: unique("test_accounts"),
        decisions_topic: unique("test_decisions"),
        events_partitions: 4,
        replication: 1,
    }
}

/// Deletes a test's topics, so that a machine running the suite again and
/// again does not pile up partitions (which slow every Kafka restart).
/// Best effort: a failure leaves them for later, and fails no test.
pub async fn drop_topics(args: &KafkaArgs) {
    let Ok(admin) = args
        .client_config()
        .create::<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>>()
    else {
        return;
    };
    let topics = [
        args.events_topic.as_str(),
        args.installations_topic.as_str(),
        args.governance_topic.as_str(),
        args.decisions_topic.as_str(),
        args.accounts_topic.as_str(),
    ];
    let _ = admin
        .delete_topics(&topics, &rdkafka::admin::AdminOptions::new())
        .await;
}

/// The payloads of every message of `topic`, partition after partition,
/// from the start up to its end now (a tombstone reads as empty).
pub async fn read_topic(args: &KafkaArgs, topic: &str) -> Vec<Vec<u8>> {
    read_topic_records(args, topic)
        .await
        .into_iter()
        .map(|(_, payload)| payload.unwrap_or_default())
        .collect()
}

/// The key and payload (`None` for a tombstone) of every message of
/// `topic`, partition after partition, from the start up to its end now.
pub async fn read_topic_records(args: &KafkaArgs, topic: &str) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let mut config = args.client_config();
    config
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false");
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let wait = Duration::from_secs(5);
        let consumer: BaseConsumer = config.create().unwrap();
        let metadata = consumer.fetch_metadata(Some(&topic), wait).unwrap();
        let partitions = metadata.topics()[0].partitions().len() as i32;
        let mut out = Vec::new();
        for partition in 0..partitions {
            let (low, high) = consumer.fetch_watermarks(&topic, partition, wait).unwrap();
            if high <= low {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition, Offset::Offset(low))
                .unwrap();
            consumer.assign(&tpl).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                assert!(std::time::Instant::now() < deadline, "reading {topic}");
                let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let message = message.unwrap();
                out.push((
                    message.key().unwrap_or_default().to_vec(),
                    message.payload().map(<[u8]>::to_vec),
                ));
                if message.offset() + 1 >= high {
                    break;
                }
            }
        }
        out
    })
    .await
    .unwrap()
}

/// A minute ago, but never before 00:00:01 UTC today: events sent with this
/// time fall on today (and this month), whenever the test runs.
pub fn a_minute_ago_today() -> chrono::DateTime<chrono::Utc> {
    let now = chrono::Utc::now();
    let day_start = now.date_naive().and_hms_opt(0, 0, 1).unwrap().and_utc();
    (now - chrono::Duration::seconds(60)).max(day_start)
}

/// ClickHouse settings pointing at a database name nobody uses yet (not created).
pub fn clickhouse_args() -> ClickHouseArgs {
    ClickHouseArgs {
        url: std::env::var(CLICKHOUSE_ENV).unwrap_or_else(|_| "http://127.0.0.1:8123".into()),
        database: unique("test"),
        user: "default".into(),
        password: String::new(),
        compression: "lz4".into(),
    }
}

/// A fresh database with every migration applied; dropped by [`drop_database`].
pub async fn migrated_database() -> ClickHouseArgs {
    let args = clickhouse_args();
    require_clickhouse(&args).await;
    usage_schemas::migrations::migrate(&args.server_client(), &args.database)
        .await
        .expect("migrations apply to a fresh database");
    args
}

pub async fn drop_database(args: &ClickHouseArgs) {
    let _ = args
        .server_client()
        .query(&format!("DROP DATABASE IF EXISTS `{}` SYNC", args.database))
        .execute()
        .await;
}

/// Fails the test with the fix when ClickHouse is not running.
pub async fn require_clickhouse(args: &ClickHouseArgs) {
    if let Err(err) = args.server_client().query("SELECT 1").execute().await {
        panic!(
            "ClickHouse is not reachable at {} ({err}). Start the engines with `./stack engines`, \
             or run the suite with `./stack test`.",
            args.url
        );
    }
}

/// Fails the test with the fix when Kafka is not running.
pub async fn require_kafka(args: &KafkaArgs) {
    if let Err(err) = args.probe().run().await {
        panic!(
            "Kafka is not reachable at {} ({err}). Start the engines with `./stack engines`, \
             or run the suite with `./stack test`.",
            args.brokers
        );
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A value of the service's /metrics at `addr` (0 until it answers).
pub async fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    let Ok(r) = http().get(format!("http://{addr}/metrics")).send().await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The sum of the series of a labelled metric whose labels contain
/// `labels` (e.g. `kind="permanent"`).
pub async fn labelled_metric(addr: std::net::SocketAddr, name: &str, labels: &str) -> u64 {
    let Ok(r) = http().get(format!("http://{addr}/metrics")).send().await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits until `GET http://{addr}/ready` answers `status` (200 or 503).
pub async fn wait_ready_status(addr: std::net::SocketAddr, status: u16, timeout: Duration) {
    eventually(
        &format!("/ready of {addr} to answer {status}"),
        timeout,
        || async move {
            let r = http()
                .get(format!("http://{addr}/ready"))
                .send()
                .await
                .ok()?;
            (r.status().as_u16() == status).then_some(())
        },
    )
    .await;
}

/// A plain HTTP client for the services under test.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client builds")
}

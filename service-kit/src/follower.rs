//! Following a compacted topic into memory (a table of the latest value per key).
//!
//! No consumer group offsets: each process reads the whole topic from the
//! beginning at start (compaction keeps one record per key), then keeps
//! following it. "Caught up" means our position reached the high watermark
//! sampled at start on every partition; services report not ready until then,
//! so they never act on a half-loaded table. Used for the installation
//! registry and the governance state.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::kafka::KafkaArgs;

/// What a follower does with the records of its topic.
pub trait Table: Send + Sync + 'static {
    /// One record: `value` is `None` for a tombstone.
    fn apply(&self, key: Option<&[u8]>, value: Option<&[u8]>);
    /// The topic has been read up to where it was when following started.
    fn caught_up(&self);
    fn is_caught_up(&self) -> bool;
}

/// Follows `topic` into `table` until the process ends; reconnects and
/// resumes from the beginning on Kafka errors (applying is idempotent).
pub async fn follow<T: Table>(table: std::sync::Arc<T>, kafka: KafkaArgs, topic: String) {
    let mut backoff = crate::retry::Backoff::default();
    loop {
        if let Err(err) = follow_once(&*table, &kafka, &topic).await {
            tracing::warn!(%err, %topic, "follower restarting");
            backoff.wait().await;
        }
    }
}

async fn follow_once<T: Table>(table: &T, kafka: &KafkaArgs, topic: &str) -> Result<(), String> {
    let consumer: StreamConsumer = kafka
        .client_config()
        // Required by librdkafka, never used for commits.
        .set("group.id", format!("follower-{topic}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "20")
        .create()
        .map_err(|e| e.to_string())?;

    // Metadata and watermarks are blocking calls: made on a blocking thread
    // with a short-lived client.
    let config = kafka.client_config();
    let topic_name = topic.to_string();
    let targets: Vec<(i32, i64)> = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let probe: BaseConsumer = config.create().map_err(|e| e.to_string())?;
        let metadata = probe
            .fetch_metadata(Some(&topic_name), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(format!("topic {topic_name} does not exist yet"));
        }
        partitions
            .into_iter()
            .map(|p| {
                probe
                    .fetch_watermarks(&topic_name, p, Duration::from_secs(5))
                    .map(|(_, high)| (p, high))
                    .map_err(|e| e.to_string())
            })
            .collect()
    })
    .await
    .map_err(|e| e.to_string())??;

    let mut assignment = TopicPartitionList::new();
    for (p, _) in &targets {
        assignment
            .add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;

    let reached_start_watermarks = |consumer: &StreamConsumer| -> bool {
        let Ok(position) = consumer.position() else {
            return false;
        };
        targets.iter().all(|(p, high)| {
            *high == 0
                || matches!(
                    position.find_partition(topic, *p).map(|e| e.offset()),
                    Some(Offset::Offset(o)) if o >= *high
                )
        })
    };
    let check = |consumer: &StreamConsumer| {
        if !table.is_caught_up() && reached_start_watermarks(consumer) {
            table.caught_up();
        }
    };
    check(&consumer);

    loop {
        match tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await {
            Ok(Ok(msg)) => {
                table.apply(msg.key(), msg.payload());
                check(&consumer);
            }
            Ok(Err(err)) => return Err(err.to_string()),
            Err(_idle) => check(&consumer),
        }
    }
}

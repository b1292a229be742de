//! Follows the installations topic into the in-memory registry.
//!
//! No consumer group offsets: every gateway reads the whole compacted topic
//! from the beginning at start (it holds one record per installation), then
//! keeps following it. "Caught up" means our position reached the high
//! watermark sampled at start on every partition; until then the gateway
//! reports not ready, so it never refuses a registered installation as unknown.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use usage_service_kit::kafka::KafkaArgs;

use super::Registry;

/// Runs until the process ends; reconnects and resumes on Kafka errors.
pub async fn follow(registry: Arc<Registry>, kafka: KafkaArgs) {
    let mut delay = Duration::from_millis(200);
    loop {
        match follow_once(&registry, &kafka).await {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(%err, "installation registry follower restarting");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn follow_once(registry: &Registry, kafka: &KafkaArgs) -> Result<(), String> {
    let topic = kafka.installations_topic.as_str();
    let consumer: StreamConsumer = kafka
        .client_config()
        // Required by librdkafka, never used for commits.
        .set("group.id", "usage-ingest-registry")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "50")
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

    let caught_up = |consumer: &StreamConsumer| -> bool {
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
    if caught_up(&consumer) {
        registry.set_caught_up();
    }

    loop {
        match tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await {
            Ok(Ok(msg)) => {
                registry.apply_message(msg.key(), msg.payload());
                if !registry.is_caught_up() && caught_up(&consumer) {
                    registry.set_caught_up();
                }
            }
            Ok(Err(err)) => return Err(err.to_string()),
            Err(_idle) => {
                if !registry.is_caught_up() && caught_up(&consumer) {
                    registry.set_caught_up();
                }
            }
        }
    }
}

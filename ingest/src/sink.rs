//! Where accepted records go: Kafka, durably, before anything is acknowledged.
//!
//! The handlers are generic over `RecordSink` so their logic reads without
//! Kafka in the way; the product always runs `KafkaSink`, and the pipeline
//! tests run it against the real broker.

use std::future::Future;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use usage_service_kit::kafka::KafkaArgs;
use usage_service_kit::produce::{send_acknowledged, Outgoing};

/// One Kafka message: key and single-object-encoded value (`None` = tombstone).
pub struct Record {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Kafka did not confirm every record in time: nothing may be acknowledged.
    #[error("Kafka did not confirm the write: {0}")]
    Unavailable(String),
}

pub trait RecordSink: Send + Sync + 'static {
    /// Resolves once Kafka has every record durably (acks=all), or fails.
    fn send_all(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

pub struct KafkaSink {
    producer: FutureProducer,
    /// How long one send may wait for the broker before the request gets 503.
    timeout: Duration,
}

impl KafkaSink {
    pub fn new(kafka: &KafkaArgs, timeout: Duration) -> Result<Self, KafkaError> {
        let producer: FutureProducer = kafka
            .client_config()
            // Exactly-once into the log per producer session: no duplicates
            // from internal retries, per-partition order kept.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Pinned: the processors compute an installation's partition
            // from it (`partition_for_key`), and its events stay in order.
            .set("partitioner", "consistent_random")
            // Concurrent requests share broker round trips.
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .create()?;
        Ok(Self { producer, timeout })
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Waits for in-flight messages at shutdown.
    pub fn flush(&self) {
        let _ = self.producer.flush(self.timeout);
    }
}

impl RecordSink for KafkaSink {
    async fn send_all(&self, topic: &str, records: Vec<Record>) -> Result<(), SinkError> {
        // A record that times out may still reach the log; the plugin's
        // retry then repeats its event ids, which the processors count once.
        let outgoing: Vec<Outgoing<'_>> = records.iter().map(outgoing).collect();
        let deadline = tokio::time::Instant::now() + self.timeout;
        send_acknowledged(&self.producer, topic, &outgoing, deadline)
            .await
            .map_err(|e| SinkError::Unavailable(e.to_string()))
    }
}

fn outgoing(record: &Record) -> Outgoing<'_> {
    Outgoing {
        key: record.key.as_str(),
        value: record.value.as_deref(),
    }
}

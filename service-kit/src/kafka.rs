//! Kafka connection settings, client construction, topic creation and the
//! readiness probe.

use std::time::Duration;

use clap::Args;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::Probe;

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma separated.
    #[arg(
        long = "kafka-brokers",
        env = "USAGE_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Topic holding the usage events (Avro, keyed by install_id).
    #[arg(
        long = "events-topic",
        env = "USAGE_EVENTS_TOPIC",
        default_value = "usage.events.v1"
    )]
    pub events_topic: String,
    /// Compacted topic holding the installation registry (Avro, keyed by install_id).
    #[arg(
        long = "installations-topic",
        env = "USAGE_INSTALLATIONS_TOPIC",
        default_value = "usage.installations.v1"
    )]
    pub installations_topic: String,
    /// Compacted topic holding each installation's current governance state
    /// (key install_id), written by the processors, enforced by the gateways.
    #[arg(
        long = "governance-topic",
        env = "USAGE_GOVERNANCE_TOPIC",
        default_value = "usage.governance.v1"
    )]
    pub governance_topic: String,
    /// Compacted topic holding the accounts the provider set plans and
    /// limits for (Avro `Account`, keyed by account_id), followed by every gateway.
    #[arg(
        long = "accounts-topic",
        env = "USAGE_ACCOUNTS_TOPIC",
        default_value = "usage.accounts.v1"
    )]
    pub accounts_topic: String,
    /// Append-only history of governance decisions.
    #[arg(
        long = "decisions-topic",
        env = "USAGE_DECISIONS_TOPIC",
        default_value = "usage.governance.decisions.v1"
    )]
    pub decisions_topic: String,
    /// Partitions of the events topic when this service creates it; the
    /// upper bound on processor instances sharing the load.
    #[arg(
        long = "events-partitions",
        env = "USAGE_EVENTS_PARTITIONS",
        default_value_t = 12
    )]
    pub events_partitions: i32,
    /// Replication factor for topics this service creates (1 on a single local broker).
    #[arg(
        long = "topic-replication",
        env = "USAGE_TOPIC_REPLICATION",
        default_value_t = 1
    )]
    pub replication: i32,
}

/// The partition of a keyed record under librdkafka's `consistent_random`
/// partitioner (CRC-32/IEEE of the key, modulo the partition count), which
/// the gateway pins. The processors use it to know which installations the
/// partitions assigned to them own.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    let n = u32::try_from(partitions.max(1)).unwrap_or(1);
    // The remainder is below `partitions`, so it fits an i32.
    (crc32fast::hash(key) % n) as i32
}

impl KafkaArgs {
    /// The client settings every producer/consumer/admin starts from.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            // A dead broker must surface as an error within seconds, not hang.
            .set("socket.timeout.ms", "10000")
            .set("reconnect.backoff.max.ms", "2000");
        config
    }

    /// Creates the events topic, the compacted installations, accounts and
    /// governance topics and the decisions history topic if absent.
    pub async fn ensure_topics(&self) -> Result<(), rdkafka::error::KafkaError> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let replication = || TopicReplication::Fixed(self.replication);
        let events = NewTopic::new(&self.events_topic, self.events_partitions, replication());
        let installations = NewTopic::new(&self.installations_topic, 1, replication())
            .set("cleanup.policy", "compact")
            // Tombstones (erasure) stay long enough for every gateway to see them.
            .set("delete.retention.ms", "86400000");
        let governance = NewTopic::new(&self.governance_topic, 1, replication())
            .set("cleanup.policy", "compact")
            .set("delete.retention.ms", "86400000");
        let accounts =
            NewTopic::new(&self.accounts_topic, 1, replication()).set("cleanup.policy", "compact");
        let decisions = NewTopic::new(&self.decisions_topic, 1, replication());
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let all = [&events, &installations, &accounts, &governance, &decisions];
        for result in admin.create_topics(all, &opts).await? {
            match result {
                Ok(name) => tracing::info!(topic = %name, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(rdkafka::error::KafkaError::AdminOp(code)).inspect_err(
                        |_| tracing::error!(topic = %name, ?code, "could not create topic"),
                    )
                }
            }
        }
        Ok(())
    }

    /// Creates the topics in the background, retrying with backoff until Kafka
    /// answers: a service comes up (not ready) even while Kafka is starting.
    pub fn ensure_topics_in_background(&self) -> tokio::task::JoinHandle<()> {
        let kafka = self.clone();
        tokio::spawn(async move {
            let mut backoff = crate::retry::Backoff::default();
            while let Err(err) = kafka.ensure_topics().await {
                tracing::warn!(%err, "could not ensure topics yet; retrying");
                backoff.wait().await;
            }
        })
    }

    /// A readiness probe: the cluster answers a metadata request.
    pub fn probe(&self) -> Probe {
        let config = self.client_config();
        Probe::new("kafka", move || {
            let config = config.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
                    let metadata = consumer
                        .fetch_metadata(None, Duration::from_secs(3))
                        .map_err(|e| e.to_string())?;
                    if metadata.brokers().is_empty() {
                        return Err("no brokers in metadata".to_string());
                    }
                    Ok(())
                })
                .await
                .map_err(|e| e.to_string())?
            }
        })
    }
}

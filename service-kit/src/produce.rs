//! The one acknowledged Kafka send of the product: every record enqueued
//! at once (a full local queue waits briefly, within the deadline), then
//! every delivery awaited until the broker confirmed it. With the
//! producers' `acks=all`, a success means Kafka has the records durably.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::time::Instant;

/// One message to send: its key and value (`None`: a tombstone).
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub key: &'a str,
    pub value: Option<&'a [u8]>,
}

impl<'a> Outgoing<'a> {
    pub fn new(key: &'a str, value: &'a [u8]) -> Self {
        Self {
            key,
            value: Some(value),
        }
    }

    pub fn tombstone(key: &'a str) -> Self {
        Self { key, value: None }
    }
}

/// Why a send was not confirmed. None of them says the records are absent
/// from the log (a record that timed out may still arrive), so a caller
/// sends again and relies on its consumers' deduplication.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the producer's queue stayed full until the deadline")]
    QueueFull,
    #[error("Kafka refused a record: {0}")]
    Refused(String),
    #[error("Kafka did not confirm in time")]
    NotConfirmed,
    #[error("Kafka did not take a record: {0}")]
    Failed(String),
    #[error("the Kafka producer shut down")]
    ProducerGone,
}

/// Sends `records` to `topic` and waits until Kafka confirmed every one,
/// or `deadline` passed. librdkafka checks its own message timeouts once a
/// second: the deadline here holds to the millisecond.
pub async fn send_acknowledged(
    producer: &FutureProducer,
    topic: &str,
    records: &[Outgoing<'_>],
    deadline: Instant,
) -> Result<(), SendError> {
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        let mut message = FutureRecord::<str, [u8]>::to(topic).key(record.key);
        if let Some(value) = record.value {
            message = message.payload(value);
        }
        loop {
            match producer.send_result(message) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    if Instant::now() >= deadline {
                        return Err(SendError::QueueFull);
                    }
                    message = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((err, _)) => return Err(SendError::Refused(err.to_string())),
            }
        }
    }
    for delivery in deliveries {
        let Ok(delivered) = tokio::time::timeout_at(deadline, delivery).await else {
            return Err(SendError::NotConfirmed);
        };
        match delivered {
            Ok(Ok(_)) => {}
            Ok(Err((err, _))) => return Err(SendError::Failed(err.to_string())),
            Err(_canceled) => return Err(SendError::ProducerGone),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;

    fn producer_of_nothing() -> FutureProducer {
        // Nothing listens there: every delivery waits for a broker.
        ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("message.timeout.ms", "60000")
            .set("log_level", "0")
            .create()
            .unwrap()
    }

    #[tokio::test]
    async fn an_unconfirmed_send_fails_at_its_deadline_not_librdkafkas() {
        let producer = producer_of_nothing();
        let started = std::time::Instant::now();
        let sent = send_acknowledged(
            &producer,
            "t",
            &[Outgoing::new("k", b"v"), Outgoing::tombstone("k")],
            Instant::now() + Duration::from_millis(300),
        )
        .await;
        assert_eq!(sent, Err(SendError::NotConfirmed));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn nothing_to_send_is_confirmed_at_once() {
        let producer = producer_of_nothing();
        let sent = send_acknowledged(&producer, "t", &[], Instant::now()).await;
        assert_eq!(sent, Ok(()));
    }
}

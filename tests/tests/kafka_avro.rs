//! Avro usage events really travel through the local Kafka: produced with the
//! settings the gateway uses (idempotent, acks=all, keyed by install_id) and
//! consumed back byte-exact, in order per installation.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use usage_e2e::{kafka_args, require_kafka, unique};
use usage_schemas::wire::AvroRecord;
use usage_schemas::UsageEvent;

fn event(install: usize, seq: usize) -> UsageEvent {
    UsageEvent {
        event_id: format!("evt_{:032x}", install * 1_000_000 + seq),
        install_id: format!("550e8400-e29b-41d4-a716-44665544000{install}_a3b4c5d6e7f8"),
        account_id: "acc_1234567890".into(),
        wp_site_id: None,
        wp_user_id_hash: format!("{:064x}", seq),
        source: ["inline", "bulk", "queue", "manual"][seq % 4].into(),
        model: "gpt-4o-mini".into(),
        prompt_tokens: 100 + seq as i64,
        completion_tokens: 20,
        total_tokens: 120 + seq as i64,
        context_json: Some(format!(r#"{{"attachment_id":{seq}}}"#)),
        created_at: 1_762_165_800_000 + seq as i64,
        processed_at: None,
        batch_sent_at: None,
        received_at: 1_762_165_900_000,
        signature_scheme: "install_sig_v1".into(),
        gateway_instance: "test".into(),
        billing_month: None,
        over_limit: None,
    }
}

#[tokio::test]
async fn avro_events_round_trip_through_kafka_in_order_per_installation() {
    let kafka = kafka_args();
    require_kafka(&kafka).await;
    kafka.ensure_topics().await.expect("topics created");

    let producer: FutureProducer = kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer");
    let mut sent: Vec<UsageEvent> = Vec::new();
    for seq in 0..60 {
        let e = event(seq % 3, seq);
        let payload = e.to_wire().unwrap();
        let record = FutureRecord::to(&kafka.events_topic)
            .key(&e.install_id)
            .payload(&payload);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("Kafka acknowledged the event");
        sent.push(e);
    }

    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", unique("test_group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&kafka.events_topic]).unwrap();

    let mut received: HashMap<String, Vec<UsageEvent>> = HashMap::new();
    let mut count = 0;
    while count < sent.len() {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("message within 30 s")
            .expect("no Kafka error");
        let decoded = UsageEvent::from_wire(msg.payload().unwrap()).expect("valid Avro");
        assert_eq!(msg.key().unwrap(), decoded.install_id.as_bytes());
        received
            .entry(decoded.install_id.clone())
            .or_default()
            .push(decoded);
        count += 1;
    }

    // Every event arrives exactly as sent, and each installation's events keep
    // their order (one key -> one partition).
    for install in 0..3 {
        let expected: Vec<_> = sent
            .iter()
            .filter(|e| e.install_id == event(install, 0).install_id)
            .cloned()
            .collect();
        assert_eq!(received[&event(install, 0).install_id], expected);
    }
    assert_eq!(received.values().map(Vec::len).sum::<usize>(), 60);
}

#[tokio::test]
async fn topics_are_created_with_the_configured_partitions_and_compaction() {
    let kafka = kafka_args();
    require_kafka(&kafka).await;
    kafka.ensure_topics().await.expect("topics created");
    // Idempotent: a second call (another service starting) is fine.
    kafka
        .ensure_topics()
        .await
        .expect("topics already exist is not an error");

    let consumer: rdkafka::consumer::BaseConsumer = kafka.client_config().create().unwrap();
    let metadata = tokio::task::spawn_blocking(move || {
        consumer
            .fetch_metadata(None, Duration::from_secs(5))
            .unwrap()
    })
    .await
    .unwrap();
    let partitions = |name: &str| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .map(|t| t.partitions().len())
    };
    assert_eq!(partitions(&kafka.events_topic), Some(4));
    assert_eq!(partitions(&kafka.installations_topic), Some(1));

    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        kafka.client_config().create().unwrap();
    let configs = admin
        .describe_configs(
            [&rdkafka::admin::ResourceSpecifier::Topic(
                &kafka.installations_topic,
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap();
    let resource = configs.into_iter().next().unwrap().unwrap();
    let policy = resource.get("cleanup.policy").and_then(|e| e.value.clone());
    assert_eq!(policy.as_deref(), Some("compact"));
}

#[tokio::test]
async fn the_gateway_producer_puts_each_installation_where_the_processors_expect_it() {
    let kafka = kafka_args();
    require_kafka(&kafka).await;
    kafka.ensure_topics().await.expect("topics created");
    let sink = usage_ingest::sink::KafkaSink::new(&kafka, Duration::from_secs(10)).unwrap();
    // 100 keys over 4 partitions: a different hash would disagree somewhere.
    for install in 0..100 {
        let e = event(install, install);
        let payload = e.to_wire().unwrap();
        let record = FutureRecord::to(&kafka.events_topic)
            .key(&e.install_id)
            .payload(&payload);
        let delivered = sink
            .producer()
            .send(record, Duration::from_secs(10))
            .await
            .expect("Kafka acknowledged the event");
        assert_eq!(
            delivered.partition,
            usage_service_kit::kafka::partition_for_key(
                e.install_id.as_bytes(),
                kafka.events_partitions
            ),
            "{}",
            e.install_id
        );
    }
}

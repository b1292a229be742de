//! Every service exposes /health, /ready and /metrics, and /ready tells the
//! truth about its Kafka and ClickHouse connections.

use std::time::Duration;

use usage_e2e::pipeline::{ingest_config, processors_config, query_config};
use usage_e2e::{
    clickhouse_args, drop_database, eventually, http, kafka_args, migrated_database, require_kafka,
};
use usage_service_kit::service::Service;

async fn ready_status(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let resp = http()
        .get(format!("http://{addr}/ready"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn wait_ready(addr: std::net::SocketAddr) -> serde_json::Value {
    eventually(
        "/ready to answer 200",
        Duration::from_secs(20),
        || async move {
            let (status, body) = ready_status(addr).await;
            (status == 200).then_some(body)
        },
    )
    .await
}

async fn check_health_and_metrics(addr: std::net::SocketAddr, service: &str, deps: &[&str]) {
    let health = http()
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"status": "ok", "service": service})
    );

    let metrics = http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status().as_u16(), 200);
    let text = metrics.text().await.unwrap();
    for dep in deps {
        let line = format!("usage_dependency_up{{dependency=\"{dep}\",service=\"{service}\"}} 1");
        assert!(text.contains(&line), "missing `{line}` in:\n{text}");
    }
}

#[tokio::test]
async fn ingest_is_ready_when_kafka_answers() {
    let kafka = kafka_args();
    require_kafka(&kafka).await;
    let gateway = usage_ingest::IngestService::start(ingest_config(&kafka))
        .await
        .unwrap();
    let addr = gateway.http.addr;
    let body = wait_ready(addr).await;
    assert_eq!(body["dependencies"]["kafka"]["ok"], true);
    assert_eq!(body["dependencies"]["registry"]["ok"], true);
    check_health_and_metrics(addr, "ingest", &["kafka", "registry"]).await;
    gateway.stop().await;
}

#[tokio::test]
async fn processors_are_ready_when_kafka_and_clickhouse_answer() {
    let kafka = kafka_args();
    require_kafka(&kafka).await;
    let clickhouse = migrated_database().await;
    let config = processors_config(&kafka, &clickhouse, &usage_e2e::unique("test_group"));
    let processors = usage_processors::Processors::start(config).await.unwrap();
    let addr = processors.http.addr;
    let body = wait_ready(addr).await;
    assert_eq!(body["dependencies"]["kafka"]["ok"], true);
    assert_eq!(body["dependencies"]["clickhouse"]["ok"], true);
    check_health_and_metrics(addr, "processors", &["kafka", "clickhouse"]).await;
    processors.stop().await;
    drop_database(&clickhouse).await;
}

#[tokio::test]
async fn query_is_ready_when_clickhouse_answers() {
    let clickhouse = migrated_database().await;
    let config = query_config(&usage_e2e::kafka_args(), &clickhouse);
    let api = usage_query::QueryApi::start(config).await.unwrap();
    wait_ready(api.http.addr).await;
    check_health_and_metrics(api.http.addr, "query", &["clickhouse"]).await;
    api.stop().await;
    drop_database(&clickhouse).await;
}

#[tokio::test]
async fn ready_is_503_with_the_reason_while_a_dependency_is_down() {
    // Nothing listens on port 1; the database does not exist either.
    let mut kafka = kafka_args();
    kafka.brokers = "127.0.0.1:1".into();
    let mut clickhouse = clickhouse_args();
    clickhouse.url = "http://127.0.0.1:1".into();
    let config = processors_config(&kafka, &clickhouse, "unused");
    let processors = usage_processors::Processors::start(config).await.unwrap();
    let addr = processors.http.addr;
    let body = eventually(
        "both probes to fail",
        Duration::from_secs(20),
        || async move {
            let (status, body) = ready_status(addr).await;
            assert_eq!(status, 503, "never ready without its dependencies: {body}");
            let checked = |d: &str| body["dependencies"][d]["detail"] != "not checked yet";
            (checked("kafka") && checked("clickhouse")).then_some(body)
        },
    )
    .await;
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["dependencies"]["kafka"]["ok"], false);
    assert_eq!(body["dependencies"]["clickhouse"]["ok"], false);
    // Liveness does not depend on the dependencies.
    let health = http()
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    processors.stop().await;
}

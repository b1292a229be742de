//! The one error type of `usage-rebuild`: each variant says what stopped
//! the operation and, where it helps, what the operator does next.

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("migrating the shadow database: {0}")]
    Migration(#[from] usage_schemas::migrations::MigrationError),
    #[error("the rebuild state in `{database}.rebuild_state` does not parse: {source}")]
    State {
        database: String,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error("writing the report: {0}")]
    Io(#[from] std::io::Error),
}

impl RebuildError {
    pub fn refused(why: impl Into<String>) -> Self {
        RebuildError::Refused(why.into())
    }
}

//! `DELETE /api/usage/installations/{install_id}`: the right to erasure.
//!
//! In this order, so that nothing can bring the data back meanwhile:
//! 1. the erasure is recorded in `erased_installations`: from then on the
//!    processors drop every event of the installation received before now,
//!    including events still in Kafka and any later replay of the topic;
//! 2. tombstones go to the registry topic (gateways forget the installation
//!    and refuse its events; its secret is gone once compacted) and to the
//!    governance topic;
//! 3. its rows are deleted from every ClickHouse table (synchronous
//!    mutations), then counted again. A batch that was being written during
//!    step 1 can land rows after these deletes; that batch then sees the
//!    record once it has written and deletes them itself
//!    (`usage_processors::rollup`). Until it has, this count can see them, so
//!    deletion repeats until every table reports none (at most a few passes;
//!    then 503 `erasure_incomplete`, and calling again finishes it).
//!
//! The answer says how many rows each table held. Erasing twice is harmless.

use std::collections::BTreeMap;
use std::time::Duration;

use clickhouse::{Client, Row};
use rdkafka::producer::FutureProducer;
use serde::Serialize;
use usage_service_kit::kafka::KafkaArgs;
use usage_service_kit::produce::{send_acknowledged, Outgoing};

use crate::error::QueryError;
use crate::events::iso_millis;

pub use usage_schemas::erasure::TABLES;

const PASSES: usize = 3;

pub struct Eraser {
    pub clickhouse: Client,
    pub producer: FutureProducer,
    pub kafka: KafkaArgs,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Erased {
    pub install_id: String,
    pub erased_at: String,
    /// Rows each table held for the installation (as readers saw them).
    pub removed: BTreeMap<String, u64>,
    /// Topics that received a tombstone for it.
    pub tombstoned: Vec<String>,
}

#[derive(Row, Serialize)]
struct ErasureRow<'a> {
    install_id: &'a str,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    erased_at: chrono::DateTime<chrono::Utc>,
    erased_by: &'a str,
    removed: String,
}

impl Eraser {
    /// Rows of the installation in `table`: as readers see them (`FINAL`,
    /// duplicates collapsed) or as stored (every physical row).
    async fn count(&self, table: &str, install_id: &str, logical: bool) -> Result<u64, QueryError> {
        let final_ = if logical { "FINAL" } else { "" };
        Ok(self
            .clickhouse
            .query(&format!(
                "SELECT count() FROM {table} {final_} WHERE install_id = {{id:String}}"
            ))
            .param("id", install_id)
            .fetch_one()
            .await?)
    }

    async fn tombstone(&self, topic: &str, install_id: &str) -> Result<(), QueryError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let tombstone = [Outgoing::tombstone(install_id)];
        send_acknowledged(&self.producer, topic, &tombstone, deadline)
            .await
            .map_err(|e| QueryError::Kafka(e.to_string()))
    }

    pub async fn erase(&self, install_id: &str, by: &str) -> Result<Erased, QueryError> {
        let now = chrono::Utc::now();
        let mut removed = BTreeMap::new();
        for table in TABLES {
            removed.insert(
                table.to_string(),
                self.count(table, install_id, true).await?,
            );
        }
        let mut insert = self
            .clickhouse
            .insert::<ErasureRow>("erased_installations")
            .await?;
        insert
            .write(&ErasureRow {
                install_id,
                erased_at: now,
                erased_by: by,
                removed: serde_json::to_string(&removed).unwrap_or_default(),
            })
            .await?;
        insert.end().await?;

        let topics = [
            self.kafka.installations_topic.clone(),
            self.kafka.governance_topic.clone(),
        ];
        for topic in &topics {
            self.tombstone(topic, install_id).await?;
        }

        for pass in 1..=PASSES {
            usage_schemas::erasure::delete_rows(&self.clickhouse, install_id).await?;
            let mut left = 0;
            for table in TABLES {
                left += self.count(table, install_id, false).await?;
            }
            if left == 0 {
                break;
            }
            tracing::warn!(
                pass,
                left,
                "rows re-appeared during the erasure; deleting again"
            );
            if pass == PASSES {
                return Err(QueryError::Incomplete(format!(
                    "{left} rows of {install_id} remain after {PASSES} passes; call again"
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tracing::info!(%install_id, ?removed, "installation erased");
        Ok(Erased {
            install_id: install_id.to_string(),
            erased_at: iso_millis(now.timestamp_millis()),
            removed,
            tombstoned: topics.to_vec(),
        })
    }
}

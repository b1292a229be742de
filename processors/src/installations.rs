//! Keeps `installation_metadata` in ClickHouse from the installations topic:
//! every field of the registry record but the secrets. ReplacingMergeTree by
//! revision makes re-reading the topic harmless, and records of an erased
//! installation written before its erasure are skipped, so re-reading the
//! topic (before compaction drops them) cannot restore it.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clickhouse::Row;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::watch;
use usage_schemas::wire::AvroRecord;
use usage_schemas::Installation;
use usage_service_kit::retry::{clickhouse_verdict, Backoff, Verdict};

#[derive(Debug, Row, Serialize)]
struct MetadataRow {
    install_id: String,
    account_id: String,
    plan: String,
    site_hash: String,
    wp_site_id: Option<u64>,
    is_multisite: bool,
    plugin_version: String,
    wordpress_version: String,
    php_version: String,
    signature_policy: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    registered_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    updated_at: DateTime<Utc>,
    revision: u64,
}

impl From<&Installation> for MetadataRow {
    fn from(r: &Installation) -> Self {
        let ts = |ms| DateTime::from_timestamp_millis(ms).unwrap_or_default();
        Self {
            install_id: r.install_id.clone(),
            account_id: r.account_id.clone(),
            plan: r.plan.clone(),
            site_hash: r.site_hash.clone(),
            wp_site_id: r.wp_site_id.and_then(|s| u64::try_from(s).ok()),
            is_multisite: r.is_multisite,
            plugin_version: r.plugin_version.clone().unwrap_or_default(),
            wordpress_version: r.wordpress_version.clone().unwrap_or_default(),
            php_version: r.php_version.clone().unwrap_or_default(),
            signature_policy: r.signature_policy.clone(),
            registered_at: ts(r.registered_at),
            updated_at: ts(r.updated_at),
            revision: u64::try_from(r.revision).unwrap_or_default(),
        }
    }
}

async fn write(
    client: &clickhouse::Client,
    rows: &[MetadataRow],
) -> Result<(), clickhouse::error::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client
        .insert::<MetadataRow>("installation_metadata")
        .await?;
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}

async fn write_unless_erased(
    client: &clickhouse::Client,
    rows: &mut Vec<MetadataRow>,
) -> Result<(), clickhouse::error::Error> {
    let erased =
        crate::rollup::erased_at(client, rows.iter().map(|r| r.install_id.as_str())).await?;
    rows.retain(|r| {
        erased
            .get(&r.install_id)
            .is_none_or(|at| r.updated_at.timestamp_millis() > *at)
    });
    write(client, rows).await
}

/// Most records written in one insert; a burst of registrations (a fleet
/// onboarding) becomes a few inserts, not one part per record.
const MAX_BATCH: usize = 5_000;
/// Longest a record waits for others to share its insert.
const MAX_WAIT: Duration = Duration::from_millis(200);

/// Follows the topic in its own consumer group until shutdown: records are
/// written in batches, and offsets committed once their batch is stored.
pub async fn run(
    consumer: StreamConsumer,
    client: clickhouse::Client,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let mut rows: Vec<MetadataRow> = Vec::new();
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        while rows.len() < MAX_BATCH {
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let msg = tokio::select! {
                _ = shutdown.changed() => return,
                _ = timer => break,
                m = consumer.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(err) => {
                    tracing::warn!(%err, "installations consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + MAX_WAIT);
            offsets.insert((msg.topic().to_string(), msg.partition()), msg.offset());
            match msg.payload().map(Installation::from_wire) {
                Some(Ok(record)) => rows.push(MetadataRow::from(&record)),
                Some(Err(err)) => {
                    tracing::error!(offset = msg.offset(), %err, "undecodable installation record skipped");
                }
                // Tombstones (erasure) are handled by the erasure flow.
                None => {}
            }
        }
        let mut backoff = Backoff::default();
        while let Err(err) = write_unless_erased(&client, &mut rows).await {
            let verdict = clickhouse_verdict(&err);
            match verdict {
                Verdict::Transient => {
                    tracing::warn!(%err, rows = rows.len(), "installation_metadata write failed; retrying");
                }
                Verdict::Permanent => {
                    tracing::error!(%err, rows = rows.len(), "installation_metadata write failed for a reason no retry cures (schema, grants); retrying until fixed");
                }
            }
            if !backoff.wait_unless(verdict, &mut shutdown).await {
                return;
            }
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &offsets {
            if let Err(err) =
                tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))
            {
                tracing::warn!(%err, "cannot build the installations offset list");
            }
        }
        // A lost commit only means re-reading records: revisions make it harmless.
        if let Err(err) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(%err, "installations offset commit failed");
        }
    }
}

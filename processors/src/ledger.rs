//! The batch ledger (`processor_batches`, migration 0015): which Kafka
//! offsets each batch is made of, recorded before its first write, and
//! whether it is done.
//!
//! A batch's id is in every deduplication token of its rollup deltas
//! (`rollup`, point 2), so writing it again adds nothing, but only if the
//! second attempt is the same batch: the same offsets. A processor that
//! takes over partitions therefore first asks the ledger for the batches
//! of those partitions that are neither done nor committed
//! ([`unfinished`]) and redoes each with exactly its recorded offsets;
//! only then does it read on, past them.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

/// One partition's offsets in a batch, both inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub partition: i32,
    pub first: i64,
    pub last: i64,
}

/// A batch as the ledger knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedBatch {
    pub id: String,
    pub ranges: Vec<Range>,
}

impl RecordedBatch {
    /// A new batch of these ranges, with a fresh id (never reused, so a
    /// token can only ever name this batch, even after the tables are
    /// emptied and the topic replayed).
    pub fn new(ranges: Vec<Range>) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            ranges,
        }
    }

    pub fn contains(&self, partition: i32, offset: i64) -> bool {
        self.ranges
            .iter()
            .any(|r| r.partition == partition && (r.first..=r.last).contains(&offset))
    }
}

#[derive(Debug, Row, Serialize, Deserialize)]
struct LedgerRow {
    topic: String,
    consumer_group: String,
    batch_id: String,
    partition: i32,
    first_offset: i64,
    last_offset: i64,
    state: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    at: DateTime<Utc>,
}

/// Where the ledger is: the database, and whose batches (topic, group).
#[derive(Clone)]
pub struct Ledger {
    pub client: Client,
    pub topic: String,
    pub group: String,
}

impl Ledger {
    fn rows(&self, batch: &RecordedBatch, state: &str) -> impl Iterator<Item = LedgerRow> + '_ {
        let at = Utc::now();
        let state = state.to_string();
        let batch = batch.clone();
        (0..batch.ranges.len()).map(move |i| {
            let r = batch.ranges[i];
            LedgerRow {
                topic: self.topic.clone(),
                consumer_group: self.group.clone(),
                batch_id: batch.id.clone(),
                partition: r.partition,
                first_offset: r.first,
                last_offset: r.last,
                state: state.clone(),
                at,
            }
        })
    }

    /// Records `batch` before its first write, and `done` (the batch
    /// before it, written and committed) in the same insert.
    pub async fn record(
        &self,
        batch: &RecordedBatch,
        done: Option<&RecordedBatch>,
    ) -> Result<(), clickhouse::error::Error> {
        let mut insert = self.client.insert::<LedgerRow>("processor_batches").await?;
        for row in self.rows(batch, "recorded") {
            insert.write(&row).await?;
        }
        if let Some(done) = done {
            for row in self.rows(done, "done") {
                insert.write(&row).await?;
            }
        }
        insert.end().await
    }

    /// Marks `batch` done (at shutdown; otherwise with the next record).
    pub async fn done(&self, batch: &RecordedBatch) -> Result<(), clickhouse::error::Error> {
        self.done_in(batch, |_| true).await
    }

    /// Marks `batch` done in the partitions `governed` says this instance
    /// governed it in: a batch redone on taking over some of its partitions
    /// stays unfinished for the owners of the others, who redo it (its
    /// writes add nothing twice) and govern their events of it.
    pub async fn done_in(
        &self,
        batch: &RecordedBatch,
        governed: impl Fn(i32) -> bool,
    ) -> Result<(), clickhouse::error::Error> {
        let mut insert = self.client.insert::<LedgerRow>("processor_batches").await?;
        for row in self.rows(batch, "done").filter(|r| governed(r.partition)) {
            insert.write(&row).await?;
        }
        insert.end().await
    }

    /// The batches with offsets in these partitions at or after their
    /// committed offset (`committed`: partition to the next offset to read)
    /// that are not done, oldest first, each with all its ranges (also
    /// those of partitions this instance does not own).
    pub async fn unfinished(
        &self,
        committed: &BTreeMap<i32, i64>,
    ) -> Result<Vec<RecordedBatch>, clickhouse::error::Error> {
        let Some(from) = committed.values().min().copied() else {
            return Ok(Vec::new());
        };
        let partitions: Vec<i32> = committed.keys().copied().collect();
        let candidates: Vec<(String, i32, i64)> = self
            .client
            .query(
                "SELECT batch_id, any(partition), max(last_offset) FROM processor_batches
                 WHERE topic = {topic:String} AND consumer_group = {group:String}
                   AND partition IN {partitions:Array(Int32)} AND first_offset >= {from:Int64}
                 GROUP BY batch_id, partition
                 HAVING countIf(state = 'done') = 0",
            )
            .param("topic", &self.topic)
            .param("group", &self.group)
            .param("partitions", &partitions)
            .param("from", from)
            .fetch_all()
            .await?;
        let ids: Vec<String> = candidates
            .into_iter()
            .filter(|(_, p, last)| committed.get(p).is_some_and(|c| last >= c))
            .map(|(id, _, _)| id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, i32, i64, i64)> = self
            .client
            .query(
                "SELECT DISTINCT batch_id, partition, first_offset, last_offset FROM processor_batches
                 WHERE topic = {topic:String} AND consumer_group = {group:String}
                   AND batch_id IN {ids:Array(String)} AND state = 'recorded'",
            )
            .param("topic", &self.topic)
            .param("group", &self.group)
            .param("ids", &ids)
            .fetch_all()
            .await?;
        Ok(assemble(rows))
    }
}

/// Batches from ledger rows, oldest first (by their smallest first offset
/// in any partition, then id: batches of one partition never overlap).
fn assemble(rows: Vec<(String, i32, i64, i64)>) -> Vec<RecordedBatch> {
    let mut by_id: HashMap<String, Vec<Range>> = HashMap::new();
    for (id, partition, first, last) in rows {
        by_id.entry(id).or_default().push(Range {
            partition,
            first,
            last,
        });
    }
    let mut batches: Vec<RecordedBatch> = by_id
        .into_iter()
        .map(|(id, mut ranges)| {
            ranges.sort_by_key(|r| r.partition);
            RecordedBatch { id, ranges }
        })
        .collect();
    batches.sort_by(|a, b| {
        let key = |b: &RecordedBatch| b.ranges.iter().map(|r| r.first).min().unwrap_or(0);
        key(a).cmp(&key(b)).then_with(|| a.id.cmp(&b.id))
    });
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_assembled_per_id_oldest_first() {
        let rows = vec![
            ("b".to_string(), 1, 200, 299),
            ("a".to_string(), 0, 10, 19),
            ("b".to_string(), 0, 20, 29),
            ("a".to_string(), 1, 100, 199),
        ];
        let batches = assemble(rows);
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].id, "a");
        assert_eq!(
            batches[0].ranges,
            vec![
                Range {
                    partition: 0,
                    first: 10,
                    last: 19
                },
                Range {
                    partition: 1,
                    first: 100,
                    last: 199
                }
            ]
        );
        assert!(batches[1].contains(1, 250));
        assert!(!batches[1].contains(1, 300));
        assert!(!batches[1].contains(2, 250));
    }

    #[test]
    fn every_batch_gets_its_own_id() {
        let r = vec![Range {
            partition: 0,
            first: 0,
            last: 9,
        }];
        assert_ne!(RecordedBatch::new(r.clone()).id, RecordedBatch::new(r).id);
    }
}

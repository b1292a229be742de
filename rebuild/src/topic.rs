//! The events topic as the rebuild reads it: its partitions' offsets, the
//! live processors' committed offsets (read, never written), and a reader
//! of exact offset ranges. The reader assigns partitions itself under a
//! consumer group of its own that never commits, so the live group's
//! offsets and membership are never touched.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use usage_service_kit::kafka::KafkaArgs;

use crate::error::RebuildError;

const TIMEOUT: Duration = Duration::from_secs(10);

/// How long a partition may give nothing while offsets remain to read
/// before the read fails (instead of waiting forever on a gap).
const STUCK_AFTER: Duration = Duration::from_secs(60);

fn consumer(kafka: &KafkaArgs, group: &str) -> Result<BaseConsumer, RebuildError> {
    let mut config = kafka.client_config();
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // An offset gone by retention mid-read must fail, not skip.
        .set("auto.offset.reset", "error")
        // Bulk reads: large fetches, a deep prefetch queue.
        .set("fetch.max.bytes", "104857600")
        .set("max.partition.fetch.bytes", "16777216")
        .set("queued.max.messages.kbytes", "262144")
        .set("fetch.wait.max.ms", "100");
    Ok(config.create()?)
}

/// Per partition: (log start, end) offsets.
pub fn watermarks(kafka: &KafkaArgs) -> Result<BTreeMap<i32, (i64, i64)>, RebuildError> {
    let c = consumer(kafka, "usage-rebuild-metadata")?;
    let topic = &kafka.events_topic;
    let metadata = c.fetch_metadata(Some(topic), TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(RebuildError::refused(format!(
            "the events topic `{topic}` has no partitions (does it exist?)"
        )));
    }
    let mut out = BTreeMap::new();
    for p in partitions {
        out.insert(p, c.fetch_watermarks(topic, p, TIMEOUT)?);
    }
    Ok(out)
}

/// The live group's committed offsets (the next offset each partition
/// reads); a partition the group never committed reads from its log start.
pub fn committed(
    kafka: &KafkaArgs,
    group: &str,
    marks: &BTreeMap<i32, (i64, i64)>,
) -> Result<BTreeMap<i32, i64>, RebuildError> {
    // Asking for a group's offsets does not join it.
    let c = consumer(kafka, group)?;
    let mut tpl = TopicPartitionList::new();
    for p in marks.keys() {
        tpl.add_partition(&kafka.events_topic, *p);
    }
    let offsets = c.committed_offsets(tpl, TIMEOUT)?;
    Ok(marks
        .iter()
        .map(|(p, (lo, _))| {
            let at = offsets
                .find_partition(&kafka.events_topic, *p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(*lo);
            (*p, at.max(*lo))
        })
        .collect())
}

/// The live group's committed offsets now, and the topic's partition
/// count, off the async threads.
pub async fn live_offsets(
    kafka: &KafkaArgs,
    group: &str,
) -> Result<(BTreeMap<i32, i64>, i32), RebuildError> {
    let kafka = kafka.clone();
    let group = group.to_string();
    tokio::task::spawn_blocking(move || {
        let marks = watermarks(&kafka)?;
        let partitions = i32::try_from(marks.len()).unwrap_or(i32::MAX);
        Ok::<_, RebuildError>((committed(&kafka, &group, &marks)?, partitions))
    })
    .await
    .map_err(|e| RebuildError::refused(format!("Kafka metadata task failed: {e}")))?
}

/// Reads every message with an offset in `[from, to)` of each partition
/// (`ranges`: partition to (from, to)), in offset order per partition,
/// calling `each(partition, offset, key, payload)`; `Break` stops the read.
/// Blocking: run it on a blocking thread.
pub fn read_ranges(
    kafka: &KafkaArgs,
    group: &str,
    ranges: &BTreeMap<i32, (i64, i64)>,
    mut each: impl FnMut(i32, i64, Option<&[u8]>, Option<&[u8]>) -> ControlFlow<()>,
) -> Result<(), RebuildError> {
    let mut left: BTreeMap<i32, (i64, i64)> = ranges
        .iter()
        .filter(|(_, (from, to))| from < to)
        .map(|(p, r)| (*p, *r))
        .collect();
    if left.is_empty() {
        return Ok(());
    }
    let c = consumer(kafka, group)?;
    let mut tpl = TopicPartitionList::new();
    for (p, (from, _)) in &left {
        tpl.add_partition_offset(&kafka.events_topic, *p, Offset::Offset(*from))?;
    }
    c.assign(&tpl)?;
    let mut last_progress = Instant::now();
    while !left.is_empty() {
        let Some(msg) = c.poll(Duration::from_millis(500)) else {
            if last_progress.elapsed() > STUCK_AFTER {
                let (p, (from, to)) = left
                    .iter()
                    .next()
                    .map(|(p, r)| (*p, *r))
                    .unwrap_or_default();
                return Err(RebuildError::refused(format!(
                    "partition {p} of `{}` gave nothing for {} s at offset {from} of {to}: is the broker up, and the offsets still retained?",
                    kafka.events_topic,
                    STUCK_AFTER.as_secs()
                )));
            }
            continue;
        };
        let msg = msg?;
        last_progress = Instant::now();
        let (p, offset) = (msg.partition(), msg.offset());
        let Some((_, to)) = left.get(&p).copied() else {
            continue;
        };
        if offset >= to {
            left.remove(&p);
            continue;
        }
        if let Some(r) = left.get_mut(&p) {
            r.0 = offset + 1;
        }
        if each(p, offset, msg.key(), msg.payload()).is_break() {
            return Ok(());
        }
        if offset + 1 >= to {
            left.remove(&p);
        }
    }
    Ok(())
}

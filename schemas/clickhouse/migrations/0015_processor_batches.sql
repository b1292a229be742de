-- The processors' batch ledger (issue 13): before a batch's rollup deltas
-- are written, the processor records which Kafka offsets the batch is made
-- of (one row per partition, all with the batch's id), and once the batch is
-- written, governed and committed it records it done (state 'done', with
-- the next batch's record or at shutdown). The batch's id is part of every
-- deduplication token of its deltas. A processor that takes over partitions
-- (after a crash, a restart or a rebalance) first redoes every batch of its
-- partitions recorded but not done and not committed, with exactly the
-- offsets recorded, so its deltas carry the same tokens and ClickHouse
-- drops the copies of those already written; only then does it go on.
-- Rows expire after 7 days: a batch is redone as soon as a processor
-- owns its partitions again.

CREATE TABLE IF NOT EXISTS processor_batches
(
    topic        LowCardinality(String),
    -- Offsets are committed per consumer group: so are batches.
    consumer_group LowCardinality(String),
    batch_id     String,
    partition    Int32,
    first_offset Int64,
    last_offset  Int64,
    -- 'recorded' before the writes, 'done' after the commit.
    state        LowCardinality(String),
    at           DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (topic, consumer_group, partition, first_offset, batch_id, state)
TTL toDateTime(at) + INTERVAL 7 DAY DELETE;

-- Daily rollup per installation, day, user hash, source and model, kept 2 years.
--
-- Rows are not incremented: the processors recompute the complete row set of
-- every (install_id, date) a batch touched, from the deduplicated raw events,
-- and insert it with a higher `version`. ReplacingMergeTree(version) keeps the
-- newest; readers use FINAL. A rollup row is therefore a pure function of the
-- raw events, so redelivery and replays from any offset rebuild the same
-- numbers instead of adding to them.
--
-- The sorting key is the replacement key and serves the summary API
-- (install_id + date range, grouped by day, user or source). Monthly partitions
-- keep 24 partitions for the 2-year TTL.
CREATE TABLE IF NOT EXISTS usage_daily
(
    install_id        String,
    date              Date,
    user_hash         String,
    source            LowCardinality(String),
    model             LowCardinality(String),
    account_id        LowCardinality(String),
    requests          UInt64,
    prompt_tokens     UInt64,
    completion_tokens UInt64,
    total_tokens      UInt64,
    cost_usd          Decimal(38, 12),
    -- Nanoseconds since the epoch at recompute time: the newest recompute wins.
    version           UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(date)
ORDER BY (install_id, date, user_hash, source, model)
TTL date + INTERVAL 2 YEAR DELETE;

-- Raw usage events: one row per accepted event, kept 90 days.
--
-- Queries served: the raw-events API and CSV export (always one install_id,
-- a created_at range, optional user_hash/source filters) and the rollup
-- recompute (one install_id and day at a time). Hence the sorting key starts
-- with install_id and the day, so both read a contiguous slice of the index.
--
-- Exact dedup by event_id: event_id closes the sorting key, so every copy of
-- an event (plugin retry, gateway retry, Kafka redelivery, replay) has the
-- same key and ReplacingMergeTree keeps one. The processors also drop
-- event_ids already stored before inserting (the bloom filter below makes that
-- lookup cheap), and readers that need exact numbers before merges happen use
-- FINAL on a key range, so counts never depend on merge timing.
--
-- Partitions are months of created_at: few, large parts, and a month is the
-- unit an operator drops or re-imports. TTL deletes rows 90 days after the
-- generation (the contract's retention), row by row during merges.
CREATE TABLE IF NOT EXISTS usage_events
(
    event_id          String,
    install_id        String,
    account_id        LowCardinality(String),
    wp_site_id        Nullable(UInt64),
    user_hash         String,
    source            LowCardinality(String),
    model             LowCardinality(String),
    prompt_tokens     UInt32,
    completion_tokens UInt32,
    total_tokens      UInt32,
    -- Priced by the processor from the dated price table at created_at.
    -- Scale 12 keeps per-token prices (USD per 1k tokens / 1000) exact.
    cost_usd          Decimal(18, 12),
    -- The site's context object as JSON text: stored, never trusted or parsed.
    context           String CODEC(ZSTD(3)),
    created_at        DateTime64(3, 'UTC'),
    processed_at      Nullable(DateTime64(3, 'UTC')),
    batch_sent_at     Nullable(DateTime64(3, 'UTC')),
    received_at       DateTime64(3, 'UTC'),
    signature_scheme  LowCardinality(String),
    gateway_instance  LowCardinality(String),
    INDEX idx_event_id event_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_user_hash user_hash TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(created_at)
ORDER BY (install_id, toDate(created_at), event_id)
TTL toDateTime(created_at) + INTERVAL 90 DAY DELETE;

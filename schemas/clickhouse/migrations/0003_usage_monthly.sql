-- Monthly rollup, kept forever (billing history).
--
-- Recomputed from usage_daily FINAL for every (install_id, month) a batch
-- touched, same replace-by-version scheme as the daily rollup. `month` is the
-- first day of the month. No TTL: monthly aggregates are the long-term record
-- once raw events (90 days) and daily rows (2 years) have expired.
CREATE TABLE IF NOT EXISTS usage_monthly
(
    install_id        String,
    month             Date,
    user_hash         String,
    source            LowCardinality(String),
    model             LowCardinality(String),
    account_id        LowCardinality(String),
    requests          UInt64,
    prompt_tokens     UInt64,
    completion_tokens UInt64,
    total_tokens      UInt64,
    cost_usd          Decimal(38, 12),
    version           UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYear(month)
ORDER BY (install_id, month, user_hash, source, model);

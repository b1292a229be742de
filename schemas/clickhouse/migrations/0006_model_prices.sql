-- The dated price table the processors price events with (USD per 1,000
-- tokens). A price change is a new row with the date it takes effect; an event
-- uses the row of its model with the latest effective_from on or before its
-- created_at day; a model with no row is priced as gpt-4o-mini.
--
-- ReplacingMergeTree(updated_at) keyed by (model, effective_from): correcting
-- a price is re-inserting the same key, and re-running this migration's seed
-- is harmless.
CREATE TABLE IF NOT EXISTS model_prices
(
    model                 LowCardinality(String),
    effective_from        Date,
    prompt_usd_per_1k     Decimal(18, 12),
    completion_usd_per_1k Decimal(18, 12),
    updated_at            DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (model, effective_from);

-- The contract's prices (as of 2025-11), in force for every event before the
-- first dated change.
INSERT INTO model_prices (model, effective_from, prompt_usd_per_1k, completion_usd_per_1k) VALUES
    ('gpt-4o-mini', '1970-01-01', 0.00015, 0.0006),
    ('gpt-4o', '1970-01-01', 0.0025, 0.01),
    ('gpt-4-turbo', '1970-01-01', 0.01, 0.03);

-- usage_daily becomes a SummingMergeTree of deltas (issue 13).
--
-- Until now every batch recomputed each touched (installation, day) from
-- `usage_events FINAL` and replaced the daily rows (ReplacingMergeTree by
-- version): exact, but the work grew with what was already stored, not with
-- what arrived. Now the processors add, for each batch, the sums of the
-- events stored for the first time, and the engine sums rows of the same key
-- when parts merge (queries read with FINAL, which sums the parts not merged
-- yet, or group and sum themselves). A batch's deltas are inserted with an
-- `insert_deduplication_token` derived from the batch's recorded Kafka
-- offset ranges (`processor_batches`, migration 0015), so a retried or
-- redelivered batch adds nothing: `non_replicated_deduplication_window`
-- keeps the tokens of the last 100,000 inserts (days of inserts at the
-- processors' rate; a redelivery comes within minutes).
--
-- Rebuilt by copying the current rows (FINAL: the newest version of each
-- key, which is exactly the sum of its events) and swapping; `version` is
-- gone. The processors must be stopped: the checks refuse to swap while an
-- old processor writes.

DROP TABLE IF EXISTS usage_daily_rebuild SYNC;

SELECT throwIf(count() > 0,
    'an INSERT into usage_daily is running: stop the processors (and wait for their last query), then run usage-migrate again')
FROM system.processes
WHERE current_database = currentDatabase() AND match(query, '^\\s*INSERT\\s+INTO\\s+usage_daily\\s');

CREATE TABLE usage_daily_rebuild
(
    install_id          String,
    date                Date,
    user_hash           String,
    source              LowCardinality(String),
    model               LowCardinality(String),
    late_billing_month  Date,
    account_id          LowCardinality(String),
    requests            UInt64,
    prompt_tokens       UInt64,
    completion_tokens   UInt64,
    total_tokens        UInt64,
    cost_usd            Decimal(38, 12),
    over_limit_requests UInt64,
    over_limit_tokens   UInt64
)
ENGINE = SummingMergeTree((requests, prompt_tokens, completion_tokens, total_tokens, cost_usd,
                           over_limit_requests, over_limit_tokens))
PARTITION BY toYYYYMM(date)
ORDER BY (install_id, date, user_hash, source, model, late_billing_month)
TTL date + INTERVAL 2 YEAR DELETE
SETTINGS index_granularity = 1024, non_replicated_deduplication_window = 100000;

INSERT INTO usage_daily_rebuild
    (install_id, date, user_hash, source, model, late_billing_month, account_id, requests,
     prompt_tokens, completion_tokens, total_tokens, cost_usd, over_limit_requests, over_limit_tokens)
SELECT install_id, date, user_hash, source, model, late_billing_month, account_id, requests,
       prompt_tokens, completion_tokens, total_tokens, cost_usd, over_limit_requests, over_limit_tokens
FROM usage_daily FINAL;

SELECT throwIf(
    (SELECT (count(), sum(requests)) FROM usage_daily FINAL WHERE date > today() - INTERVAL 2 YEAR + INTERVAL 1 DAY)
        != (SELECT (count(), sum(requests)) FROM usage_daily_rebuild FINAL WHERE date > today() - INTERVAL 2 YEAR + INTERVAL 1 DAY),
    'usage_daily was written while it was being copied: stop the processors, then run usage-migrate again');

SELECT throwIf(count() > 0,
    'an INSERT into usage_daily is running: stop the processors (and wait for their last query), then run usage-migrate again')
FROM system.processes
WHERE current_database = currentDatabase() AND match(query, '^\\s*INSERT\\s+INTO\\s+usage_daily\\s');

EXCHANGE TABLES usage_daily AND usage_daily_rebuild;

DROP TABLE IF EXISTS usage_daily_rebuild SYNC;

-- usage_monthly becomes a SummingMergeTree of deltas, like usage_daily
-- (migration 0012, which says why).

DROP TABLE IF EXISTS usage_monthly_rebuild SYNC;

SELECT throwIf(count() > 0,
    'an INSERT into usage_monthly is running: stop the processors (and wait for their last query), then run usage-migrate again')
FROM system.processes
WHERE current_database = currentDatabase() AND match(query, '^\\s*INSERT\\s+INTO\\s+usage_monthly\\s');

CREATE TABLE usage_monthly_rebuild
(
    install_id          String,
    month               Date,
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
PARTITION BY toYear(month)
ORDER BY (install_id, month, user_hash, source, model, late_billing_month)
SETTINGS non_replicated_deduplication_window = 100000;

INSERT INTO usage_monthly_rebuild
    (install_id, month, user_hash, source, model, late_billing_month, account_id, requests,
     prompt_tokens, completion_tokens, total_tokens, cost_usd, over_limit_requests, over_limit_tokens)
SELECT install_id, month, user_hash, source, model, late_billing_month, account_id, requests,
       prompt_tokens, completion_tokens, total_tokens, cost_usd, over_limit_requests, over_limit_tokens
FROM usage_monthly FINAL;

SELECT throwIf(
    (SELECT (count(), sum(requests)) FROM usage_monthly FINAL)
        != (SELECT (count(), sum(requests)) FROM usage_monthly_rebuild FINAL),
    'usage_monthly was written while it was being copied: stop the processors, then run usage-migrate again');

SELECT throwIf(count() > 0,
    'an INSERT into usage_monthly is running: stop the processors (and wait for their last query), then run usage-migrate again')
FROM system.processes
WHERE current_database = currentDatabase() AND match(query, '^\\s*INSERT\\s+INTO\\s+usage_monthly\\s');

EXCHANGE TABLES usage_monthly AND usage_monthly_rebuild;

DROP TABLE IF EXISTS usage_monthly_rebuild SYNC;

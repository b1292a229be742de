-- usage_install_daily becomes a SummingMergeTree of deltas, like usage_daily
-- (migration 0012, which says why): one row per (day, installation) once
-- merged; queries read it with FINAL or sum it.

DROP TABLE IF EXISTS usage_install_daily_rebuild SYNC;

SELECT throwIf(count() > 0,
    'an INSERT into usage_install_daily is running: stop the processors (and wait for their last query), then run usage-migrate again')
FROM system.processes
WHERE current_database = currentDatabase() AND match(query, '^\\s*INSERT\\s+INTO\\s+usage_install_daily\\s');

CREATE TABLE usage_install_daily_rebuild
(
    date                Date,
    install_id          String,
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
ORDER BY (date, install_id)
TTL date + INTERVAL 2 YEAR DELETE
SETTINGS non_replicated_deduplication_window = 100000;

INSERT INTO usage_install_daily_rebuild
    (date, install_id, requests, prompt_tokens, completion_tokens, total_tokens, cost_usd,
     over_limit_requests, over_limit_tokens)
SELECT date, install_id, requests, prompt_tokens, completion_tokens, total_tokens, cost_usd,
       over_limit_requests, over_limit_tokens
FROM usage_install_daily FINAL;

SELECT throwIf(
    (SELECT (count(), sum(requests)) FROM usage_install_daily FINAL WHERE date > today() - INTERVAL 2 YEAR + INTERVAL 1 DAY)
        != (SELECT (count(), sum(requests)) FROM usage_install_daily_rebuild FINAL WHERE date > today() - INTERVAL 2 YEAR + INTERVAL 1 DAY),
    'usage_install_daily was written while it was being copied: stop the processors, then run usage-migrate again');

SELECT throwIf(count() > 0,
    'an INSERT into usage_install_daily is running: stop the processors (and wait for their last query), then run usage-migrate again')
FROM system.processes
WHERE current_database = currentDatabase() AND match(query, '^\\s*INSERT\\s+INTO\\s+usage_install_daily\\s');

EXCHANGE TABLES usage_install_daily AND usage_install_daily_rebuild;

DROP TABLE IF EXISTS usage_install_daily_rebuild SYNC;

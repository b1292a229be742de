-- usage_daily rebuilt with granules of 1,024 rows (was ClickHouse's default
-- of 8,192). Same columns, engine, keys, partitions and TTL as 0002.
--
-- Why: a summary reads one installation's rows over a date range, and
-- FINAL reads at least one whole granule of every part holding any of
-- them. On the 100M-event bench an installation has ~1,000 daily rows a
-- year; right after a bulk load (62 parts) a 1-year summary read 508k rows
-- (89 MB) for them, 8,192 a part, p99 155-172 ms. With 1,024-row granules
-- it reads about an eighth of that, p99 65-94 ms (BENCHMARKS.md, the
-- 2026-12-01 section).
--
-- The price: 8 times as many marks (a primary index of 5 MiB in memory
-- for 98M rows instead of 0.6 MiB); and the processors' recomputes, which
-- read usage_daily by key too, drained ~11% slower where every batch
-- touches nearly every installation (200 of them), and 1% and 15% slower
-- in two rounds with 100k installations. Where the keys are sparse in a
-- large table they read less: over the 98M rows, a recompute for 2,000
-- random keys reads 2.1M rows instead of 7.4M (376-415 ms, was 575 ms).
--
-- index_granularity is fixed when a table is created, so the rows are
-- copied into a new table and the two are swapped (EXCHANGE is atomic:
-- readers see the old table or the new one, never a half-copied one).
-- Writers must be stopped meanwhile (README, "upgrade order"): a batch
-- written to the old table during the copy would be lost with it. Two
-- checks catch a writer left running, and stop the migration with a
-- message (it can then simply be run again): no INSERT into usage_daily
-- may be running before the copy or before the swap, and no row may have
-- come in meanwhile. They cannot see a write that starts between the last
-- check and the swap, so stopping the writers stays required. The copy of
-- 98M rows (1.4 GiB) took 51-66 s on a 2-core machine (BENCHMARKS.md), and
-- needs the table's size again in free disk until the old table is
-- dropped.
--
-- A run that died anywhere is repaired by running the file again: the
-- first statement drops whatever the dead run left under the new name (a
-- partial copy, or the old table once swapped out), and the copy is made
-- again from usage_daily, whichever of the two tables it is by then.

DROP TABLE IF EXISTS usage_daily_rebuild SYNC;

-- (The pattern matches usage_daily followed by white space, never the
-- scratch table, whose name goes on.)
SELECT throwIf(count() > 0,
    'an INSERT into usage_daily is running: stop the processors (and wait for their last query), then run usage-migrate again')
FROM system.processes
WHERE current_database = currentDatabase() AND match(query, '^\\s*INSERT\\s+INTO\\s+usage_daily\\s');

CREATE TABLE usage_daily_rebuild
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
    version           UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(date)
ORDER BY (install_id, date, user_hash, source, model)
TTL date + INTERVAL 2 YEAR DELETE
SETTINGS index_granularity = 1024;

INSERT INTO usage_daily_rebuild
    (install_id, date, user_hash, source, model, account_id, requests, prompt_tokens,
     completion_tokens, total_tokens, cost_usd, version)
SELECT install_id, date, user_hash, source, model, account_id, requests, prompt_tokens,
       completion_tokens, total_tokens, cost_usd, version
FROM usage_daily;

-- A recompute written during the copy carries a newer version than any row
-- copied (from one clock: with several writers a late insert of an older
-- recompute can slip by). Rows at the TTL's edge are left out on both
-- sides: the copy may drop what expired meanwhile.
SELECT throwIf(
    (SELECT max(version) FROM usage_daily WHERE date > today() - INTERVAL 2 YEAR + INTERVAL 1 DAY)
        != (SELECT max(version) FROM usage_daily_rebuild WHERE date > today() - INTERVAL 2 YEAR + INTERVAL 1 DAY),
    'usage_daily was written while it was being copied: stop the processors, then run usage-migrate again');

SELECT throwIf(count() > 0,
    'an INSERT into usage_daily is running: stop the processors (and wait for their last query), then run usage-migrate again')
FROM system.processes
WHERE current_database = currentDatabase() AND match(query, '^\\s*INSERT\\s+INTO\\s+usage_daily\\s');

EXCHANGE TABLES usage_daily AND usage_daily_rebuild;

-- The old table, once swapped out.
DROP TABLE IF EXISTS usage_daily_rebuild SYNC;

-- One row per installation and day: the totals of every usage_daily row of
-- that (install_id, date), for the provider's installations list, which
-- aggregates a date range over every installation. Summing these rows reads
-- about a third of the rows of usage_daily (one per user, source and model
-- there) and none of its strings.
--
-- Maintained like the other rollups: after recomputing the daily rows of an
-- (install_id, date), the processors recompute its row here from them and
-- insert it with a higher `version`; ReplacingMergeTree(version) keeps the
-- newest and readers use FINAL. It is thus a pure function of the
-- deduplicated raw events, rebuilt exactly by a replay.
--
-- Sorted by date first: the list's filter is a date range over all
-- installations. Monthly partitions and the 2-year TTL follow usage_daily.
CREATE TABLE IF NOT EXISTS usage_install_daily
(
    date              Date,
    install_id        String,
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
ORDER BY (date, install_id)
TTL date + INTERVAL 2 YEAR DELETE;

-- Existing rollups, so the list is complete as soon as the table exists.
-- Running it again (a crash before the migration was recorded) inserts the
-- same totals with a newer version.
INSERT INTO usage_install_daily
    (date, install_id, requests, prompt_tokens, completion_tokens, total_tokens, cost_usd, version)
SELECT date, install_id, sum(requests), sum(prompt_tokens), sum(completion_tokens),
       sum(total_tokens), sum(cost_usd), toUnixTimestamp64Nano(now64(9))
FROM usage_daily FINAL
GROUP BY install_id, date;

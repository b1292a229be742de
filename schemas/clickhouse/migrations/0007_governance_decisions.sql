-- The history of governance decisions (rate limited, abuse and spike flags,
-- cap warnings, blocks, unblocks), for the dashboard; the same records as the
-- decisions topic.
--
-- decision_id is derived from the decision's content, so a replay or a
-- processor restart that decides the same thing again writes the same id:
-- ReplacingMergeTree keyed by (install_id, decision_id) keeps one. `at` is
-- the event time of the event that caused the decision, so a decision always
-- lands in the same monthly partition. Kept 2 years, like the daily rollup.
CREATE TABLE IF NOT EXISTS governance_decisions
(
    decision_id String,
    install_id  String,
    kind        LowCardinality(String),
    reason      String,
    at          DateTime64(3, 'UTC'),
    recorded_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (install_id, decision_id)
TTL toDateTime(at) + INTERVAL 2 YEAR DELETE;

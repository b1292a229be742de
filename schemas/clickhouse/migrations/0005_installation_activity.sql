-- First and last generation seen per installation, kept forever.
--
-- min/max are idempotent, so an AggregatingMergeTree fed by a materialized
-- view on the raw table stays exact under duplicates and replays, and it
-- outlives the raw events' 90-day TTL.
CREATE TABLE IF NOT EXISTS installation_activity
(
    install_id String,
    first_seen SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_seen  SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
ORDER BY install_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS installation_activity_mv TO installation_activity AS
SELECT
    install_id,
    min(created_at) AS first_seen,
    max(created_at) AS last_seen
FROM usage_events
GROUP BY install_id;

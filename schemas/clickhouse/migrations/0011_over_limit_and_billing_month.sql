-- Every generation is recorded, also while its installation is over a
-- limit, and counts toward a billing period the site's clock cannot move.
--
-- usage_events.over_limit: why the gateway saw the event arrive over a
-- limit (plan_limit_reached, rate_limited, abuse_flagged), '' when within
-- every limit. The gateway stamps it on the event; nothing is refused for it.
--
-- usage_events.billing_month: the month the event counts toward for caps
-- and billing. It is its created_at month, unless it arrived after that
-- month had closed for longer than the late grace (48 h): then the month it
-- arrived in. created_at stays what the site said, for reports. Rows written
-- before this migration read the created_at month (the DEFAULT).
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS over_limit LowCardinality(String) DEFAULT '';
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS billing_month Date DEFAULT toStartOfMonth(created_at);

-- Governance windows run on the gateway's received_at (an event counts at
-- its created_at clamped to [received_at - grace, received_at]), so a
-- rebuild reads an installation's events by received_at: this lets it skip
-- the granules of older arrivals. Parts written before get it when merged.
ALTER TABLE usage_events ADD INDEX IF NOT EXISTS idx_received_at received_at TYPE minmax GRANULARITY 1;

-- The rollups keep late events apart: late_billing_month is the billing
-- month of events that arrived after their month closed, and 1970-01-01
-- (zero) for all others, whose billing month is their own date's. It closes
-- the sorting key, so a late and an on-time event of one day, user, source
-- and model are two rows, and a recompute replaces each with its own. ClickHouse
-- lets a sorting key grow only by a column added in the same ALTER, without
-- a default, which is why the zero means "the row's own month" (existing
-- rows read zero, and recomputes write zero for them again).
--
-- over_limit_requests / over_limit_tokens: the events of the row that
-- arrived over a limit (over_limit != ''): the overage a billing report shows.
ALTER TABLE usage_daily ADD COLUMN IF NOT EXISTS late_billing_month Date, MODIFY ORDER BY (install_id, date, user_hash, source, model, late_billing_month);
ALTER TABLE usage_daily ADD COLUMN IF NOT EXISTS over_limit_requests UInt64 DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN IF NOT EXISTS over_limit_tokens UInt64 DEFAULT 0;

ALTER TABLE usage_monthly ADD COLUMN IF NOT EXISTS late_billing_month Date, MODIFY ORDER BY (install_id, month, user_hash, source, model, late_billing_month);
ALTER TABLE usage_monthly ADD COLUMN IF NOT EXISTS over_limit_requests UInt64 DEFAULT 0;
ALTER TABLE usage_monthly ADD COLUMN IF NOT EXISTS over_limit_tokens UInt64 DEFAULT 0;

ALTER TABLE usage_install_daily ADD COLUMN IF NOT EXISTS over_limit_requests UInt64 DEFAULT 0;
ALTER TABLE usage_install_daily ADD COLUMN IF NOT EXISTS over_limit_tokens UInt64 DEFAULT 0;

-- Decisions are episodes: a start, extensions at most once a minute per
-- kind, an end. phase says which; episode_id links an extension or an end
-- to its start; until is when a rate limit frees, as known then. Rows
-- written before read as starts.
ALTER TABLE governance_decisions ADD COLUMN IF NOT EXISTS phase LowCardinality(String) DEFAULT 'start';
ALTER TABLE governance_decisions ADD COLUMN IF NOT EXISTS episode_id String DEFAULT '';
ALTER TABLE governance_decisions ADD COLUMN IF NOT EXISTS until Nullable(DateTime64(3, 'UTC'));

//! `GET /provider/installations/{install_id}`: one installation in depth.
//!
//! What the registry knows (account, plan, site hash, versions, signature
//! policy), when it was first and last seen, its usage all time and this
//! month, where it stands on its plan's monthly cap (the thresholds at 75,
//! 90 and 100% by default, as the governance policy sets them) and which
//! governance episodes are open now.
//!
//! The cap counts the billing month as the processors do: the events created
//! this month, less those that arrived after the month closed (which count
//! toward their arrival month), plus this month's late arrivals.
//!
//! The timeline, per-user, source and model breakdowns come from
//! `/provider/usage/summary`; the governance history from
//! `/provider/usage/decisions`.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};
use usage_service_kit::policy::Policy;

use crate::error::QueryError;
use crate::events::iso_millis;
use crate::fleet::overview::Usage;
use crate::fleet::usd;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Installation {
    pub install_id: String,
    pub account_id: String,
    pub plan: String,
    pub site_hash: String,
    pub wp_site_id: Option<u64>,
    pub is_multisite: bool,
    pub plugin_version: String,
    pub wordpress_version: String,
    pub php_version: String,
    pub signature_policy: String,
    pub registered_at: String,
    pub updated_at: String,
    /// First and last generation (`null` before the first).
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub usage: InstallationUsage,
    pub cap: CapProgress,
    pub open_episodes: Vec<Episode>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InstallationUsage {
    pub all_time: Usage,
    pub month_to_date: Usage,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Threshold {
    pub level: &'static str,
    pub percent: f64,
    /// The generation at which the level starts.
    pub at: u64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CapProgress {
    pub billing_month: String,
    /// Generations counted toward the billing month.
    pub used: u64,
    /// `null`: the plan has no cap.
    pub cap: Option<u64>,
    pub percent: Option<f64>,
    /// `ok`, `warning`, `critical` or `blocked`.
    pub level: &'static str,
    pub thresholds: Vec<Threshold>,
}

#[derive(Debug, Row, Deserialize)]
struct EpisodeRow {
    kind_name: String,
    episode_id: String,
    since_ms: i64,
    reason: String,
    until_ms: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Episode {
    pub kind: String,
    pub episode_id: String,
    pub since: String,
    pub reason: String,
    /// When a rate limit frees, as known when it was last extended.
    pub until: Option<String>,
}

#[derive(Debug, Row, Deserialize)]
struct MetadataRow {
    account: String,
    plan_name: String,
    site_hash: String,
    wp_site_id: Option<u64>,
    is_multisite: bool,
    plugin_version: String,
    wordpress_version: String,
    php_version: String,
    policy: String,
    registered_ms: i64,
    updated_ms: i64,
}

pub async fn installation(
    client: &Client,
    policy: &Policy,
    install_id: &str,
    now: DateTime<Utc>,
) -> Result<Installation, QueryError> {
    let q = |sql: &str| client.query(sql).param("id", install_id);
    let meta: Option<MetadataRow> = q(
        "SELECT toString(account_id) AS account, toString(plan) AS plan_name, site_hash,
                wp_site_id, is_multisite, plugin_version, wordpress_version, php_version,
                toString(signature_policy) AS policy,
                toUnixTimestamp64Milli(registered_at) AS registered_ms,
                toUnixTimestamp64Milli(updated_at) AS updated_ms
         FROM installation_metadata FINAL WHERE install_id = {id:String}",
    )
    .fetch_optional()
    .await?;
    let meta = meta.ok_or(QueryError::NotFound)?;
    let seen: Option<(i64, i64)> = q(
        "SELECT toUnixTimestamp64Milli(min(first_seen)), toUnixTimestamp64Milli(max(last_seen))
         FROM installation_activity WHERE install_id = {id:String} GROUP BY install_id",
    )
    .fetch_optional()
    .await?;
    let month: NaiveDate = now.date_naive().with_day(1).unwrap_or(now.date_naive());
    let all_time: (u64, u64, String) = q(
        "SELECT sum(requests), sum(total_tokens), toString(sum(cost_usd))
         FROM usage_monthly WHERE install_id = {id:String}",
    )
    .fetch_one()
    .await?;
    let (mtd_requests, mtd_tokens, mtd_cost, used): (u64, u64, String, u64) = q(
        "SELECT sumIf(requests, date >= {month:Date}), sumIf(total_tokens, date >= {month:Date}),
                toString(sumIf(cost_usd, date >= {month:Date})),
                sumIf(requests, if(late_billing_month = toDate(0), toStartOfMonth(date),
                                   late_billing_month) = {month:Date})
         FROM usage_daily
         WHERE install_id = {id:String} AND date >= {month:Date} - INTERVAL 1 MONTH",
    )
    .param("month", month.to_string())
    .fetch_one()
    .await?;
    // Each kind's latest start in the last 40 days, unless it has ended (a
    // rate limit also ends when its `until` has passed).
    let open_episodes: Vec<EpisodeRow> = q(
        "SELECT kind_name, episode_id, since_ms, reason, until_ms FROM (
             SELECT toString(kind) AS kind_name, argMax(episode_id, at) AS episode_id,
                    toUnixTimestamp64Milli(max(at)) AS since_ms, argMax(reason, at) AS reason,
                    toUnixTimestamp64Milli(argMax(until, at)) AS until_ms
             FROM governance_decisions FINAL
             WHERE install_id = {id:String} AND phase = 'start'
               AND kind IN ('rate_limited', 'abuse_flagged', 'spike_flagged', 'blocked')
               AND at >= now64(3, 'UTC') - INTERVAL 40 DAY
             GROUP BY kind)
         WHERE episode_id NOT IN (SELECT episode_id FROM governance_decisions FINAL
                                  WHERE install_id = {id:String} AND phase = 'end')
           AND NOT (kind_name = 'rate_limited'
                    AND ifNull(until_ms < toUnixTimestamp64Milli(now64(3, 'UTC')), 0))
         ORDER BY since_ms",
    )
    .fetch_all()
    .await?;
    let cap = policy.plan(&meta.plan_name).monthly_cap;
    let level = policy.level(used, cap);
    let thresholds = cap.map_or_else(Vec::new, |cap| {
        let t = &policy.thresholds;
        policy
            .level_starts(cap)
            .iter()
            .zip([t.warning, t.critical, t.block])
            .map(|((level, at), fraction)| Threshold {
                level: level.as_str(),
                percent: (fraction * 1000.0).round() / 10.0,
                at: *at,
            })
            .collect()
    });
    Ok(Installation {
        install_id: install_id.to_string(),
        first_seen: seen.map(|s| iso_millis(s.0)),
        last_seen: seen.map(|s| iso_millis(s.1)),
        usage: InstallationUsage {
            all_time: Usage {
                generations: all_time.0,
                tokens: all_time.1,
                cost_usd: usd(&all_time.2),
            },
            month_to_date: Usage {
                generations: mtd_requests,
                tokens: mtd_tokens,
                cost_usd: usd(&mtd_cost),
            },
        },
        cap: CapProgress {
            billing_month: format!("{:04}-{:02}", month.year(), month.month()),
            used,
            cap,
            percent: cap.map(|cap| {
                if cap == 0 {
                    100.0
                } else {
                    (used as f64 * 1000.0 / cap as f64).round() / 10.0
                }
            }),
            level: level.as_str(),
            thresholds,
        },
        open_episodes: open_episodes
            .into_iter()
            .map(|e| Episode {
                kind: e.kind_name,
                episode_id: e.episode_id,
                since: iso_millis(e.since_ms),
                reason: e.reason,
                until: e.until_ms.map(iso_millis),
            })
            .collect(),
        account_id: meta.account,
        plan: meta.plan_name,
        site_hash: meta.site_hash,
        wp_site_id: meta.wp_site_id,
        is_multisite: meta.is_multisite,
        plugin_version: meta.plugin_version,
        wordpress_version: meta.wordpress_version,
        php_version: meta.php_version,
        signature_policy: meta.policy,
        registered_at: iso_millis(meta.registered_ms),
        updated_at: iso_millis(meta.updated_ms),
    })
}

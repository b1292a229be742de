//! `GET /api/usage/installations` (provider admins): every installation with
//! usage in the range, its totals, first and last generation, unique users,
//! active days, plan and governance level.
//!
//! Parameters: `date_from`/`date_to` (default the last 30 days), `sort_by`
//! (`tokens` default, `cost`, `date` = last seen, `requests`), `order`
//! (`desc` default, `asc`), `limit` (1..=500, default 50), `offset`.
//! Ties are broken by install_id, so pages are stable.
//!
//! Totals come from `usage_install_daily` (one row per installation and day;
//! exact, deduplicated; its rows are the active days), unique users of the
//! page's installations from `usage_daily`, first/last seen from
//! `installation_activity` (all time), the plan from `installation_metadata`
//! and the level from this month's cap decisions in `governance_decisions`.

use std::collections::HashMap;

use chrono::NaiveDate;
use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use crate::error::QueryError;
use crate::events::iso_millis;
use crate::params::{self, DateRange, Query};

pub const MAX_LIMIT: u64 = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    Tokens,
    Cost,
    Date,
    Requests,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallationsParams {
    pub range: DateRange,
    pub sort_by: SortBy,
    pub descending: bool,
    pub limit: u64,
    pub offset: u64,
}

impl InstallationsParams {
    pub fn parse(params: &Query, today: NaiveDate) -> Result<Self, QueryError> {
        let sort_by = match params.get("sort_by").map(String::as_str) {
            None | Some("") | Some("tokens") => SortBy::Tokens,
            Some("cost") => SortBy::Cost,
            Some("date") => SortBy::Date,
            Some("requests") => SortBy::Requests,
            Some(other) => {
                return Err(QueryError::BadRequest(format!(
                    "sort_by must be tokens, cost, date or requests, not {other:?}"
                )))
            }
        };
        let descending = match params.get("order").map(String::as_str) {
            None | Some("") | Some("desc") => true,
            Some("asc") => false,
            Some(other) => {
                return Err(QueryError::BadRequest(format!(
                    "order must be desc or asc, not {other:?}"
                )))
            }
        };
        Ok(Self {
            range: DateRange::parse(params, today)?,
            sort_by,
            descending,
            limit: params::limit(params, 50, MAX_LIMIT)?,
            offset: params::number(params, "offset", 0)?,
        })
    }
}

#[derive(Debug, Row, Deserialize)]
struct InstallationRow {
    install_id: String,
    account_id: String,
    plan: String,
    level: String,
    first_seen: i64,
    last_seen: i64,
    total_requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    cost: String,
    /// Days with usage: rows of `usage_install_daily`, one per day.
    active_days: u64,
    /// Installations in the range (a window over the groups, before LIMIT).
    groups: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct InstallationItem {
    pub install_id: String,
    pub account_id: String,
    pub first_seen: String,
    pub last_seen: String,
    pub total_requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub estimated_cost_usd: f64,
    pub unique_users: u64,
    pub active_days: u64,
    pub plan: String,
    pub governance_level: String,
}

pub async fn installations(
    client: &Client,
    params: &InstallationsParams,
) -> Result<(Vec<InstallationItem>, crate::summary::Meta), QueryError> {
    let sort = match params.sort_by {
        SortBy::Tokens => "total_tokens",
        SortBy::Cost => "cost_decimal",
        SortBy::Date => "last_date",
        SortBy::Requests => "total_requests",
    };
    let order = if params.descending { "DESC" } else { "ASC" };
    // The page is cut from the aggregate first; the small per-installation
    // tables are joined to those rows only, and the distinct users (no sort
    // key, but the costliest aggregate) are counted for them alone by a
    // second query: over 100k installations this halves the time.
    let sql = format!(
        "SELECT u.install_id AS install_id, ifNull(m.account_id, '') AS account_id,
                ifNull(m.plan, '') AS plan, ifNull(g.level, 'ok') AS level,
                ifNull(toUnixTimestamp64Milli(a.first_seen), 0) AS first_seen,
                ifNull(toUnixTimestamp64Milli(a.last_seen), 0) AS last_seen,
                u.total_requests AS total_requests, u.prompt_tokens AS prompt_tokens,
                u.completion_tokens AS completion_tokens, u.total_tokens AS total_tokens,
                toString(u.cost_decimal) AS cost, u.active_days AS active_days,
                u.groups AS groups
         FROM (
             SELECT install_id, sum(requests) AS total_requests, sum(prompt_tokens) AS prompt_tokens,
                    sum(completion_tokens) AS completion_tokens, sum(total_tokens) AS total_tokens,
                    sum(cost_usd) AS cost_decimal, count() AS active_days, max(date) AS last_date,
                    count() OVER () AS groups
             FROM usage_install_daily FINAL
             WHERE date >= {{date_from:Date}} AND date <= {{date_to:Date}}
             GROUP BY install_id
             ORDER BY {sort} {order}, install_id
             LIMIT {{limit:UInt64}} OFFSET {{offset:UInt64}}
         ) AS u
         LEFT JOIN (SELECT install_id, min(first_seen) AS first_seen, max(last_seen) AS last_seen
                    FROM installation_activity GROUP BY install_id) AS a ON a.install_id = u.install_id
         LEFT JOIN (SELECT install_id, account_id, plan FROM installation_metadata FINAL) AS m
                ON m.install_id = u.install_id
         LEFT JOIN (SELECT install_id,
                           multiIf(argMax(kind, at) = 'cap_warning', 'warning',
                                   argMax(kind, at) = 'cap_critical', 'critical',
                                   argMax(kind, at) = 'blocked', 'blocked', 'ok') AS level
                    FROM governance_decisions FINAL
                    WHERE kind IN ('cap_warning', 'cap_critical', 'blocked', 'unblocked')
                      AND at >= toStartOfMonth(now64(3, 'UTC'))
                    GROUP BY install_id) AS g ON g.install_id = u.install_id
         ORDER BY u.{sort} {order}, install_id
         SETTINGS join_use_nulls = 1"
    );
    let bind = |q: clickhouse::query::Query| {
        q.param("date_from", params.range.from.to_string())
            .param("date_to", params.range.to.to_string())
    };
    let rows: Vec<InstallationRow> = bind(client.query(&sql))
        .param("limit", params.limit)
        .param("offset", params.offset)
        .fetch_all()
        .await?;
    let users = unique_users(client, &params.range, &rows).await?;
    let total: u64 = match rows.first() {
        Some(r) => r.groups,
        None if params.offset == 0 => 0,
        None => {
            bind(client.query(
                "SELECT uniqExact(install_id) FROM usage_install_daily
                 WHERE date >= {date_from:Date} AND date <= {date_to:Date}",
            ))
            .fetch_one()
            .await?
        }
    };
    let items = rows
        .into_iter()
        .map(|r| InstallationItem {
            unique_users: users.get(&r.install_id).copied().unwrap_or_default(),
            install_id: r.install_id,
            account_id: r.account_id,
            first_seen: iso_millis(r.first_seen),
            last_seen: iso_millis(r.last_seen),
            total_requests: r.total_requests,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            total_tokens: r.total_tokens,
            estimated_cost_usd: r.cost.parse().unwrap_or(0.0),
            active_days: r.active_days,
            plan: r.plan,
            governance_level: r.level,
        })
        .collect();
    Ok((
        items,
        crate::summary::Meta {
            total,
            limit: params.limit,
            offset: params.offset,
        },
    ))
}

/// Unique user hashes in the range of each listed installation.
async fn unique_users(
    client: &Client,
    range: &DateRange,
    rows: &[InstallationRow],
) -> Result<HashMap<String, u64>, QueryError> {
    if rows.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.install_id.as_str()).collect();
    let counts: Vec<(String, u64)> = client
        .query(
            "SELECT install_id, uniqExact(user_hash) FROM usage_daily FINAL
             WHERE install_id IN {ids:Array(String)}
               AND date >= {date_from:Date} AND date <= {date_to:Date}
             GROUP BY install_id",
        )
        .param("ids", ids)
        .param("date_from", range.from.to_string())
        .param("date_to", range.to.to_string())
        .fetch_all()
        .await?;
    Ok(counts.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::params::query_of as q;

    #[test]
    fn defaults_and_refusals() {
        let today = "2025-11-30".parse().unwrap();
        let p = InstallationsParams::parse(&q(&[]), today).unwrap();
        assert_eq!(
            (p.sort_by, p.descending, p.limit, p.offset),
            (SortBy::Tokens, true, 50, 0)
        );
        let err = |pairs: &[(&str, &str)]| {
            InstallationsParams::parse(&q(pairs), today)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(&[("sort_by", "name")]),
            "sort_by must be tokens, cost, date or requests, not \"name\""
        );
        assert_eq!(
            err(&[("order", "up")]),
            "order must be desc or asc, not \"up\""
        );
        assert_eq!(err(&[("limit", "501")]), "limit must be 1 to 500, not 501");
    }
}

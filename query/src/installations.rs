//! `GET /api/usage/installations`: every installation the token may see
//! (the fleet for provider-level tokens, its own for an account, the listed
//! ones for network and site admins) with usage in the range, its totals,
//! first and last generation, unique users, active days, plan and
//! governance level.
//!
//! Parameters: `date_from`/`date_to` (default the last 30 days), `q` (a
//! search: part of an install id, the start of a site hash, or an account
//! id), `sort_by` (`tokens` default, `cost`, `date` = last day with usage,
//! `requests`), `order` (`desc` default, `asc`), `limit` (1..=500, default
//! 50), `offset`. Ties are broken by install_id, so pages are stable.
//!
//! Totals come from `usage_install_daily` (a SummingMergeTree of deltas: one
//! row per installation and day once merged, summed without `FINAL`, its
//! distinct days the active days). Over 100,000
//! installations that aggregate is the cost of a page (a third of a second),
//! so it is computed once per fleet and range ([`Ranking`], kept like the
//! dashboard's figures when expensive), and every page, order and search is
//! cut from it (a search reads the registry's mirror, [`matching`]). The listed installations' unique users (`usage_daily`),
//! first/last seen (`installation_activity`, all time), plan
//! (`installation_metadata`) and level (this month's cap decisions in
//! `governance_decisions`) are read for that page alone.

use std::collections::HashMap;

use chrono::NaiveDate;
use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use crate::error::QueryError;
use crate::events::iso_millis;
use crate::fleet::Fleet;
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
    /// A search: part of an install id, the start of a site hash, or an
    /// account id.
    pub q: Option<String>,
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
        let q = params.get("q").map(|q| q.trim()).filter(|q| !q.is_empty());
        if let Some(q) = q {
            if q.chars().count() > 100 {
                return Err(QueryError::BadRequest("q is at most 100 characters".into()));
            }
        }
        Ok(Self {
            range: DateRange::parse(params, today)?,
            sort_by,
            descending,
            limit: params::limit(params, 50, MAX_LIMIT)?,
            offset: params::number(params, "offset", 0)?,
            q: q.map(str::to_string),
        })
    }
}

/// One installation's totals over the range, as ranked.
#[derive(Debug, Clone, Row, Deserialize)]
pub struct Ranked {
    install_id: String,
    total_requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    cost: String,
    /// Days with usage: rows of `usage_install_daily`, one per day.
    active_days: u64,
    /// The last day with usage, in days since 1970.
    last_date: u16,
}

/// Every installation of a fleet with usage in a range: what any page, any
/// order of one listing is cut from. Each order (4 keys, 2 directions) is
/// sorted once, when first asked for, and kept with the ranking: a page is
/// then a walk down the order, not a sort of 100,000 rows.
pub struct Ranking {
    rows: Vec<(f64, Ranked)>,
    orders: [std::sync::OnceLock<Vec<u32>>; 8],
}

impl Ranking {
    fn new(rows: Vec<(f64, Ranked)>) -> Self {
        Self {
            rows,
            orders: Default::default(),
        }
    }

    /// The rows' indexes in the requested order; ties by install_id, so
    /// pages are stable.
    fn order(&self, sort_by: SortBy, descending: bool) -> &[u32] {
        let slot = sort_by as usize * 2 + usize::from(descending);
        self.orders[slot].get_or_init(|| {
            let key = |(cost, r): &(f64, Ranked)| -> f64 {
                match sort_by {
                    SortBy::Tokens => r.total_tokens as f64,
                    SortBy::Cost => *cost,
                    SortBy::Date => f64::from(r.last_date),
                    SortBy::Requests => r.total_requests as f64,
                }
            };
            let keys: Vec<f64> = self.rows.iter().map(key).collect();
            let mut order: Vec<u32> = (0..self.rows.len() as u32).collect();
            order.sort_by(|&a, &b| {
                let by_key = keys[a as usize].total_cmp(&keys[b as usize]);
                let by_key = if descending { by_key.reverse() } else { by_key };
                by_key.then_with(|| {
                    self.rows[a as usize]
                        .1
                        .install_id
                        .cmp(&self.rows[b as usize].1.install_id)
                })
            });
            order
        })
    }

    /// One page in the requested order (of those in `only`, if given), and
    /// how many there are.
    fn page(
        &self,
        only: Option<&std::collections::HashSet<String>>,
        params: &InstallationsParams,
    ) -> (Vec<&Ranked>, usize) {
        let offset = usize::try_from(params.offset).unwrap_or(usize::MAX);
        let limit = params.limit as usize;
        let order = self.order(params.sort_by, params.descending);
        let rows = order.iter().map(|&i| &self.rows[i as usize].1);
        match only {
            None => (rows.skip(offset).take(limit).collect(), order.len()),
            Some(ids) => {
                let (mut page, mut total) = (Vec::new(), 0);
                for r in rows.filter(|r| ids.contains(&r.install_id)) {
                    if total >= offset && page.len() < limit {
                        page.push(r);
                    }
                    total += 1;
                }
                (page, total)
            }
        }
    }
}

/// The installations of `fleet` a search finds: part of the install id,
/// the start of the site hash, or the whole account id. The registry's
/// mirror holds one row per installation, so this stays a few milliseconds
/// over 100,000 of them, and the page is then cut from the kept ranking.
pub async fn matching(
    client: &Client,
    fleet: &Fleet,
    q: &str,
) -> Result<std::collections::HashSet<String>, QueryError> {
    let sql = format!(
        "SELECT install_id FROM installation_metadata FINAL
         WHERE (positionCaseInsensitive(install_id, {{q:String}}) > 0
                OR startsWith(site_hash, lower({{q:String}})) OR account_id = {{q:String}})
           AND {}",
        fleet.sql()
    );
    let ids: Vec<String> = fleet
        .bind(client.query(&sql))
        .param("q", q)
        .fetch_all()
        .await?;
    Ok(ids.into_iter().collect())
}

/// The totals of every installation of `fleet` with usage in `range`.
pub async fn ranking(
    client: &Client,
    fleet: &Fleet,
    range: &DateRange,
) -> Result<Ranking, QueryError> {
    let sql = format!(
        "SELECT install_id, sum(requests) AS total_requests, sum(prompt_tokens) AS prompt_tokens,
                sum(completion_tokens) AS completion_tokens, sum(total_tokens) AS total_tokens,
                toString(sum(cost_usd)) AS cost, uniqExact(date) AS active_days,
                toUInt16(max(date)) AS last_date
         FROM usage_install_daily
         WHERE date >= {{date_from:Date}} AND date <= {{date_to:Date}} AND {}
         GROUP BY install_id",
        fleet.sql(),
    );
    let rows: Vec<Ranked> = fleet
        .bind(client.query(&sql))
        .param("date_from", range.from.to_string())
        .param("date_to", range.to.to_string())
        .fetch_all()
        .await?;
    Ok(Ranking::new(
        rows.into_iter()
            .map(|r| (r.cost.parse().unwrap_or(0.0), r))
            .collect(),
    ))
}

#[derive(Debug, Row, Deserialize)]
struct Labels {
    install_id: String,
    account_id: String,
    plan: String,
    level: String,
    first_seen: i64,
    last_seen: i64,
    unique_users: u64,
}

#[derive(Debug, Serialize, PartialEq, utoipa::ToSchema)]
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

/// One page of `ranking` (of the installations a search found, if any),
/// with each listed installation's account, plan, governance level, first
/// and last generation and unique users.
pub async fn installations(
    client: &Client,
    ranking: &Ranking,
    found: Option<&std::collections::HashSet<String>>,
    params: &InstallationsParams,
) -> Result<(Vec<InstallationItem>, crate::summary::Meta), QueryError> {
    let (page, total) = ranking.page(found, params);
    let labels = labels(client, &params.range, &page).await?;
    let items = page
        .into_iter()
        .map(|r| {
            let l = labels.get(&r.install_id);
            InstallationItem {
                install_id: r.install_id.clone(),
                account_id: l.map(|l| l.account_id.clone()).unwrap_or_default(),
                first_seen: iso_millis(l.map_or(0, |l| l.first_seen)),
                last_seen: iso_millis(l.map_or(0, |l| l.last_seen)),
                total_requests: r.total_requests,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
                total_tokens: r.total_tokens,
                estimated_cost_usd: r.cost.parse().unwrap_or(0.0),
                unique_users: l.map_or(0, |l| l.unique_users),
                active_days: r.active_days,
                plan: l.map(|l| l.plan.clone()).unwrap_or_default(),
                governance_level: l.map_or_else(|| "ok".to_string(), |l| l.level.clone()),
            }
        })
        .collect();
    Ok((
        items,
        crate::summary::Meta {
            total: total as u64,
            limit: params.limit,
            offset: params.offset,
        },
    ))
}

/// What the page's installations are beside their totals: the small
/// per-installation tables, and the distinct users (the costliest part)
/// counted for these installations alone. The users are counted without
/// `FINAL` (half the time over 100M events): the daily rollup's unmerged
/// rows are deltas of one key, never removals (only erasure removes rows,
/// all of an installation's), so they hold the same user hashes as the
/// merged rows would.
async fn labels(
    client: &Client,
    range: &DateRange,
    page: &[&Ranked],
) -> Result<HashMap<String, Labels>, QueryError> {
    if page.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<&str> = page.iter().map(|r| r.install_id.as_str()).collect();
    let rows: Vec<Labels> = client
        .query(
            "SELECT i.install_id AS install_id, ifNull(m.account_id, '') AS account_id,
                    ifNull(m.plan, '') AS plan, ifNull(g.level, 'ok') AS level,
                    ifNull(toUnixTimestamp64Milli(a.first_seen), 0) AS first_seen,
                    ifNull(toUnixTimestamp64Milli(a.last_seen), 0) AS last_seen,
                    ifNull(u.users, 0) AS unique_users
             FROM (SELECT arrayJoin({ids:Array(String)}) AS install_id) AS i
             LEFT JOIN (SELECT install_id, min(first_seen) AS first_seen, max(last_seen) AS last_seen
                        FROM installation_activity WHERE install_id IN {ids:Array(String)}
                        GROUP BY install_id) AS a ON a.install_id = i.install_id
             LEFT JOIN (SELECT install_id, toString(account_id) AS account_id, toString(plan) AS plan
                        FROM installation_metadata FINAL
                        WHERE install_id IN {ids:Array(String)}) AS m ON m.install_id = i.install_id
             LEFT JOIN (SELECT install_id,
                               multiIf(argMax(kind, at) = 'cap_warning', 'warning',
                                       argMax(kind, at) = 'cap_critical', 'critical',
                                       argMax(kind, at) = 'blocked', 'blocked', 'ok') AS level
                        FROM governance_decisions FINAL
                        WHERE install_id IN {ids:Array(String)}
                          AND kind IN ('cap_warning', 'cap_critical', 'blocked', 'unblocked')
                          AND at >= toStartOfMonth(now64(3, 'UTC'))
                        GROUP BY install_id) AS g ON g.install_id = i.install_id
             LEFT JOIN (SELECT install_id, uniqExact(user_hash) AS users FROM usage_daily
                        WHERE install_id IN {ids:Array(String)}
                          AND date >= {date_from:Date} AND date <= {date_to:Date}
                        GROUP BY install_id) AS u ON u.install_id = i.install_id
             SETTINGS join_use_nulls = 1",
        )
        .param("ids", ids)
        .param("date_from", range.from.to_string())
        .param("date_to", range.to.to_string())
        .fetch_all()
        .await?;
    Ok(rows
        .into_iter()
        .map(|l| (l.install_id.clone(), l))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::params::query_of as q;

    fn ranked(id: &str, tokens: u64, cost: f64, last_date: u16) -> (f64, Ranked) {
        (
            cost,
            Ranked {
                install_id: id.into(),
                total_requests: tokens / 10,
                prompt_tokens: 0,
                completion_tokens: tokens,
                total_tokens: tokens,
                cost: cost.to_string(),
                active_days: 1,
                last_date,
            },
        )
    }

    #[test]
    fn pages_are_cut_from_kept_orders_with_ties_by_install_id() {
        let ranking = Ranking::new(vec![
            ranked("c", 30, 0.1, 3),
            ranked("a", 10, 0.3, 3),
            ranked("d", 30, 0.2, 1),
            ranked("b", 20, 0.4, 2),
        ]);
        let today = "2025-11-30".parse().unwrap();
        let ids = |pairs: &[(&str, &str)], only: Option<&std::collections::HashSet<String>>| {
            let params = InstallationsParams::parse(&q(pairs), today).unwrap();
            let (page, total) = ranking.page(only, &params);
            let ids: Vec<&str> = page.iter().map(|r| r.install_id.as_str()).collect();
            (ids.join(""), total)
        };
        assert_eq!(ids(&[], None), ("cdba".into(), 4));
        assert_eq!(ids(&[("order", "asc")], None), ("abcd".into(), 4));
        assert_eq!(ids(&[("sort_by", "cost")], None), ("badc".into(), 4));
        assert_eq!(ids(&[("sort_by", "date")], None), ("acbd".into(), 4));
        assert_eq!(
            ids(&[("sort_by", "date"), ("order", "asc")], None),
            ("dbac".into(), 4)
        );
        assert_eq!(
            ids(&[("limit", "2"), ("offset", "1")], None),
            ("db".into(), 4)
        );
        assert_eq!(ids(&[("offset", "9")], None), ("".into(), 4));
        // A search: the page and the total among those it found.
        let found: std::collections::HashSet<String> = ["a", "d", "x"].map(String::from).into();
        assert_eq!(ids(&[], Some(&found)), ("da".into(), 2));
        assert_eq!(
            ids(&[("limit", "1"), ("offset", "1")], Some(&found)),
            ("a".into(), 2)
        );
        // Asked again, the kept order answers the same.
        assert_eq!(ids(&[], None), ("cdba".into(), 4));
    }

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

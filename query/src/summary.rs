//! `GET /provider/usage/summary`: rollups from `usage_daily`, grouped by day,
//! user or source, exactly as the contract describes.
//!
//! Parameters: `install_id` (required unless provider admin; without it the
//! rows are per installation across all), `date_from`/`date_to` (inclusive,
//! `YYYY-MM-DD`, default the last 30 days to today UTC), `group_by`
//! (`day` default, `user`, `source`), `limit` (1..=1000, default 100),
//! `offset` (default 0). Dimensions a row is not grouped by are `null`.

use std::collections::HashMap;

use chrono::{Duration, NaiveDate, Utc};
use clickhouse::Client;
use serde::Serialize;

use crate::access::Scope;
use crate::error::QueryError;

pub const MAX_LIMIT: u64 = 1000;
pub const MAX_RANGE_DAYS: i64 = 731;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Day,
    User,
    Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryParams {
    pub install_id: Option<String>,
    pub date_from: NaiveDate,
    pub date_to: NaiveDate,
    pub group_by: GroupBy,
    pub limit: u64,
    pub offset: u64,
}

fn date(params: &HashMap<String, String>, name: &str) -> Result<Option<NaiveDate>, QueryError> {
    params
        .get(name)
        .map(|s| {
            NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| {
                QueryError::BadRequest(format!("{name} must be a date like 2025-10-01"))
            })
        })
        .transpose()
}

fn number(params: &HashMap<String, String>, name: &str, default: u64) -> Result<u64, QueryError> {
    params.get(name).map_or(Ok(default), |s| {
        s.parse()
            .map_err(|_| QueryError::BadRequest(format!("{name} must be a non-negative integer")))
    })
}

impl SummaryParams {
    pub fn parse(params: &HashMap<String, String>, today: NaiveDate) -> Result<Self, QueryError> {
        let date_to = date(params, "date_to")?.unwrap_or(today);
        let date_from = date(params, "date_from")?.unwrap_or(date_to - Duration::days(29));
        if date_from > date_to {
            return Err(QueryError::BadRequest("date_from is after date_to".into()));
        }
        if (date_to - date_from).num_days() > MAX_RANGE_DAYS {
            return Err(QueryError::BadRequest(format!(
                "the range may span at most {MAX_RANGE_DAYS} days"
            )));
        }
        let group_by = match params.get("group_by").map(String::as_str) {
            None | Some("day") => GroupBy::Day,
            Some("user") => GroupBy::User,
            Some("source") => GroupBy::Source,
            Some(other) => {
                return Err(QueryError::BadRequest(format!(
                    "group_by {other:?} is not day, user or source"
                )))
            }
        };
        let limit = number(params, "limit", 100)?;
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(QueryError::BadRequest(format!(
                "limit must be 1 to {MAX_LIMIT}"
            )));
        }
        Ok(Self {
            install_id: params.get("install_id").filter(|s| !s.is_empty()).cloned(),
            date_from,
            date_to,
            group_by,
            limit,
            offset: number(params, "offset", 0)?,
        })
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct SummaryItem {
    pub install_id: String,
    pub date: Option<String>,
    pub user_hash: Option<String>,
    pub source: Option<String>,
    pub total_requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub estimated_cost_usd: f64,
}

#[derive(Debug, Serialize)]
pub struct Meta {
    pub total: u64,
    pub limit: u64,
    pub offset: u64,
}

pub async fn summary(
    client: &Client,
    params: &SummaryParams,
    scope: &Scope,
) -> Result<(Vec<SummaryItem>, Meta), QueryError> {
    let (dimension, order) = match params.group_by {
        GroupBy::Day => ("toString(date)", "dim"),
        GroupBy::User => ("user_hash", "total_tokens DESC, dim"),
        GroupBy::Source => ("toString(source)", "dim"),
    };
    let mut filter = String::from("date >= ? AND date <= ?");
    if scope.install_id.is_some() {
        filter.push_str(" AND install_id = ?");
    }
    if scope.user_hash.is_some() {
        filter.push_str(" AND user_hash = ?");
    }
    let bind = |mut q: clickhouse::query::Query| {
        q = q
            .bind(params.date_from.to_string())
            .bind(params.date_to.to_string());
        if let Some(i) = &scope.install_id {
            q = q.bind(i);
        }
        if let Some(u) = &scope.user_hash {
            q = q.bind(u);
        }
        q
    };
    let sql = format!(
        "SELECT install_id, {dimension} AS dim,
                sum(requests) AS total_requests, sum(prompt_tokens) AS p, sum(completion_tokens) AS c,
                sum(total_tokens) AS total_tokens, toString(sum(cost_usd)) AS cost
         FROM usage_daily FINAL
         WHERE {filter}
         GROUP BY install_id, dim
         ORDER BY {order}, install_id
         LIMIT {} OFFSET {}",
        params.limit, params.offset
    );
    let rows: Vec<(String, String, u64, u64, u64, u64, String)> =
        bind(client.query(&sql)).fetch_all().await?;
    let total: u64 = bind(client.query(&format!(
        "SELECT count() FROM (SELECT 1 FROM usage_daily FINAL WHERE {filter} GROUP BY install_id, {dimension})"
    )))
    .fetch_one()
    .await?;

    let items = rows
        .into_iter()
        .map(
            |(
                install_id,
                dim,
                total_requests,
                prompt_tokens,
                completion_tokens,
                total_tokens,
                cost,
            )| {
                let (date, user_hash, source) = match params.group_by {
                    GroupBy::Day => (Some(dim), None, None),
                    GroupBy::User => (None, Some(dim), None),
                    GroupBy::Source => (None, None, Some(dim)),
                };
                SummaryItem {
                    install_id,
                    date,
                    user_hash,
                    source,
                    total_requests,
                    prompt_tokens,
                    completion_tokens,
                    total_tokens,
                    // Summed exactly as Decimal in ClickHouse; a JSON number here.
                    estimated_cost_usd: cost.parse().unwrap_or(0.0),
                }
            },
        )
        .collect();
    Ok((
        items,
        Meta {
            total,
            limit: params.limit,
            offset: params.offset,
        },
    ))
}

pub fn today() -> NaiveDate {
    Utc::now().date_naive()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Result<SummaryParams, QueryError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SummaryParams::parse(&map, "2025-11-30".parse().unwrap())
    }

    #[test]
    fn defaults_are_the_last_30_days_by_day() {
        let p = params(&[("install_id", "i")]).unwrap();
        assert_eq!(p.date_to.to_string(), "2025-11-30");
        assert_eq!(p.date_from.to_string(), "2025-11-01");
        assert_eq!((p.group_by, p.limit, p.offset), (GroupBy::Day, 100, 0));
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        for bad in [
            vec![("date_from", "2025-13-01")],
            vec![("date_from", "2025-11-10"), ("date_to", "2025-11-01")],
            vec![("group_by", "model")],
            vec![("limit", "0")],
            vec![("limit", "5000")],
            vec![("offset", "-1")],
            vec![("date_from", "2020-01-01"), ("date_to", "2025-01-01")],
        ] {
            match params(&bad) {
                Err(QueryError::BadRequest(msg)) => assert!(!msg.is_empty()),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}

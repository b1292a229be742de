//! `GET /provider/usage/summary`: rollups from `usage_daily`, grouped as the
//! contract describes, plus grouping by model and month and row filters.
//!
//! Parameters: `install_id` (required unless provider admin; without it the
//! rows are per installation across all), `date_from`/`date_to` (inclusive,
//! `YYYY-MM-DD`, default the last 30 days to today UTC), `group_by`
//! (`day` default, `user`, `source`, `model`, `month`, `billing_month`), filters `source`,
//! `model`, `user_hash`, `limit` (1..=1000, default 100), `offset`
//! (default 0). Dimensions a row is not grouped by are `null`; `meta.total`
//! is the exact number of groups.

use chrono::{NaiveDate, Utc};
use clickhouse::Client;
use serde::Serialize;

use crate::access::Scope;
use crate::error::QueryError;
use crate::params::{self, DateRange, Filters, Query};

pub const MAX_LIMIT: u64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Day,
    User,
    Source,
    Model,
    Month,
    /// The month usage counts toward for caps and billing (a late event's
    /// is the month it arrived in; `month` is always its created_at month).
    BillingMonth,
}

impl GroupBy {
    /// The grouping expression over `usage_daily` and the row order.
    fn sql(self) -> (&'static str, &'static str) {
        match self {
            GroupBy::Day => ("toString(date)", "dim"),
            GroupBy::User => ("user_hash", "total_tokens DESC, dim"),
            GroupBy::Source => ("toString(source)", "dim"),
            GroupBy::Model => ("toString(model)", "total_tokens DESC, dim"),
            GroupBy::Month => ("formatDateTime(date, '%Y-%m')", "dim"),
            GroupBy::BillingMonth => (
                "formatDateTime(if(late_billing_month = toDate(0), toStartOfMonth(date), late_billing_month), '%Y-%m')",
                "dim",
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryParams {
    pub install_id: Option<String>,
    pub range: DateRange,
    pub group_by: GroupBy,
    pub filters: Filters,
    pub limit: u64,
    pub offset: u64,
}

impl SummaryParams {
    pub fn parse(params: &Query, today: NaiveDate) -> Result<Self, QueryError> {
        let range = DateRange::parse(params, today)?;
        let group_by = match params.get("group_by").map(String::as_str) {
            None | Some("day") | Some("") => GroupBy::Day,
            Some("user") => GroupBy::User,
            Some("source") => GroupBy::Source,
            Some("model") => GroupBy::Model,
            Some("month") => GroupBy::Month,
            Some("billing_month") => GroupBy::BillingMonth,
            Some(other) => {
                return Err(QueryError::BadRequest(format!(
                "group_by must be day, user, source, model, month or billing_month, not {other:?}"
            )))
            }
        };
        Ok(Self {
            install_id: params.get("install_id").filter(|s| !s.is_empty()).cloned(),
            range,
            group_by,
            filters: Filters::parse(params)?,
            limit: params::limit(params, 100, MAX_LIMIT)?,
            offset: params::number(params, "offset", 0)?,
        })
    }
}

#[derive(Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct SummaryItem {
    pub install_id: String,
    pub date: Option<String>,
    pub user_hash: Option<String>,
    pub source: Option<String>,
    pub model: Option<String>,
    pub month: Option<String>,
    pub billing_month: Option<String>,
    pub total_requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub estimated_cost_usd: f64,
    /// Generations that arrived while the installation was over a limit
    /// (its plan's cap, a rate window, an abuse flag): recorded and
    /// counted in every total above, and shown here as the overage.
    pub over_limit_requests: u64,
    pub over_limit_tokens: u64,
}

/// Paging: the exact number of rows (groups) and this page's window.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Meta {
    pub total: u64,
    pub limit: u64,
    pub offset: u64,
}

/// The `WHERE` clause of a scoped, filtered read of a table with `date`,
/// `install_id`, `user_hash`, `source` and `model` columns.
pub fn scoped_where(date_column: &str, scope: &Scope, filters: &Filters) -> String {
    let mut sql =
        format!("{date_column} >= {{date_from:Date}} AND {date_column} <= {{date_to:Date}}");
    if scope.install_id.is_some() {
        sql.push_str(" AND install_id = {install_id:String}");
    }
    if scope.user_hash.is_some() {
        sql.push_str(" AND user_hash = {scope_user_hash:String}");
    }
    sql.push_str(&filters.sql());
    sql
}

/// Binds what [`scoped_where`] refers to.
pub fn bind_scoped(
    query: clickhouse::query::Query,
    range: &DateRange,
    scope: &Scope,
    filters: &Filters,
) -> clickhouse::query::Query {
    let mut q = query
        .param("date_from", range.from.to_string())
        .param("date_to", range.to.to_string());
    if let Some(i) = &scope.install_id {
        q = q.param("install_id", i);
    }
    if let Some(u) = &scope.user_hash {
        q = q.param("scope_user_hash", u);
    }
    filters.bind(q)
}

/// One group of the summary query, with the number of groups. (Short
/// aliases in the query, so that no sum shadows the column it sums.)
#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct SummaryRow {
    install_id: String,
    dim: String,
    total_requests: u64,
    #[serde(rename = "p")]
    prompt_tokens: u64,
    #[serde(rename = "c")]
    completion_tokens: u64,
    total_tokens: u64,
    cost: String,
    #[serde(rename = "o")]
    over_limit_requests: u64,
    #[serde(rename = "ot")]
    over_limit_tokens: u64,
    groups: u64,
}

pub async fn summary(
    client: &Client,
    params: &SummaryParams,
    scope: &Scope,
) -> Result<(Vec<SummaryItem>, Meta), QueryError> {
    let (dimension, order) = params.group_by.sql();
    let filter = scoped_where("date", scope, &params.filters);
    let bind = |q| bind_scoped(q, &params.range, scope, &params.filters);
    let sql = format!(
        "SELECT install_id, {dimension} AS dim,
                sum(requests) AS total_requests, sum(prompt_tokens) AS p, sum(completion_tokens) AS c,
                sum(total_tokens) AS total_tokens, toString(sum(cost_usd)) AS cost,
                sum(over_limit_requests) AS o, sum(over_limit_tokens) AS ot,
                count() OVER () AS groups
         FROM usage_daily
         WHERE {filter}
         GROUP BY install_id, dim
         ORDER BY {order}, install_id
         LIMIT {{limit:UInt64}} OFFSET {{offset:UInt64}}"
    );
    // The number of groups comes with the page (a window over the groups,
    // before LIMIT): one pass over the rollup instead of two.
    let rows: Vec<SummaryRow> = bind(client.query(&sql))
        .param("limit", params.limit)
        .param("offset", params.offset)
        .fetch_all()
        .await?;
    let total = match rows.first() {
        Some(r) => r.groups,
        None if params.offset == 0 => 0,
        // A page past the end: count separately.
        None => {
            bind(client.query(&format!(
                "SELECT count() FROM (SELECT 1 FROM usage_daily WHERE {filter} GROUP BY install_id, {dimension})"
            )))
            .fetch_one()
            .await?
        }
    };

    let items = rows
        .into_iter()
        .map(|r| {
            let mut item = SummaryItem {
                install_id: r.install_id,
                date: None,
                user_hash: None,
                source: None,
                model: None,
                month: None,
                billing_month: None,
                total_requests: r.total_requests,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
                total_tokens: r.total_tokens,
                // Summed exactly as Decimal in ClickHouse; a JSON number here.
                estimated_cost_usd: r.cost.parse().unwrap_or(0.0),
                over_limit_requests: r.over_limit_requests,
                over_limit_tokens: r.over_limit_tokens,
            };
            *match params.group_by {
                GroupBy::Day => &mut item.date,
                GroupBy::User => &mut item.user_hash,
                GroupBy::Source => &mut item.source,
                GroupBy::Model => &mut item.model,
                GroupBy::Month => &mut item.month,
                GroupBy::BillingMonth => &mut item.billing_month,
            } = Some(r.dim);
            item
        })
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
        SummaryParams::parse(
            &crate::params::query_of(pairs),
            "2025-11-30".parse().unwrap(),
        )
    }

    #[test]
    fn defaults_are_the_last_30_days_by_day() {
        let p = params(&[("install_id", "i")]).unwrap();
        assert_eq!(p.range.to.to_string(), "2025-11-30");
        assert_eq!(p.range.from.to_string(), "2025-11-01");
        assert_eq!((p.group_by, p.limit, p.offset), (GroupBy::Day, 100, 0));
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        for bad in [
            vec![("date_from", "2025-13-01")],
            vec![("date_from", "2025-11-10"), ("date_to", "2025-11-01")],
            vec![("group_by", "week")],
            vec![("source", "email")],
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

//! `GET /provider/usage/summary`: rollups from `usage_daily` (and, for whole
//! months when not grouping by day, `usage_monthly`), grouped as the
//! contract describes, plus grouping by model and month and row filters.
//!
//! Parameters: `install_id` (required unless provider admin; without it the
//! rows are per installation across all), `date_from`/`date_to` (inclusive,
//! `YYYY-MM-DD`, default the last 30 days to today UTC), `group_by`
//! (`day` default, `user`, `source`, `model`, `month`), filters `source`,
//! `model`, `user_hash`, `limit` (1..=1000, default 100), `offset`
//! (default 0). Dimensions a row is not grouped by are `null`; `meta.total`
//! is the exact number of groups.

use chrono::{Datelike, Months, NaiveDate, Utc};
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
            Some(other) => {
                return Err(QueryError::BadRequest(format!(
                    "group_by must be day, user, source, model or month, not {other:?}"
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

#[derive(Debug, Serialize, PartialEq)]
pub struct SummaryItem {
    pub install_id: String,
    pub date: Option<String>,
    pub user_hash: Option<String>,
    pub source: Option<String>,
    pub model: Option<String>,
    pub month: Option<String>,
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

/// The `WHERE` clause of a scoped, filtered read of a table with `date`,
/// `install_id`, `user_hash`, `source` and `model` columns.
pub fn scoped_where(date_column: &str, scope: &Scope, filters: &Filters) -> String {
    format!(
        "{date_column} >= {{date_from:Date}} AND {date_column} <= {{date_to:Date}}{}",
        scope_and_filters(scope, filters)
    )
}

/// The conditions of [`scoped_where`] but the date range, each with its
/// leading ` AND `.
fn scope_and_filters(scope: &Scope, filters: &Filters) -> String {
    let mut sql = String::new();
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

/// The whole months of a date range, which `usage_monthly` can answer for
/// groupings coarser than a day: (first month, last month, last day of the
/// last month). None when the range covers no whole month.
pub fn whole_months(range: &DateRange) -> Option<(NaiveDate, NaiveDate, NaiveDate)> {
    let month_start = |d: NaiveDate| d.with_day(1).unwrap_or(d);
    let first = if range.from.day() == 1 {
        range.from
    } else {
        month_start(range.from).checked_add_months(Months::new(1))?
    };
    let after = range.to.succ_opt()?;
    let end = if after.day() == 1 {
        range.to
    } else {
        month_start(range.to).pred_opt()?
    };
    (first <= end).then(|| (first, month_start(end), end))
}

/// The rows a summary groups, with the columns of `usage_daily`: from
/// `usage_daily` alone when grouping by day or when the range holds no
/// whole month; otherwise whole months from `usage_monthly` (a twelfth of
/// the rows over a year) and the partial months at either end from
/// `usage_daily`. Both rollups are recomputed in the same flush, the
/// monthly rows from the daily ones, so they agree.
fn source(group_by: GroupBy, range: &DateRange, scope: &Scope, filters: &Filters) -> String {
    let rest = scope_and_filters(scope, filters);
    let daily = format!(
        "SELECT install_id, date, user_hash, source, model, requests, prompt_tokens,
                completion_tokens, total_tokens, cost_usd
         FROM usage_daily FINAL
         WHERE date >= {{date_from:Date}} AND date <= {{date_to:Date}}{rest}"
    );
    if group_by == GroupBy::Day || whole_months(range).is_none() {
        return format!("({daily})");
    }
    format!(
        "(SELECT install_id, month AS date, user_hash, source, model, requests, prompt_tokens,
                completion_tokens, total_tokens, cost_usd
         FROM usage_monthly FINAL
         WHERE month >= {{months_from:Date}} AND month <= {{months_to:Date}}{rest}
         UNION ALL
         {daily} AND (date < {{months_from:Date}} OR date > {{months_end:Date}}))"
    )
}

/// Binds what [`source`] refers to.
fn bind_source(
    query: clickhouse::query::Query,
    range: &DateRange,
    scope: &Scope,
    filters: &Filters,
) -> clickhouse::query::Query {
    let query = bind_scoped(query, range, scope, filters);
    match whole_months(range) {
        Some((from, to, end)) => query
            .param("months_from", from.to_string())
            .param("months_to", to.to_string())
            .param("months_end", end.to_string()),
        None => query,
    }
}

/// install_id, dimension, requests, prompt, completion, total tokens, cost,
/// number of groups.
type SummaryRow = (String, String, u64, u64, u64, u64, String, u64);

pub async fn summary(
    client: &Client,
    params: &SummaryParams,
    scope: &Scope,
) -> Result<(Vec<SummaryItem>, Meta), QueryError> {
    let (dimension, order) = params.group_by.sql();
    let rows_source = source(params.group_by, &params.range, scope, &params.filters);
    let bind = |q| bind_source(q, &params.range, scope, &params.filters);
    let sql = format!(
        "SELECT install_id, {dimension} AS dim,
                sum(requests) AS total_requests, sum(prompt_tokens) AS p, sum(completion_tokens) AS c,
                sum(total_tokens) AS total_tokens, toString(sum(cost_usd)) AS cost,
                count() OVER () AS groups
         FROM {rows_source}
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
        Some(r) => r.7,
        None if params.offset == 0 => 0,
        // A page past the end: count separately.
        None => {
            bind(client.query(&format!(
                "SELECT count() FROM (SELECT 1 FROM {rows_source} GROUP BY install_id, {dimension})"
            )))
            .fetch_one()
            .await?
        }
    };

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
                _groups,
            )| {
                let mut item = SummaryItem {
                    install_id,
                    date: None,
                    user_hash: None,
                    source: None,
                    model: None,
                    month: None,
                    total_requests,
                    prompt_tokens,
                    completion_tokens,
                    total_tokens,
                    // Summed exactly as Decimal in ClickHouse; a JSON number here.
                    estimated_cost_usd: cost.parse().unwrap_or(0.0),
                };
                *match params.group_by {
                    GroupBy::Day => &mut item.date,
                    GroupBy::User => &mut item.user_hash,
                    GroupBy::Source => &mut item.source,
                    GroupBy::Model => &mut item.model,
                    GroupBy::Month => &mut item.month,
                } = Some(dim);
                item
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
        SummaryParams::parse(
            &crate::params::query_of(pairs),
            "2025-11-30".parse().unwrap(),
        )
    }

    fn range(from: &str, to: &str) -> DateRange {
        DateRange {
            from: from.parse().unwrap(),
            to: to.parse().unwrap(),
        }
    }

    #[test]
    fn whole_months_are_those_the_range_covers_entirely() {
        let months = |from, to| {
            whole_months(&range(from, to))
                .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        };
        let some = |a: &str, b: &str, c: &str| Some((a.into(), b.into(), c.into()));
        assert_eq!(
            months("2025-01-15", "2025-12-20"),
            some("2025-02-01", "2025-11-01", "2025-11-30")
        );
        assert_eq!(
            months("2025-03-01", "2025-03-31"),
            some("2025-03-01", "2025-03-01", "2025-03-31")
        );
        assert_eq!(
            months("2024-02-01", "2024-02-29"),
            some("2024-02-01", "2024-02-01", "2024-02-29")
        );
        assert_eq!(
            months("2025-01-31", "2025-03-01"),
            some("2025-02-01", "2025-02-01", "2025-02-28")
        );
        assert_eq!(
            months("2025-12-01", "2026-01-31"),
            some("2025-12-01", "2026-01-01", "2026-01-31")
        );
        assert_eq!(months("2025-03-02", "2025-03-31"), None);
        assert_eq!(months("2025-03-01", "2025-03-30"), None);
        assert_eq!(months("2025-03-10", "2025-04-20"), None);
    }

    proptest::proptest! {
        /// A day is served from the monthly rollup exactly when its whole
        /// month lies in the range; every other day of the range from the
        /// daily one: each day once.
        #[test]
        fn each_day_of_the_range_is_read_from_exactly_one_rollup(
            start in 0i64..3000, len in 0i64..800,
        ) {
            let epoch: NaiveDate = "2020-01-01".parse().unwrap();
            let r = DateRange {
                from: epoch + chrono::Duration::days(start),
                to: epoch + chrono::Duration::days(start + len),
            };
            let months = whole_months(&r);
            let mut d = r.from;
            while d <= r.to {
                let first = d.with_day(1).unwrap();
                let last = first.checked_add_months(Months::new(1)).unwrap().pred_opt().unwrap();
                let whole = first >= r.from && last <= r.to;
                let monthly = months.is_some_and(|(from, to, end)| d >= from && d <= end && first <= to);
                proptest::prop_assert_eq!(monthly, whole, "{} in {:?}", d, r);
                d = d.succ_opt().unwrap();
            }
        }
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

//! `GET /provider/fleet/overview`: the fleet at a glance.
//!
//! Installations (registered, active in the last 30 days, new this month);
//! generations, tokens and estimated cost all time, month to date and over
//! the last 30 days; revenue from the plans' monthly prices (the governance
//! policy's `monthly_price_usd`) and the margin after model cost this month;
//! the top 10 installations by tokens and by cost over the last 30 days (with
//! their cost this month, revenue and margin, as the plugin's original
//! dashboard showed); a daily trend over `date_from`..`date_to` (default the
//! last 30 days) next to the period just before; and the installations near
//! or over their plan's cap this month.
//!
//! Days are UTC. Month-to-date and the cap counts read the days of this UTC
//! month by `created_at` (a late event billed to this month but created in
//! the previous one is counted there).

use chrono::{Datelike, Duration, Months, NaiveDate};
use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};
use usage_service_kit::policy::Policy;

use super::{usd, Fleet};
use crate::error::QueryError;
use crate::params::{DateRange, Query};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Overview {
    /// The UTC day the figures are for.
    pub today: String,
    pub month: String,
    pub installations: InstallationCounts,
    pub usage: UsageWindows,
    pub revenue: Revenue,
    pub top_by_tokens: Vec<TopInstallation>,
    pub top_by_cost: Vec<TopInstallation>,
    pub trend: Trend,
    pub near_cap: Vec<NearCap>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InstallationCounts {
    pub total: u64,
    pub active_30d: u64,
    pub new_this_month: u64,
}

#[derive(Debug, Default, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Usage {
    pub generations: u64,
    pub tokens: u64,
    pub cost_usd: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageWindows {
    pub all_time: Usage,
    pub month_to_date: Usage,
    pub last_30_days: Usage,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PlanRevenue {
    pub plan: String,
    pub installations: u64,
    pub monthly_price_usd: f64,
    pub revenue_usd: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Revenue {
    /// The plans' monthly prices over the registered installations.
    pub month_usd: f64,
    pub cost_month_to_date_usd: f64,
    pub margin_month_to_date_usd: f64,
    pub by_plan: Vec<PlanRevenue>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TopInstallation {
    pub install_id: String,
    pub account_id: String,
    pub plan: String,
    pub generations_30d: u64,
    pub tokens_30d: u64,
    pub cost_30d_usd: f64,
    pub cost_month_to_date_usd: f64,
    pub revenue_usd: f64,
    /// Revenue minus the cost this month.
    pub margin_usd: f64,
}

#[derive(Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Day {
    pub date: String,
    pub generations: u64,
    pub tokens: u64,
    pub cost_usd: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Period {
    pub date_from: String,
    pub date_to: String,
    pub days: Vec<Day>,
    pub total: Usage,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Trend {
    pub current: Period,
    /// The same number of days just before.
    pub previous: Period,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NearCap {
    pub install_id: String,
    pub account_id: String,
    pub plan: String,
    pub used: u64,
    pub cap: u64,
    pub percent: f64,
    pub level: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverviewParams {
    pub range: DateRange,
}

impl OverviewParams {
    pub fn parse(params: &Query, today: NaiveDate) -> Result<Self, QueryError> {
        Ok(Self {
            range: DateRange::parse(params, today)?,
        })
    }

    pub fn key(&self) -> String {
        format!("{}..{}", self.range.from, self.range.to)
    }
}

#[derive(Debug, Row, Deserialize)]
struct TopRow {
    install_id: String,
    account_id: String,
    plan: String,
    generations: u64,
    tokens: u64,
    cost: String,
    cost_mtd: String,
}

fn month_start(day: NaiveDate) -> NaiveDate {
    day.with_day(1).unwrap_or(day)
}

fn usage_of((generations, tokens, cost): (u64, u64, String)) -> Usage {
    Usage {
        generations,
        tokens,
        cost_usd: usd(&cost),
    }
}

pub async fn overview(
    client: &Client,
    fleet: &Fleet,
    policy: &Policy,
    params: &OverviewParams,
    today: NaiveDate,
) -> Result<Overview, QueryError> {
    let month = month_start(today);
    let d30 = today - Duration::days(29);
    let since = month.min(d30);
    let q = |sql: &str| {
        let sql = sql.replace("{fleet}", fleet.sql());
        fleet
            .bind(client.query(&sql))
            .param("month", month.to_string())
            .param("d30", d30.to_string())
            .param("since", since.to_string())
    };

    let total: u64 = q("SELECT count() FROM installation_metadata FINAL WHERE {fleet}")
        .fetch_one()
        .await?;
    let (active_30d, new_this_month): (u64, u64) = q(
        "SELECT countIf(last >= toDateTime64({d30:Date}, 3)), countIf(first >= toDateTime64({month:Date}, 3))
         FROM (SELECT install_id, min(first_seen) AS first, max(last_seen) AS last
               FROM installation_activity WHERE {fleet} GROUP BY install_id)",
    )
    .fetch_one()
    .await?;
    // The last year from the per-installation daily rollup (a few rows an
    // installation a day: a tenth of the monthly rollup's rows, which
    // keep every user, source and model), the months before from the
    // monthly one (the daily rows expire after two years, those never).
    let daily_from = month - Months::new(12);
    let all_time: (u64, u64, String) = q("SELECT sum(r), sum(t), toString(sum(c))
         FROM (SELECT sum(requests) AS r, sum(total_tokens) AS t, sum(cost_usd) AS c
               FROM usage_monthly WHERE {fleet} AND month < {daily_from:Date}
               UNION ALL
               SELECT sum(requests), sum(total_tokens), sum(cost_usd)
               FROM usage_install_daily WHERE {fleet} AND date >= {daily_from:Date})")
    .param("daily_from", daily_from.to_string())
    .fetch_one()
    .await?;
    let windows: (u64, u64, String, u64, u64, String) = q(
        "SELECT sumIf(requests, date >= {month:Date}), sumIf(total_tokens, date >= {month:Date}),
                toString(sumIf(cost_usd, date >= {month:Date})),
                sumIf(requests, date >= {d30:Date}), sumIf(total_tokens, date >= {d30:Date}),
                toString(sumIf(cost_usd, date >= {d30:Date}))
         FROM usage_install_daily WHERE {fleet} AND date >= {since:Date}",
    )
    .fetch_one()
    .await?;
    let month_to_date = usage_of((windows.0, windows.1, windows.2));
    let last_30_days = usage_of((windows.3, windows.4, windows.5));

    let plans: Vec<(String, u64)> = q(
        "SELECT plan, count() FROM installation_metadata FINAL WHERE {fleet} GROUP BY plan ORDER BY plan",
    )
    .fetch_all()
    .await?;
    let by_plan: Vec<PlanRevenue> = plans
        .into_iter()
        .map(|(plan, installations)| {
            let price = policy.plan(&plan).monthly_price_usd;
            PlanRevenue {
                revenue_usd: round_cents(price * installations as f64),
                monthly_price_usd: price,
                installations,
                plan,
            }
        })
        .collect();
    let revenue_month = round_cents(by_plan.iter().map(|p| p.revenue_usd).sum());

    let top = |order: &'static str| {
        let sql = format!(
            "SELECT u.install_id AS install_id, ifNull(m.account_id, '') AS account_id,
                    ifNull(m.plan, '') AS plan, u.generations AS generations, u.tokens AS tokens,
                    toString(u.cost) AS cost, toString(u.cost_mtd) AS cost_mtd
             FROM (SELECT install_id, sumIf(requests, date >= {{d30:Date}}) AS generations,
                          sumIf(total_tokens, date >= {{d30:Date}}) AS tokens,
                          sumIf(cost_usd, date >= {{d30:Date}}) AS cost,
                          sumIf(cost_usd, date >= {{month:Date}}) AS cost_mtd
                   FROM usage_install_daily
                   WHERE {{fleet}} AND date >= {{since:Date}}
                   GROUP BY install_id
                   ORDER BY {order} DESC, install_id LIMIT 10) AS u
             LEFT JOIN (SELECT install_id, account_id, plan FROM installation_metadata FINAL) AS m
                    ON m.install_id = u.install_id
             ORDER BY u.{order} DESC, install_id
             SETTINGS join_use_nulls = 1"
        );
        let query = q(&sql);
        async move {
            let rows: Vec<TopRow> = query.fetch_all().await?;
            Ok::<_, QueryError>(
                rows.into_iter()
                    .map(|r| {
                        let revenue = policy.plan(&r.plan).monthly_price_usd;
                        let cost_mtd = usd(&r.cost_mtd);
                        TopInstallation {
                            install_id: r.install_id,
                            account_id: r.account_id,
                            generations_30d: r.generations,
                            tokens_30d: r.tokens,
                            cost_30d_usd: usd(&r.cost),
                            cost_month_to_date_usd: cost_mtd,
                            revenue_usd: revenue,
                            margin_usd: revenue - cost_mtd,
                            plan: r.plan,
                        }
                    })
                    .collect::<Vec<_>>(),
            )
        }
    };
    let top_by_tokens = top("tokens").await?;
    let top_by_cost = top("cost").await?;

    let trend = trend(client, fleet, &params.range).await?;
    let near_cap = near_cap(client, fleet, policy, month).await?;

    Ok(Overview {
        today: today.to_string(),
        month: format!("{:04}-{:02}", month.year(), month.month()),
        installations: InstallationCounts {
            total,
            active_30d,
            new_this_month,
        },
        usage: UsageWindows {
            all_time: usage_of(all_time),
            month_to_date: month_to_date.clone_usage(),
            last_30_days,
        },
        revenue: Revenue {
            month_usd: revenue_month,
            cost_month_to_date_usd: month_to_date.cost_usd,
            margin_month_to_date_usd: revenue_month - month_to_date.cost_usd,
            by_plan,
        },
        top_by_tokens,
        top_by_cost,
        trend,
        near_cap,
    })
}

impl Usage {
    fn clone_usage(&self) -> Usage {
        Usage {
            generations: self.generations,
            tokens: self.tokens,
            cost_usd: self.cost_usd,
        }
    }
}

fn round_cents(usd: f64) -> f64 {
    (usd * 100.0).round() / 100.0
}

/// Daily totals over `range` and over the same number of days before it;
/// days without usage are zeros.
pub async fn trend(client: &Client, fleet: &Fleet, range: &DateRange) -> Result<Trend, QueryError> {
    let days = (range.to - range.from).num_days() + 1;
    let previous = DateRange {
        from: range.from - Duration::days(days),
        to: range.from - Duration::days(1),
    };
    let sql = "SELECT toString(date), sum(requests), sum(total_tokens), toString(sum(cost_usd))
               FROM usage_install_daily
               WHERE {fleet} AND date >= {from:Date} AND date <= {to:Date}
               GROUP BY date ORDER BY date"
        .replace("{fleet}", fleet.sql());
    let rows: Vec<(String, u64, u64, String)> = fleet
        .bind(client.query(&sql))
        .param("from", previous.from.to_string())
        .param("to", range.to.to_string())
        .fetch_all()
        .await?;
    Ok(Trend {
        current: period(range, &rows),
        previous: period(&previous, &rows),
    })
}

fn period(range: &DateRange, rows: &[(String, u64, u64, String)]) -> Period {
    let mut days = Vec::new();
    let mut total = Usage::default();
    let mut day = range.from;
    while day <= range.to {
        let date = day.to_string();
        let (generations, tokens, cost_usd) = rows
            .iter()
            .find(|r| r.0 == date)
            .map_or((0, 0, 0.0), |r| (r.1, r.2, usd(&r.3)));
        total.generations += generations;
        total.tokens += tokens;
        total.cost_usd += cost_usd;
        days.push(Day {
            date,
            generations,
            tokens,
            cost_usd,
        });
        day += Duration::days(1);
    }
    Period {
        date_from: range.from.to_string(),
        date_to: range.to.to_string(),
        days,
        total,
    }
}

/// Installations at or past their plan's warning threshold this month,
/// fullest first (at most 100).
async fn near_cap(
    client: &Client,
    fleet: &Fleet,
    policy: &Policy,
    month: NaiveDate,
) -> Result<Vec<NearCap>, QueryError> {
    // Nothing below the smallest warning level can be near a cap: the
    // query leaves those out before the join.
    let Some(least) = policy
        .plans
        .values()
        .filter_map(|p| p.monthly_cap)
        .map(|cap| policy.level_starts(cap)[0].1)
        .min()
    else {
        return Ok(Vec::new());
    };
    let sql = "SELECT d.install_id, ifNull(m.account_id, ''), ifNull(m.plan, ''), d.used
               FROM (SELECT install_id, sum(requests) AS used FROM usage_install_daily
                     WHERE {fleet} AND date >= {month:Date}
                     GROUP BY install_id HAVING used >= {least:UInt64}) AS d
               LEFT JOIN (SELECT install_id, account_id, plan FROM installation_metadata FINAL) AS m
                      ON m.install_id = d.install_id
               SETTINGS join_use_nulls = 1"
        .replace("{fleet}", fleet.sql());
    let rows: Vec<(String, String, String, u64)> = fleet
        .bind(client.query(&sql))
        .param("month", month.to_string())
        .param("least", least)
        .fetch_all()
        .await?;
    let mut near: Vec<NearCap> = rows
        .into_iter()
        .filter_map(|(install_id, account_id, plan, used)| {
            let cap = policy.plan(&plan).monthly_cap?;
            let level = policy.level(used, Some(cap));
            (level != usage_service_kit::policy::Level::Ok).then(|| NearCap {
                percent: if cap == 0 {
                    100.0
                } else {
                    (used as f64 * 1000.0 / cap as f64).round() / 10.0
                },
                level: level.as_str().to_string(),
                install_id,
                account_id,
                plan,
                used,
                cap,
            })
        })
        .collect();
    near.sort_by(|a, b| {
        b.percent
            .total_cmp(&a.percent)
            .then(a.install_id.cmp(&b.install_id))
    });
    near.truncate(100);
    Ok(near)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_period_lists_every_day_with_zeros_where_nothing_happened() {
        let range =
            DateRange::new("2026-11-29".parse().unwrap(), "2026-12-01".parse().unwrap()).unwrap();
        let rows = vec![
            ("2026-11-28".to_string(), 9, 90, "1".to_string()),
            ("2026-11-30".to_string(), 3, 30, "0.25".to_string()),
        ];
        let p = period(&range, &rows);
        assert_eq!(
            p.days
                .iter()
                .map(|d| (d.date.as_str(), d.generations))
                .collect::<Vec<_>>(),
            [("2026-11-29", 0), ("2026-11-30", 3), ("2026-12-01", 0)]
        );
        assert_eq!(
            p.total,
            Usage {
                generations: 3,
                tokens: 30,
                cost_usd: 0.25
            }
        );
    }
}

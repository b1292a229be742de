//! Each installation's daily generations and cost over a few weeks, read
//! one installation at a time (a cursor), so that projecting or screening a
//! fleet of 100,000 installations never holds all their days at once.

use chrono::NaiveDate;
use clickhouse::{Client, Row};
use serde::Deserialize;

use super::Fleet;
use crate::error::QueryError;

/// One installation's days `first`.. (index 0 = `first`), zeros where it had
/// no usage.
#[derive(Debug, Clone, PartialEq)]
pub struct DailySeries {
    pub install_id: String,
    pub first: NaiveDate,
    pub generations: Vec<f64>,
    pub cost: Vec<f64>,
}

impl DailySeries {
    pub fn zeros(install_id: String, first: NaiveDate, days: usize) -> Self {
        Self {
            install_id,
            first,
            generations: vec![0.0; days],
            cost: vec![0.0; days],
        }
    }
}

/// The days `from..=to` of the whole fleet (`install_id` empty).
pub async fn totals(
    client: &Client,
    fleet: &Fleet,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<DailySeries, QueryError> {
    let days = usize::try_from((to - from).num_days() + 1).unwrap_or(0);
    let sql = "SELECT toUInt16(dateDiff('day', {from:Date}, date)) AS day, sum(requests),
                      toFloat64(sum(cost_usd))
               FROM usage_install_daily
               WHERE {fleet} AND date >= {from:Date} AND date <= {to:Date}
               GROUP BY day"
        .replace("{fleet}", fleet.sql());
    let rows: Vec<(u16, u64, f64)> = fleet
        .bind(client.query(&sql))
        .param("from", from.to_string())
        .param("to", to.to_string())
        .fetch_all()
        .await?;
    let mut series = DailySeries::zeros(String::new(), from, days);
    for (day, generations, cost) in rows {
        let i = usize::from(day);
        if i < days {
            series.generations[i] = generations as f64;
            series.cost[i] = cost;
        }
    }
    Ok(series)
}

#[derive(Row, Deserialize)]
struct SeriesRow {
    install_id: String,
    days: Vec<u16>,
    generations: Vec<u64>,
    cost: Vec<f64>,
}

/// Calls `each` with the series over `from..=to` of every installation of
/// `fleet` with usage in those days.
pub async fn scan(
    client: &Client,
    fleet: &Fleet,
    from: NaiveDate,
    to: NaiveDate,
    mut each: impl FnMut(DailySeries),
) -> Result<(), QueryError> {
    let days = usize::try_from((to - from).num_days() + 1).unwrap_or(0);
    let sql = "SELECT install_id, groupArray(toUInt16(dateDiff('day', {from:Date}, date))) AS days,
                      groupArray(requests) AS generations, groupArray(toFloat64(cost_usd)) AS cost
               FROM usage_install_daily
               WHERE {fleet} AND date >= {from:Date} AND date <= {to:Date}
               GROUP BY install_id"
        .replace("{fleet}", fleet.sql());
    let mut cursor = fleet
        .bind(client.query(&sql))
        .param("from", from.to_string())
        .param("to", to.to_string())
        .fetch::<SeriesRow>()?;
    while let Some(row) = cursor.next().await? {
        let mut series = DailySeries::zeros(row.install_id, from, days);
        for ((day, generations), cost) in row.days.iter().zip(&row.generations).zip(&row.cost) {
            let i = usize::from(*day);
            if i < days {
                series.generations[i] += *generations as f64;
                series.cost[i] += *cost;
            }
        }
        each(series);
    }
    Ok(())
}

//! The rollup rows a batch adds: the sums of its events stored for the first
//! time, per key of each rollup table. Pure, so that what ClickHouse ends up
//! summing is checked here against the events themselves.
//!
//! The tables are SummingMergeTree (migrations 0012-0014): inserting these
//! rows adds them to whatever the keys held, and merges fold rows of the
//! same key into one.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate};
use clickhouse::Row;
use serde::Serialize;
use usage_schemas::rows::UsageEventRow;

/// The summed columns, shared by the three tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sums {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Decimal(38, 12): USD × 10^12.
    pub cost_usd: i128,
    pub over_limit_requests: u64,
    pub over_limit_tokens: u64,
}

impl Sums {
    fn add(&mut self, e: &UsageEventRow) {
        let over = !e.over_limit.is_empty();
        self.requests += 1;
        self.prompt_tokens += u64::from(e.prompt_tokens);
        self.completion_tokens += u64::from(e.completion_tokens);
        self.total_tokens += u64::from(e.total_tokens);
        self.cost_usd += i128::from(e.cost_usd);
        self.over_limit_requests += u64::from(over);
        self.over_limit_tokens += if over { u64::from(e.total_tokens) } else { 0 };
    }
}

/// A row of `usage_daily` (migration 0012).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize)]
pub struct DailyRow {
    pub install_id: String,
    #[serde(with = "clickhouse::serde::chrono::date")]
    pub date: NaiveDate,
    pub user_hash: String,
    pub source: String,
    pub model: String,
    #[serde(with = "clickhouse::serde::chrono::date")]
    pub late_billing_month: NaiveDate,
    pub account_id: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Decimal(38, 12): USD × 10^12.
    pub cost_usd: i128,
    pub over_limit_requests: u64,
    pub over_limit_tokens: u64,
}

/// A row of `usage_install_daily` (migration 0013).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize)]
pub struct InstallDailyRow {
    #[serde(with = "clickhouse::serde::chrono::date")]
    pub date: NaiveDate,
    pub install_id: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Decimal(38, 12): USD × 10^12.
    pub cost_usd: i128,
    pub over_limit_requests: u64,
    pub over_limit_tokens: u64,
}

/// A row of `usage_monthly` (migration 0014).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize)]
pub struct MonthlyRow {
    pub install_id: String,
    #[serde(with = "clickhouse::serde::chrono::date")]
    pub month: NaiveDate,
    pub user_hash: String,
    pub source: String,
    pub model: String,
    #[serde(with = "clickhouse::serde::chrono::date")]
    pub late_billing_month: NaiveDate,
    pub account_id: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Decimal(38, 12): USD × 10^12.
    pub cost_usd: i128,
    pub over_limit_requests: u64,
    pub over_limit_tokens: u64,
}

/// The rows one batch adds to each rollup table, grouped by the table's
/// partition (`YYYYMM` of the day, `YYYY` of the month for the monthly
/// table): one insert per partition, so that each insert is one part,
/// written or not as a whole, under a deduplication token of its own.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Deltas {
    pub daily: BTreeMap<u32, Vec<DailyRow>>,
    pub install_daily: BTreeMap<u32, Vec<InstallDailyRow>>,
    pub monthly: BTreeMap<u32, Vec<MonthlyRow>>,
}

/// `1970-01-01`: ClickHouse's Date zero, what `late_billing_month` holds
/// for events billed to their own month.
pub fn date_zero() -> NaiveDate {
    DateTime::UNIX_EPOCH.date_naive()
}

pub fn month_of(day: NaiveDate) -> NaiveDate {
    day.with_day(1).unwrap_or(day)
}

fn yyyymm(day: NaiveDate) -> u32 {
    u32::try_from(day.year()).unwrap_or(0) * 100 + day.month()
}

/// The billing month of an event dated in an earlier month (it arrived
/// after that month closed and counts toward a later one): its rows keep it
/// apart (migration 0011). Zero for every other event.
pub fn late_billing_month(created: NaiveDate, billing_month: NaiveDate) -> NaiveDate {
    if billing_month == month_of(created) {
        date_zero()
    } else {
        billing_month
    }
}

type DailyKey = (String, NaiveDate, String, String, String, NaiveDate);

/// Sums `rows` (the batch's first-seen events, priced) into rollup rows.
pub fn deltas<'a>(rows: impl IntoIterator<Item = &'a UsageEventRow>) -> Deltas {
    let mut daily: BTreeMap<DailyKey, (String, Sums)> = BTreeMap::new();
    let mut install_daily: BTreeMap<(NaiveDate, String), Sums> = BTreeMap::new();
    let mut monthly: BTreeMap<DailyKey, (String, Sums)> = BTreeMap::new();
    for e in rows {
        let day = e.created_at.date_naive();
        let late = late_billing_month(day, e.billing_month);
        let key = |at: NaiveDate| {
            (
                e.install_id.clone(),
                at,
                e.user_hash.clone(),
                e.source.clone(),
                e.model.clone(),
                late,
            )
        };
        daily
            .entry(key(day))
            .or_insert_with(|| (e.account_id.clone(), Sums::default()))
            .1
            .add(e);
        monthly
            .entry(key(month_of(day)))
            .or_insert_with(|| (e.account_id.clone(), Sums::default()))
            .1
            .add(e);
        install_daily
            .entry((day, e.install_id.clone()))
            .or_default()
            .add(e);
    }
    let mut out = Deltas::default();
    for ((install_id, date, user_hash, source, model, late), (account_id, sums)) in daily {
        out.daily.entry(yyyymm(date)).or_default().push(DailyRow {
            install_id,
            date,
            user_hash,
            source,
            model,
            late_billing_month: late,
            account_id,
            requests: sums.requests,
            prompt_tokens: sums.prompt_tokens,
            completion_tokens: sums.completion_tokens,
            total_tokens: sums.total_tokens,
            cost_usd: sums.cost_usd,
            over_limit_requests: sums.over_limit_requests,
            over_limit_tokens: sums.over_limit_tokens,
        });
    }
    for ((install_id, month, user_hash, source, model, late), (account_id, sums)) in monthly {
        let year = u32::try_from(month.year()).unwrap_or(0);
        out.monthly.entry(year).or_default().push(MonthlyRow {
            install_id,
            month,
            user_hash,
            source,
            model,
            late_billing_month: late,
            account_id,
            requests: sums.requests,
            prompt_tokens: sums.prompt_tokens,
            completion_tokens: sums.completion_tokens,
            total_tokens: sums.total_tokens,
            cost_usd: sums.cost_usd,
            over_limit_requests: sums.over_limit_requests,
            over_limit_tokens: sums.over_limit_tokens,
        });
    }
    for ((date, install_id), sums) in install_daily {
        out.install_daily
            .entry(yyyymm(date))
            .or_default()
            .push(InstallDailyRow {
                date,
                install_id,
                requests: sums.requests,
                prompt_tokens: sums.prompt_tokens,
                completion_tokens: sums.completion_tokens,
                total_tokens: sums.total_tokens,
                cost_usd: sums.cost_usd,
                over_limit_requests: sums.over_limit_requests,
                over_limit_tokens: sums.over_limit_tokens,
            });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;

    fn row(install: &str, day: u32, tokens: u32, over: bool, late: bool) -> UsageEventRow {
        let created = Utc.with_ymd_and_hms(2025, 11, day, 12, 0, 0).unwrap();
        UsageEventRow {
            event_id: format!("e{day}{tokens}"),
            install_id: install.into(),
            account_id: "acct".into(),
            wp_site_id: None,
            user_hash: "u".into(),
            source: "media-library".into(),
            model: "gpt-4o-mini".into(),
            prompt_tokens: tokens,
            completion_tokens: 1,
            total_tokens: tokens + 1,
            cost_usd: i64::from(tokens) * 1_000,
            context: String::new(),
            created_at: created,
            processed_at: None,
            batch_sent_at: None,
            received_at: created,
            signature_scheme: "v1".into(),
            gateway_instance: "g".into(),
            over_limit: if over { "rate".into() } else { String::new() },
            billing_month: if late {
                NaiveDate::from_ymd_opt(2025, 12, 1).unwrap()
            } else {
                NaiveDate::from_ymd_opt(2025, 11, 1).unwrap()
            },
        }
    }

    #[test]
    fn sums_each_key_and_keeps_late_events_apart() {
        let rows = [
            row("a", 3, 10, false, false),
            row("a", 3, 20, true, false),
            row("a", 3, 5, false, true),
            row("b", 4, 7, false, false),
        ];
        let d = deltas(&rows);
        let daily = &d.daily[&202511];
        assert_eq!(daily.len(), 3);
        let a = &daily[0];
        assert_eq!(
            (a.install_id.as_str(), a.late_billing_month),
            ("a", date_zero())
        );
        assert_eq!(a.requests, 2);
        assert_eq!(a.total_tokens, 11 + 21);
        assert_eq!(a.cost_usd, 30_000);
        assert_eq!((a.over_limit_requests, a.over_limit_tokens), (1, 21));
        assert_eq!(
            daily[1].late_billing_month,
            NaiveDate::from_ymd_opt(2025, 12, 1).unwrap()
        );
        assert_eq!(d.install_daily[&202511][0].requests, 3);
        assert_eq!(d.monthly[&2025].len(), 3);
        assert_eq!(
            d.monthly[&2025][0].month,
            NaiveDate::from_ymd_opt(2025, 11, 1).unwrap()
        );
    }

    proptest! {
        /// Every table's rows add up to the events, whatever their mix.
        #[test]
        fn every_table_adds_up_to_the_events(
            spec in proptest::collection::vec((0u8..4, 1u32..29, 0u32..5000, any::<bool>(), any::<bool>()), 0..200)
        ) {
            let rows: Vec<UsageEventRow> = spec
                .iter()
                .map(|(i, day, t, over, late)| row(&format!("i{i}"), *day, *t, *over, *late))
                .collect();
            let d = deltas(&rows);
            macro_rules! total { ($r:expr) => { ($r.requests, $r.total_tokens, $r.cost_usd, $r.over_limit_tokens) } }
            let add = |a: (u64, u64, i128, u64), b: (u64, u64, i128, u64)| (a.0 + b.0, a.1 + b.1, a.2 + b.2, a.3 + b.3);
            let mut expected = (0u64, 0u64, 0i128, 0u64);
            for r in &rows {
                let over = !r.over_limit.is_empty();
                expected = add(expected, (1, u64::from(r.total_tokens), i128::from(r.cost_usd), if over { u64::from(r.total_tokens) } else { 0 }));
            }
            let sum_of = |it: Vec<(u64, u64, i128, u64)>| it.into_iter().fold((0, 0, 0, 0), add);
            prop_assert_eq!(sum_of(d.daily.values().flatten().map(|r| total!(r)).collect()), expected);
            prop_assert_eq!(sum_of(d.install_daily.values().flatten().map(|r| total!(r)).collect()), expected);
            prop_assert_eq!(sum_of(d.monthly.values().flatten().map(|r| total!(r)).collect()), expected);
        }
    }
}

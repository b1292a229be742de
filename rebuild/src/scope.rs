//! What a rebuild covers: all installations or some, all days of
//! `created_at` or a range of them. Everything outside the scope is kept
//! as the live tables hold it (copied into the shadow tables at the swap).
//!
//! The same scope is written three ways, kept side by side here so they
//! cannot drift: a Rust test on one event, a SQL condition with server-side
//! parameters (no hand-quoted SQL), and the month partitions it touches.

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};

/// ClickHouse's `Date` range: what "no bound" means in SQL.
pub const DATE_MIN: NaiveDate = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");
pub const DATE_MAX: NaiveDate = NaiveDate::from_ymd_opt(2149, 6, 6).expect("valid date");

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// Empty: every installation.
    pub installs: Vec<String>,
    /// First and last day of `created_at` (UTC), inclusive; `None`: unbounded.
    pub since: Option<NaiveDate>,
    pub until: Option<NaiveDate>,
}

impl Scope {
    pub fn since_or_min(&self) -> NaiveDate {
        self.since.unwrap_or(DATE_MIN)
    }

    pub fn until_or_max(&self) -> NaiveDate {
        self.until.unwrap_or(DATE_MAX)
    }

    pub fn is_all(&self) -> bool {
        self.installs.is_empty() && self.since.is_none() && self.until.is_none()
    }

    pub fn covers_install(&self, install: &str) -> bool {
        self.installs.is_empty() || self.installs.iter().any(|i| i == install)
    }

    pub fn covers_day(&self, day: NaiveDate) -> bool {
        (self.since_or_min()..=self.until_or_max()).contains(&day)
    }

    pub fn contains(&self, install: &str, day: NaiveDate) -> bool {
        self.covers_install(install) && self.covers_day(day)
    }

    /// Whether a month (its first day) has any day in the scope.
    pub fn touches_month(&self, month: NaiveDate) -> bool {
        let last = month
            .checked_add_months(chrono::Months::new(1))
            .and_then(|m| m.pred_opt())
            .unwrap_or(DATE_MAX);
        month <= self.until_or_max() && last >= self.since_or_min()
    }

    /// Whether every day of a month is in the date range.
    pub fn spans_month(&self, month: NaiveDate) -> bool {
        let last = month
            .checked_add_months(chrono::Months::new(1))
            .and_then(|m| m.pred_opt())
            .unwrap_or(DATE_MAX);
        month >= self.since_or_min() && last <= self.until_or_max()
    }

    /// The events topic's partitions that can hold the scope's events (an
    /// installation's are all in the one its id hashes to, the gateway's
    /// pinned partitioner); `None`: all of them.
    pub fn partitions(&self, count: i32) -> Option<std::collections::BTreeSet<i32>> {
        (!self.installs.is_empty()).then(|| {
            self.installs
                .iter()
                .map(|i| usage_service_kit::kafka::partition_for_key(i.as_bytes(), count))
                .collect()
        })
    }

    /// The SQL condition "in scope" for rows whose installation is
    /// `install_id` and whose day is `day` (an expression), with the
    /// parameters `scope_installs`, `scope_since`, `scope_until`
    /// ([`Scope::bind`]).
    pub fn sql(day: &str) -> String {
        format!(
            "((empty({{scope_installs:Array(String)}}) OR has({{scope_installs:Array(String)}}, install_id)) \
             AND {day} BETWEEN {{scope_since:Date}} AND {{scope_until:Date}})"
        )
    }

    /// The SQL condition for monthly rows (`month`) of a month the scope
    /// touches, for its installations.
    pub fn sql_month() -> String {
        "((empty({scope_installs:Array(String)}) OR has({scope_installs:Array(String)}, install_id)) \
         AND month BETWEEN toStartOfMonth({scope_since:Date}) AND toStartOfMonth({scope_until:Date}))"
            .to_string()
    }

    pub fn bind(&self, query: clickhouse::query::Query) -> clickhouse::query::Query {
        query
            .param("scope_installs", &self.installs)
            .param("scope_since", self.since_or_min().to_string())
            .param("scope_until", self.until_or_max().to_string())
    }

    pub fn describe(&self) -> String {
        let installs = if self.installs.is_empty() {
            "every installation".to_string()
        } else {
            format!(
                "{} installation(s): {}",
                self.installs.len(),
                self.installs.join(", ")
            )
        };
        let days = match (self.since, self.until) {
            (None, None) => "every day".to_string(),
            (s, u) => format!(
                "days {} to {}",
                s.map_or("the first".into(), |d| d.to_string()),
                u.map_or("the last".into(), |d| d.to_string())
            ),
        };
        format!("{installs}, {days} (of created_at, UTC)")
    }
}

/// `YYYYMM` of a day: the partition id of the monthly-partitioned tables.
pub fn yyyymm(day: NaiveDate) -> u32 {
    u32::try_from(day.year()).unwrap_or(0) * 100 + day.month()
}

/// The first day of the month of a `YYYYMM` partition id.
pub fn month_of_partition(id: u32) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(i32::try_from(id / 100).ok()?, id % 100, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn the_empty_scope_covers_everything() {
        let s = Scope::default();
        assert!(s.is_all());
        assert!(s.contains("any", day("1999-01-01")));
        assert!(s.spans_month(day("2026-02-01")));
    }

    #[test]
    fn a_range_touches_and_spans_months() {
        let s = Scope {
            installs: vec![],
            since: Some(day("2026-10-15")),
            until: Some(day("2026-12-31")),
        };
        assert!(!s.touches_month(day("2026-09-01")));
        assert!(s.touches_month(day("2026-10-01")));
        assert!(!s.spans_month(day("2026-10-01")));
        assert!(s.spans_month(day("2026-11-01")));
        assert!(s.spans_month(day("2026-12-01")));
        assert!(!s.touches_month(day("2027-01-01")));
        assert!(s.contains("x", day("2026-10-15")));
        assert!(!s.contains("x", day("2026-10-14")));
    }

    #[test]
    fn installations_narrow_the_scope() {
        let s = Scope {
            installs: vec!["a".into()],
            ..Scope::default()
        };
        assert!(s.contains("a", day("2026-01-01")));
        assert!(!s.contains("b", day("2026-01-01")));
        assert!(!s.is_all());
    }

    #[test]
    fn partition_ids_round_trip() {
        assert_eq!(yyyymm(day("2026-03-09")), 202603);
        assert_eq!(month_of_partition(202603), Some(day("2026-03-01")));
        assert_eq!(month_of_partition(202613), None);
    }

    proptest! {
        // A day is in the scope exactly when its month is touched and, for
        // a month the range spans, always.
        #[test]
        fn months_agree_with_days(a in 0i64..2000, len in 0i64..400, d in 0i64..3000) {
            let base = day("2024-01-01");
            let since = base + chrono::Duration::days(a);
            let until = since + chrono::Duration::days(len);
            let s = Scope { installs: vec![], since: Some(since), until: Some(until) };
            let x = base + chrono::Duration::days(d);
            let month = x.with_day(1).unwrap();
            if s.covers_day(x) { prop_assert!(s.touches_month(month)); }
            if s.spans_month(month) { prop_assert!(s.covers_day(x)); }
        }
    }
}

//! Query-string parameters every read endpoint shares: the date range and the
//! row filters, parsed into typed values with a 400 that says what to fix.
//!
//! Values never reach SQL as text: [`Filters::sql`] writes only server-side
//! parameter placeholders (`{source:String}`) and [`Filters::bind`] sends the
//! values as ClickHouse query parameters.

use std::collections::HashMap;

use chrono::{Duration, NaiveDate};

use crate::error::QueryError;

/// Longest date range one request may cover.
pub const MAX_RANGE_DAYS: i64 = 731;
/// The contract's sources.
pub const SOURCES: [&str; 4] = ["inline", "bulk", "queue", "manual"];

pub type Query = HashMap<String, String>;

/// A query string from pairs (the parsers' tests).
#[cfg(test)]
pub fn query_of(pairs: &[(&str, &str)]) -> Query {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn date(params: &Query, name: &str) -> Result<Option<NaiveDate>, QueryError> {
    params
        .get(name)
        .filter(|s| !s.is_empty())
        .map(|s| {
            NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| {
                QueryError::BadRequest(format!("{name} must be a date like 2025-10-01, not {s:?}"))
            })
        })
        .transpose()
}

pub fn number(params: &Query, name: &str, default: u64) -> Result<u64, QueryError> {
    params.get(name).map_or(Ok(default), |s| {
        s.parse().map_err(|_| {
            QueryError::BadRequest(format!("{name} must be a non-negative integer, not {s:?}"))
        })
    })
}

/// `limit` in `1..=max`, `default` when absent.
pub fn limit(params: &Query, default: u64, max: u64) -> Result<u64, QueryError> {
    let limit = number(params, "limit", default)?;
    if !(1..=max).contains(&limit) {
        return Err(QueryError::BadRequest(format!(
            "limit must be 1 to {max}, not {limit}"
        )));
    }
    Ok(limit)
}

/// An inclusive range of UTC days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    pub from: NaiveDate,
    pub to: NaiveDate,
}

impl DateRange {
    /// `date_from`/`date_to`, by default the 30 days up to `today`.
    pub fn parse(params: &Query, today: NaiveDate) -> Result<Self, QueryError> {
        let to = date(params, "date_to")?.unwrap_or(today);
        let from = date(params, "date_from")?.unwrap_or(to - Duration::days(29));
        Self::new(from, to)
    }

    pub fn new(from: NaiveDate, to: NaiveDate) -> Result<Self, QueryError> {
        if from > to {
            return Err(QueryError::BadRequest(format!(
                "date_to ({to}) is before date_from ({from})"
            )));
        }
        if (to - from).num_days() > MAX_RANGE_DAYS {
            return Err(QueryError::BadRequest(format!(
                "the range may span at most {MAX_RANGE_DAYS} days"
            )));
        }
        Ok(Self { from, to })
    }
}

/// Optional row filters: source, model, user hash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    pub source: Option<String>,
    pub model: Option<String>,
    pub user_hash: Option<String>,
}

fn is_user_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Filters {
    pub fn parse(params: &Query) -> Result<Self, QueryError> {
        let get = |name: &str| params.get(name).filter(|s| !s.is_empty()).cloned();
        let source = get("source");
        if let Some(s) = &source {
            if !SOURCES.contains(&s.as_str()) {
                return Err(QueryError::BadRequest(format!(
                    "source must be one of {}, not {s:?}",
                    SOURCES.join(", ")
                )));
            }
        }
        let model = get("model");
        if let Some(m) = &model {
            if m.len() > 100 {
                return Err(QueryError::BadRequest(
                    "model is at most 100 characters".into(),
                ));
            }
        }
        let user_hash = get("user_hash");
        if let Some(u) = &user_hash {
            if !is_user_hash(u) {
                return Err(QueryError::BadRequest(
                    "user_hash must be 64 hexadecimal characters".into(),
                ));
            }
        }
        Ok(Self {
            source,
            model,
            user_hash,
        })
    }

    /// ` AND ...` conditions for the filters that are set, as placeholders.
    pub fn sql(&self) -> String {
        let mut sql = String::new();
        if self.source.is_some() {
            sql.push_str(" AND source = {source:String}");
        }
        if self.model.is_some() {
            sql.push_str(" AND model = {model:String}");
        }
        if self.user_hash.is_some() {
            sql.push_str(" AND user_hash = {user_hash:String}");
        }
        sql
    }

    pub fn bind(&self, mut query: clickhouse::query::Query) -> clickhouse::query::Query {
        for (name, value) in [
            ("source", &self.source),
            ("model", &self.model),
            ("user_hash", &self.user_hash),
        ] {
            if let Some(v) = value {
                query = query.param(name, v);
            }
        }
        query
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::query_of as q;

    #[test]
    fn the_default_range_is_the_last_30_days() {
        let r = DateRange::parse(&q(&[]), "2025-11-30".parse().unwrap()).unwrap();
        assert_eq!(
            (r.from.to_string(), r.to.to_string()),
            ("2025-11-01".into(), "2025-11-30".into())
        );
    }

    #[test]
    fn a_reversed_range_says_which_date_to_fix() {
        let err = DateRange::parse(
            &q(&[("date_from", "2025-11-10"), ("date_to", "2025-11-01")]),
            "2025-11-30".parse().unwrap(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "date_to (2025-11-01) is before date_from (2025-11-10)"
        );
    }

    #[test]
    fn filters_are_validated_and_become_placeholders_only() {
        let hash = "ab".repeat(32);
        let f = Filters::parse(&q(&[
            ("source", "bulk"),
            ("model", "x' OR 1=1 --"),
            ("user_hash", &hash),
        ]))
        .unwrap();
        assert_eq!(
            f.sql(),
            " AND source = {source:String} AND model = {model:String} AND user_hash = {user_hash:String}"
        );
        assert!(!f.sql().contains("OR 1=1"));
        for bad in [
            vec![("source", "email")],
            vec![("user_hash", "not-a-hash")],
            vec![("model", &"m".repeat(101) as &str)],
        ] {
            assert!(
                matches!(Filters::parse(&q(&bad)), Err(QueryError::BadRequest(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn limits_outside_the_bounds_are_refused() {
        assert_eq!(limit(&q(&[]), 100, 1000).unwrap(), 100);
        assert!(limit(&q(&[("limit", "0")]), 100, 1000).is_err());
        assert!(limit(&q(&[("limit", "1001")]), 100, 1000).is_err());
        assert!(limit(&q(&[("limit", "ten")]), 100, 1000).is_err());
    }
}

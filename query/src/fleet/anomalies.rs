//! `GET /provider/fleet/anomalies`: installations whose usage departs from
//! their own baseline, and those governance flagged, ranked.
//!
//! The method (also stated in every answer, `method`): each of the last
//! `days` UTC days (default 7) is compared with the same installation's 28
//! days before it (days without usage count as zero):
//! - **spike**: generations of the day at least 20 and at least the
//!   baseline's median plus 4 robust standard deviations (1.4826 x the median
//!   absolute deviation, at least the square root of the median, at least 1;
//!   today counts although it is not over), once the baseline has at least 7
//!   days with usage (a new installation's first days are no anomaly);
//! - **drop**: a complete day at most 20% of a median of at least 10 a day;
//! - governance episodes that started in those days (`abuse_flagged`,
//!   `spike_flagged`, `rate_limited`, `blocked`), from the decisions the
//!   processors recorded.
//!
//! Each installation shows once per kind, at its most extreme day. Usage
//! findings score their distance from the median in robust standard
//! deviations (at most 99.9); governance findings score 10 (abuse), 8 (blocked), 6 (spike
//! flag) and 4 (rate limit), plus one per further episode. The list is by
//! score, highest first.

use chrono::{Duration, NaiveDate};
use clickhouse::Client;
use serde::Serialize;

use super::series;
use super::Fleet;
use crate::error::QueryError;
use crate::params::{self, Query};

/// Days each examined day is compared with.
pub const BASELINE_DAYS: usize = 28;
pub const SPIKE_MIN: f64 = 20.0;
pub const SPIKE_SIGMAS: f64 = 4.0;
/// Days with usage a baseline needs before a day can spike above it: a new
/// installation's first busy day is not an anomaly.
pub const SPIKE_MIN_HISTORY: usize = 7;
/// Scores stop here: beyond it, a spike is a spike.
pub const MAX_SCORE: f64 = 99.9;
pub const DROP_MIN_MEDIAN: f64 = 10.0;
pub const DROP_FRACTION: f64 = 0.2;
pub const MAX_DAYS: u64 = 28;
pub const MAX_LIMIT: u64 = 500;

pub const METHOD: &str = "Each of the last days is compared with the same installation's 28 days \
before it (days without usage count as zero). A spike: at least 20 generations and at least the \
median plus 4 robust standard deviations (1.4826 x the median absolute deviation, at least the \
square root of the median and at least 1), once the baseline has 7 days with usage. A drop: a complete day at most 20% of a median of at \
least 10 a day. Also every governance episode (abuse flag, spike flag, rate limit, block) that \
started in those days. Usage findings score their distance from the median in robust standard \
deviations (at most 99.9); abuse scores 10, a block 8, a spike flag 6, a rate limit 4, plus 1 per further \
episode.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnomaliesParams {
    pub days: u64,
    pub limit: u64,
}

impl AnomaliesParams {
    pub fn parse(params: &Query) -> Result<Self, QueryError> {
        let days = params::number(params, "days", 7)?;
        if !(1..=MAX_DAYS).contains(&days) {
            return Err(QueryError::BadRequest(format!(
                "days must be 1 to {MAX_DAYS}, not {days}"
            )));
        }
        Ok(Self {
            days,
            limit: params::limit(params, 100, MAX_LIMIT)?,
        })
    }
}

/// A baseline: the median and the robust standard deviation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Baseline {
    pub median: f64,
    pub sigma: f64,
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

impl Baseline {
    pub fn of(days: &[f64]) -> Self {
        let mut sorted = days.to_vec();
        sorted.sort_by(f64::total_cmp);
        let median = median(&sorted);
        let mut deviations: Vec<f64> = sorted.iter().map(|y| (y - median).abs()).collect();
        deviations.sort_by(f64::total_cmp);
        let mad = self::median(&deviations);
        Self {
            median,
            sigma: (1.4826 * mad).max(median.sqrt()).max(1.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub kind: &'static str,
    pub date: String,
    pub generations: f64,
    pub baseline_median: f64,
    pub score: f64,
}

/// Spikes and drops of `days` (the first on `first`; the last is today),
/// over the last `examined` of them: the most extreme of each kind.
pub fn usage_findings(days: &[f64], first: NaiveDate, examined: usize) -> Vec<Finding> {
    let n = days.len();
    let start = n.saturating_sub(examined).max(BASELINE_DAYS);
    let mut spike: Option<Finding> = None;
    let mut drop: Option<Finding> = None;
    for i in start..n {
        let y = days[i];
        let base = Baseline::of(&days[i - BASELINE_DAYS..i]);
        let date = || (first + Duration::days(i as i64)).to_string();
        let up = ((y - base.median) / base.sigma).min(MAX_SCORE);
        let history = days[i - BASELINE_DAYS..i]
            .iter()
            .filter(|d| **d > 0.0)
            .count();
        if y >= SPIKE_MIN
            && history >= SPIKE_MIN_HISTORY
            && up >= SPIKE_SIGMAS
            && spike.as_ref().is_none_or(|s| up > s.score)
        {
            spike = Some(Finding {
                kind: "spike",
                date: date(),
                generations: y,
                baseline_median: base.median,
                score: round1(up),
            });
        }
        let down = ((base.median - y) / base.sigma).min(MAX_SCORE);
        let complete = i + 1 < n;
        if complete
            && base.median >= DROP_MIN_MEDIAN
            && y <= DROP_FRACTION * base.median
            && drop.as_ref().is_none_or(|d| down > d.score)
        {
            drop = Some(Finding {
                kind: "drop",
                date: date(),
                generations: y,
                baseline_median: base.median,
                score: round1(down),
            });
        }
    }
    spike.into_iter().chain(drop).collect()
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The score of a governance finding.
pub fn governance_score(kind: &str, episodes: u64) -> f64 {
    let base = match kind {
        "abuse_flagged" => 10.0,
        "blocked" => 8.0,
        "spike_flagged" => 6.0,
        _ => 4.0,
    };
    base + episodes.saturating_sub(1) as f64
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Anomaly {
    pub install_id: String,
    pub account_id: String,
    pub plan: String,
    /// `spike`, `drop`, `abuse_flagged`, `spike_flagged`, `rate_limited`, `blocked`.
    pub kind: String,
    /// The day to mark on the installation's timeline.
    pub date: String,
    pub score: f64,
    pub detail: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Anomalies {
    pub date_from: String,
    pub date_to: String,
    pub method: &'static str,
    pub anomalies: Vec<Anomaly>,
}

/// Governance episodes of one kind that started in the examined days.
struct EpisodeRow {
    install_id: String,
    kind: String,
    episodes: u64,
    first: String,
    reason: String,
}

pub async fn anomalies(
    client: &Client,
    fleet: &Fleet,
    params: &AnomaliesParams,
    today: NaiveDate,
) -> Result<Anomalies, QueryError> {
    let examined = params.days as usize;
    let date_from = today - Duration::days(params.days as i64 - 1);
    let from = date_from - Duration::days(BASELINE_DAYS as i64);
    let mut found: Vec<Anomaly> = Vec::new();
    series::scan(client, fleet, from, today, |s| {
        for f in usage_findings(&s.generations, from, examined) {
            found.push(Anomaly {
                install_id: s.install_id.clone(),
                account_id: String::new(),
                plan: String::new(),
                detail: format!(
                    "{} generations on {}, against a median of {} a day over the 28 days before",
                    f.generations, f.date, f.baseline_median
                ),
                kind: f.kind.to_string(),
                date: f.date,
                score: f.score,
            });
        }
    })
    .await?;

    let sql = "SELECT install_id, toString(kind), count(), toString(toDate(min(at))),
                      argMin(reason, at)
               FROM governance_decisions FINAL
               WHERE {fleet} AND at >= toDateTime64({from:Date}, 3) AND phase = 'start'
                 AND kind IN ('abuse_flagged', 'spike_flagged', 'rate_limited', 'blocked')
               GROUP BY install_id, kind"
        .replace("{fleet}", fleet.sql());
    let episodes: Vec<(String, String, u64, String, String)> = fleet
        .bind(client.query(&sql))
        .param("from", date_from.to_string())
        .fetch_all()
        .await?;
    for (install_id, kind, episodes, first, reason) in episodes {
        let e = EpisodeRow {
            install_id,
            kind,
            episodes,
            first,
            reason,
        };
        found.push(Anomaly {
            score: governance_score(&e.kind, e.episodes),
            detail: if e.episodes == 1 {
                format!("{} on {}: {}", e.kind.replace('_', " "), e.first, e.reason)
            } else {
                format!(
                    "{} episodes of {} since {}; the first: {}",
                    e.episodes,
                    e.kind.replace('_', " "),
                    e.first,
                    e.reason
                )
            },
            install_id: e.install_id,
            account_id: String::new(),
            plan: String::new(),
            kind: e.kind,
            date: e.first,
        });
    }
    found.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.install_id.cmp(&b.install_id))
            .then_with(|| a.kind.cmp(&b.kind))
    });
    found.truncate(params.limit as usize);
    label(client, &mut found).await?;
    Ok(Anomalies {
        date_from: date_from.to_string(),
        date_to: today.to_string(),
        method: METHOD,
        anomalies: found,
    })
}

/// Fills in the account and plan of each finding.
async fn label(client: &Client, found: &mut [Anomaly]) -> Result<(), QueryError> {
    let ids: Vec<&str> = found.iter().map(|a| a.install_id.as_str()).collect();
    if ids.is_empty() {
        return Ok(());
    }
    let rows: Vec<(String, String, String)> = client
        .query(
            "SELECT install_id, toString(account_id), toString(plan)
             FROM installation_metadata FINAL WHERE install_id IN {ids:Array(String)}",
        )
        .param("ids", ids)
        .fetch_all()
        .await?;
    let labels: std::collections::HashMap<String, (String, String)> = rows
        .into_iter()
        .map(|(id, account, plan)| (id, (account, plan)))
        .collect();
    for a in found {
        if let Some((account, plan)) = labels.get(&a.install_id) {
            a.account_id.clone_from(account);
            a.plan.clone_from(plan);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn the_baseline_is_robust_to_one_wild_day() {
        let mut days = vec![10.0; 27];
        days.push(10_000.0);
        let b = Baseline::of(&days);
        assert_eq!(b.median, 10.0);
        assert!((b.sigma - 10f64.sqrt()).abs() < 1e-9, "{b:?}");
    }

    #[test]
    fn a_spike_and_a_drop_are_found_on_their_days() {
        // 28 baseline days at about 30 a day, then a week: a spike on the
        // third day, nothing on the sixth, and today (partial) quiet.
        let mut days: Vec<f64> = (0..28).map(|i| 28.0 + (i % 5) as f64).collect();
        days.extend([30.0, 31.0, 400.0, 29.0, 30.0, 0.0, 2.0]);
        let found = usage_findings(&days, d("2026-10-29"), 7);
        let kinds: Vec<_> = found.iter().map(|f| (f.kind, f.date.as_str())).collect();
        assert_eq!(kinds, [("spike", "2026-11-28"), ("drop", "2026-12-01")]);
        assert!(found[0].score > 50.0 && found[0].score <= MAX_SCORE);
        // A new installation's first busy day: no spike.
        let mut new = vec![0.0; 30];
        new.extend([500.0, 600.0, 550.0, 10.0, 700.0]);
        assert!(usage_findings(&new, d("2026-10-29"), 7).is_empty());
    }

    #[test]
    fn quiet_installations_and_partial_days_raise_nothing() {
        // A site with a few generations a day that has 12 one day: below 20.
        let mut days: Vec<f64> = (0..28).map(|i| (i % 3) as f64).collect();
        days.extend([1.0, 12.0, 0.0, 2.0, 1.0, 0.0, 0.0]);
        assert!(usage_findings(&days, d("2026-10-29"), 7).is_empty());
        // A busy site whose today has barely started: not a drop.
        let mut busy = vec![100.0; 34];
        busy.push(3.0);
        assert!(usage_findings(&busy, d("2026-10-29"), 7).is_empty());
    }

    #[test]
    fn governance_findings_rank_abuse_first() {
        assert!(governance_score("abuse_flagged", 1) > governance_score("blocked", 1));
        assert!(governance_score("blocked", 1) > governance_score("spike_flagged", 2));
        assert_eq!(governance_score("rate_limited", 3), 6.0);
    }

    proptest! {
        #[test]
        fn a_steady_installation_is_never_an_anomaly(level in 0u32..10_000, noise in 0u32..3) {
            let days: Vec<f64> = (0..35)
                .map(|i| f64::from(level) + f64::from((i as u32 * 7) % (noise + 1)))
                .collect();
            prop_assert!(usage_findings(&days, d("2026-10-29"), 7).is_empty());
        }

        #[test]
        fn findings_are_within_the_examined_days(days in proptest::collection::vec(0.0..500.0f64, 28..40), examined in 1usize..10) {
            for f in usage_findings(&days, d("2026-10-01"), examined) {
                let i = (f.date.parse::<NaiveDate>().unwrap() - d("2026-10-01")).num_days() as usize;
                prop_assert!(i >= days.len().saturating_sub(examined) && i < days.len());
            }
        }
    }
}

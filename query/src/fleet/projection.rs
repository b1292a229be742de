//! `GET /provider/fleet/projection`: this month's generations and cost at
//! month end, for the fleet and each installation, as an 80% interval.
//!
//! The method (also stated in every answer, `method`):
//! 1. Day-of-week factors from the fleet's last 28 complete UTC days: each
//!    weekday's mean over the overall mean, shrunk toward 1 by k
//!    pseudo-weeks of average days, k = min(1, 25 / the mean day): a fleet
//!    of ten sites has noisy weekdays, a fleet of thousands does not; and
//!    at least 0.25, since they divide each installation's days.
//! 2. A level per series (the fleet's, and each installation's): the mean of
//!    its last 14 complete days, each divided by its weekday's factor.
//! 3. The rest of the month is the level times the factors of the days
//!    left (the rest of today by the part of the day still to come), added
//!    to the month to date.
//! 4. The interval: the spread of those 14 adjusted days (sample standard
//!    deviation s) over the days left, s * sqrt(sum f^2 + (sum f)^2 / 14),
//!    the second term for the level's own error; plus the drift: the change
//!    of the level from the fortnight before, beyond what the days' noise
//!    explains, carried on over the days left (a growing fleet is not
//!    projected to grow, but its interval allows it). +/- 1.2816 of it is
//!    80% if the days are roughly normal. Never below the month to date.
//!
//! An installation with no usage in the last 28 days projects its month to
//! date. The error of this method over a year of history is measured by
//! `usage-query-bench --backtest` (BENCHMARKS.md).

use chrono::{Datelike, Duration, NaiveDate, Timelike};
use clickhouse::Client;
use serde::Serialize;

use super::series;
use super::Fleet;
use crate::error::QueryError;
use crate::params::{self, Query};

/// Complete days the level is taken over.
pub const LEVEL_DAYS: usize = 14;
/// Complete days the weekday factors and the drift are taken over.
pub const WEEKDAY_DAYS: usize = 28;
/// The mean day at which weekday factors are no longer shrunk (a Poisson
/// count of 25 is within 20% of its mean most days).
const WEEKDAY_SHRINK_AT: f64 = 25.0;
/// The least a weekday's factor may be, before they are scaled to average 1.
const WEEKDAY_FLOOR: f64 = 0.25;
/// The normal quantile of an 80% two-sided interval.
pub const Z80: f64 = 1.2816;
pub const MAX_LIMIT: u64 = 500;

pub const METHOD: &str = "Run rate with day-of-week effects: weekday factors from the fleet's \
last 28 complete UTC days (each weekday's mean over the overall mean, shrunk toward 1 when the \
fleet is small); each series' level is the mean of its last 14 complete days divided by their \
weekday factors; the rest of the month is that level times the factors of the days left, added \
to the month to date. The interval is 80%: +/- 1.2816 standard deviations of the adjusted daily \
values, scaled to the days left and to the level's own error, plus the drift of the level from \
the fortnight before beyond what its noise explains.";

/// Factors by weekday, Monday first; their mean is 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(value_type = Vec<f64>)]
pub struct Weekdays(pub [f64; 7]);

impl Weekdays {
    pub const FLAT: Weekdays = Weekdays([1.0; 7]);

    /// From `days` of history, the first on `first`.
    pub fn estimate(days: &[f64], first: NaiveDate) -> Self {
        let mean = days.iter().sum::<f64>() / days.len().max(1) as f64;
        if mean <= 0.0 {
            return Self::FLAT;
        }
        let mut sums = [0.0; 7];
        let mut counts = [0.0; 7];
        for (i, y) in days.iter().enumerate() {
            let w = weekday(first + Duration::days(i as i64));
            sums[w] += y;
            counts[w] += 1.0;
        }
        let k = (WEEKDAY_SHRINK_AT / mean).min(1.0);
        let mut f = [1.0; 7];
        for w in 0..7 {
            // Floored: the factors divide every installation's days, and a
            // site busy on the fleet's idle day would otherwise project
            // its one busy day many times over.
            f[w] = ((sums[w] + k * mean) / ((counts[w] + k) * mean)).max(WEEKDAY_FLOOR);
        }
        let norm = f.iter().sum::<f64>() / 7.0;
        Weekdays(f.map(|x| x / norm))
    }

    pub fn of(&self, day: NaiveDate) -> f64 {
        self.0[weekday(day)]
    }
}

fn weekday(day: NaiveDate) -> usize {
    day.weekday().num_days_from_monday() as usize
}

/// A month-end figure: the expectation and an 80% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Forecast {
    pub month_to_date: f64,
    pub expected: f64,
    pub low: f64,
    pub high: f64,
}

/// Where the projection stands: the day, how much of it has passed, and
/// the last day of the month.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clock {
    pub today: NaiveDate,
    /// Part of `today` already past, 0..=1.
    pub elapsed: f64,
}

impl Clock {
    pub fn month_end(&self) -> NaiveDate {
        let next = if self.today.month() == 12 {
            NaiveDate::from_ymd_opt(self.today.year() + 1, 1, 1)
        } else {
            NaiveDate::from_ymd_opt(self.today.year(), self.today.month() + 1, 1)
        };
        next.map_or(self.today, |d| d - Duration::days(1))
    }

    /// The weights of the days left: the rest of today, then every day to
    /// the month's end, with their dates.
    fn days_left(&self, weekdays: &Weekdays) -> Vec<(NaiveDate, f64)> {
        let mut left = vec![(
            self.today,
            (1.0 - self.elapsed.clamp(0.0, 1.0)) * weekdays.of(self.today),
        )];
        let mut day = self.today + Duration::days(1);
        while day <= self.month_end() {
            left.push((day, weekdays.of(day)));
            day += Duration::days(1);
        }
        left
    }
}

/// What a series' history says about its days to come, in
/// weekday-adjusted units a day.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Run {
    /// The mean of the last 14 adjusted days.
    level: f64,
    /// Their sample standard deviation.
    spread: f64,
    /// Days the level is the mean of.
    days: f64,
    /// How far the level may drift, per day, squared: the change from the
    /// fortnight before beyond what the days' noise explains.
    drift_var: f64,
}

impl Run {
    /// From `history` (complete days, oldest first, the first on `first`):
    /// the level over its last [`LEVEL_DAYS`], the drift from the
    /// [`LEVEL_DAYS`] before when the history has them.
    fn of(history: &[f64], first: NaiveDate, weekdays: &Weekdays) -> Self {
        let adjusted: Vec<f64> = history
            .iter()
            .enumerate()
            .map(|(i, y)| y / weekdays.of(first + Duration::days(i as i64)))
            .collect();
        let split = adjusted.len().saturating_sub(LEVEL_DAYS);
        let (before, recent) = adjusted.split_at(split);
        let n = recent.len();
        if n == 0 {
            return Self {
                level: 0.0,
                spread: 0.0,
                days: 1.0,
                drift_var: 0.0,
            };
        }
        let level = mean(recent);
        let spread = if n > 1 {
            (recent.iter().map(|z| (z - level).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        let mut drift_var = 0.0;
        if before.len() == LEVEL_DAYS && n == LEVEL_DAYS {
            let span = LEVEL_DAYS as f64;
            let earlier = mean(before);
            let change = (level - earlier) / span;
            let var_before =
                before.iter().map(|z| (z - earlier).powi(2)).sum::<f64>() / (span - 1.0);
            // What two means of 14 noisy days a fortnight apart differ by
            // on their own, per day squared; the change beyond that is
            // drift the level may keep up.
            let noise = (spread * spread + var_before) / span / (span * span);
            drift_var = (change * change - noise).max(0.0);
        }
        Self {
            level,
            spread,
            days: n as f64,
            drift_var,
        }
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The month-end forecast of one series: `month_to_date` observed (today's
/// part included), `history` the complete days before today (oldest first,
/// the first on `first`; up to [`WEEKDAY_DAYS`]).
pub fn forecast(
    month_to_date: f64,
    history: &[f64],
    first: NaiveDate,
    weekdays: &Weekdays,
    clock: Clock,
) -> Forecast {
    path(month_to_date, history, first, weekdays, clock)
        .last()
        .map_or(
            Forecast {
                month_to_date,
                expected: month_to_date,
                low: month_to_date,
                high: month_to_date,
            },
            |(_, f)| *f,
        )
}

/// The forecast at the end of each day left (today first).
pub fn path(
    month_to_date: f64,
    history: &[f64],
    first: NaiveDate,
    weekdays: &Weekdays,
    clock: Clock,
) -> Vec<(NaiveDate, Forecast)> {
    let run = Run::of(history, first, weekdays);
    // Days from the middle of the level's fortnight to today's middle: how
    // far a drifting level has moved by each day left.
    let lead = (run.days + 1.0) / 2.0;
    let (mut sum_f, mut sum_f2, mut sum_fh) = (0.0, 0.0, 0.0);
    clock
        .days_left(weekdays)
        .into_iter()
        .enumerate()
        .map(|(h, (day, f))| {
            sum_f += f;
            sum_f2 += f * f;
            sum_fh += f * (lead + h as f64);
            let rest = run.level * sum_f;
            let var = run.spread * run.spread * (sum_f2 + sum_f * sum_f / run.days)
                + run.drift_var * sum_fh * sum_fh;
            let half = Z80 * var.sqrt();
            (
                day,
                Forecast {
                    month_to_date,
                    expected: month_to_date + rest,
                    low: month_to_date + (rest - half).max(0.0),
                    high: month_to_date + rest + half,
                },
            )
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionParams {
    pub sort_by_cost: bool,
    pub limit: u64,
    pub offset: u64,
}

impl ProjectionParams {
    pub fn parse(params: &Query) -> Result<Self, QueryError> {
        let sort_by_cost = match params.get("sort_by").map(String::as_str) {
            None | Some("") | Some("cost") => true,
            Some("generations") => false,
            Some(other) => {
                return Err(QueryError::BadRequest(format!(
                    "sort_by must be cost or generations, not {other:?}"
                )))
            }
        };
        Ok(Self {
            sort_by_cost,
            limit: params::limit(params, 20, MAX_LIMIT)?,
            offset: params::number(params, "offset", 0)?,
        })
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InstallationProjection {
    pub install_id: String,
    pub generations: Forecast,
    pub cost_usd: Forecast,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PathPoint {
    pub date: String,
    pub generations: Forecast,
    pub cost_usd: Forecast,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ActualDay {
    pub date: String,
    pub generations: f64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FleetProjection {
    pub generations: Forecast,
    pub cost_usd: Forecast,
    /// This month's days so far (today's part included).
    pub actual: Vec<ActualDay>,
    /// The cumulative forecast at the end of each day left.
    pub path: Vec<PathPoint>,
}

/// Everything the projection computed for one fleet, before paging.
#[derive(Debug)]
pub struct Projection {
    pub month: String,
    pub month_end: String,
    pub as_of: String,
    pub method: &'static str,
    pub interval: f64,
    pub weekday_factors: Weekdays,
    pub fleet: FleetProjection,
    /// Every installation with usage in the last 28 days or this month,
    /// costliest month end first.
    pub installations: Vec<InstallationProjection>,
}

/// Projects `fleet` at `clock`: one pass over the installations' last
/// weeks.
pub async fn projection(
    client: &Client,
    fleet: &Fleet,
    clock: Clock,
) -> Result<Projection, QueryError> {
    let today = clock.today;
    let month = today.with_day(1).unwrap_or(today);
    let from = month.min(today - Duration::days(WEEKDAY_DAYS as i64));
    let days = usize::try_from((today - from).num_days() + 1).unwrap_or(0);
    // The fleet's days first (one row a day), for the weekday factors; then
    // each installation is projected as the scan reads it.
    let total = series::totals(client, fleet, from, today).await?;
    let today_index = days - 1;
    let month_index = usize::try_from((month - from).num_days()).unwrap_or(0);
    let weekdays = Weekdays::estimate(
        &total.generations[today_index - WEEKDAY_DAYS..today_index],
        today - Duration::days(WEEKDAY_DAYS as i64),
    );
    let history_first = today - Duration::days(WEEKDAY_DAYS as i64);
    let one = |values: &[f64]| {
        let mtd: f64 = values[month_index..].iter().sum();
        forecast(
            mtd,
            &values[today_index - WEEKDAY_DAYS..today_index],
            history_first,
            &weekdays,
            clock,
        )
    };
    let mut installations: Vec<InstallationProjection> = Vec::new();
    series::scan(client, fleet, from, today, |s| {
        installations.push(InstallationProjection {
            generations: one(&s.generations),
            cost_usd: one(&s.cost),
            install_id: s.install_id,
        })
    })
    .await?;
    installations.sort_by(|a, b| {
        b.cost_usd
            .expected
            .total_cmp(&a.cost_usd.expected)
            .then_with(|| a.install_id.cmp(&b.install_id))
    });

    let path_of = |values: &[f64]| {
        let mtd: f64 = values[month_index..].iter().sum();
        path(
            mtd,
            &values[today_index - WEEKDAY_DAYS..today_index],
            history_first,
            &weekdays,
            clock,
        )
    };
    let generations_path = path_of(&total.generations);
    let cost_path = path_of(&total.cost);
    let fleet_projection = FleetProjection {
        generations: one(&total.generations),
        cost_usd: one(&total.cost),
        actual: (month_index..days)
            .map(|i| ActualDay {
                date: (from + Duration::days(i as i64)).to_string(),
                generations: total.generations[i],
                cost_usd: total.cost[i],
            })
            .collect(),
        path: generations_path
            .into_iter()
            .zip(cost_path)
            .map(|((day, generations), (_, cost_usd))| PathPoint {
                date: day.to_string(),
                generations,
                cost_usd,
            })
            .collect(),
    };
    Ok(Projection {
        month: format!("{:04}-{:02}", month.year(), month.month()),
        month_end: clock.month_end().to_string(),
        as_of: format!(
            "{}T{}Z",
            today,
            (chrono::NaiveTime::MIN + Duration::seconds((clock.elapsed * 86_400.0).round() as i64))
                .format("%H:%M:%S")
        ),
        method: METHOD,
        interval: 0.8,
        weekday_factors: weekdays,
        fleet: fleet_projection,
        installations,
    })
}

/// What `GET /provider/fleet/projection` answers: the fleet's projection
/// and one page of the installations'.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectionPage {
    /// `YYYY-MM`.
    pub month: String,
    /// The month's last day.
    pub month_end: String,
    /// When the projection was made (UTC).
    pub as_of: String,
    /// How the figures are computed.
    pub method: String,
    /// The intervals' coverage: 0.8.
    pub interval: f64,
    /// Day-of-week factors, Monday first; their mean is 1.
    pub weekday_factors: Weekdays,
    pub fleet: FleetProjection,
    pub installations: Vec<InstallationProjection>,
}

impl Projection {
    /// The fleet's projection with one page of the installations'.
    pub fn page(&self, params: &ProjectionParams) -> ProjectionPage {
        ProjectionPage {
            month: self.month.clone(),
            month_end: self.month_end.clone(),
            as_of: self.as_of.clone(),
            method: self.method.to_string(),
            interval: self.interval,
            weekday_factors: self.weekday_factors,
            fleet: self.fleet.clone(),
            installations: self.installations(params),
        }
    }

    /// One page of the installations, by projected cost or generations.
    fn installations(&self, params: &ProjectionParams) -> Vec<InstallationProjection> {
        let mut ordered: Vec<&InstallationProjection> = self.installations.iter().collect();
        if !params.sort_by_cost {
            ordered.sort_by(|a, b| {
                b.generations
                    .expected
                    .total_cmp(&a.generations.expected)
                    .then_with(|| a.install_id.cmp(&b.install_id))
            });
        }
        ordered
            .into_iter()
            .skip(params.offset as usize)
            .take(params.limit as usize)
            .cloned()
            .collect()
    }
}

/// The clock of `now`, to the minute: a projection is as of a minute, so
/// that answers within it agree (and a second changes nothing anyone needs).
pub fn clock_at(now: chrono::DateTime<chrono::Utc>) -> Clock {
    let today = now.date_naive();
    let seconds = now.time().num_seconds_from_midnight() / 60 * 60;
    Clock {
        today,
        elapsed: f64::from(seconds) / 86_400.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn weekday_factors_follow_the_weekly_shape_and_average_one() {
        // 2026-11-02 is a Monday; weekends at half the weekdays' volume.
        let shape = |scale: f64| -> Vec<f64> {
            (0..28)
                .map(|i| if i % 7 >= 5 { scale / 2.0 } else { scale })
                .collect()
        };
        let big = Weekdays::estimate(&shape(10_000.0), d("2026-11-02"));
        let mean = big.0.iter().sum::<f64>() / 7.0;
        assert!((mean - 1.0).abs() < 1e-9);
        // A large fleet's weekdays are taken as they are: 0.5 / (6 / 7).
        assert!((big.0[5] - 7.0 / 12.0).abs() < 1e-3, "{big:?}");
        assert!((big.0[0] - 7.0 / 6.0).abs() < 1e-3, "{big:?}");
        // A fleet of a few sites (about 8 generations a day) is shrunk by
        // one pseudo-week of average days.
        let small = Weekdays::estimate(&shape(10.0), d("2026-11-02"));
        assert!(small.0[5] > 0.6 && small.0[5] < 0.75, "{small:?}");
        assert_eq!(
            Weekdays::estimate(&[0.0; 28], d("2026-11-02")),
            Weekdays::FLAT
        );
        // A large fleet idle on Sundays: the factor stays a quarter of
        // the others' (before scaling), not zero.
        let idle: Vec<f64> = (0..28)
            .map(|i| if i % 7 == 6 { 0.0 } else { 100_000.0 })
            .collect();
        let w = Weekdays::estimate(&idle, d("2026-11-02"));
        assert!((w.0[6] / w.0[0] - 0.25 / (7.0 / 6.0)).abs() < 1e-3, "{w:?}");
    }

    #[test]
    fn a_drifting_series_gets_a_wider_interval_around_the_same_run_rate() {
        // 1,000 a day on 2026-10-17, 10 more each day: 1,205 a day over
        // the last fortnight, 1,065 over the one before.
        let clock = Clock {
            today: d("2026-11-14"),
            elapsed: 0.0,
        };
        let growing: Vec<f64> = (0..28).map(|i| 1000.0 + 10.0 * i as f64).collect();
        let f = forecast(0.0, &growing, d("2026-10-17"), &Weekdays::FLAT, clock);
        let recent = forecast(0.0, &growing[14..], d("2026-10-31"), &Weekdays::FLAT, clock);
        assert!((f.expected - 17.0 * 1205.0).abs() < 1e-6, "{f:?}");
        assert!((recent.expected - f.expected).abs() < 1e-6);
        assert!(
            f.high - f.low > 2.0 * (recent.high - recent.low),
            "{f:?} {recent:?}"
        );
        // What really came (10 more a day) is inside.
        let truth: f64 = (28..45).map(|i| 1000.0 + 10.0 * i as f64).sum();
        assert!(f.low <= truth && truth <= f.high, "{f:?} vs {truth}");
        assert!(!(recent.low <= truth && truth <= recent.high));
    }

    #[test]
    fn noise_between_the_fortnights_is_not_drift() {
        // Alternating 0 and 20 a day, after a fortnight of 8 and 12.
        let history: Vec<f64> = (0..28)
            .map(|i| match (i < 14, i % 2 == 0) {
                (true, true) => 8.0,
                (true, false) => 12.0,
                (false, true) => 0.0,
                (false, false) => 20.0,
            })
            .collect();
        let run = Run::of(&history, d("2026-10-17"), &Weekdays::FLAT);
        assert_eq!((run.level, run.drift_var), (10.0, 0.0));
        // Slightly different levels, within the noise: still no drift.
        let mut shifted = history.clone();
        shifted[27] += 2.0;
        let run = Run::of(&shifted, d("2026-10-17"), &Weekdays::FLAT);
        assert_eq!(run.drift_var, 0.0, "{run:?}");
    }

    #[test]
    fn a_steady_series_projects_its_rate_with_no_spread() {
        let clock = Clock {
            today: d("2026-11-21"),
            elapsed: 0.5,
        };
        // 10 a day, 200 so far this month (20 days and half of today's 10 ... 205).
        let f = forecast(205.0, &[10.0; 14], d("2026-11-07"), &Weekdays::FLAT, clock);
        // Left: half of the 21st, then the 22nd..30th (9 days): 9.5 days.
        assert!((f.expected - 300.0).abs() < 1e-9, "{f:?}");
        assert_eq!((f.low, f.high), (f.expected, f.expected));
    }

    #[test]
    fn the_last_moment_of_the_month_projects_what_happened() {
        let clock = Clock {
            today: d("2026-12-31"),
            elapsed: 1.0,
        };
        let f = forecast(
            77.0,
            &[3.0, 9.0, 1.0],
            d("2026-12-28"),
            &Weekdays::FLAT,
            clock,
        );
        assert_eq!((f.expected, f.low, f.high), (77.0, 77.0, 77.0));
        assert_eq!(clock.month_end(), d("2026-12-31"));
    }

    #[test]
    fn a_noisy_series_gets_a_wider_interval() {
        let clock = Clock {
            today: d("2026-11-10"),
            elapsed: 0.0,
        };
        let calm = forecast(90.0, &[10.0; 14], d("2026-10-27"), &Weekdays::FLAT, clock);
        let noisy: Vec<f64> = (0..14)
            .map(|i| if i % 2 == 0 { 0.0 } else { 20.0 })
            .collect();
        let wild = forecast(90.0, &noisy, d("2026-10-27"), &Weekdays::FLAT, clock);
        assert!((calm.expected - wild.expected).abs() < 1e-9);
        assert!(wild.high - wild.low > 100.0, "{wild:?}");
    }

    proptest! {
        #[test]
        fn the_interval_holds_the_expectation_and_never_falls_below_the_month_to_date(
            mtd in 0.0..1e6f64,
            history in proptest::collection::vec(0.0..1e4f64, 0..=28),
            day in 1u32..=28,
            elapsed in 0.0..=1.0f64,
            factors in proptest::array::uniform7(0.2..2.0f64),
        ) {
            let clock = Clock { today: NaiveDate::from_ymd_opt(2026, 2, day).unwrap(), elapsed };
            let weekdays = Weekdays(factors);
            let first = clock.today - Duration::days(history.len() as i64);
            let f = forecast(mtd, &history, first, &weekdays, clock);
            prop_assert!(f.low >= mtd - 1e-6);
            prop_assert!(f.low <= f.expected + 1e-6 && f.expected <= f.high + 1e-6);
            let p = path(mtd, &history, first, &weekdays, clock);
            prop_assert_eq!(p.len() as u32, 28 - day + 1);
            prop_assert!(p.windows(2).all(|w| w[0].1.expected <= w[1].1.expected + 1e-6));
        }
    }
}

//! One installation's governance: its windows, and the pure function from
//! (windows, monthly usage, plan) to its state and the decisions that change.
//!
//! Everything is computed in event time, so replaying the same events gives
//! the same states and the same decisions (decision ids are derived from
//! their content, not from a clock or a counter).

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use sha2::{Digest, Sha256};
pub use usage_schemas::{GovernanceDecision as Decision, GovernanceState};

use super::policy::{Level, Policy};
use super::window::{Applied, Counts, InstallationWindows, WindowConfig};

fn month_of(ms: i64) -> (String, NaiveDate) {
    let d = DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .date_naive();
    (format!("{:04}-{:02}", d.year(), d.month()), d)
}

fn decision(install_id: &str, kind: &str, key: &str, reason: String, at: i64) -> Decision {
    let id = Sha256::digest(format!("{install_id}|{kind}|{key}"));
    Decision {
        decision_id: hex::encode(&id[..16]),
        install_id: install_id.to_string(),
        kind: kind.to_string(),
        reason,
        at,
    }
}

/// One installation's governance state kept by the processor that owns its partition.
#[derive(Debug, Clone, Default)]
pub struct Installation {
    pub windows: InstallationWindows,
    /// Requests per UTC hour, for the spike detector's trailing baseline.
    hourly: BTreeMap<i64, u64>,
    /// Earliest event time seen (spike detection needs a full baseline).
    first_seen: Option<i64>,
    pub last: Option<GovernanceState>,
    /// Cap alerts already raised: (level, UTC day). At most one each.
    alerted: HashSet<(Level, NaiveDate)>,
}

pub const HOUR_MS: i64 = 3_600_000;
/// The spike detector's trailing baseline, in hours.
pub const BASELINE_HOURS: i64 = 24;

impl Installation {
    /// Counts one new (first-seen, deduplicated) event in the windows.
    pub fn count(&mut self, config: &WindowConfig, t: i64, tokens: u64) -> Applied {
        let applied = self.windows.apply(config, t, tokens);
        if applied == Applied::Counted {
            let hour = t.div_euclid(HOUR_MS) * HOUR_MS;
            *self.hourly.entry(hour).or_default() += 1;
            let keep = self.windows.max_event_time.div_euclid(HOUR_MS) * HOUR_MS
                - (BASELINE_HOURS + 1) * HOUR_MS;
            self.hourly = self.hourly.split_off(&keep);
            self.first_seen = Some(self.first_seen.map_or(t, |f| f.min(t)));
        }
        applied
    }

    /// Restores what a rebuild reads back from ClickHouse: the hourly
    /// counts of the spike baseline and the first event time.
    pub fn restore(&mut self, hourly: BTreeMap<i64, u64>, first_seen: Option<i64>) {
        self.hourly = hourly;
        self.first_seen = first_seen;
    }

    /// Marks a cap alert as already raised (state rebuilt after a restart).
    pub fn remember_alert(&mut self, level: Level, day: NaiveDate) {
        self.alerted.insert((level, day));
    }

    fn spike(&self, policy_factor: f64, min_requests: u64, at: i64, last_hour: u64) -> bool {
        let Some(first) = self.first_seen else {
            return false;
        };
        if at - first < BASELINE_HOURS * HOUR_MS || last_hour < min_requests {
            return false;
        }
        let current = at.div_euclid(HOUR_MS) * HOUR_MS;
        let baseline: u64 = self
            .hourly
            .range(current - BASELINE_HOURS * HOUR_MS..current)
            .map(|(_, n)| *n)
            .sum();
        let average = baseline as f64 / BASELINE_HOURS as f64;
        last_hour as f64 >= policy_factor * average.max(1.0)
    }

    /// The state at event time `at` and the decisions that changed since the
    /// last evaluation. `monthly_used` is the exact count of the month of
    /// `at` (from the monthly rollup).
    pub fn evaluate(
        &mut self,
        install_id: &str,
        plan: &str,
        monthly_used: u64,
        at: i64,
        policy: &Policy,
        config: &WindowConfig,
    ) -> (GovernanceState, Vec<Decision>) {
        let p = policy.plan(plan);
        let short = self.windows.short.window(&config.short, at);
        let long = self.windows.long.window(&config.long, at);

        let over_rate = |c: Counts| c.requests >= p.rate_requests || c.tokens >= p.rate_tokens;
        let rate_limited_until = self.windows.short.frees_at(&config.short, at, over_rate);
        let rate_limit_reason = rate_limited_until.map(|_| {
            if short.requests >= p.rate_requests {
                "requests"
            } else {
                "tokens"
            }
            .to_string()
        });
        let abuse_reason = if long.requests >= p.abuse_requests {
            Some(format!(
                "{} requests in one hour (limit {})",
                long.requests, p.abuse_requests
            ))
        } else if long.tokens >= p.abuse_tokens {
            Some(format!(
                "{} tokens in one hour (limit {})",
                long.tokens, p.abuse_tokens
            ))
        } else {
            None
        };
        let spike_flagged = self.spike(p.spike_factor, p.spike_min_requests, at, long.requests);
        let level = policy.level(monthly_used, p.monthly_cap);
        let (month, day) = month_of(at);

        let state = GovernanceState {
            install_id: install_id.to_string(),
            plan: plan.to_string(),
            month: month.clone(),
            monthly_used: monthly_used as i64,
            monthly_cap: p.monthly_cap.map(|c| c as i64),
            level: level.as_str().to_string(),
            rate_limited_until,
            rate_limit_reason,
            abuse_flagged: abuse_reason.is_some(),
            abuse_reason: abuse_reason.clone(),
            spike_flagged,
            window_requests: short.requests as i64,
            window_tokens: short.tokens as i64,
            hour_requests: long.requests as i64,
            hour_tokens: long.tokens as i64,
            rate_requests_limit: p.rate_requests as i64,
            rate_tokens_limit: p.rate_tokens as i64,
            as_of: at,
        };

        let mut decisions = Vec::new();
        let previous = self.last.as_ref();
        let was = |f: fn(&GovernanceState) -> bool| previous.is_some_and(f);
        if let Some(until) = state.rate_limited_until {
            if previous
                .and_then(|s| s.rate_limited_until)
                .is_none_or(|u| u < at)
            {
                let reason = format!(
                    "{} requests, {} tokens in 5 minutes (limits {}, {})",
                    short.requests, short.tokens, p.rate_requests, p.rate_tokens
                );
                decisions.push(decision(
                    install_id,
                    "rate_limited",
                    &until.to_string(),
                    reason,
                    at,
                ));
            }
        }
        if let Some(reason) = &abuse_reason {
            if !was(|s| s.abuse_flagged) {
                let hour = at.div_euclid(HOUR_MS);
                decisions.push(decision(
                    install_id,
                    "abuse_flagged",
                    &hour.to_string(),
                    reason.clone(),
                    at,
                ));
            }
        }
        if spike_flagged && !was(|s| s.spike_flagged) {
            let hour = at.div_euclid(HOUR_MS);
            let reason = format!(
                "{} requests in the last hour, far above the trailing 24 h",
                long.requests
            );
            decisions.push(decision(
                install_id,
                "spike_flagged",
                &hour.to_string(),
                reason,
                at,
            ));
        }
        // Cap alerts: every level reached for the first time today (a jump from
        // ok to blocked raises warning and critical too), at most once per day.
        for (reached, kind) in [
            (Level::Warning, "cap_warning"),
            (Level::Critical, "cap_critical"),
            (Level::Blocked, "blocked"),
        ] {
            if level >= reached && self.alerted.insert((reached, day)) {
                let reason = format!(
                    "{monthly_used} of {} generations used in {month} ({plan} plan)",
                    p.monthly_cap.unwrap_or_default()
                );
                decisions.push(decision(
                    install_id,
                    kind,
                    &format!("{month}|{day}"),
                    reason,
                    at,
                ));
            }
        }
        if was(|s| s.level == "blocked") && level != Level::Blocked {
            let reason = if previous.is_some_and(|s| s.month != month) {
                format!("new month {month}")
            } else {
                format!("plan {plan} allows more generations")
            };
            decisions.push(decision(
                install_id,
                "unblocked",
                &format!("{month}|{plan}|{at}"),
                reason,
                at,
            ));
        }
        self.last = Some(state.clone());
        (state, decisions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_764_547_200_000; // 2025-12-01T00:00:00Z

    fn setup() -> (Installation, Policy, WindowConfig) {
        (
            Installation::default(),
            Policy::default(),
            WindowConfig::default(),
        )
    }

    fn kinds(d: &[Decision]) -> Vec<&str> {
        d.iter().map(|d| d.kind.as_str()).collect()
    }

    #[test]
    fn the_100th_request_in_5_minutes_rate_limits_until_the_window_frees() {
        let (mut g, p, c) = setup();
        let mut last = (None, vec![]);
        for i in 0..100 {
            let t = T0 + i * 1000; // one request per second
            g.count(&c, t, 10);
            let (s, d) = g.evaluate("i", "pro", i as u64 + 1, t, &p, &c);
            last = (s.rate_limited_until, d);
            if i < 99 {
                assert_eq!(s.rate_limited_until, None, "request {} is allowed", i + 1);
            }
        }
        // After the 100th, the next one would be the 101st: limited until the
        // first 10 s bucket slides out of the 5-minute window.
        assert_eq!(last.0, Some(T0 + 300_000));
        assert_eq!(kinds(&last.1), ["rate_limited"]);
    }

    #[test]
    fn tokens_rate_limit_likewise() {
        let (mut g, p, c) = setup();
        g.count(&c, T0, 30_000);
        let (s, _) = g.evaluate("i", "pro", 1, T0, &p, &c);
        assert_eq!(s.rate_limited_until, None);
        g.count(&c, T0 + 20_000, 20_000);
        let (s, d) = g.evaluate("i", "pro", 2, T0 + 20_000, &p, &c);
        assert_eq!(s.rate_limit_reason.as_deref(), Some("tokens"));
        // Dropping the first bucket (30k tokens) frees the window.
        assert_eq!(s.rate_limited_until, Some(T0 + 300_000));
        assert_eq!(kinds(&d), ["rate_limited"]);
    }

    #[test]
    fn abuse_is_flagged_at_200_requests_in_an_hour_once() {
        let (mut g, p, c) = setup();
        let mut flagged_at = None;
        for i in 0..250 {
            let t = T0 + i * 15_000; // 4 per minute: never rate limited
            g.count(&c, t, 10);
            let (s, d) = g.evaluate("i", "agency", i as u64 + 1, t, &p, &c);
            assert_eq!(s.rate_limited_until, None);
            if kinds(&d).contains(&"abuse_flagged") {
                assert!(flagged_at.is_none(), "flagged once");
                flagged_at = Some(i + 1);
            }
        }
        assert_eq!(flagged_at, Some(200));
    }

    #[test]
    fn free_plan_alerts_at_38_and_45_once_each_and_blocks_at_50() {
        let (mut g, p, c) = setup();
        let mut alerts = vec![];
        for used in 1..=55u64 {
            let t = T0 + used as i64 * 60_000; // one a minute
            g.count(&c, t, 10);
            let (s, d) = g.evaluate("i", "free", used, t, &p, &c);
            for k in kinds(&d) {
                alerts.push((used, k.to_string()));
            }
            if used >= 50 {
                assert_eq!(s.level, "blocked");
            }
        }
        assert_eq!(
            alerts,
            [
                (38, "cap_warning".to_string()),
                (45, "cap_critical".into()),
                (50, "blocked".into())
            ]
        );
    }

    #[test]
    fn a_plan_upgrade_or_a_new_month_unblocks() {
        let (mut g, p, c) = setup();
        g.count(&c, T0, 10);
        let (s, _) = g.evaluate("i", "free", 50, T0, &p, &c);
        assert_eq!(s.level, "blocked");
        let (s, d) = g.evaluate("i", "pro", 50, T0 + 1000, &p, &c);
        assert_eq!(s.level, "ok");
        assert_eq!(kinds(&d), ["unblocked"]);
        assert!(d[0].reason.contains("plan pro"));

        let (mut g, p, c) = setup();
        let (s, _) = g.evaluate("i", "free", 50, T0 - 1000, &p, &c); // 2025-11-30
        assert_eq!((s.level.as_str(), s.month.as_str()), ("blocked", "2025-11"));
        let (s, d) = g.evaluate("i", "free", 1, T0 + 1000, &p, &c); // December: 1 used
        assert_eq!((s.level.as_str(), s.month.as_str()), ("ok", "2025-12"));
        assert_eq!(kinds(&d), ["unblocked"]);
    }

    #[test]
    fn a_spike_far_above_the_trailing_day_is_flagged_once() {
        let (mut g, p, c) = setup();
        let hour = 3_600_000i64;
        let start = T0 - 30 * hour;
        // A quiet site: 2 requests an hour for 30 hours.
        for h in 0..30 {
            for k in 0..2 {
                let t = start + h * hour + k * 600_000;
                g.count(&c, t, 100);
                let (s, d) = g.evaluate("i", "agency", 1, t, &p, &c);
                assert!(!s.spike_flagged && d.is_empty(), "quiet hour {h}");
            }
        }
        // Then 60 requests in 30 minutes: >= 10x the ~2/hour average and >= 50.
        let mut flagged = vec![];
        for k in 0..60 {
            let t = T0 + k * 30_000;
            g.count(&c, t, 100);
            let (_, d) = g.evaluate("i", "agency", 100 + k as u64, t, &p, &c);
            flagged.extend(
                d.into_iter()
                    .filter(|d| d.kind == "spike_flagged")
                    .map(|_| k),
            );
        }
        assert_eq!(
            flagged,
            [49],
            "flagged once, at the 50th request of the hour"
        );
    }

    #[test]
    fn a_replay_yields_the_same_states_and_decision_ids() {
        let run = || {
            let (mut g, p, c) = setup();
            let mut out = vec![];
            for i in 0..120u64 {
                let t = T0 + i as i64 * 700;
                g.count(&c, t, 400);
                out.push(g.evaluate("i", "free", i + 1, t, &p, &c));
            }
            out
        };
        assert_eq!(run(), run());
    }
}

//! One installation's governance: its windows, and the pure function from
//! (windows, billing-period usage, plan) to its state and the decisions
//! that mark a change.
//!
//! Everything is computed in governance time (`usage_service_kit::periods`),
//! so replaying the same events gives the same states and the same
//! decisions (decision ids are derived from their content, not from a clock
//! or a counter).
//!
//! **Decisions are episodes.** Being rate limited, abuse flagged or spike
//! flagged is an episode: a `start` decision when it begins, an `extended`
//! one while it lasts (at most once a minute per kind), and an `end`
//! (`rate_limit_ended`, `abuse_cleared`, `spike_cleared`) once the condition
//! has been gone for a minute (so a site hovering at a limit is one episode,
//! not hundreds). A block is an episode of the current billing period: it
//! starts with `blocked`, is reminded once a day (`alert`), and ends with
//! `unblocked` (a plan upgrade, or a new month). Cap warnings are alerts,
//! at most one per level, billing month and UTC day. The open episodes
//! travel in the published state, so whoever governs the installation next
//! continues them.
//!
//! **Billing periods.** The state's month is the installation's current
//! billing period: the latest one it counted an event in. An event of an
//! earlier period (late within the billing grace) is counted there and can
//! raise that period's alerts, but never moves the state back, so a
//! backdated batch cannot lift the current period's block.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use sha2::{Digest, Sha256};
pub use usage_schemas::{Episode, GovernanceDecision as Decision, GovernanceState};

use super::policy::{Level, Policy};
use super::window::{Applied, Counts, InstallationWindows, WindowConfig};

/// An ongoing episode gets a new history row at most this often.
pub const EXTEND_EVERY_MS: i64 = 60_000;
/// An episode ends once its condition has been gone this long.
pub const QUIET_MS: i64 = 60_000;

fn day_of(ms: i64) -> NaiveDate {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .date_naive()
}

/// A decision whose id is derived from `(install, kind, key)`.
struct New<'a> {
    install_id: &'a str,
    kind: &'a str,
    key: String,
    reason: String,
    at: i64,
    phase: &'a str,
    episode: Link,
    until: Option<i64>,
}

/// Which episode a decision belongs to.
enum Link {
    /// It starts one: the episode's id is its own.
    Starts,
    /// It extends or ends this one.
    Of(String),
    /// None (a cap warning).
    Alone,
}

impl New<'_> {
    fn decide(self) -> Decision {
        let id = Sha256::digest(format!("{}|{}|{}", self.install_id, self.kind, self.key));
        let decision_id = hex::encode(&id[..16]);
        Decision {
            episode_id: match self.episode {
                Link::Starts => Some(decision_id.clone()),
                Link::Of(id) => Some(id),
                Link::Alone => None,
            },
            decision_id,
            install_id: self.install_id.to_string(),
            kind: self.kind.to_string(),
            reason: self.reason,
            at: self.at,
            phase: self.phase.to_string(),
            until: self.until,
        }
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
    /// Cap alerts already raised: (level, billing month, UTC day).
    alerted: HashSet<(Level, String, NaiveDate)>,
}

pub const HOUR_MS: i64 = 3_600_000;
/// The spike detector's trailing baseline, in hours.
pub const BASELINE_HOURS: i64 = 24;

/// What one evaluation is about: an event, or a plan change.
#[derive(Debug, Clone, Copy)]
pub struct Counted<'a> {
    pub install_id: &'a str,
    /// The plan in force at `at`.
    pub plan: &'a str,
    /// Governance time of the event (or of the plan change).
    pub at: i64,
    /// The event's received_at (0 for a plan change).
    pub received: i64,
    /// The billing month (`YYYY-MM`) it counts toward, and that month's
    /// generations including it.
    pub month: &'a str,
    pub month_used: u64,
}

/// One window condition that makes episodes.
struct Condition<'a> {
    kind: &'a str,
    end_kind: &'a str,
    holds: bool,
    /// The reasons, made only when a decision needs one (not per event).
    reason: &'a dyn Fn() -> String,
    ended: &'a dyn Fn() -> String,
    until: Option<i64>,
}

impl Installation {
    /// Counts one new (first-seen, deduplicated) event in the windows at
    /// its governance time `t`.
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
    pub fn remember_alert(&mut self, level: Level, month: String, day: NaiveDate) {
        self.alerted.insert((level, month, day));
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

    /// The state after counting `c`, and the decisions that mark a change.
    pub fn evaluate(
        &mut self,
        c: Counted<'_>,
        policy: &Policy,
        config: &WindowConfig,
    ) -> (GovernanceState, Vec<Decision>) {
        let p = policy.plan(c.plan);
        let previous = self.last.as_ref();
        // An event behind the latest one (late within the lateness) is
        // counted, but the state never goes back in time.
        let now = previous.map_or(c.at, |s| s.as_of.max(c.at));
        let short = self.windows.short.window(&config.short, now);
        let long = self.windows.long.window(&config.long, now);

        let over_rate = |c: Counts| c.requests >= p.rate_requests || c.tokens >= p.rate_tokens;
        let rate_limited_until = self.windows.short.frees_at(&config.short, now, over_rate);
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
        let spike_flagged = self.spike(p.spike_factor, p.spike_min_requests, now, long.requests);

        // The current billing period: the latest one counted; and the one
        // before it, which events within its late grace still count toward.
        let (month, used) = match previous {
            Some(s) if s.month.as_str() > c.month => {
                (s.month.clone(), u64::try_from(s.monthly_used).unwrap_or(0))
            }
            _ => (c.month.to_string(), c.month_used),
        };
        let (previous_month, previous_month_used) = match previous {
            // This event counts toward the period before the current one.
            Some(s) if s.month.as_str() > c.month => {
                if s.previous_month.as_deref().is_none_or(|m| m <= c.month) {
                    (Some(c.month.to_string()), c.month_used as i64)
                } else {
                    (s.previous_month.clone(), s.previous_month_used)
                }
            }
            // A new period begins: the current one becomes the previous one.
            Some(s) if s.month.as_str() < c.month => (Some(s.month.clone()), s.monthly_used),
            Some(s) => (s.previous_month.clone(), s.previous_month_used),
            None => (None, 0),
        };
        let level = policy.level(used, p.monthly_cap);

        let mut state = GovernanceState {
            install_id: c.install_id.to_string(),
            plan: c.plan.to_string(),
            month: month.clone(),
            monthly_used: used as i64,
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
            as_of: now,
            previous_month,
            previous_month_used,
            received_through: previous.map_or(c.received, |s| s.received_through.max(c.received)),
            episodes: Vec::new(),
        };

        let mut decisions = Vec::new();
        let rate = || {
            format!(
                "{} requests, {} tokens in 5 minutes (limits {}, {})",
                short.requests, short.tokens, p.rate_requests, p.rate_tokens
            )
        };
        let rate_ended = || format!("window freed: {}", rate());
        let abuse = || abuse_reason.clone().unwrap_or_default();
        let hour = || {
            format!(
                "{} requests, {} tokens in the last hour",
                long.requests, long.tokens
            )
        };
        let spike = || {
            format!(
                "{} requests in the last hour, far above the trailing 24 h",
                long.requests
            )
        };
        let spike_ended = || format!("{} requests in the last hour", long.requests);
        let conditions = [
            Condition {
                kind: "rate_limited",
                end_kind: "rate_limit_ended",
                holds: rate_limited_until.is_some(),
                reason: &rate,
                ended: &rate_ended,
                until: rate_limited_until,
            },
            Condition {
                kind: "abuse_flagged",
                end_kind: "abuse_cleared",
                holds: abuse_reason.is_some(),
                reason: &abuse,
                ended: &hour,
                until: None,
            },
            Condition {
                kind: "spike_flagged",
                end_kind: "spike_cleared",
                holds: spike_flagged,
                reason: &spike,
                ended: &spike_ended,
                until: None,
            },
        ];
        for cond in conditions {
            let open = previous.and_then(|s| s.episodes.iter().find(|e| e.kind == cond.kind));
            match (open, cond.holds) {
                (None, true) => {
                    let d = New {
                        install_id: c.install_id,
                        kind: cond.kind,
                        key: now.to_string(),
                        reason: (cond.reason)(),
                        at: now,
                        phase: "start",
                        episode: Link::Starts,
                        until: cond.until,
                    }
                    .decide();
                    state.episodes.push(Episode {
                        kind: cond.kind.to_string(),
                        episode_id: d.decision_id.clone(),
                        since: now,
                        last_seen: cond.until.unwrap_or(now),
                        marked_at: now,
                    });
                    decisions.push(d);
                }
                (Some(open), true) => {
                    let mut episode = open.clone();
                    // A rate limit is known to hold until its window frees.
                    episode.last_seen = cond.until.unwrap_or(now).max(open.last_seen);
                    if now - open.marked_at >= EXTEND_EVERY_MS {
                        episode.marked_at = now;
                        decisions.push(
                            New {
                                install_id: c.install_id,
                                kind: cond.kind,
                                key: format!("{}|extended|{now}", open.episode_id),
                                reason: (cond.reason)(),
                                at: now,
                                phase: "extended",
                                episode: Link::Of(open.episode_id.clone()),
                                until: cond.until,
                            }
                            .decide(),
                        );
                    }
                    state.episodes.push(episode);
                }
                (Some(open), false) if now - open.last_seen >= QUIET_MS => {
                    decisions.push(
                        New {
                            install_id: c.install_id,
                            kind: cond.end_kind,
                            key: open.episode_id.clone(),
                            reason: (cond.ended)(),
                            at: now,
                            phase: "end",
                            episode: Link::Of(open.episode_id.clone()),
                            until: None,
                        }
                        .decide(),
                    );
                }
                (Some(open), false) => state.episodes.push(open.clone()),
                (None, false) => {}
            }
        }

        // Cap alerts of the month the event counts toward (its own level
        // when that is an earlier period than the current one).
        let event_level = if c.month == month {
            level
        } else {
            policy.level(c.month_used, p.monthly_cap)
        };
        let day = day_of(c.at);
        let open_block = previous
            .filter(|s| s.month == month)
            .and_then(|s| s.episodes.iter().find(|e| e.kind == "blocked"));
        for (reached, kind) in [
            (Level::Warning, "cap_warning"),
            (Level::Critical, "cap_critical"),
            (Level::Blocked, "blocked"),
        ] {
            if event_level >= reached && self.alerted.insert((reached, c.month.to_string(), day)) {
                let current_block = reached == Level::Blocked && c.month == month;
                let (phase, episode) = match (current_block, open_block) {
                    (true, None) => ("start", Link::Starts),
                    (true, Some(open)) => ("alert", Link::Of(open.episode_id.clone())),
                    (false, _) => ("alert", Link::Alone),
                };
                let d = New {
                    install_id: c.install_id,
                    kind,
                    key: format!("{}|{day}", c.month),
                    reason: format!(
                        "{} of {} generations used in {} ({} plan)",
                        c.month_used,
                        p.monthly_cap.unwrap_or_default(),
                        c.month,
                        c.plan
                    ),
                    at: c.at,
                    phase,
                    episode,
                    until: None,
                }
                .decide();
                decisions.push(d);
            }
        }
        // The block of the current period: open while blocked.
        let previous_block = previous.and_then(|s| s.episodes.iter().find(|e| e.kind == "blocked"));
        if level == Level::Blocked {
            let episode = open_block.cloned().unwrap_or_else(|| {
                // Its id is the day's `blocked` decision's, made above or
                // earlier today.
                let id = New {
                    install_id: c.install_id,
                    kind: "blocked",
                    key: format!("{month}|{day}"),
                    reason: String::new(),
                    at: now,
                    phase: "start",
                    episode: Link::Starts,
                    until: None,
                }
                .decide()
                .decision_id;
                Episode {
                    kind: "blocked".into(),
                    episode_id: id,
                    since: now,
                    last_seen: now,
                    marked_at: now,
                }
            });
            state.episodes.push(Episode {
                last_seen: now,
                ..episode
            });
        }
        if let (Some(block), true) = (previous_block, level != Level::Blocked) {
            let reason = if previous.is_some_and(|s| s.month != month) {
                format!("new month {month}")
            } else {
                format!("plan {} allows more generations", c.plan)
            };
            decisions.push(
                New {
                    install_id: c.install_id,
                    kind: "unblocked",
                    key: format!("{month}|{}|{now}", c.plan),
                    reason,
                    at: now,
                    phase: "end",
                    episode: Link::Of(block.episode_id.clone()),
                    until: None,
                }
                .decide(),
            );
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

    fn month_of(t: i64) -> String {
        usage_service_kit::periods::month_key(usage_service_kit::periods::month_start(t))
    }

    /// Evaluates an event at `t` that counts toward its own month, in
    /// which it is the `used`-th generation.
    fn eval(
        g: &mut Installation,
        plan: &str,
        used: u64,
        t: i64,
        p: &Policy,
        c: &WindowConfig,
    ) -> (GovernanceState, Vec<Decision>) {
        let month = month_of(t);
        g.evaluate(
            Counted {
                install_id: "i",
                plan,
                at: t,
                received: t,
                month: &month,
                month_used: used,
            },
            p,
            c,
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
            let (s, d) = eval(&mut g, "pro", i as u64 + 1, t, &p, &c);
            last = (s.rate_limited_until, d);
            if i < 99 {
                assert_eq!(s.rate_limited_until, None, "request {} is allowed", i + 1);
            }
        }
        // After the 100th, the next one would be the 101st: limited until the
        // first 10 s bucket slides out of the 5-minute window.
        assert_eq!(last.0, Some(T0 + 300_000));
        assert_eq!(kinds(&last.1), ["rate_limited"]);
        assert_eq!(last.1[0].phase, "start");
        assert_eq!(last.1[0].until, Some(T0 + 300_000));
        assert_eq!(
            last.1[0].episode_id.as_deref(),
            Some(last.1[0].decision_id.as_str())
        );
    }

    #[test]
    fn tokens_rate_limit_likewise() {
        let (mut g, p, c) = setup();
        g.count(&c, T0, 30_000);
        let (s, _) = eval(&mut g, "pro", 1, T0, &p, &c);
        assert_eq!(s.rate_limited_until, None);
        g.count(&c, T0 + 20_000, 20_000);
        let (s, d) = eval(&mut g, "pro", 2, T0 + 20_000, &p, &c);
        assert_eq!(s.rate_limit_reason.as_deref(), Some("tokens"));
        // Dropping the first bucket (30k tokens) frees the window.
        assert_eq!(s.rate_limited_until, Some(T0 + 300_000));
        assert_eq!(kinds(&d), ["rate_limited"]);
    }

    #[test]
    fn a_site_that_stays_over_the_limit_is_one_episode_extended_once_a_minute() {
        let (mut g, p, c) = setup();
        let mut all = vec![];
        // 2 requests a second for 10 minutes: over 100 per 5 minutes all along.
        for i in 0..1200 {
            let t = T0 + i * 500;
            g.count(&c, t, 10);
            let (_, d) = eval(&mut g, "credits", 1, t, &p, &c);
            all.extend(d.into_iter().filter(|d| d.kind.starts_with("rate_limit")));
        }
        let starts: Vec<_> = all.iter().filter(|d| d.phase == "start").collect();
        assert_eq!(starts.len(), 1, "one episode: {:?}", kinds(&all));
        let extended: Vec<_> = all.iter().filter(|d| d.phase == "extended").collect();
        // Limited from the 100th request (t = 49.5 s) to the end (599.5 s):
        // an extension at most once a minute, each linked to the start.
        assert_eq!(extended.len(), 9);
        for pair in extended.windows(2) {
            assert!(pair[1].at - pair[0].at >= EXTEND_EVERY_MS);
        }
        assert!(extended
            .iter()
            .all(|d| d.episode_id.as_deref() == Some(starts[0].decision_id.as_str())));
        // Then quiet: a request once the window has emptied ends it (the
        // abuse flag of the hour goes on).
        let t = T0 + 600_000 + 420_000;
        g.count(&c, t, 10);
        let (s, d) = eval(&mut g, "credits", 1, t, &p, &c);
        let d: Vec<_> = d
            .into_iter()
            .filter(|d| d.kind.starts_with("rate_limit"))
            .collect();
        assert_eq!(kinds(&d), ["rate_limit_ended"]);
        assert_eq!(d[0].phase, "end");
        assert_eq!(d[0].episode_id, starts[0].episode_id);
        assert!(s.episodes.iter().all(|e| e.kind != "rate_limited"));
    }

    #[test]
    fn a_limit_that_frees_and_fills_again_within_a_minute_is_the_same_episode() {
        let (mut g, p, c) = setup();
        let mut d_all = vec![];
        let mut t = T0;
        // 100 requests in the first second: limited until T0 + 300 s.
        for _ in 0..100 {
            g.count(&c, t, 1);
            d_all.extend(eval(&mut g, "credits", 1, t, &p, &c).1);
            t += 10;
        }
        // Free at 300 s; one request at 310 s (not limited), then 100 more
        // at 320 s: limited again within a minute of the last time it held.
        for (at, n) in [(T0 + 310_000, 1), (T0 + 320_000, 100)] {
            for _ in 0..n {
                g.count(&c, at, 1);
                d_all.extend(eval(&mut g, "credits", 1, at, &p, &c).1);
            }
        }
        let phases: Vec<_> = d_all
            .iter()
            .filter(|d| d.kind.starts_with("rate_limit"))
            .map(|d| d.phase.as_str())
            .collect();
        assert_eq!(phases, ["start", "extended"]);
    }

    #[test]
    fn abuse_is_flagged_at_200_requests_in_an_hour_once() {
        let (mut g, p, c) = setup();
        let mut flagged_at = None;
        for i in 0..250 {
            let t = T0 + i * 15_000; // 4 per minute: never rate limited
            g.count(&c, t, 10);
            let (s, d) = eval(&mut g, "agency", i as u64 + 1, t, &p, &c);
            assert_eq!(s.rate_limited_until, None);
            let flags: Vec<_> = d.iter().filter(|d| d.kind == "abuse_flagged").collect();
            if flags.iter().any(|d| d.phase == "start") {
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
            let (s, d) = eval(&mut g, "free", used, t, &p, &c);
            for d in d {
                alerts.push((used, d.kind, d.phase));
            }
            if used >= 50 {
                assert_eq!(s.level, "blocked");
                assert_eq!(s.episodes.len(), 1);
            }
        }
        assert_eq!(
            alerts,
            [
                (38, "cap_warning".to_string(), "alert".to_string()),
                (45, "cap_critical".into(), "alert".into()),
                (50, "blocked".into(), "start".into())
            ]
        );
    }

    #[test]
    fn a_plan_upgrade_or_a_new_month_unblocks() {
        let (mut g, p, c) = setup();
        g.count(&c, T0, 10);
        let (s, d) = eval(&mut g, "free", 50, T0, &p, &c);
        assert_eq!(s.level, "blocked");
        let block = d.iter().find(|d| d.kind == "blocked").unwrap().clone();
        let (s, d) = eval(&mut g, "pro", 50, T0 + 1000, &p, &c);
        assert_eq!(s.level, "ok");
        assert_eq!(kinds(&d), ["unblocked"]);
        assert!(d[0].reason.contains("plan pro"));
        assert_eq!(d[0].episode_id.as_deref(), Some(block.decision_id.as_str()));

        let (mut g, p, c) = setup();
        let (s, _) = eval(&mut g, "free", 50, T0 - 1000, &p, &c); // 2025-11-30
        assert_eq!((s.level.as_str(), s.month.as_str()), ("blocked", "2025-11"));
        let (s, d) = eval(&mut g, "free", 1, T0 + 1000, &p, &c); // December: 1 used
        assert_eq!((s.level.as_str(), s.month.as_str()), ("ok", "2025-12"));
        assert_eq!(
            (s.previous_month.as_deref(), s.previous_month_used),
            (Some("2025-11"), 50)
        );
        assert_eq!(kinds(&d), ["unblocked"]);
        assert!(d[0].reason.contains("new month"));
    }

    #[test]
    fn an_event_of_an_earlier_month_never_lifts_the_current_block() {
        let (mut g, p, c) = setup();
        let (s, _) = eval(&mut g, "free", 50, T0 + 3_600_000, &p, &c); // December, blocked
        assert_eq!((s.level.as_str(), s.month.as_str()), ("blocked", "2025-12"));
        // A November event (late within the billing grace): counted in
        // November (its 3rd generation there), the state stays December's.
        let (s, d) = g.evaluate(
            Counted {
                install_id: "i",
                plan: "free",
                at: T0 + 3_600_000,
                received: T0 + 3_600_000,
                month: "2025-11",
                month_used: 3,
            },
            &p,
            &c,
        );
        assert_eq!(
            (s.level.as_str(), s.month.as_str(), s.monthly_used),
            ("blocked", "2025-12", 50)
        );
        // ...and the gateways learn November's count, for its cap.
        assert_eq!(
            (s.previous_month.as_deref(), s.previous_month_used),
            (Some("2025-11"), 3)
        );
        assert!(d.is_empty(), "{d:?}");
        // An earlier period's own alerts are its own, and open no episode.
        let (s, d) = g.evaluate(
            Counted {
                install_id: "i",
                plan: "free",
                at: T0 + 3_600_000,
                received: T0 + 3_600_000,
                month: "2025-11",
                month_used: 45,
            },
            &p,
            &c,
        );
        assert_eq!(s.level, "blocked");
        assert_eq!(kinds(&d), ["cap_warning", "cap_critical"]);
        assert!(d
            .iter()
            .all(|d| d.episode_id.is_none() && d.phase == "alert"));
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
                let (s, d) = eval(&mut g, "agency", 1, t, &p, &c);
                assert!(!s.spike_flagged && d.is_empty(), "quiet hour {h}");
            }
        }
        // Then 60 requests in 30 minutes: >= 10x the ~2/hour average and >= 50.
        let mut flagged = vec![];
        for k in 0..60 {
            let t = T0 + k * 30_000;
            g.count(&c, t, 100);
            let (_, d) = eval(&mut g, "agency", 100 + k as u64, t, &p, &c);
            flagged.extend(
                d.into_iter()
                    .filter(|d| d.kind == "spike_flagged" && d.phase == "start")
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
            for i in 0..400u64 {
                let t = T0 + i as i64 * 700;
                g.count(&c, t, 400);
                out.push(eval(&mut g, "free", i + 1, t, &p, &c));
            }
            out
        };
        let first = run();
        assert_eq!(first, run());
        let decisions: usize = first.iter().map(|(_, d)| d.len()).sum();
        assert!(decisions < 20, "{decisions} decisions for 400 events");
    }

    #[test]
    fn a_restarted_owner_continues_the_published_episodes() {
        let (mut g, p, c) = setup();
        let mut first = vec![];
        for i in 0..150 {
            let t = T0 + i * 500;
            g.count(&c, t, 1);
            first.extend(eval(&mut g, "credits", 1, t, &p, &c).1);
        }
        let published = g.last.clone().unwrap();
        // Another instance resumes from the published state: the episode
        // goes on, it does not start again.
        let mut h = Installation {
            windows: g.windows.clone(),
            last: Some(published),
            ..Installation::default()
        };
        let t = T0 + 150 * 500;
        h.count(&c, t, 1);
        let (s, d) = eval(&mut h, "credits", 1, t, &p, &c);
        assert!(d.iter().all(|d| d.phase != "start"), "{d:?}");
        assert_eq!(
            s.episodes[0].episode_id,
            first
                .iter()
                .find(|d| d.phase == "start")
                .unwrap()
                .decision_id
        );
    }
}

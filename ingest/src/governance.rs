//! Enforcement of the processors' governance decisions.
//!
//! Every gateway follows the compacted governance topic into memory (like the
//! registry) and, before appending a batch, refuses it when the installation
//! is rate limited (429 `rate_limited`, `Retry-After` until the window frees)
//! or blocked on its monthly cap (429 `plan_limit_reached`, until the next
//! month or a plan upgrade). Decisions are in event time: a batch is refused
//! if it holds an event created before the rate limit ends, or in the month
//! the installation is blocked in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::Serialize;
use usage_schemas::wire::AvroRecord;
use usage_schemas::GovernanceState;
use usage_service_kit::follower::Table;

#[derive(Default)]
pub struct GovernanceView {
    states: RwLock<HashMap<String, Arc<GovernanceState>>>,
    caught_up: AtomicBool,
}

impl Table for GovernanceView {
    fn apply(&self, key: Option<&[u8]>, value: Option<&[u8]>) {
        let mut states = self.states.write().unwrap_or_else(|p| p.into_inner());
        match value.map(GovernanceState::from_wire) {
            Some(Ok(state)) => {
                states.insert(state.install_id.clone(), Arc::new(state));
            }
            Some(Err(err)) => tracing::error!(%err, "undecodable governance state skipped"),
            None => {
                if let Some(id) = key.and_then(|k| std::str::from_utf8(k).ok()) {
                    states.remove(id);
                }
            }
        }
    }

    fn caught_up(&self) {
        if !self.caught_up.swap(true, Ordering::SeqCst) {
            tracing::info!("governance state caught up");
        }
    }

    fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }
}

/// Why a batch is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    RateLimited {
        retry_after_secs: u64,
        reason: String,
    },
    PlanLimitReached {
        retry_after_secs: u64,
        used: i64,
        cap: i64,
    },
}

fn month_of(ms: i64) -> String {
    let d = DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
    format!("{:04}-{:02}", d.year(), d.month())
}

/// First millisecond of the month after the one of `ms`.
fn next_month_start(ms: i64) -> i64 {
    let d = DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .date_naive();
    let (y, m) = if d.month() == 12 {
        (d.year() + 1, 1)
    } else {
        (d.year(), d.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
        .unwrap_or(ms)
}

fn secs_until(until: i64, from: i64) -> u64 {
    u64::try_from((until - from + 999) / 1000)
        .unwrap_or(0)
        .max(1)
}

impl GovernanceView {
    pub fn get(&self, install_id: &str) -> Option<Arc<GovernanceState>> {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(install_id)
            .cloned()
    }

    /// Whether a batch whose events were created at `created` (ms) may be
    /// appended at gateway time `now` (ms).
    pub fn check(&self, install_id: &str, created: &[i64], now: i64) -> Result<(), Refusal> {
        let Some(state) = self.get(install_id) else {
            return Ok(());
        };
        let Some(earliest) = created.iter().min().copied() else {
            return Ok(());
        };
        if state.level == "blocked" && created.iter().any(|t| month_of(*t) == state.month) {
            return Err(Refusal::PlanLimitReached {
                retry_after_secs: secs_until(next_month_start(earliest), now.max(earliest)),
                used: state.monthly_used,
                cap: state.monthly_cap.unwrap_or_default(),
            });
        }
        if let Some(until) = state.rate_limited_until {
            if earliest < until {
                return Err(Refusal::RateLimited {
                    retry_after_secs: secs_until(until, now.max(earliest)),
                    reason: state.rate_limit_reason.clone().unwrap_or_default(),
                });
            }
        }
        Ok(())
    }
}

/// What `GET /api/usage/governance` answers: what the plugin's admin notice needs.
#[derive(Debug, Serialize, PartialEq)]
pub struct GovernanceReport {
    pub install_id: String,
    pub plan: String,
    pub month: String,
    pub monthly_used: i64,
    pub monthly_cap: Option<i64>,
    pub usage_percent: Option<f64>,
    pub level: String,
    pub rate_limited: bool,
    pub rate_limited_until: Option<String>,
    pub requests_left_in_window: i64,
    pub tokens_left_in_window: i64,
    pub abuse_flagged: bool,
    pub abuse_reason: Option<String>,
    pub spike_flagged: bool,
    pub monthly_resets_at: String,
    pub as_of: Option<String>,
}

fn iso(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl GovernanceReport {
    /// The report at gateway time `now`; an installation with no state yet has used nothing.
    pub fn new(
        install_id: &str,
        plan: &str,
        cap: Option<i64>,
        state: Option<&GovernanceState>,
        now: i64,
    ) -> Self {
        let month_now = month_of(now);
        let current = state.filter(|s| s.month == month_now);
        let used = current.map_or(0, |s| s.monthly_used);
        let cap = state.map_or(cap, |s| s.monthly_cap);
        let until = state
            .and_then(|s| s.rate_limited_until)
            .filter(|u| *u > now);
        Self {
            install_id: install_id.to_string(),
            plan: state.map_or(plan.to_string(), |s| s.plan.clone()),
            month: month_now,
            monthly_used: used,
            monthly_cap: cap,
            usage_percent: cap.map(|c| {
                if c == 0 {
                    100.0
                } else {
                    (used as f64 * 10_000.0 / c as f64).round() / 100.0
                }
            }),
            level: current.map_or("ok".to_string(), |s| s.level.clone()),
            rate_limited: until.is_some(),
            rate_limited_until: until.map(iso),
            requests_left_in_window: state
                .map_or(100, |s| (s.rate_requests_limit - s.window_requests).max(0)),
            tokens_left_in_window: state
                .map_or(50_000, |s| (s.rate_tokens_limit - s.window_tokens).max(0)),
            abuse_flagged: state.is_some_and(|s| s.abuse_flagged),
            abuse_reason: state.and_then(|s| s.abuse_reason.clone()),
            spike_flagged: state.is_some_and(|s| s.spike_flagged),
            monthly_resets_at: iso(next_month_start(now)),
            as_of: state.map(|s| iso(s.as_of)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEC1: i64 = 1_764_547_200_000; // 2025-12-01T00:00:00Z

    fn state(level: &str, until: Option<i64>) -> GovernanceState {
        GovernanceState {
            install_id: "i".into(),
            plan: "free".into(),
            month: "2025-12".into(),
            monthly_used: 50,
            monthly_cap: Some(50),
            level: level.into(),
            rate_limited_until: until,
            rate_limit_reason: until.map(|_| "requests".into()),
            abuse_flagged: false,
            abuse_reason: None,
            spike_flagged: false,
            window_requests: 100,
            window_tokens: 1000,
            hour_requests: 100,
            hour_tokens: 1000,
            rate_requests_limit: 100,
            rate_tokens_limit: 50_000,
            as_of: DEC1 + 1000,
        }
    }

    fn view(s: GovernanceState) -> GovernanceView {
        let v = GovernanceView::default();
        v.apply(Some(b"i"), Some(&s.to_wire().unwrap()));
        v
    }

    #[test]
    fn rate_limited_batches_wait_until_the_window_frees() {
        let v = view(state("ok", Some(DEC1 + 300_000)));
        assert_eq!(
            v.check("i", &[DEC1 + 100_000], DEC1 + 100_000),
            Err(Refusal::RateLimited {
                retry_after_secs: 200,
                reason: "requests".into()
            })
        );
        assert_eq!(v.check("i", &[DEC1 + 300_000], DEC1 + 300_000), Ok(()));
        assert_eq!(v.check("other", &[DEC1], DEC1), Ok(()));
    }

    #[test]
    fn a_blocked_installation_waits_for_the_next_month() {
        let v = view(state("blocked", None));
        match v.check("i", &[DEC1 + 86_400_000], DEC1 + 86_400_000) {
            Err(Refusal::PlanLimitReached {
                retry_after_secs,
                used: 50,
                cap: 50,
            }) => {
                assert_eq!(retry_after_secs, 30 * 86_400);
            }
            other => panic!("{other:?}"),
        }
        // January is a new month.
        assert_eq!(
            v.check("i", &[DEC1 + 31 * 86_400_000], DEC1 + 31 * 86_400_000),
            Ok(())
        );
        // A tombstone (erasure) forgets it.
        v.apply(Some(b"i"), None);
        assert_eq!(v.check("i", &[DEC1 + 86_400_000], DEC1), Ok(()));
    }

    #[test]
    fn the_report_says_what_is_left_and_when_it_resets() {
        let s = state("critical", Some(DEC1 + 300_000));
        let r = GovernanceReport::new("i", "free", Some(50), Some(&s), DEC1 + 2000);
        assert_eq!(r.usage_percent, Some(100.0));
        assert_eq!(r.level, "critical");
        assert!(r.rate_limited);
        assert_eq!(
            r.rate_limited_until.as_deref(),
            Some("2025-12-01T00:05:00Z")
        );
        assert_eq!(r.requests_left_in_window, 0);
        assert_eq!(r.tokens_left_in_window, 49_000);
        assert_eq!(r.monthly_resets_at, "2026-01-01T00:00:00Z");
        let fresh = GovernanceReport::new("i", "pro", Some(10_000), None, DEC1);
        assert_eq!(
            (
                fresh.monthly_used,
                fresh.usage_percent,
                fresh.level.as_str()
            ),
            (0, Some(0.0), "ok")
        );
    }
}

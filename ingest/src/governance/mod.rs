//! Enforcement where spending is decided, and every generation recorded.
//!
//! Every gateway follows the compacted governance topic into memory (like the
//! registry): the processors' latest state of each installation. Usage events
//! report generations that already happened and cost money, so a batch is
//! never refused for a limit: every authentic event is stored, and the ones
//! that arrived while the installation was over its cap, rate limited or
//! flagged are marked (`over_limit`). Limits are enforced before the
//! spending, by `POST /api/usage/admit`, which the provider's generation API
//! asks before each generation; it answers from this state and what this
//! gateway accepted and admitted since (`ledger`), in microseconds.
//!
//! A block belongs to the installation's current billing period (the
//! state's `month`, which no event of an earlier period moves back), so no
//! event's date lifts it; it ends with a new month or a plan upgrade.

pub mod ledger;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::Serialize;
use usage_schemas::wire::AvroRecord;
use usage_schemas::GovernanceState;
use usage_service_kit::follower::Table;
use usage_service_kit::periods;
use usage_service_kit::policy::Policy;

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

impl GovernanceView {
    pub fn get(&self, install_id: &str) -> Option<Arc<GovernanceState>> {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(install_id)
            .cloned()
    }
}

/// What `GET /api/usage/governance` answers: what the plugin's admin notice needs.
#[derive(Debug, Serialize, PartialEq, utoipa::ToSchema)]
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
    /// The report at gateway time `now`: the installation's plan now (a
    /// provider's change shows at once), the processors' state, and `used`,
    /// this month's generations as the gateway knows them (`Ledger::pending`).
    pub fn new(
        install_id: &str,
        plan: &str,
        policy: &Policy,
        state: Option<&GovernanceState>,
        used: u64,
        now: i64,
    ) -> Self {
        let p = policy.plan(plan);
        let month_now = periods::month_key(periods::month_start(now));
        let current = state.filter(|s| s.month == month_now);
        let cap = p.monthly_cap;
        let until = state
            .and_then(|s| s.rate_limited_until)
            .filter(|u| *u > now);
        let fresh = state.filter(|s| now - s.as_of < ledger::RATE_WINDOW_MS);
        Self {
            install_id: install_id.to_string(),
            plan: plan.to_string(),
            month: month_now,
            monthly_used: used as i64,
            monthly_cap: cap.map(|c| c as i64),
            usage_percent: cap.map(|c| {
                if c == 0 {
                    100.0
                } else {
                    (used as f64 * 10_000.0 / c as f64).round() / 100.0
                }
            }),
            level: policy.level(used, cap).as_str().to_string(),
            rate_limited: until.is_some(),
            rate_limited_until: until.map(iso),
            requests_left_in_window: (p.rate_requests as i64
                - fresh.map_or(0, |s| s.window_requests))
            .max(0),
            tokens_left_in_window: (p.rate_tokens as i64 - fresh.map_or(0, |s| s.window_tokens))
                .max(0),
            abuse_flagged: current.is_some_and(|s| s.abuse_flagged),
            abuse_reason: current.and_then(|s| s.abuse_reason.clone()),
            spike_flagged: current.is_some_and(|s| s.spike_flagged),
            monthly_resets_at: iso(periods::next_month_start_ms(now)),
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
            monthly_used: 45,
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
            previous_month: None,
            previous_month_used: 0,
            received_through: DEC1 + 1000,
            episodes: vec![],
        }
    }

    #[test]
    fn the_view_follows_the_topic_and_forgets_on_a_tombstone() {
        let v = GovernanceView::default();
        v.apply(Some(b"i"), Some(&state("ok", None).to_wire().unwrap()));
        assert_eq!(v.get("i").unwrap().monthly_used, 45);
        v.apply(Some(b"i"), None);
        assert!(v.get("i").is_none());
    }

    #[test]
    fn the_report_says_what_is_left_and_when_it_resets() {
        let s = state("critical", Some(DEC1 + 300_000));
        let p = Policy::default();
        let r = GovernanceReport::new("i", "free", &p, Some(&s), 46, DEC1 + 2000);
        assert_eq!(r.monthly_used, 46, "the state's 45 and one accepted since");
        assert_eq!(r.usage_percent, Some(92.0));
        assert_eq!(r.level, "critical");
        assert!(r.rate_limited);
        assert_eq!(
            r.rate_limited_until.as_deref(),
            Some("2025-12-01T00:05:00Z")
        );
        assert_eq!(r.requests_left_in_window, 0);
        assert_eq!(r.tokens_left_in_window, 49_000);
        assert_eq!(r.monthly_resets_at, "2026-01-01T00:00:00Z");
        // A plan upgrade shows at once: pro's cap, not the state's.
        let r = GovernanceReport::new("i", "pro", &p, Some(&s), 46, DEC1 + 2000);
        assert_eq!((r.monthly_cap, r.level.as_str()), (Some(10_000), "ok"));
        let fresh = GovernanceReport::new("i", "pro", &p, None, 0, DEC1);
        assert_eq!(
            (
                fresh.monthly_used,
                fresh.usage_percent,
                fresh.level.as_str()
            ),
            (0, Some(0.0), "ok")
        );
        // The next month starts from nothing.
        let january = GovernanceReport::new("i", "free", &p, Some(&s), 0, DEC1 + 31 * 86_400_000);
        assert_eq!(
            (january.level.as_str(), january.month.as_str()),
            ("ok", "2026-01")
        );
    }
}

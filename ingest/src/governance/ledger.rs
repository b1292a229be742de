//! What this gateway accepted or admitted that the installation's published
//! state has not counted yet, so that its admission checks and over-limit
//! marks do not wait for the processors.
//!
//! The published state (from the processors, ~0.3 s behind) counts the
//! events up to its `received_through`. On top of it, per installation:
//! - **accepted**: batches this gateway stored after that mark (by billing
//!   month), dropped once a state counts them;
//! - **admitted**: generations `POST /api/usage/admit` allowed that no event
//!   has reported yet. Each event this gateway accepts pays the oldest of
//!   them off (it reports a generation that was admitted), so a generation
//!   is never counted twice, as admitted and as accepted; one that is never
//!   reported (the generation failed) expires after the hold
//!   (`USAGE_ADMIT_HOLD_SECS`).
//!
//! Every check and the reservation it makes happen under the installation's
//! lock, so on one gateway concurrent admissions never overshoot a cap by
//! more than the configured slack. Gateways share no counts: with G
//! gateways answering admissions for the same installations
//! (`USAGE_ADMIT_GATEWAYS`), each admits at most its share (rounded up) of
//! what the processors' state leaves, so together they overshoot by at most
//! the slack plus G - 1, whatever the balancer does (see BENCHMARKS.md).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use usage_schemas::GovernanceState;
use usage_service_kit::periods;
use usage_service_kit::policy::PlanPolicy;

/// The contract's rate-limit window.
pub const RATE_WINDOW_MS: i64 = 300_000;
/// How long an accepted batch counts as pending at most.
const ACCEPTED_HOLD_MS: i64 = 600_000;
/// The most entries of pending batches one installation holds.
const MAX_ENTRIES: usize = 1024;
/// The abuse window.
const ABUSE_WINDOW_MS: i64 = 3_600_000;
const SHARDS: usize = 64;

/// Why an event arrived over a limit (the raw event's `over_limit`).
pub const PLAN_LIMIT_REACHED: &str = "plan_limit_reached";
pub const RATE_LIMITED: &str = "rate_limited";
pub const ABUSE_FLAGGED: &str = "abuse_flagged";

struct Accepted {
    received_at: i64,
    month: String,
    events: u64,
    tokens: u64,
}

struct Admitted {
    at: i64,
    generations: u64,
    tokens: u64,
}

#[derive(Default)]
struct Pending {
    accepted: VecDeque<Accepted>,
    admitted: VecDeque<Admitted>,
    touched: i64,
}

impl Pending {
    /// Forgets what `state` counts, and admissions held longer than `hold_ms`.
    fn reconcile(&mut self, state: Option<&GovernanceState>, now: i64, hold_ms: i64) {
        self.touched = now;
        if let Some(s) = state {
            self.accepted.retain(|a| a.received_at > s.received_through);
        }
        // A batch no state has counted in this long was a resend the
        // processors did not report on, or they lag far behind: either way
        // this gateway stops holding it (memory stays bounded).
        while self
            .accepted
            .front()
            .is_some_and(|a| a.received_at < now - ACCEPTED_HOLD_MS)
        {
            self.accepted.pop_front();
        }
        while self.admitted.front().is_some_and(|a| a.at < now - hold_ms) {
            self.admitted.pop_front();
        }
    }

    /// Records an accepted event: one entry per event arrival (exact: a
    /// state that counted some of a second's events leaves the others
    /// pending). When the processors lag so far that an installation holds
    /// `MAX_ENTRIES`, its two oldest entries merge (memory stays bounded;
    /// the merged one waits for the later arrival of the two).
    fn add_accepted(&mut self, now: i64, month: &str, tokens: u64) {
        if let Some(back) = self
            .accepted
            .back_mut()
            .filter(|b| b.month == month && b.received_at == now)
        {
            back.events += 1;
            back.tokens += tokens;
            return;
        }
        self.accepted.push_back(Accepted {
            received_at: now,
            month: month.to_string(),
            events: 1,
            tokens,
        });
        if self.accepted.len() > MAX_ENTRIES {
            if let (Some(first), Some(second)) =
                (self.accepted.pop_front(), self.accepted.front_mut())
            {
                if first.month == second.month {
                    second.events += first.events;
                    second.tokens += first.tokens;
                } else {
                    self.accepted.push_front(first);
                }
            }
        }
    }

    /// `events` reported generations pay off the oldest admissions.
    fn pay_off(&mut self, mut events: u64) {
        while events > 0 {
            let Some(front) = self.admitted.front_mut() else {
                return;
            };
            let paid = front.generations.min(events);
            front.generations -= paid;
            events -= paid;
            if front.generations == 0 {
                self.admitted.pop_front();
            }
        }
    }

    fn accepted_in(&self, month: &str) -> u64 {
        self.accepted
            .iter()
            .filter(|a| a.month == month)
            .map(|a| a.events)
            .sum()
    }

    fn admitted_generations(&self) -> u64 {
        self.admitted.iter().map(|a| a.generations).sum()
    }

    /// Requests and tokens accepted or admitted within the rate window.
    fn recent(&self, now: i64) -> (u64, u64) {
        let from = now - RATE_WINDOW_MS;
        let accepted = self
            .accepted
            .iter()
            .filter(|a| a.received_at > from)
            .fold((0, 0), |(r, t), a| (r + a.events, t + a.tokens));
        self.admitted
            .iter()
            .filter(|a| a.at > from)
            .fold(accepted, |(r, t), a| (r + a.generations, t + a.tokens))
    }
}

/// The usage a check starts from: what the processors' state counted, and
/// what this gateway accepted and admitted since.
struct Usage {
    /// Generations of the current month the state counted.
    counted: u64,
    /// Generations of the current month this gateway accepted since.
    accepted: u64,
    admitted: u64,
    /// The state's rate window (while it is recent), and this gateway's
    /// requests and tokens since.
    counted_requests: u64,
    counted_tokens: u64,
    recent_requests: u64,
    recent_tokens: u64,
    rate_limited_until: Option<i64>,
    abuse_flagged: bool,
}

impl Usage {
    fn used(&self) -> u64 {
        self.counted + self.accepted
    }
}

/// What the state counted toward `month`, when it knows: the current
/// period or the one before.
fn counted_in(state: Option<&GovernanceState>, month: &str) -> Option<u64> {
    let s = state?;
    let n = if s.month == month {
        s.monthly_used
    } else if s.previous_month.as_deref() == Some(month) {
        s.previous_month_used
    } else {
        return None;
    };
    Some(u64::try_from(n).unwrap_or(0))
}

fn usage(p: &Pending, state: Option<&GovernanceState>, now: i64) -> Usage {
    let month = periods::month_key(periods::month_start(now));
    let fresh = |window: i64| state.filter(|s| now - s.as_of < window);
    let (recent_requests, recent_tokens) = p.recent(now);
    let window = fresh(RATE_WINDOW_MS);
    Usage {
        counted: counted_in(state, &month).unwrap_or(0),
        accepted: p.accepted_in(&month),
        admitted: p.admitted_generations(),
        counted_requests: window.map_or(0, |s| u64::try_from(s.window_requests).unwrap_or(0)),
        counted_tokens: window.map_or(0, |s| u64::try_from(s.window_tokens).unwrap_or(0)),
        recent_requests,
        recent_tokens,
        rate_limited_until: state
            .and_then(|s| s.rate_limited_until)
            .filter(|u| *u > now),
        abuse_flagged: fresh(ABUSE_WINDOW_MS).is_some_and(|s| s.abuse_flagged),
    }
}

/// An admission check's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub allowed: bool,
    pub reason: Option<&'static str>,
    pub retry_after_secs: Option<u64>,
}

fn secs_until(until: i64, now: i64) -> u64 {
    u64::try_from((until - now + 999) / 1000)
        .unwrap_or(0)
        .max(1)
}

pub struct Ledger {
    shards: Vec<Mutex<HashMap<String, Pending>>>,
    hold_ms: i64,
    slack: u64,
    gateways: u64,
}

/// This gateway's share of `left` among `gateways` (rounded up).
fn share(left: u64, gateways: u64) -> u64 {
    left.div_ceil(gateways.max(1))
}

impl Ledger {
    /// `hold_ms`: how long an admission waits to be reported; `slack`:
    /// generations an admission may go past a cap; `gateways`: how many
    /// gateways answer admissions for the same installations (each admits
    /// its share of what the processors' state leaves).
    pub fn new(hold_ms: i64, slack: u64, gateways: u64) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hold_ms,
            slack,
            gateways: gateways.max(1),
        }
    }

    fn with<T>(
        &self,
        install_id: &str,
        state: Option<&GovernanceState>,
        now: i64,
        f: impl FnOnce(&mut Pending) -> T,
    ) -> T {
        let mut h = DefaultHasher::new();
        install_id.hash(&mut h);
        let shard = &self.shards[(h.finish() as usize) % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        let pending = map.entry(install_id.to_string()).or_default();
        pending.reconcile(state, now, self.hold_ms);
        f(pending)
    }

    /// The over-limit mark of each event of a batch about to be stored
    /// (`events`: each one's billing month and tokens, in order), and the
    /// batch recorded as accepted. Marks say what was already so when the
    /// event arrived: a plan used up, a full rate window, an abuse flag.
    pub fn accept(
        &self,
        install_id: &str,
        state: Option<&GovernanceState>,
        plan: &PlanPolicy,
        events: &[(String, u64)],
        now: i64,
    ) -> Vec<Option<&'static str>> {
        self.with(install_id, state, now, |p| {
            let month = periods::month_key(periods::month_start(now));
            // An event reporting an admitted generation is of this month; an
            // event dated into an earlier one pays no admission off, so that
            // backdating within the late grace frees no admission.
            p.pay_off(events.iter().filter(|(m, _)| *m == month).count() as u64);
            let u = usage(p, state, now);
            let (mut requests, mut tokens) = (
                u.counted_requests + u.recent_requests,
                u.counted_tokens + u.recent_tokens,
            );
            // Each month's generations so far, for its cap: the current
            // month's and the previous one's are known (the state carries
            // both); an older month has closed and takes no event.
            let mut used: HashMap<&str, u64> = HashMap::new();
            let marks = events
                .iter()
                .map(|(event_month, event_tokens)| {
                    let counted = if *event_month == month {
                        Some(u.counted)
                    } else {
                        counted_in(state, event_month)
                    };
                    let over_cap = counted.is_some_and(|counted| {
                        let n = used
                            .entry(event_month.as_str())
                            .or_insert_with(|| counted + p.accepted_in(event_month));
                        *n += 1;
                        plan.monthly_cap.is_some_and(|cap| *n > cap)
                    });
                    requests += 1;
                    tokens += event_tokens;
                    if over_cap {
                        Some(PLAN_LIMIT_REACHED)
                    } else if u.rate_limited_until.is_some()
                        || requests > plan.rate_requests
                        || tokens > plan.rate_tokens
                    {
                        Some(RATE_LIMITED)
                    } else if u.abuse_flagged {
                        Some(ABUSE_FLAGGED)
                    } else {
                        None
                    }
                })
                .collect();
            for (m, t) in events {
                p.add_accepted(now, m, *t);
            }
            marks
        })
    }

    /// Whether `generations` more (of `tokens` in all) may be generated now,
    /// reserving them when they may.
    pub fn admit(
        &self,
        install_id: &str,
        state: Option<&GovernanceState>,
        plan: &PlanPolicy,
        generations: u64,
        tokens: u64,
        now: i64,
    ) -> Admission {
        let (slack, gateways) = (self.slack, self.gateways);
        self.with(install_id, state, now, |p| {
            let u = usage(p, state, now);
            let deny = |reason, until: i64| Admission {
                allowed: false,
                reason: Some(reason),
                retry_after_secs: Some(secs_until(until, now)),
            };
            // What this gateway has let through since the state, against
            // its share of what the state leaves (all of it, alone).
            if let Some(cap) = plan.monthly_cap {
                let left = (cap + slack).saturating_sub(u.counted);
                if u.accepted + u.admitted + generations > share(left, gateways) {
                    return deny(PLAN_LIMIT_REACHED, periods::next_month_start_ms(now));
                }
            }
            if let Some(until) = u.rate_limited_until {
                return deny(RATE_LIMITED, until);
            }
            let requests_left = plan.rate_requests.saturating_sub(u.counted_requests);
            let tokens_left = plan.rate_tokens.saturating_sub(u.counted_tokens);
            if u.recent_requests + generations > share(requests_left, gateways)
                || u.recent_tokens + tokens > share(tokens_left, gateways)
            {
                // The oldest of what fills the window leaves it within one
                // rate window at most; the processors' state says exactly
                // when as soon as it comes.
                let oldest = state
                    .filter(|s| now - s.as_of < RATE_WINDOW_MS && s.window_requests > 0)
                    .map(|s| s.as_of)
                    .or_else(|| p.accepted.front().map(|a| a.received_at))
                    .or_else(|| p.admitted.front().map(|a| a.at))
                    .unwrap_or(now);
                return deny(RATE_LIMITED, oldest + RATE_WINDOW_MS);
            }
            p.admitted.push_back(Admitted {
                at: now,
                generations,
                tokens,
            });
            Admission {
                allowed: true,
                reason: None,
                retry_after_secs: None,
            }
        })
    }

    /// This month's generations as far as this gateway knows (the state's
    /// and what it accepted since), and the admitted ones not yet reported.
    pub fn pending(
        &self,
        install_id: &str,
        state: Option<&GovernanceState>,
        now: i64,
    ) -> (u64, u64) {
        self.with(install_id, state, now, |p| {
            let u = usage(p, state, now);
            (u.used(), u.admitted)
        })
    }

    /// Forgets installations with nothing pending and no activity for
    /// `idle_ms`: memory follows the active installations.
    pub fn sweep(&self, now: i64, idle_ms: i64) -> usize {
        let mut dropped = 0;
        for shard in &self.shards {
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = map.len();
            map.retain(|_, p| {
                now - p.touched < idle_ms || !p.accepted.is_empty() || !p.admitted.is_empty()
            });
            dropped += before - map.len();
        }
        dropped
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use usage_service_kit::policy::Policy;

    const NOW: i64 = 1_764_590_400_000; // 2025-12-01T12:00:00Z
    const DEC: &str = "2025-12";

    fn state(used: i64, received_through: i64) -> GovernanceState {
        GovernanceState {
            install_id: "i".into(),
            plan: "free".into(),
            month: DEC.into(),
            monthly_used: used,
            monthly_cap: Some(50),
            level: "ok".into(),
            rate_limited_until: None,
            rate_limit_reason: None,
            abuse_flagged: false,
            abuse_reason: None,
            spike_flagged: false,
            window_requests: 0,
            window_tokens: 0,
            hour_requests: 0,
            hour_tokens: 0,
            rate_requests_limit: 100,
            rate_tokens_limit: 50_000,
            as_of: received_through,
            previous_month: None,
            previous_month_used: 0,
            received_through,
            episodes: vec![],
        }
    }

    fn free() -> PlanPolicy {
        Policy::default().plan("free").clone()
    }

    #[test]
    fn events_past_the_cap_are_marked_even_before_the_state_says_so() {
        let l = Ledger::new(120_000, 0, 1);
        let s = state(48, NOW - 1000);
        let batch: Vec<(String, u64)> = (0..4).map(|_| (DEC.to_string(), 10)).collect();
        let marks = l.accept("i", Some(&s), &free(), &batch, NOW);
        assert_eq!(
            marks,
            [
                None,
                None,
                Some(PLAN_LIMIT_REACHED),
                Some(PLAN_LIMIT_REACHED)
            ]
        );
        // The next batch starts from 52 until a state counts these.
        let marks = l.accept("i", Some(&s), &free(), &batch[..1], NOW + 10);
        assert_eq!(marks, [Some(PLAN_LIMIT_REACHED)]);
        assert_eq!(l.pending("i", Some(&s), NOW + 20), (53, 0));
        // A state that counted them: nothing pending on top of it.
        let counted = state(53, NOW + 10);
        assert_eq!(l.pending("i", Some(&counted), NOW + 30), (53, 0));
    }

    #[test]
    fn an_event_billed_to_the_previous_month_counts_against_its_cap_not_this_ones() {
        let l = Ledger::new(120_000, 0, 1);
        let mut s = state(10, NOW - 1000);
        s.previous_month = Some("2025-11".into());
        s.previous_month_used = 49;
        let nov =
            |n: usize| -> Vec<(String, u64)> { (0..n).map(|_| ("2025-11".into(), 10)).collect() };
        // November had one generation left: the second is overage there.
        assert_eq!(
            l.accept("i", Some(&s), &free(), &nov(2), NOW),
            [None, Some(PLAN_LIMIT_REACHED)]
        );
        // December's count did not move.
        assert_eq!(l.pending("i", Some(&s), NOW + 10), (10, 0));
    }

    #[test]
    fn backdated_reports_pay_off_no_admission() {
        let l = Ledger::new(120_000, 0, 1);
        let s = state(45, NOW - 1000);
        for _ in 0..5 {
            assert!(l.admit("i", Some(&s), &free(), 1, 10, NOW).allowed);
        }
        // The site reports them dated in November (within the late grace):
        // December's admissions stay taken.
        let november: Vec<(String, u64)> = (0..5).map(|_| ("2025-11".into(), 10)).collect();
        l.accept("i", Some(&s), &free(), &november, NOW + 10);
        assert!(!l.admit("i", Some(&s), &free(), 1, 10, NOW + 20).allowed);
    }

    #[test]
    fn pending_batches_stay_bounded_and_expire() {
        let l = Ledger::new(120_000, 0, 1);
        for k in 0..5000 {
            l.accept("i", None, &free(), &[(DEC.into(), 1)], NOW + k);
        }
        assert_eq!(l.pending("i", None, NOW + 5000), (5000, 0));
        let held = |l: &Ledger| {
            l.shards
                .iter()
                .map(|s| {
                    s.lock()
                        .unwrap()
                        .values()
                        .map(|p| p.accepted.len())
                        .sum::<usize>()
                })
                .sum::<usize>()
        };
        assert_eq!(held(&l), MAX_ENTRIES);
        // A state that counted the first 4,000 leaves exactly the last 1,000.
        let counted = state(4000, NOW + 3999);
        assert_eq!(l.pending("i", Some(&counted), NOW + 5000), (5000, 0));
        assert_eq!(l.pending("i", None, NOW + ACCEPTED_HOLD_MS + 6000), (0, 0));
    }

    #[test]
    fn rate_windows_and_flags_mark_what_arrives_over_them() {
        let l = Ledger::new(120_000, 0, 1);
        let mut s = state(0, NOW - 1000);
        s.window_requests = 99;
        let marks = l.accept(
            "i",
            Some(&s),
            &Policy::default().plan("credits").clone(),
            &[(DEC.into(), 1), (DEC.into(), 1)],
            NOW,
        );
        assert_eq!(marks, [None, Some(RATE_LIMITED)]);
        let mut s = state(0, NOW + 5);
        s.abuse_flagged = true;
        let marks = l.accept("j", Some(&s), &free(), &[(DEC.into(), 1)], NOW + 10);
        assert_eq!(marks, [Some(ABUSE_FLAGGED)]);
    }

    #[test]
    fn concurrent_admissions_stop_at_the_cap() {
        let l = std::sync::Arc::new(Ledger::new(120_000, 0, 1));
        let s = std::sync::Arc::new(state(45, NOW - 1000));
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let (l, s) = (l.clone(), s.clone());
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|_| l.admit("i", Some(&s), &free(), 1, 100, NOW).allowed)
                        .count()
                })
            })
            .collect();
        let allowed: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(allowed, 5, "45 used of 50: exactly 5 more");
        let denied = l.admit("i", Some(&s), &free(), 1, 100, NOW);
        assert_eq!(denied.reason, Some(PLAN_LIMIT_REACHED));
        // Until next month: 2025-12-01T12:00 to 2026-01-01T00:00.
        assert_eq!(denied.retry_after_secs, Some(30 * 86_400 + 12 * 3600));
    }

    #[test]
    fn reported_generations_pay_off_admissions_and_unreported_ones_expire() {
        let l = Ledger::new(60_000, 0, 1);
        let s = state(40, NOW - 1000);
        for _ in 0..10 {
            assert!(l.admit("i", Some(&s), &free(), 1, 10, NOW).allowed);
        }
        assert!(!l.admit("i", Some(&s), &free(), 1, 10, NOW).allowed);
        // 4 of them reported: counted once (accepted), 6 still admitted.
        let batch: Vec<(String, u64)> = (0..4).map(|_| (DEC.to_string(), 10)).collect();
        assert_eq!(
            l.accept("i", Some(&s), &free(), &batch, NOW + 100),
            [None; 4]
        );
        assert_eq!(l.pending("i", Some(&s), NOW + 200), (44, 6));
        // The processors count them: the same.
        let s2 = state(44, NOW + 100);
        assert_eq!(l.pending("i", Some(&s2), NOW + 600), (44, 6));
        // The other 6 never come: after the hold they no longer count.
        assert_eq!(l.pending("i", Some(&s2), NOW + 61_000), (44, 0));
        assert!(
            l.admit("i", Some(&s2), &free(), 6, 10, NOW + 61_000)
                .allowed
        );
    }

    #[test]
    fn slack_lets_admissions_go_that_far_past_the_cap() {
        let l = Ledger::new(120_000, 3, 1);
        let s = state(50, NOW - 1000);
        let allowed = (0..10)
            .filter(|_| l.admit("i", Some(&s), &free(), 1, 10, NOW).allowed)
            .count();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn gateways_admit_their_share_of_what_the_state_leaves() {
        // Two gateways, 45 of 50 counted: 3 each at most (5 / 2, rounded up).
        let s = state(45, NOW - 1000);
        let (a, b) = (Ledger::new(120_000, 0, 2), Ledger::new(120_000, 0, 2));
        let allowed = |l: &Ledger| {
            (0..10)
                .filter(|_| l.admit("i", Some(&s), &free(), 1, 10, NOW).allowed)
                .count()
        };
        assert_eq!((allowed(&a), allowed(&b)), (3, 3));
        // The state counts what they reported: the shares follow it.
        let s2 = state(50, NOW + 100);
        assert!(!a.admit("i", Some(&s2), &free(), 1, 10, NOW + 200).allowed);
    }

    #[test]
    fn a_rate_limited_installation_is_refused_until_its_window_frees() {
        let l = Ledger::new(120_000, 0, 1);
        let mut s = state(0, NOW - 1000);
        s.rate_limited_until = Some(NOW + 42_000);
        let a = l.admit("i", Some(&s), &free(), 1, 10, NOW);
        assert_eq!(
            (a.allowed, a.reason, a.retry_after_secs),
            (false, Some(RATE_LIMITED), Some(42))
        );
        // 100 requests in the window: the 101st waits.
        let l = Ledger::new(120_000, 0, 1);
        let credits = Policy::default().plan("credits").clone();
        let allowed = (0..150)
            .filter(|_| l.admit("k", None, &credits, 1, 10, NOW).allowed)
            .count();
        assert_eq!(allowed, 100);
    }

    #[test]
    fn idle_installations_leave_memory() {
        let l = Ledger::new(1000, 0, 1);
        l.pending("a", None, NOW);
        l.accept("b", None, &free(), &[(DEC.into(), 1)], NOW);
        assert_eq!(l.sweep(NOW + 5000, 2000), 1, "b still has a pending batch");
        let counted = state(1, NOW);
        l.pending("b", Some(&counted), NOW + 6000);
        assert_eq!(l.sweep(NOW + 9000, 2000), 1);
        assert!(l.is_empty());
    }
}

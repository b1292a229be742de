//! The governance records: the per-installation state on the compacted
//! governance topic (enforced by every gateway), the decisions history, and
//! the accounts the provider sets plans for.

use serde::{Deserialize, Serialize};

/// Mirrors `schemas/avro/governance_state.v2.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GovernanceState {
    pub install_id: String,
    pub plan: String,
    pub month: String,
    pub monthly_used: i64,
    pub monthly_cap: Option<i64>,
    pub level: String,
    pub rate_limited_until: Option<i64>,
    pub rate_limit_reason: Option<String>,
    pub abuse_flagged: bool,
    pub abuse_reason: Option<String>,
    pub spike_flagged: bool,
    pub window_requests: i64,
    pub window_tokens: i64,
    pub hour_requests: i64,
    pub hour_tokens: i64,
    pub rate_requests_limit: i64,
    pub rate_tokens_limit: i64,
    pub as_of: i64,
    /// The billing period before `month`, and its generations: events that
    /// arrive within its late grace still count toward it (and its cap).
    #[serde(default)]
    pub previous_month: Option<String>,
    #[serde(default)]
    pub previous_month_used: i64,
    /// The latest `received_at` among the events this state counts.
    #[serde(default)]
    pub received_through: i64,
    /// The open episodes (rate limited, flagged).
    #[serde(default)]
    pub episodes: Vec<Episode>,
}

/// An ongoing governance episode, carried in the state so that whoever
/// governs the installation next continues it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Episode {
    pub kind: String,
    /// The `decision_id` of the decision that started it.
    pub episode_id: String,
    pub since: i64,
    /// The latest governance time the condition is known to hold (a rate
    /// limit: until its window frees).
    pub last_seen: i64,
    /// When its latest history row (start or extension) was made.
    pub marked_at: i64,
}

/// Mirrors `schemas/avro/governance_decision.v2.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GovernanceDecision {
    pub decision_id: String,
    pub install_id: String,
    pub kind: String,
    pub reason: String,
    pub at: i64,
    /// `start`, `extended`, `end` or `alert`.
    #[serde(default = "start_phase")]
    pub phase: String,
    /// The decision that started the episode this one belongs to.
    #[serde(default)]
    pub episode_id: Option<String>,
    /// Rate limits: when the window frees, as known then.
    #[serde(default)]
    pub until: Option<i64>,
}

fn start_phase() -> String {
    "start".into()
}

/// Mirrors `schemas/avro/account.v1.avsc`: what the provider sets for an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub account_id: String,
    pub plan: String,
    pub max_installations: Option<i64>,
    pub updated_at: i64,
    pub updated_by: String,
    pub revision: i64,
}

crate::avro_record!(
    GovernanceState,
    "GovernanceState",
    ["governance_state.v1.avsc", "governance_state.v2.avsc"]
);
crate::avro_record!(
    GovernanceDecision,
    "GovernanceDecision",
    ["governance_decision.v1.avsc", "governance_decision.v2.avsc"]
);
crate::avro_record!(Account, "Account", ["account.v1.avsc"]);

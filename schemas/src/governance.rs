//! The governance records: the per-installation state on the compacted
//! governance topic (enforced by every gateway) and the decisions history.

use serde::{Deserialize, Serialize};

/// Mirrors `schemas/avro/governance_state.v1.avsc`.
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
}

/// Mirrors `schemas/avro/governance_decision.v1.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GovernanceDecision {
    pub decision_id: String,
    pub install_id: String,
    pub kind: String,
    pub reason: String,
    pub at: i64,
}

crate::avro_record!(
    GovernanceState,
    "GovernanceState",
    ["governance_state.v1.avsc"]
);
crate::avro_record!(
    GovernanceDecision,
    "GovernanceDecision",
    ["governance_decision.v1.avsc"]
);

//! The governance records: the per-installation state on the compacted
//! governance topic (enforced by every gateway) and the decisions history.

use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::wire::{AvroRecord, Codec, SchemaHistory};

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

static STATE: LazyLock<Codec> = LazyLock::new(|| Codec::new(&GovernanceState::HISTORY));
static DECISION: LazyLock<Codec> = LazyLock::new(|| Codec::new(&GovernanceDecision::HISTORY));

impl AvroRecord for GovernanceState {
    const HISTORY: SchemaHistory = SchemaHistory {
        subject: "GovernanceState",
        versions: &[include_str!("../avro/governance_state.v1.avsc")],
    };

    fn codec() -> &'static Codec {
        &STATE
    }
}

impl AvroRecord for GovernanceDecision {
    const HISTORY: SchemaHistory = SchemaHistory {
        subject: "GovernanceDecision",
        versions: &[include_str!("../avro/governance_decision.v1.avsc")],
    };

    fn codec() -> &'static Codec {
        &DECISION
    }
}

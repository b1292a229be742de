//! The usage event as it travels on the events topic.

use serde::{Deserialize, Serialize};

/// One accepted generation. Field names and types mirror
/// `schemas/avro/usage_event.v2.avsc`; timestamps are Unix milliseconds (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    pub event_id: String,
    pub install_id: String,
    pub account_id: String,
    pub wp_site_id: Option<i64>,
    pub wp_user_id_hash: String,
    pub source: String,
    pub model: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub context_json: Option<String>,
    pub created_at: i64,
    pub processed_at: Option<i64>,
    pub batch_sent_at: Option<i64>,
    pub received_at: i64,
    pub signature_scheme: String,
    pub gateway_instance: String,
    /// `YYYY-MM`: the billing period the gateway counted the event in
    /// (`None` in v1 data: the month of `created_at`).
    #[serde(default)]
    pub billing_month: Option<String>,
    /// Why the event arrived while its installation was over a limit
    /// (`plan_limit_reached`, `rate_limited`, `abuse_flagged`), as the
    /// gateway saw it; recorded and counted all the same.
    #[serde(default)]
    pub over_limit: Option<String>,
}

crate::avro_record!(
    UsageEvent,
    "UsageEvent",
    ["usage_event.v1.avsc", "usage_event.v2.avsc"]
);

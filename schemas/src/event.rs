//! The usage event as it travels on the events topic.

use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::wire::{AvroRecord, Codec, SchemaHistory};

/// One accepted generation. Field names and types mirror
/// `schemas/avro/usage_event.v1.avsc`; timestamps are Unix milliseconds (UTC).
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
}

static CODEC: LazyLock<Codec> = LazyLock::new(|| Codec::new(&UsageEvent::HISTORY));

impl AvroRecord for UsageEvent {
    const HISTORY: SchemaHistory = SchemaHistory {
        subject: "UsageEvent",
        versions: &[include_str!("../avro/usage_event.v1.avsc")],
    };

    fn codec() -> &'static Codec {
        &CODEC
    }
}

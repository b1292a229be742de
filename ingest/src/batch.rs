//! Parsing and validating one batch as the plugin sends it.
//!
//! Two levels of failure, kept apart:
//! - the batch itself (not JSON, not an object, `install_id`/`account_id`/
//!   `events` missing or of the wrong type, `batch_sent_at` unparseable):
//!   the whole request is refused with 400;
//! - one event (any field missing or of the wrong type, a bad `evt_` id, an
//!   unknown source, negative or inconsistent tokens, a timestamp that is
//!   unparseable, too far in the future or older than the rollups can take,
//!   an oversized or too deep `context`): that event is refused with a reason
//!   and the others go on. The handler answers 422 only when no event is left.
//!
//! A repeated `event_id` inside one batch is the same event: it is accepted
//! once and listed once.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Bounds on what a batch may contain; see `Config` for the defaults.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_events: usize,
    /// How far `created_at` may be ahead of the gateway's clock.
    pub max_future_secs: i64,
    /// How old `created_at` may be: rollups are recomputed from raw events,
    /// which ClickHouse keeps 90 days, so older events could not be counted.
    pub max_age_secs: i64,
    pub max_context_bytes: usize,
    pub max_context_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_events: 500,
            max_future_secs: 300,
            max_age_secs: 35 * 86_400,
            max_context_bytes: 4096,
            max_context_depth: 8,
        }
    }
}

/// A batch of usage events, as the plugin sends it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = UsageBatch)]
pub struct BatchIn<'a> {
    pub install_id: String,
    /// A string, or the account's number as the deployed plugin sends it.
    #[serde(deserialize_with = "crate::registry::commands::account_id")]
    #[schema(schema_with = crate::registry::commands::account_id_schema)]
    pub account_id: String,
    /// 1 to 500 events; each is checked on its own (`rejected`).
    #[serde(borrow)]
    #[schema(value_type = Vec<EventIn>)]
    pub events: Vec<&'a RawValue>,
    #[serde(default)]
    pub batch_sent_at: Option<String>,
    #[serde(default)]
    pub wp_site_id: Option<i64>,
}

/// One generation, as the plugin records it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = UsageEventIn)]
pub struct EventIn<'a> {
    /// `evt_` and 32 hex characters; a resent event counts once.
    event_id: String,
    /// SHA-256 hex of the WordPress user (64 hex characters).
    wp_user_id_hash: String,
    /// `inline`, `bulk`, `queue` or `manual`.
    source: String,
    model: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    /// `prompt_tokens + completion_tokens`.
    total_tokens: i64,
    /// ISO 8601 with a zone.
    created_at: String,
    #[serde(default)]
    processed_at: Option<String>,
    /// Any JSON object (at most 4 KB, 8 levels).
    #[serde(default, borrow)]
    #[schema(value_type = Option<Object>)]
    context: Option<&'a RawValue>,
    #[serde(default)]
    wp_site_id: Option<i64>,
}

/// A batch-level problem: the request is refused whole (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("body is not a valid usage batch: {0}")]
    Malformed(String),
    #[error("batch has {got} events; at most {max} are accepted per request")]
    TooManyEvents { got: usize, max: usize },
    #[error("batch has no events")]
    Empty,
}

/// Why one event was refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Refusal {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub error: &'static str,
    pub message: String,
}

/// A validated event, before the gateway stamps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidEvent {
    pub event_id: String,
    pub wp_site_id: Option<i64>,
    pub wp_user_id_hash: String,
    pub source: &'static str,
    pub model: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub context_json: Option<String>,
    pub created_at: i64,
    pub processed_at: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Validated {
    pub accepted: Vec<ValidEvent>,
    pub refused: Vec<Refusal>,
    pub batch_sent_at: Option<i64>,
}

pub const SOURCES: [&str; 4] = ["inline", "bulk", "queue", "manual"];

pub fn parse(body: &[u8]) -> Result<BatchIn<'_>, BatchError> {
    serde_json::from_slice(body).map_err(|e| BatchError::Malformed(e.to_string()))
}

/// RFC 3339 with an offset (`2025-11-03T10:30:00Z`), to Unix milliseconds.
pub fn parse_time(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc).timestamp_millis())
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks every event of `batch` at gateway time `now_ms`.
pub fn validate(
    batch: &BatchIn<'_>,
    limits: &Limits,
    now_ms: i64,
) -> Result<Validated, BatchError> {
    if batch.events.is_empty() {
        return Err(BatchError::Empty);
    }
    if batch.events.len() > limits.max_events {
        return Err(BatchError::TooManyEvents {
            got: batch.events.len(),
            max: limits.max_events,
        });
    }
    let batch_sent_at = match &batch.batch_sent_at {
        None => None,
        Some(s) => Some(parse_time(s).ok_or_else(|| {
            BatchError::Malformed(format!("batch_sent_at {s:?} is not an RFC 3339 time"))
        })?),
    };
    let mut out = Validated {
        batch_sent_at,
        ..Default::default()
    };
    let mut seen = HashSet::new();
    for (index, raw) in batch.events.iter().enumerate() {
        match validate_event(raw, batch.wp_site_id, limits, now_ms) {
            Ok(event) => {
                if seen.insert(event.event_id.clone()) {
                    out.accepted.push(event);
                }
            }
            Err((error, message)) => out.refused.push(Refusal {
                index,
                event_id: event_id_of(raw),
                error,
                message,
            }),
        }
    }
    Ok(out)
}

/// The event_id of an event that failed validation, if it has a usable one.
fn event_id_of(raw: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        event_id: String,
    }
    serde_json::from_str::<Id>(raw.get())
        .ok()
        .map(|i| i.event_id)
        .filter(|id| id.len() <= 64)
}

type Reason = (&'static str, String);

fn validate_event(
    raw: &RawValue,
    batch_site: Option<i64>,
    limits: &Limits,
    now_ms: i64,
) -> Result<ValidEvent, Reason> {
    let e: EventIn<'_> =
        serde_json::from_str(raw.get()).map_err(|err| ("invalid_event", err.to_string()))?;

    let hex = e.event_id.strip_prefix("evt_").unwrap_or("");
    if hex.len() != 32 || !is_hex(hex) {
        return Err((
            "invalid_event_id",
            "event_id must be evt_ followed by 32 hex characters".into(),
        ));
    }
    // The plugin writes lowercase; normalising makes dedup case-insensitive.
    let event_id = format!("evt_{}", hex.to_ascii_lowercase());

    if e.wp_user_id_hash.len() != 64 || !is_hex(&e.wp_user_id_hash) {
        return Err((
            "invalid_user_hash",
            "wp_user_id_hash must be 64 hex characters (sha256)".into(),
        ));
    }
    let source = SOURCES
        .iter()
        .find(|s| **s == e.source)
        .copied()
        .ok_or_else(|| {
            (
                "invalid_source",
                format!(
                    "source {:?} is not one of inline, bulk, queue, manual",
                    e.source
                ),
            )
        })?;
    if e.model.is_empty() || e.model.len() > 64 || e.model.chars().any(char::is_control) {
        return Err((
            "invalid_model",
            "model must be 1 to 64 printable characters".into(),
        ));
    }

    for (name, value) in [
        ("prompt_tokens", e.prompt_tokens),
        ("completion_tokens", e.completion_tokens),
        ("total_tokens", e.total_tokens),
    ] {
        if value < 0 {
            return Err(("negative_tokens", format!("{name} is negative ({value})")));
        }
        if value > i64::from(u32::MAX) {
            return Err((
                "tokens_out_of_range",
                format!("{name} is too large ({value})"),
            ));
        }
    }
    if e.prompt_tokens + e.completion_tokens != e.total_tokens {
        return Err((
            "inconsistent_tokens",
            format!(
                "total_tokens {} is not prompt_tokens {} + completion_tokens {}",
                e.total_tokens, e.prompt_tokens, e.completion_tokens
            ),
        ));
    }

    let created_at = parse_time(&e.created_at).ok_or_else(|| {
        (
            "invalid_timestamp",
            format!("created_at {:?} is not an RFC 3339 time", e.created_at),
        )
    })?;
    if created_at > now_ms + limits.max_future_secs * 1000 {
        return Err((
            "timestamp_in_future",
            format!(
                "created_at is more than {} s ahead of server time",
                limits.max_future_secs
            ),
        ));
    }
    if created_at < now_ms - limits.max_age_secs * 1000 {
        return Err((
            "timestamp_too_old",
            format!(
                "created_at is more than {} days old",
                limits.max_age_secs / 86_400
            ),
        ));
    }
    let processed_at = match &e.processed_at {
        None => None,
        Some(s) => Some(parse_time(s).ok_or_else(|| {
            (
                "invalid_timestamp",
                format!("processed_at {s:?} is not an RFC 3339 time"),
            )
        })?),
    };

    let context_json = match e.context {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => Some(check_context(raw, limits)?),
    };

    Ok(ValidEvent {
        event_id,
        wp_site_id: e.wp_site_id.or(batch_site),
        wp_user_id_hash: e.wp_user_id_hash.to_ascii_lowercase(),
        source,
        model: e.model,
        prompt_tokens: e.prompt_tokens,
        completion_tokens: e.completion_tokens,
        total_tokens: e.total_tokens,
        context_json,
        created_at,
        processed_at,
    })
}

/// `context` is the site's free JSON: it must be an object within the size
/// and depth bounds. It is kept as the JSON text the site sent (serde has
/// already checked it is valid JSON) and never interpreted; checking it on
/// the raw text costs no allocation but the copy that is stored.
fn check_context(raw: &RawValue, limits: &Limits) -> Result<String, Reason> {
    let text = raw.get();
    if !text.starts_with('{') {
        return Err(("invalid_context", "context must be a JSON object".into()));
    }
    if text.len() > limits.max_context_bytes {
        return Err((
            "context_too_large",
            format!("context exceeds {} bytes", limits.max_context_bytes),
        ));
    }
    if nesting_depth(text) > limits.max_context_depth {
        return Err((
            "context_too_deep",
            format!(
                "context nests deeper than {} levels",
                limits.max_context_depth
            ),
        ));
    }
    Ok(text.to_string())
}

/// Deepest nesting of objects and arrays in valid JSON text.
fn nesting_depth(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const NOW: i64 = 1_762_165_860_000; // 2025-11-03T10:31:00Z

    fn event(id: u32) -> Value {
        json!({
            "event_id": format!("evt_{id:032x}"),
            "wp_user_id_hash": "a".repeat(64),
            "source": "inline",
            "model": "gpt-4o-mini",
            "prompt_tokens": 150,
            "completion_tokens": 25,
            "total_tokens": 175,
            "context": {"attachment_id": 12345, "image_dimensions": "1920x1080"},
            "created_at": "2025-11-03T10:30:00Z",
            "processed_at": "2025-11-03T10:30:02Z"
        })
    }

    fn body(events: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "install_id": "550e8400-e29b-41d4-a716-446655440000_a3b4c5d6e7f8",
            "account_id": "acc_1234567890",
            "events": events,
            "batch_sent_at": "2025-11-03T10:31:00Z"
        }))
        .unwrap()
    }

    fn run(events: Vec<Value>) -> Validated {
        let bytes = body(events);
        let batch = parse(&bytes).unwrap();
        validate(&batch, &Limits::default(), NOW).unwrap()
    }

    fn refused_with(mutate: impl FnOnce(&mut Value)) -> Refusal {
        let mut e = event(1);
        mutate(&mut e);
        let v = run(vec![e]);
        assert!(v.accepted.is_empty(), "expected a refusal");
        v.refused.into_iter().next().unwrap()
    }

    #[test]
    fn the_contract_example_is_accepted_as_sent() {
        let v = run(vec![event(1)]);
        assert!(v.refused.is_empty());
        let e = &v.accepted[0];
        assert_eq!(e.event_id, "evt_00000000000000000000000000000001");
        assert_eq!(e.source, "inline");
        assert_eq!(
            (e.prompt_tokens, e.completion_tokens, e.total_tokens),
            (150, 25, 175)
        );
        assert_eq!(e.created_at, NOW - 60_000);
        assert_eq!(e.processed_at, Some(NOW - 58_000));
        assert_eq!(
            e.context_json.as_deref(),
            Some(r#"{"attachment_id":12345,"image_dimensions":"1920x1080"}"#)
        );
        assert_eq!(v.batch_sent_at, Some(NOW));
    }

    #[test]
    fn optional_fields_may_be_missing() {
        let mut e = event(1);
        let o = e.as_object_mut().unwrap();
        o.remove("context");
        o.remove("processed_at");
        let bytes = serde_json::to_vec(&json!({
            "install_id": "i", "account_id": "acc_1", "events": [e]
        }))
        .unwrap();
        let batch = parse(&bytes).unwrap();
        let v = validate(&batch, &Limits::default(), NOW).unwrap();
        assert_eq!(v.accepted.len(), 1);
        assert_eq!(v.accepted[0].context_json, None);
        assert_eq!(v.batch_sent_at, None);
    }

    #[test]
    fn each_bad_field_is_refused_with_its_reason() {
        type Mutation = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "invalid_event_id",
                Box::new(|e| e["event_id"] = json!("evt_123")),
            ),
            (
                "invalid_event_id",
                Box::new(|e| e["event_id"] = json!(format!("xyz_{}", "0".repeat(32)))),
            ),
            (
                "invalid_user_hash",
                Box::new(|e| e["wp_user_id_hash"] = json!("42")),
            ),
            ("invalid_source", Box::new(|e| e["source"] = json!("api"))),
            ("invalid_model", Box::new(|e| e["model"] = json!(""))),
            (
                "negative_tokens",
                Box::new(|e| {
                    e["prompt_tokens"] = json!(-1);
                    e["total_tokens"] = json!(24);
                }),
            ),
            (
                "inconsistent_tokens",
                Box::new(|e| e["total_tokens"] = json!(176)),
            ),
            (
                "tokens_out_of_range",
                Box::new(|e| {
                    e["prompt_tokens"] = json!(5_000_000_000u64);
                    e["total_tokens"] = json!(5_000_000_025u64);
                }),
            ),
            (
                "invalid_timestamp",
                Box::new(|e| e["created_at"] = json!("yesterday")),
            ),
            (
                "invalid_timestamp",
                Box::new(|e| e["processed_at"] = json!("2025-13-01")),
            ),
            (
                "timestamp_in_future",
                Box::new(|e| e["created_at"] = json!("2025-11-03T10:37:00Z")),
            ),
            (
                "timestamp_too_old",
                Box::new(|e| e["created_at"] = json!("2025-09-01T00:00:00Z")),
            ),
            (
                "invalid_context",
                Box::new(|e| e["context"] = json!([1, 2])),
            ),
            (
                "context_too_deep",
                Box::new(|e| {
                    e["context"] = json!({"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":1}}}}}}}}})
                }),
            ),
            (
                "context_too_large",
                Box::new(|e| e["context"] = json!({"x": "y".repeat(5000)})),
            ),
            (
                "invalid_event",
                Box::new(|e| e["prompt_tokens"] = json!("150")),
            ),
            (
                "invalid_event",
                Box::new(|e| {
                    e.as_object_mut().unwrap().remove("model");
                }),
            ),
        ];
        for (reason, mutate) in cases {
            let refusal = refused_with(mutate);
            assert_eq!(refusal.error, reason, "{refusal:?}");
            assert_eq!(refusal.index, 0);
            assert!(!refusal.message.is_empty());
        }
    }

    #[test]
    fn nesting_depth_ignores_brackets_in_strings() {
        assert_eq!(nesting_depth(r#"{"a":1}"#), 1);
        assert_eq!(nesting_depth(r#"{"a":{"b":[1,{"c":2}]}}"#), 4);
        assert_eq!(nesting_depth(r#"{"a":"{{{[[[","b":"\"{"}"#), 1);
    }

    #[test]
    fn a_mixed_batch_keeps_the_good_events_and_says_which_were_refused() {
        let mut bad = event(2);
        bad["source"] = json!("api");
        let v = run(vec![event(1), bad, event(3)]);
        let ids: Vec<_> = v.accepted.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "evt_00000000000000000000000000000001",
                "evt_00000000000000000000000000000003"
            ]
        );
        assert_eq!(v.refused.len(), 1);
        assert_eq!(v.refused[0].index, 1);
        assert_eq!(
            v.refused[0].event_id.as_deref(),
            Some("evt_00000000000000000000000000000002")
        );
        assert_eq!(v.refused[0].error, "invalid_source");
    }

    #[test]
    fn a_repeated_event_id_counts_once_and_ids_are_normalised() {
        let mut upper = event(0xab);
        upper["event_id"] = json!("evt_000000000000000000000000000000AB");
        let v = run(vec![event(0xab), upper]);
        assert_eq!(v.accepted.len(), 1);
        assert!(v.refused.is_empty());
    }

    #[test]
    fn batch_level_problems_refuse_the_whole_request() {
        assert!(matches!(parse(b"not json"), Err(BatchError::Malformed(_))));
        assert!(matches!(parse(b"[]"), Err(BatchError::Malformed(_))));
        assert!(matches!(
            parse(br#"{"install_id": 5, "account_id": "a", "events": []}"#),
            Err(BatchError::Malformed(_))
        ));
        assert!(matches!(
            parse(br#"{"install_id": "i", "account_id": "a"}"#),
            Err(BatchError::Malformed(_))
        ));
        let empty = body(vec![]);
        assert_eq!(
            validate(&parse(&empty).unwrap(), &Limits::default(), NOW).unwrap_err(),
            BatchError::Empty
        );
        let many = body((0..501).map(event).collect());
        assert_eq!(
            validate(&parse(&many).unwrap(), &Limits::default(), NOW).unwrap_err(),
            BatchError::TooManyEvents { got: 501, max: 500 }
        );
        let bad_sent =
            br#"{"install_id":"i","account_id":"a","events":[{}],"batch_sent_at":"soon"}"#;
        assert!(matches!(
            validate(&parse(bad_sent).unwrap(), &Limits::default(), NOW),
            Err(BatchError::Malformed(_))
        ));
    }
}

//! Rust mirrors of the ClickHouse tables' rows, for RowBinary inserts and
//! reads through the `clickhouse` crate (which checks them against the live
//! table schema, so a drift between DDL and code fails loudly).

use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::{Deserialize, Serialize};

/// Decimal columns travel as their scaled integer: USD × 10^12.
pub const COST_SCALE: i64 = 1_000_000_000_000;

/// One row of `usage_events` (migrations 0001 and 0011).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct UsageEventRow {
    pub event_id: String,
    pub install_id: String,
    pub account_id: String,
    pub wp_site_id: Option<u64>,
    pub user_hash: String,
    pub source: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// Decimal(18, 12): USD × 10^12.
    pub cost_usd: i64,
    /// JSON text, empty when the plugin sent no context.
    pub context: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis::option")]
    pub processed_at: Option<DateTime<Utc>>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis::option")]
    pub batch_sent_at: Option<DateTime<Utc>>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub received_at: DateTime<Utc>,
    pub signature_scheme: String,
    pub gateway_instance: String,
    /// Why the event arrived over a limit, '' when it did not (migration 0011).
    pub over_limit: String,
    /// The month it counts toward for caps and billing (migration 0011).
    #[serde(with = "clickhouse::serde::chrono::date")]
    pub billing_month: chrono::NaiveDate,
}

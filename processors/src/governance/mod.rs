//! Live governance: rolling rate limits, abuse and spike detection, and
//! monthly plan caps, computed in event time per installation.
//!
//! - `window`: tumbling buckets summed into rolling windows, watermark and grace;
//! - `policy`: limits, plans and thresholds as configuration (shared with
//!   the gateways: `usage_service_kit::policy`);
//! - `state`: one installation's state and the decisions that change it;
//! - `tables`: the registry and governance topics followed into memory;
//! - `engine`: the per-batch driver (rebuild, count, evaluate, publish).

pub mod engine;
pub use usage_service_kit::policy;
pub mod state;
pub mod tables;
pub mod window;

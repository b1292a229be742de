//! What every service of the metering backend shares, so each service's own
//! crate holds only its domain logic:
//! - `telemetry`: tracing setup (text or JSON logs);
//! - `metrics`: the Prometheus registry behind `/metrics`;
//! - `health`: `/health` (process alive) and `/ready` (dependencies answer);
//! - `kafka` and `clickhouse`: typed connection settings, clients and probes;
//! - `server`: binding the HTTP listener and serving until shutdown;
//! - `retry`: the backoff and the verdict on ClickHouse errors (transient
//!   or permanent) that every retry loop shares;
//! - `policy` and `periods`: the governance rules and clocks that gateways
//!   (admission, over-limit marks) and processors (decisions) must share.

pub mod auth;
pub mod clickhouse;
pub mod follower;
pub mod health;
pub mod kafka;
pub mod metrics;
pub mod periods;
pub mod policy;
pub mod produce;
pub mod retry;
pub mod server;
pub mod service;
pub mod telemetry;

pub use health::{Probe, Readiness};
pub use metrics::Metrics;

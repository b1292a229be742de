//! The contracts between the services of the metering backend:
//! - the Avro schemas (`schemas/avro/*.avsc`, every published version) and the
//!   wire format every Kafka message uses (`wire`);
//! - the Rust types of those records (`event`, `installation`);
//! - the ClickHouse DDL as numbered migrations and the runner that applies
//!   them (`migrations`).

pub mod erasure;
pub mod event;
pub mod governance;
pub mod installation;
pub mod migrations;
pub mod rows;
pub mod wire;

pub use event::UsageEvent;
pub use governance::{Account, Episode, GovernanceDecision, GovernanceState};
pub use installation::{Installation, PlanPeriod};
pub use wire::{AvroRecord, WireError};

//! `usage-rebuild`: replay and rebuild as an operation ops can trust.
//!
//! A rebuild recomputes the raw events and every rollup of a scope
//! (`scope`) into shadow tables created by the current migrations in a
//! database of their own, from the events topic or from the live raw table
//! (`build`, the bulk path: the first copy of each event kept in memory per
//! partition, large inserts, the daily sums made by ClickHouse once per
//! month partition), then keeps up with
//! what arrives meanwhile (`catchup`, the processors' own exactly-once
//! order), compares the shadow with the live tables (`compare`) and swaps
//! them in with `EXCHANGE TABLES` while the processors are fenced for the
//! few steps that need the live tables still (`swap`), keeping the
//! replaced tables for `rollback`. Where it is: `state`.

pub mod build;
pub mod catchup;
pub mod cli;
pub mod compare;
pub mod config;
pub mod error;
pub mod plan;
pub mod progress;
pub mod scope;
pub mod state;
pub mod swap;
pub mod topic;

use clickhouse::Client;
use usage_service_kit::kafka::KafkaArgs;

pub use error::RebuildError;

/// The engines and names every step works with.
#[derive(Clone)]
pub struct Ctx {
    /// Bound to the live database.
    pub live: Client,
    /// Bound to the shadow database.
    pub shadow: Client,
    /// Bound to no database (to create the shadow one).
    pub server: Client,
    pub live_db: String,
    pub shadow_db: String,
    pub kafka: KafkaArgs,
    /// The live processors' consumer group.
    pub group: String,
}

impl Ctx {
    pub fn from_cli(cli: &config::Cli) -> Result<Self, RebuildError> {
        let valid =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid(&cli.shadow) || !valid(&cli.clickhouse.database) {
            return Err(RebuildError::refused(
                "database names are letters, digits and underscores",
            ));
        }
        if cli.shadow == cli.clickhouse.database {
            return Err(RebuildError::refused(
                "the shadow database must not be the live one",
            ));
        }
        let server = cli.clickhouse.server_client();
        Ok(Self {
            live: server.clone().with_database(&cli.clickhouse.database),
            shadow: server.clone().with_database(&cli.shadow),
            server,
            live_db: cli.clickhouse.database.clone(),
            shadow_db: cli.shadow.clone(),
            kafka: cli.kafka.clone(),
            group: cli.group.clone(),
        })
    }

    /// `db.table` of the live database.
    pub fn live_table(&self, table: &str) -> String {
        format!("{}.{table}", self.live_db)
    }

    pub fn shadow_table(&self, table: &str) -> String {
        format!("{}.{table}", self.shadow_db)
    }
}

//! `usage-rebuild`'s command line: the engines (flags and the same
//! environment as the services), the shadow database, and one subcommand
//! per step of the operation.

use chrono::NaiveDate;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use usage_service_kit::clickhouse::ClickHouseArgs;
use usage_service_kit::kafka::KafkaArgs;
use usage_service_kit::telemetry::LogArgs;

use crate::scope::Scope;

#[derive(Debug, Parser)]
#[command(
    name = "usage-rebuild",
    about = "Rebuild raw events and rollups into shadow tables, compare, swap atomically, roll back",
    long_about = "Rebuilds usage_events, usage_daily, usage_install_daily and usage_monthly into a \
                  shadow database while the gateway, processors and query API keep running, \
                  compares the shadow with the live tables, swaps them in with EXCHANGE TABLES \
                  and can swap back. README, section \"Operations: rebuilding aggregates\"."
)]
pub struct Cli {
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// The database the shadow tables are built in (and the old tables are
    /// kept in after a swap, for rollback).
    #[arg(
        long = "shadow-database",
        env = "USAGE_REBUILD_SHADOW_DATABASE",
        default_value = "usage_rebuild",
        global = true
    )]
    pub shadow: String,
    /// The live processors' consumer group: read (never committed to) to
    /// know what the live tables hold.
    #[arg(
        long = "processors-group",
        env = "USAGE_PROCESSORS_GROUP",
        default_value = "usage-processors",
        global = true
    )]
    pub group: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prints what a build would read and write, and the disk it needs.
    Plan(BuildArgs),
    /// Builds the shadow tables (resumes an interrupted build of the same scope).
    Build(BuildArgs),
    /// Prints the state of the rebuild in the shadow database.
    Status,
    /// Diffs the shadow tables against the live ones, in the rebuild's scope.
    Compare(CompareArgs),
    /// Swaps the shadow tables in (the live ones are kept for rollback).
    Swap(SwapArgs),
    /// Swaps the kept tables back in.
    Rollback(SwapArgs),
    /// Drops the shadow database (after the keep time, once swapped).
    Drop(DropArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Source {
    /// The events topic: every copy of every event as the gateways
    /// appended it (needs the topic to hold the scope's days).
    Topic,
    /// The live raw table: for days the topic no longer holds, and for
    /// re-pricing (the raw table keeps 90 days).
    Table,
}

#[derive(Debug, Clone, Args)]
pub struct ScopeArgs {
    /// Rebuild only this installation (repeatable); default: all.
    #[arg(long = "install", value_name = "INSTALL_ID")]
    pub installs: Vec<String>,
    /// First day (of created_at, UTC) to rebuild; default: the first.
    #[arg(long, value_name = "YYYY-MM-DD")]
    pub since: Option<NaiveDate>,
    /// Last day to rebuild, inclusive; default: the last.
    #[arg(long, value_name = "YYYY-MM-DD")]
    pub until: Option<NaiveDate>,
}

impl ScopeArgs {
    pub fn scope(&self) -> Scope {
        let mut installs = self.installs.clone();
        installs.sort();
        installs.dedup();
        Scope {
            installs,
            since: self.since,
            until: self.until,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Where the events are read from.
    #[arg(long, value_enum, default_value = "topic")]
    pub source: Source,
    /// Print the plan and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Events per insert of the bulk path (memory: four inserts are in flight).
    #[arg(long, default_value_t = 500_000)]
    pub insert_rows: usize,
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<std::path::PathBuf>,
    /// Differing (installation, day) rows listed in the readable report.
    #[arg(long, default_value_t = 20)]
    pub show: usize,
}

#[derive(Debug, Clone, Args)]
pub struct SwapArgs {
    /// Swap even if the compare shows unexplained differences.
    #[arg(long)]
    pub force: bool,
    /// How long to wait for the processors' batches in flight to finish
    /// once new ones are fenced.
    #[arg(long, default_value_t = 60)]
    pub quiesce_timeout_secs: u64,
    /// How long the replaced tables are kept for `rollback` (`drop`
    /// refuses before).
    #[arg(long, default_value_t = 24)]
    pub keep_hours: u64,
    /// Also write the fenced compare's report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct DropArgs {
    /// Drop even within the keep time (rollback is then impossible).
    #[arg(long)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("usage-rebuild").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_work_locally() {
        let cli = parse(&["build"]);
        assert_eq!(cli.shadow, "usage_rebuild");
        assert_eq!(cli.group, "usage-processors");
        assert_eq!(cli.clickhouse.database, "usage");
        let Command::Build(b) = cli.command else {
            panic!("not a build")
        };
        assert_eq!(b.source, Source::Topic);
        assert!(b.scope.scope().is_all());
        assert!(!b.dry_run);
    }

    #[test]
    fn a_scope_parses_and_is_sorted() {
        let cli = parse(&[
            "plan",
            "--install",
            "b",
            "--install",
            "a",
            "--install",
            "b",
            "--since",
            "2026-10-01",
            "--source",
            "table",
        ]);
        let Command::Plan(b) = cli.command else {
            panic!("not a plan")
        };
        let s = b.scope.scope();
        assert_eq!(s.installs, vec!["a", "b"]);
        assert_eq!(s.since, Some("2026-10-01".parse().unwrap()));
        assert_eq!(b.source, Source::Table);
    }

    #[test]
    fn bad_dates_are_refused() {
        let e = Cli::try_parse_from(["usage-rebuild", "build", "--since", "2026-13-01"]);
        assert!(e.is_err());
    }
}

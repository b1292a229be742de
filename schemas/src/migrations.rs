//! ClickHouse DDL as numbered migrations, and the runner that applies them.
//!
//! The SQL lives in `schemas/clickhouse/migrations/NNNN_name.sql`, with the
//! reasoning for each table's engine, keys, partitions and TTL next to it.
//! The runner creates the database, then applies, in order, every migration
//! not yet recorded in `schema_migrations`, recording each with a SHA-256 of
//! its text. It is idempotent: statements use IF NOT EXISTS, and a table
//! rebuild (copy into `<table>_rebuild`, swap) starts by dropping whatever
//! a run that died left, so a crash between applying and recording is
//! repaired by the next run. A recorded migration whose text has changed
//! since is refused: migrations are append-only, a change is a new file.
//! (So a rebuild spells out its table's DDL again rather than pointing at
//! an earlier file: each migration is the schema as it was applied.)

use clickhouse::Client;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The configuration of the `usage-migrate` binary.
/// Create the metering database and apply pending ClickHouse migrations.
#[derive(Debug, clap::Parser)]
#[command(name = "usage-migrate", version)]
pub struct MigrateConfig {
    /// Only print the versions not applied yet, one per line, and apply
    /// none (the database and its `schema_migrations` are created if absent).
    #[arg(long)]
    pub pending: bool,
    #[command(flatten)]
    pub clickhouse: usage_service_kit::clickhouse::ClickHouseArgs,
    #[command(flatten)]
    pub log: usage_service_kit::telemetry::LogArgs,
}

pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! migration {
    ($version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../clickhouse/migrations/", $name, ".sql")),
        }
    };
}

/// Every migration, in the order they apply. A test checks this list matches
/// the files on disk.
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_usage_events"),
    migration!(2, "0002_usage_daily"),
    migration!(3, "0003_usage_monthly"),
    migration!(4, "0004_installation_metadata"),
    migration!(5, "0005_installation_activity"),
    migration!(6, "0006_model_prices"),
    migration!(7, "0007_governance_decisions"),
    migration!(8, "0008_erased_installations"),
    migration!(9, "0009_usage_install_daily"),
    migration!(10, "0010_usage_daily_small_granules"),
    migration!(11, "0011_over_limit_and_billing_month"),
    migration!(12, "0012_usage_daily_summing"),
    migration!(13, "0013_usage_install_daily_summing"),
    migration!(14, "0014_usage_monthly_summing"),
    migration!(15, "0015_processor_batches"),
];

impl Migration {
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }

    /// The statements of the file: split at `;` ending a line, comments dropped.
    pub fn statements(&self) -> Vec<String> {
        split_statements(self.sql)
    }
}

pub(crate) fn split_statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let code = line.trim_end();
        if code.trim_start().starts_with("--") || code.is_empty() {
            continue;
        }
        current.push_str(code);
        current.push('\n');
        if code.ends_with(';') {
            let stmt = current.trim().trim_end_matches(';').trim().to_string();
            if !stmt.is_empty() {
                out.push(stmt);
            }
            current.clear();
        }
    }
    let rest = current.trim();
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("invalid database name {0:?}: use letters, digits and underscores")]
    BadDatabaseName(String),
    #[error(
        "migration {version} ({name}) was edited after it was applied: add a new migration instead"
    )]
    Edited { version: u32, name: String },
    #[error("migration {version} ({name}) failed: {source}")]
    Statement {
        version: u32,
        name: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
}

/// What one run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<u32>,
    pub already_applied: Vec<u32>,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct AppliedRow {
    version: u32,
    name: String,
    checksum: String,
}

fn valid_identifier(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The database's client, with the database and `schema_migrations`
/// created if absent, and the migrations recorded there.
async fn open(
    server: &Client,
    database: &str,
) -> Result<(Client, Vec<AppliedRow>), MigrationError> {
    if !valid_identifier(database) {
        return Err(MigrationError::BadDatabaseName(database.to_string()));
    }
    server
        .query(&format!("CREATE DATABASE IF NOT EXISTS `{database}`"))
        .execute()
        .await?;
    let db = server.clone().with_database(database);
    db.query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version UInt32,
            name String,
            checksum String,
            applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
        ) ENGINE = ReplacingMergeTree(applied_at) ORDER BY version",
    )
    .execute()
    .await?;
    let applied: Vec<AppliedRow> = db
        .query("SELECT version, name, checksum FROM schema_migrations FINAL ORDER BY version")
        .fetch_all()
        .await?;
    Ok((db, applied))
}

/// Whether `migration` is recorded as applied; an error if it was edited since.
fn is_applied(migration: &Migration, applied: &[AppliedRow]) -> Result<bool, MigrationError> {
    match applied.iter().find(|r| r.version == migration.version) {
        Some(row) if row.checksum != migration.checksum() => Err(MigrationError::Edited {
            version: row.version,
            name: row.name.clone(),
        }),
        Some(_) => Ok(true),
        None => Ok(false),
    }
}

/// The versions of [`MIGRATIONS`] that `database` has not recorded yet
/// (an error, as for [`migrate`], if an applied one was edited since).
pub async fn pending(server: &Client, database: &str) -> Result<Vec<u32>, MigrationError> {
    let (_, applied) = open(server, database).await?;
    let mut pending = Vec::new();
    for migration in MIGRATIONS {
        if !is_applied(migration, &applied)? {
            pending.push(migration.version);
        }
    }
    Ok(pending)
}

/// Applies every pending migration to `database` (created if absent).
/// `server` is a client without a default database.
pub async fn migrate(server: &Client, database: &str) -> Result<MigrationReport, MigrationError> {
    migrate_through(server, database, MIGRATIONS).await
}

/// [`migrate`] with a prefix of [`MIGRATIONS`] only: tests use it to stand
/// a database at an older version.
#[doc(hidden)]
pub async fn migrate_through(
    server: &Client,
    database: &str,
    migrations: &[Migration],
) -> Result<MigrationReport, MigrationError> {
    assert!(
        migrations.len() <= MIGRATIONS.len()
            && migrations
                .iter()
                .zip(MIGRATIONS)
                .all(|(a, b)| a.version == b.version),
        "migrate_through takes a prefix of MIGRATIONS"
    );
    let (db, applied) = open(server, database).await?;
    let mut report = MigrationReport::default();
    for migration in migrations {
        if is_applied(migration, &applied)? {
            report.already_applied.push(migration.version);
            continue;
        }
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applying migration"
        );
        let statements = migration.statements();
        for (i, statement) in statements.iter().enumerate() {
            let step = format!("{}/{}", i + 1, statements.len());
            run_with_progress(&db, statement, migration.name, &step)
                .await
                .map_err(|source| MigrationError::Statement {
                    version: migration.version,
                    name: migration.name,
                    source,
                })?;
        }
        db.query("INSERT INTO schema_migrations (version, name, checksum) VALUES (?, ?, ?)")
            .bind(migration.version)
            .bind(migration.name)
            .bind(migration.checksum())
            .execute()
            .await?;
        report.applied.push(migration.version);
    }
    Ok(report)
}

/// Where long statements report progress (`./stack up` shows only this).
pub const PROGRESS_TARGET: &str = "usage_migrate::progress";

/// Runs one statement. A backfill or a table copy can take minutes: every
/// 10 s it says it is still running, and at the end how long it took.
async fn run_with_progress(
    db: &Client,
    sql: &str,
    migration: &str,
    step: &str,
) -> Result<(), clickhouse::error::Error> {
    let started = std::time::Instant::now();
    let run = db.query(sql).execute();
    tokio::pin!(run);
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(10));
    ticks.tick().await;
    loop {
        tokio::select! {
            done = &mut run => break done?,
            _ = ticks.tick() => tracing::info!(
                target: PROGRESS_TARGET,
                migration,
                step,
                seconds = started.elapsed().as_secs(),
                "still running"
            ),
        }
    }
    let seconds = started.elapsed().as_secs();
    if seconds >= 10 {
        tracing::info!(target: PROGRESS_TARGET, migration, step, seconds, "done");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_matches_the_files_on_disk() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clickhouse/migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("migrations folder exists")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{}.sql", m.name))
            .collect();
        assert_eq!(
            files, listed,
            "every migration file must be listed in MIGRATIONS, in order"
        );
    }

    #[test]
    fn versions_are_consecutive_and_match_file_prefixes() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert_eq!(
                m.name[..4].parse::<u32>().ok(),
                Some(m.version),
                "{}",
                m.name
            );
        }
    }

    #[test]
    fn every_migration_is_idempotent_ddl() {
        for m in MIGRATIONS {
            let statements = m.statements();
            assert!(!statements.is_empty(), "{} has no statement", m.name);
            for s in statements {
                // DDL says IF NOT EXISTS; seed and backfill INSERTs go to
                // ReplacingMergeTree tables, where inserting the same keys
                // again (with the same values) changes nothing; a table
                // rebuild only touches its scratch table until the swap.
                let idempotent_insert = [
                    "INSERT INTO model_prices",
                    "INSERT INTO usage_install_daily",
                ]
                .iter()
                .any(|table| s.starts_with(table));
                assert!(
                    s.contains("IF NOT EXISTS") || idempotent_insert || rebuild_step(m, &s),
                    "{}: statement is not idempotent: {s}",
                    m.name
                );
            }
        }
    }

    /// A step of a table rebuild: a migration whose first statement drops
    /// `<table>_rebuild` (whatever a run that died left there) may create
    /// and fill that scratch table, check, swap it with `<table>`, and drop
    /// it again. Run again from the start, that is always the same copy.
    fn rebuild_step(m: &Migration, s: &str) -> bool {
        let statements = m.statements();
        let Some(table) = statements.first().and_then(|first| {
            first
                .strip_prefix("DROP TABLE IF EXISTS ")?
                .strip_suffix("_rebuild SYNC")
        }) else {
            return false;
        };
        let scratch = format!("{table}_rebuild");
        s == format!("DROP TABLE IF EXISTS {scratch} SYNC")
            || s.starts_with(&format!("CREATE TABLE {scratch}\n"))
            || s.starts_with(&format!("INSERT INTO {scratch}\n"))
            || s.starts_with("SELECT throwIf(")
            || s == format!("EXCHANGE TABLES {table} AND {scratch}")
    }

    #[test]
    fn splitting_drops_comments_and_keeps_statements_whole() {
        let sql = "-- a comment; with a semicolon\nCREATE TABLE a (x UInt8)\nENGINE = Memory;\n\n-- next\nCREATE VIEW v AS\nSELECT 1;\n";
        assert_eq!(
            split_statements(sql),
            vec![
                "CREATE TABLE a (x UInt8)\nENGINE = Memory".to_string(),
                "CREATE VIEW v AS\nSELECT 1".to_string()
            ]
        );
    }

    #[test]
    fn database_names_are_checked() {
        assert!(valid_identifier("usage_test_42"));
        assert!(!valid_identifier("usage; DROP"));
        assert!(!valid_identifier(""));
    }
}

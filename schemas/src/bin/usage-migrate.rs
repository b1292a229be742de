//! Applies the ClickHouse migrations (`./stack up` runs it before the services).

use clap::Parser;
use usage_schemas::migrations::{migrate, pending, MigrateConfig as Cli, MIGRATIONS};
use usage_service_kit::telemetry;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init(&cli.log);
    if cli.pending {
        return match pending(&cli.clickhouse.server_client(), &cli.clickhouse.database).await {
            Ok(versions) => {
                for v in versions {
                    println!("{v}");
                }
                std::process::ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("usage-migrate: {err}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    match migrate(&cli.clickhouse.server_client(), &cli.clickhouse.database).await {
        Ok(report) => {
            println!(
                "database {}: {} migration(s) applied now {:?}, {} already applied, {} known",
                cli.clickhouse.database,
                report.applied.len(),
                report.applied,
                report.already_applied.len(),
                MIGRATIONS.len()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("usage-migrate: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

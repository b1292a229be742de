//! Tracing setup shared by every binary.

use clap::{Args, ValueEnum};
use tracing_subscriber::{fmt, EnvFilter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (local development).
    Text,
    /// One JSON object per line (production log shipping).
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter in `tracing` EnvFilter syntax, e.g. `info,usage_ingest=debug`.
    #[arg(long = "log", env = "USAGE_LOG", default_value = "info")]
    pub filter: String,
    /// Log line format.
    #[arg(long, env = "USAGE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Installs the global subscriber. Calling it twice (tests) is harmless.
pub fn init(args: &LogArgs) {
    let filter = EnvFilter::try_new(&args.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_target(true);
    let _ = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

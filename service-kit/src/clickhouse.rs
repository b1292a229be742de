//! ClickHouse connection settings, client construction and the readiness probe.

use clap::Args;

use crate::Probe;

#[derive(Clone, Args)]
pub struct ClickHouseArgs {
    /// ClickHouse HTTP endpoint.
    #[arg(
        long = "clickhouse-url",
        env = "USAGE_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123"
    )]
    pub url: String,
    /// Database holding the metering tables (created by `usage-migrate`).
    #[arg(
        long = "clickhouse-database",
        env = "USAGE_CLICKHOUSE_DATABASE",
        default_value = "usage"
    )]
    pub database: String,
    #[arg(
        long = "clickhouse-user",
        env = "USAGE_CLICKHOUSE_USER",
        default_value = "default"
    )]
    pub user: String,
    /// Password of the ClickHouse user; never logged.
    #[arg(
        long = "clickhouse-password",
        env = "USAGE_CLICKHOUSE_PASSWORD",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub password: String,
    /// Compression of what travels to and from ClickHouse: `lz4` (less
    /// network, more CPU on both ends) or `none` (no compression CPU, more
    /// bytes). With a server on the same machine `none` drained no faster
    /// in BENCHMARKS.md, so lz4 stays the default.
    #[arg(
        long = "clickhouse-compression",
        env = "USAGE_CLICKHOUSE_COMPRESSION",
        default_value = "lz4",
        value_parser = ["lz4", "none"]
    )]
    pub compression: String,
}

// Hand-written so the password can never reach a log line through `{:?}`.
impl std::fmt::Debug for ClickHouseArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseArgs")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("compression", &self.compression)
            .field(
                "password",
                &if self.password.is_empty() { "" } else { "***" },
            )
            .finish()
    }
}

impl ClickHouseArgs {
    /// A client bound to the configured database.
    pub fn client(&self) -> clickhouse::Client {
        self.server_client().with_database(&self.database)
    }

    /// A client with no default database (to create it).
    pub fn server_client(&self) -> clickhouse::Client {
        let compression = match self.compression.as_str() {
            "none" => clickhouse::Compression::None,
            _ => clickhouse::Compression::Lz4,
        };
        let client = clickhouse::Client::default()
            .with_url(&self.url)
            .with_user(&self.user)
            .with_compression(compression);
        if self.password.is_empty() {
            client
        } else {
            client.with_password(&self.password)
        }
    }

    /// A readiness probe: the server answers a query in the configured database.
    pub fn probe(&self) -> Probe {
        let client = self.client();
        Probe::new("clickhouse", move || {
            let client = client.clone();
            async move {
                client
                    .query("SELECT 1")
                    .fetch_one::<u8>()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
    }
}

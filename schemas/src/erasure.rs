//! What an erasure removes from ClickHouse, shared by the query API's
//! erasure endpoint and the processors, which repeat it when an erasure
//! began while they were writing the same installation (see
//! `usage_processors::rollup`).

use clickhouse::Client;

/// Every table holding per-installation rows.
pub const TABLES: [&str; 7] = [
    "usage_events",
    "usage_daily",
    "usage_install_daily",
    "usage_monthly",
    "installation_activity",
    "installation_metadata",
    "governance_decisions",
];

/// Deletes every row of `install_id` from every table in [`TABLES`], and
/// returns once the deletes are applied (`mutations_sync = 2`): a reader
/// after this sees none of them.
pub async fn delete_rows(
    client: &Client,
    install_id: &str,
) -> Result<(), clickhouse::error::Error> {
    for table in TABLES {
        client
            .query(&format!(
                "ALTER TABLE {table} DELETE WHERE install_id = {{id:String}}"
            ))
            .param("id", install_id)
            .with_setting("mutations_sync", "2")
            .execute()
            .await?;
    }
    Ok(())
}

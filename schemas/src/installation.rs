//! The installation registry record as it travels on the compacted
//! installations topic (key: install_id; a null value erases).

use serde::{Deserialize, Serialize};

/// Mirrors `schemas/avro/installation.v1.avsc`; timestamps are Unix ms (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installation {
    pub install_id: String,
    pub account_id: String,
    pub plan: String,
    pub site_hash: String,
    pub wp_site_id: Option<i64>,
    pub is_multisite: bool,
    pub plugin_version: Option<String>,
    pub wordpress_version: Option<String>,
    pub php_version: Option<String>,
    pub signature_policy: String,
    // Avro `bytes` must be serialised as serde bytes, not as a sequence of u8.
    #[serde(with = "apache_avro::serde::bytes")]
    pub secret_sealed: Vec<u8>,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub previous_secret_sealed: Option<Vec<u8>>,
    pub previous_secret_valid_until: Option<i64>,
    pub registered_at: i64,
    pub updated_at: i64,
    pub revision: i64,
}

crate::avro_record!(Installation, "Installation", ["installation.v1.avsc"]);

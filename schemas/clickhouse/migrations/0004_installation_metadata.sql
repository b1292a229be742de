-- Installation metadata, written by the processors from the installation
-- registry topic. Never holds the secret.
--
-- ReplacingMergeTree(revision): the registry's revision counter orders the
-- changes, so replaying the compacted topic in any order converges on the
-- latest record. Point lookups and the installations listing read it by
-- install_id with FINAL.
CREATE TABLE IF NOT EXISTS installation_metadata
(
    install_id        String,
    account_id        LowCardinality(String),
    plan              LowCardinality(String),
    site_hash         String,
    wp_site_id        Nullable(UInt64),
    is_multisite      Bool,
    plugin_version    String,
    wordpress_version String,
    php_version       String,
    signature_policy  LowCardinality(String),
    registered_at     DateTime64(3, 'UTC'),
    updated_at        DateTime64(3, 'UTC'),
    revision          UInt64
)
ENGINE = ReplacingMergeTree(revision)
ORDER BY install_id;

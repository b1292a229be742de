-- Installations erased on request (the contract's right to erasure), one row
-- per erasure. The processors drop every event of an erased installation
-- that the gateway received before its erasure, so no redelivery or replay
-- of the events topic can bring its data back; a later re-registration of
-- the same install_id starts afresh. Holds no usage data: kept forever as
-- the record of what was erased, when and at whose request.
CREATE TABLE IF NOT EXISTS erased_installations
(
    install_id String,
    erased_at  DateTime64(3, 'UTC'),
    -- The token's subject and role that asked for it.
    erased_by  String,
    -- JSON object: rows removed per table.
    removed    String
)
ENGINE = ReplacingMergeTree
ORDER BY (install_id, erased_at);

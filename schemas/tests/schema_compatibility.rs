//! Data written with every published version of a schema must still decode
//! with the current one: replays re-read months-old topic data.
//!
//! `schemas/fixtures/<Subject>.v<N>.avro` holds a message written with version
//! N (its header carries version N's fingerprint) and `<Subject>.v<N>.json` the
//! value it must decode to with the current code. Adding a schema version
//! without its fixture fails `every_version_has_a_fixture`; run this test once
//! with USAGE_WRITE_FIXTURES=1 to write the fixture of the current version.

use std::path::PathBuf;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::Serialize;
use usage_schemas::wire::{fingerprint, AvroRecord};
use usage_schemas::{
    Account, Episode, GovernanceDecision, GovernanceState, Installation, PlanPeriod, UsageEvent,
};

fn fixture(subject: &str, version: usize, ext: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("{subject}.v{version}.{ext}"))
}

fn sample_event() -> UsageEvent {
    UsageEvent {
        event_id: "evt_550e8400e29b41d4a716446655440000".into(),
        install_id: "550e8400-e29b-41d4-a716-446655440000_a3b4c5d6e7f8".into(),
        account_id: "acc_1234567890".into(),
        wp_site_id: Some(2),
        wp_user_id_hash: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        source: "bulk".into(),
        model: "gpt-4o".into(),
        prompt_tokens: 150,
        completion_tokens: 25,
        total_tokens: 175,
        context_json: Some(r#"{"attachment_id":12345,"image_dimensions":"1920x1080"}"#.into()),
        created_at: 1_762_165_800_000,
        processed_at: Some(1_762_165_802_000),
        batch_sent_at: Some(1_762_165_860_000),
        received_at: 1_762_165_861_234,
        signature_scheme: "install_sig_v1".into(),
        gateway_instance: "gateway-7f3a".into(),
        billing_month: Some("2025-11".into()),
        over_limit: Some("plan_limit_reached".into()),
    }
}

fn sample_installation() -> Installation {
    Installation {
        install_id: "550e8400-e29b-41d4-a716-446655440000_a3b4c5d6e7f8".into(),
        account_id: "acc_1234567890".into(),
        plan: "pro".into(),
        site_hash: "a3b4c5d6e7f8".into(),
        wp_site_id: None,
        is_multisite: false,
        plugin_version: Some("2.4.1".into()),
        wordpress_version: Some("6.8.3".into()),
        php_version: Some("8.2.12".into()),
        signature_policy: "v1_or_v2".into(),
        secret_sealed: vec![0xde, 0xad, 0xbe, 0xef],
        previous_secret_sealed: None,
        previous_secret_valid_until: None,
        registered_at: 1_762_000_000_000,
        updated_at: 1_762_000_000_000,
        revision: 2,
        plan_history: vec![
            PlanPeriod {
                plan: "free".into(),
                since: 1_762_000_000_000,
                changed_by: "account:acc_1234567890".into(),
            },
            PlanPeriod {
                plan: "pro".into(),
                since: 1_762_100_000_000,
                changed_by: "admin:billing-ops".into(),
            },
        ],
        registered_by: Some("first_sync".into()),
    }
}

fn check_subject<T>(sample: T)
where
    T: AvroRecord + Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let history = T::HISTORY;
    let current = T::codec().current_schema();
    let n = history.versions.len();

    if std::env::var("USAGE_WRITE_FIXTURES").as_deref() == Ok("1") {
        let bin = fixture(history.subject, n, "avro");
        if !bin.exists() {
            std::fs::write(&bin, sample.to_wire().unwrap()).unwrap();
            let json = serde_json::to_string_pretty(&sample).unwrap();
            std::fs::write(fixture(history.subject, n, "json"), json + "\n").unwrap();
        }
    }

    for (i, json) in history.versions.iter().enumerate() {
        let version = i + 1;
        let writer = Schema::parse_str(json).unwrap();
        SchemaCompatibility::can_read(&writer, current).unwrap_or_else(|e| {
            panic!(
                "{} v{version} cannot be read by the current schema: {e}",
                history.subject
            )
        });

        let bin_path = fixture(history.subject, version, "avro");
        let bytes = std::fs::read(&bin_path).unwrap_or_else(|_| {
            panic!(
                "missing fixture {}: run `USAGE_WRITE_FIXTURES=1 cargo test -p usage-schemas --test schema_compatibility`",
                bin_path.display()
            )
        });
        assert_eq!(
            bytes[2..10],
            fingerprint(&writer),
            "{} was not written with v{version}",
            bin_path.display()
        );
        let decoded: T = T::from_wire(&bytes).unwrap_or_else(|e| {
            panic!(
                "{} v{version} fixture no longer decodes: {e}",
                history.subject
            )
        });
        let expected: T = serde_json::from_str(
            &std::fs::read_to_string(fixture(history.subject, version, "json")).unwrap(),
        )
        .unwrap();
        assert_eq!(decoded, expected, "{} v{version}", history.subject);
    }
}

#[test]
fn every_usage_event_version_decodes_with_the_current_schema() {
    check_subject(sample_event());
}

#[test]
fn every_installation_version_decodes_with_the_current_schema() {
    check_subject(sample_installation());
}

#[test]
fn every_governance_state_version_decodes_with_the_current_schema() {
    check_subject(GovernanceState {
        install_id: "550e8400-e29b-41d4-a716-446655440000_a3b4c5d6e7f8".into(),
        plan: "free".into(),
        month: "2025-11".into(),
        monthly_used: 45,
        monthly_cap: Some(50),
        level: "critical".into(),
        rate_limited_until: Some(1_762_166_100_000),
        rate_limit_reason: Some("requests".into()),
        abuse_flagged: false,
        abuse_reason: None,
        spike_flagged: false,
        window_requests: 100,
        window_tokens: 17_500,
        hour_requests: 120,
        hour_tokens: 21_000,
        rate_requests_limit: 100,
        rate_tokens_limit: 50_000,
        as_of: 1_762_165_800_000,
        previous_month: Some("2025-10".into()),
        previous_month_used: 50,
        received_through: 1_762_165_801_234,
        episodes: vec![Episode {
            kind: "rate_limited".into(),
            episode_id: "fedcba9876543210fedcba9876543210".into(),
            since: 1_762_165_700_000,
            last_seen: 1_762_165_800_000,
            marked_at: 1_762_165_760_000,
        }],
    });
}

#[test]
fn every_governance_decision_version_decodes_with_the_current_schema() {
    check_subject(GovernanceDecision {
        decision_id: "0123456789abcdef0123456789abcdef".into(),
        install_id: "550e8400-e29b-41d4-a716-446655440000_a3b4c5d6e7f8".into(),
        kind: "cap_critical".into(),
        reason: "45 of 50 generations used in 2025-11 (free plan)".into(),
        at: 1_762_165_800_000,
        phase: "alert".into(),
        episode_id: None,
        until: None,
    });
}

#[test]
fn every_account_version_decodes_with_the_current_schema() {
    check_subject(Account {
        account_id: "acc_1234567890".into(),
        plan: "agency".into(),
        max_installations: Some(20_000),
        updated_at: 1_762_165_800_000,
        updated_by: "admin:billing-ops".into(),
        revision: 3,
    });
}

#[test]
fn the_check_rejects_an_incompatible_change() {
    // A new required field without a default cannot read old data: the
    // compatibility check above must say so rather than pass vacuously.
    let v1 = Schema::parse_str(UsageEvent::HISTORY.versions[0]).unwrap();
    let mut broken: serde_json::Value =
        serde_json::from_str(UsageEvent::HISTORY.versions[0]).unwrap();
    broken["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "tenant", "type": "string"}));
    let broken = Schema::parse_str(&broken.to_string()).unwrap();
    assert!(SchemaCompatibility::can_read(&v1, &broken).is_err());
}

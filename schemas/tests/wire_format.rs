//! The single-object wire format: header layout, round trips, and every way a
//! message can be refused.

use apache_avro::rabin::Rabin;
use apache_avro::writer::single_object::GenericSingleObjectWriter;
use proptest::prelude::*;
use usage_schemas::wire::{AvroRecord, WireError, MAGIC};
use usage_schemas::{Installation, UsageEvent};

fn sample_event() -> UsageEvent {
    UsageEvent {
        event_id: "evt_550e8400e29b41d4a716446655440000".into(),
        install_id: "550e8400-e29b-41d4-a716-446655440000_a3b4c5d6e7f8".into(),
        account_id: "acc_1234567890".into(),
        wp_site_id: None,
        wp_user_id_hash: "a".repeat(64),
        source: "inline".into(),
        model: "gpt-4o-mini".into(),
        prompt_tokens: 150,
        completion_tokens: 25,
        total_tokens: 175,
        context_json: Some(r#"{"attachment_id":12345}"#.into()),
        created_at: 1_762_165_800_000,
        processed_at: Some(1_762_165_802_000),
        batch_sent_at: None,
        received_at: 1_762_165_860_123,
        signature_scheme: "install_sig_v1".into(),
        gateway_instance: "gw-1".into(),
        billing_month: None,
        over_limit: None,
    }
}

#[test]
fn header_is_marker_then_little_endian_rabin_fingerprint() {
    let bytes = sample_event().to_wire().unwrap();
    assert_eq!(&bytes[..2], &MAGIC);
    let schema = UsageEvent::codec().current_schema();
    assert_eq!(&bytes[2..10], &schema.fingerprint::<Rabin>().bytes[..]);
}

#[test]
fn our_bytes_equal_apache_avro_single_object_writer() {
    // An independent encoder of the same format must produce identical bytes.
    let event = sample_event();
    let schema = UsageEvent::codec().current_schema();
    let value = apache_avro::to_value(&event)
        .unwrap()
        .resolve(schema)
        .unwrap();
    let mut theirs = Vec::new();
    GenericSingleObjectWriter::new_with_capacity(schema, 512)
        .unwrap()
        .write_value_ref(&value, &mut theirs)
        .unwrap();
    assert_eq!(event.to_wire().unwrap(), theirs);
}

#[test]
fn refuses_short_foreign_unknown_and_trailing_messages() {
    assert!(matches!(
        UsageEvent::from_wire(&[0xC3, 0x01, 1]),
        Err(WireError::TooShort(3))
    ));
    let mut bytes = sample_event().to_wire().unwrap();
    let mut json = bytes.clone();
    json[0] = b'{';
    assert!(matches!(
        UsageEvent::from_wire(&json),
        Err(WireError::BadMagic)
    ));

    let mut unknown = bytes.clone();
    unknown[2] ^= 0xFF;
    match UsageEvent::from_wire(&unknown) {
        Err(WireError::UnknownFingerprint { subject, .. }) => assert_eq!(subject, "UsageEvent"),
        other => panic!("expected UnknownFingerprint, got {other:?}"),
    }

    bytes.push(0);
    assert!(matches!(
        UsageEvent::from_wire(&bytes),
        Err(WireError::TrailingBytes(1, "UsageEvent"))
    ));
}

#[test]
fn an_installation_is_not_read_as_an_event() {
    let installation = Installation {
        install_id: "i".into(),
        account_id: "acc_1".into(),
        plan: "free".into(),
        site_hash: "h".into(),
        wp_site_id: Some(3),
        is_multisite: true,
        plugin_version: None,
        wordpress_version: Some("6.8".into()),
        php_version: None,
        signature_policy: "v1_or_v2".into(),
        secret_sealed: vec![1, 2, 3],
        previous_secret_sealed: Some(vec![9]),
        previous_secret_valid_until: Some(5),
        registered_at: 1,
        updated_at: 2,
        revision: 1,
        plan_history: vec![],
        registered_by: None,
    };
    let bytes = installation.to_wire().unwrap();
    assert_eq!(Installation::from_wire(&bytes).unwrap(), installation);
    assert!(matches!(
        UsageEvent::from_wire(&bytes),
        Err(WireError::UnknownFingerprint { .. })
    ));
}

fn arb_event() -> impl Strategy<Value = UsageEvent> {
    (
        "[0-9a-f]{32}",
        any::<Option<i64>>(),
        prop::sample::select(vec!["inline", "bulk", "queue", "manual"]),
        (0i64..1 << 40, 0i64..1 << 40),
        proptest::option::of(".{0,64}"),
        (
            any::<i64>(),
            any::<Option<i64>>(),
            any::<Option<i64>>(),
            any::<i64>(),
        ),
        "\\PC{0,40}",
    )
        .prop_map(
            |(hex, site, source, (p, c), ctx, (created, processed, sent, received), model)| {
                UsageEvent {
                    event_id: format!("evt_{hex}"),
                    install_id: format!("inst_{hex}"),
                    account_id: "acc_x".into(),
                    wp_site_id: site,
                    wp_user_id_hash: hex.repeat(2),
                    source: source.into(),
                    model,
                    prompt_tokens: p,
                    completion_tokens: c,
                    total_tokens: p + c,
                    context_json: ctx,
                    created_at: created,
                    processed_at: processed,
                    batch_sent_at: sent,
                    received_at: received,
                    signature_scheme: "body_sig_v2".into(),
                    gateway_instance: "gw".into(),
                    billing_month: Some("2025-11".into()),
                    over_limit: hex.starts_with('a').then(|| "rate_limited".into()),
                }
            },
        )
}

proptest! {
    #[test]
    fn every_event_round_trips(event in arb_event()) {
        let bytes = event.to_wire().unwrap();
        prop_assert_eq!(UsageEvent::from_wire(&bytes).unwrap(), event);
    }

    #[test]
    fn truncated_messages_are_errors_not_panics(event in arb_event(), cut in 0usize..200) {
        let bytes = event.to_wire().unwrap();
        let cut = cut.min(bytes.len() - 1);
        prop_assert!(UsageEvent::from_wire(&bytes[..cut]).is_err());
    }
}

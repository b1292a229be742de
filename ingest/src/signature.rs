//! Installation signatures: the plugin's legacy scheme and the stronger v2.
//!
//! Legacy (`install_sig_v1`), what every deployed plugin sends:
//!   `X-Install-Signature: hex(HMAC-SHA256(secret, install_id + ":" + ts)):ts`
//! It covers only the installation and the time, not the body: anyone who sees
//! one request can send any body for that installation for five minutes.
//!
//! v2 (`body_sig_v2`), for clients that can send it:
//!   `X-Usage-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, t + "." + raw body)>`
//! It covers the exact bytes of the body, so a captured request can only be
//! replayed as is (and replaying it is harmless: events dedup by event_id).
//! Several `v1=` entries may be sent (e.g. during a secret rotation); one
//! matching is enough. An installation whose policy is `v2_only` is refused
//! the legacy scheme.
//!
//! Both are valid only while |now - t| <= the window (300 s by default), and
//! every comparison is constant-time (`Mac::verify_slice`).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub const LEGACY_HEADER: &str = "x-install-signature";
pub const V2_HEADER: &str = "x-usage-signature";

/// Which scheme authenticated a batch; recorded on every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    InstallSigV1,
    BodySigV2,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::InstallSigV1 => "install_sig_v1",
            Scheme::BodySigV2 => "body_sig_v2",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no X-Install-Signature or X-Usage-Signature header")]
    Missing,
    #[error("signature header is malformed: {0}")]
    Malformed(&'static str),
    #[error("signature timestamp is {skew} s away from server time (allowed: {window} s)")]
    Stale { skew: i64, window: i64 },
    #[error("signature does not match")]
    Mismatch,
    #[error("this installation accepts only X-Usage-Signature (body-signed) requests")]
    V2Required,
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    <HmacSha256 as KeyInit>::new_from_slice(secret).unwrap_or_else(|_| unreachable!())
}

fn check_window(ts: i64, now: i64, window: i64) -> Result<(), SignatureError> {
    let skew = now.saturating_sub(ts);
    if skew.abs() > window {
        return Err(SignatureError::Stale { skew, window });
    }
    Ok(())
}

fn matches_any(secrets: &[&[u8]], message: &[&[u8]], tag: &[u8]) -> bool {
    // Every secret is tried (no early exit on the first), so timing does not
    // reveal which one matched.
    let mut ok = false;
    for secret in secrets {
        let mut m = mac(secret);
        for part in message {
            m.update(part);
        }
        ok |= m.verify_slice(tag).is_ok();
    }
    ok
}

fn parse_ts(s: &str) -> Result<i64, SignatureError> {
    if s.is_empty() || s.len() > 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignatureError::Malformed("timestamp is not unix seconds"));
    }
    s.parse()
        .map_err(|_| SignatureError::Malformed("timestamp is not unix seconds"))
}

fn parse_hex_tag(s: &str) -> Result<Vec<u8>, SignatureError> {
    if s.len() != 64 {
        return Err(SignatureError::Malformed("HMAC must be 64 hex characters"));
    }
    hex::decode(s).map_err(|_| SignatureError::Malformed("HMAC must be 64 hex characters"))
}

/// Verifies `X-Install-Signature` for `install_id`; returns the signed timestamp.
pub fn verify_legacy(
    header: &str,
    install_id: &str,
    secrets: &[&[u8]],
    now: i64,
    window: i64,
) -> Result<i64, SignatureError> {
    let (hex_tag, ts) = header
        .trim()
        .rsplit_once(':')
        .ok_or(SignatureError::Malformed(
            "expected <hex hmac>:<unix seconds>",
        ))?;
    let ts_value = parse_ts(ts)?;
    let tag = parse_hex_tag(hex_tag)?;
    check_window(ts_value, now, window)?;
    if matches_any(secrets, &[install_id.as_bytes(), b":", ts.as_bytes()], &tag) {
        Ok(ts_value)
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Verifies `X-Usage-Signature` over the raw body; returns the signed timestamp.
pub fn verify_v2(
    header: &str,
    body: &[u8],
    secrets: &[&[u8]],
    now: i64,
    window: i64,
) -> Result<i64, SignatureError> {
    let mut ts: Option<&str> = None;
    let mut tags = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) if ts.is_none() => ts = Some(v),
            Some(("t", _)) => return Err(SignatureError::Malformed("t= given twice")),
            Some(("v1", v)) => tags.push(parse_hex_tag(v)?),
            // Unknown schemes are ignored so clients can send future ones alongside.
            Some((_, _)) => {}
            None => return Err(SignatureError::Malformed("expected t=<unix>,v1=<hex>")),
        }
    }
    let ts = ts.ok_or(SignatureError::Malformed("t= is missing"))?;
    if tags.is_empty() {
        return Err(SignatureError::Malformed("v1= is missing"));
    }
    let ts_value = parse_ts(ts)?;
    check_window(ts_value, now, window)?;
    let mut ok = false;
    for tag in &tags {
        ok |= matches_any(secrets, &[ts.as_bytes(), b".", body], tag);
    }
    if ok {
        Ok(ts_value)
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The `X-Install-Signature` value a plugin sends (tests, load generator, docs).
pub fn sign_legacy(secret: &[u8], install_id: &str, ts: i64) -> String {
    let mut m = mac(secret);
    m.update(format!("{install_id}:{ts}").as_bytes());
    format!("{}:{ts}", hex::encode(m.finalize().into_bytes()))
}

/// The `X-Usage-Signature` value for `body` (tests, load generator, docs).
pub fn sign_v2(secret: &[u8], ts: i64, body: &[u8]) -> String {
    let mut m = mac(secret);
    m.update(ts.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    format!("t={ts},v1={}", hex::encode(m.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"s3cr3t-plugin-key";
    const INSTALL: &str = "550e8400-e29b-41d4-a716-446655440000_a3b4c5d6e7f8";
    const TS: i64 = 1_762_165_860;
    // Computed outside Rust:
    //   printf '%s' "$INSTALL:1762165860" | openssl dgst -sha256 -hmac s3cr3t-plugin-key
    const LEGACY_HEX: &str = "eee73c003eddc5a03a7e5a74063bf3998802636fa5941ce1cbcc21bc64fd76fe";
    //   printf '%s' '1762165860.<BODY>' | openssl dgst -sha256 -hmac s3cr3t-plugin-key
    const BODY: &[u8] =
        br#"{"install_id":"550e8400-e29b-41d4-a716-446655440000_a3b4c5d6e7f8","events":[]}"#;
    const V2_HEX: &str = "d4812623d4f1af79c2906f0922e354a8e85d215c5faed64dfb01013fe2bcde32";

    #[test]
    fn legacy_matches_the_openssl_vector() {
        assert_eq!(
            sign_legacy(SECRET, INSTALL, TS),
            format!("{LEGACY_HEX}:{TS}")
        );
        let header = format!("{LEGACY_HEX}:{TS}");
        assert_eq!(
            verify_legacy(&header, INSTALL, &[SECRET], TS + 299, 300),
            Ok(TS)
        );
        // Uppercase hex is the same MAC.
        let upper = format!("{}:{TS}", LEGACY_HEX.to_uppercase());
        assert_eq!(verify_legacy(&upper, INSTALL, &[SECRET], TS, 300), Ok(TS));
    }

    #[test]
    fn v2_matches_the_openssl_vector() {
        assert_eq!(sign_v2(SECRET, TS, BODY), format!("t={TS},v1={V2_HEX}"));
        let header = format!("t={TS},v1={V2_HEX}");
        assert_eq!(verify_v2(&header, BODY, &[SECRET], TS - 300, 300), Ok(TS));
    }

    #[test]
    fn stale_and_future_timestamps_are_refused() {
        let header = format!("{LEGACY_HEX}:{TS}");
        assert_eq!(
            verify_legacy(&header, INSTALL, &[SECRET], TS + 301, 300),
            Err(SignatureError::Stale {
                skew: 301,
                window: 300
            })
        );
        assert_eq!(
            verify_legacy(&header, INSTALL, &[SECRET], TS - 301, 300),
            Err(SignatureError::Stale {
                skew: -301,
                window: 300
            })
        );
        let v2 = format!("t={TS},v1={V2_HEX}");
        assert!(matches!(
            verify_v2(&v2, BODY, &[SECRET], TS + 1000, 300),
            Err(SignatureError::Stale { .. })
        ));
    }

    #[test]
    fn wrong_secret_installation_or_body_is_a_mismatch() {
        let header = format!("{LEGACY_HEX}:{TS}");
        assert_eq!(
            verify_legacy(&header, INSTALL, &[b"other"], TS, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_legacy(&header, "other_install", &[SECRET], TS, 300),
            Err(SignatureError::Mismatch)
        );
        let v2 = format!("t={TS},v1={V2_HEX}");
        assert_eq!(
            verify_v2(&v2, b"{\"tampered\":1}", &[SECRET], TS, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn any_current_secret_verifies_during_rotation() {
        let header = format!("{LEGACY_HEX}:{TS}");
        assert_eq!(
            verify_legacy(&header, INSTALL, &[b"new", SECRET], TS, 300),
            Ok(TS)
        );
        let v2 = format!("t={TS},v1={},v1={V2_HEX}", "00".repeat(32));
        assert_eq!(verify_v2(&v2, BODY, &[SECRET], TS, 300), Ok(TS));
    }

    #[test]
    fn malformed_headers_say_why() {
        for bad in [
            "",
            "abc",
            ":123",
            "zz:123",
            &format!("{LEGACY_HEX}:"),
            &format!("{LEGACY_HEX}:12a"),
        ] {
            assert!(
                matches!(
                    verify_legacy(bad, INSTALL, &[SECRET], TS, 300),
                    Err(SignatureError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        for bad in [
            "",
            "t=1",
            &format!("v1={V2_HEX}"),
            "t=1,t=2,v1=00",
            "garbage",
        ] {
            assert!(
                matches!(
                    verify_v2(bad, BODY, &[SECRET], TS, 300),
                    Err(SignatureError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn signing_then_verifying_round_trips(
            secret in proptest::collection::vec(any::<u8>(), 1..64),
            install in "[a-z0-9_-]{1,80}",
            body in proptest::collection::vec(any::<u8>(), 0..512),
            ts in 0i64..4_000_000_000,
            skew in -300i64..=300,
        ) {
            let legacy = sign_legacy(&secret, &install, ts);
            prop_assert_eq!(verify_legacy(&legacy, &install, &[&secret], ts + skew, 300), Ok(ts));
            let v2 = sign_v2(&secret, ts, &body);
            prop_assert_eq!(verify_v2(&v2, &body, &[&secret], ts + skew, 300), Ok(ts));
        }

        #[test]
        fn any_flipped_bit_of_the_body_fails_v2(
            body in proptest::collection::vec(any::<u8>(), 1..256),
            bit in 0usize..2048,
        ) {
            let header = sign_v2(SECRET, TS, &body);
            let mut tampered = body.clone();
            let i = (bit / 8) % tampered.len();
            tampered[i] ^= 1 << (bit % 8);
            prop_assert_eq!(verify_v2(&header, &tampered, &[SECRET], TS, 300), Err(SignatureError::Mismatch));
        }
    }
}

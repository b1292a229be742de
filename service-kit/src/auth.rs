//! Bearer JWTs (HS256), shared by the gateway and the query API.
//!
//! Tokens are issued by the provider's account system with a shared HMAC
//! secret (`USAGE_JWT_SECRET`). Only HS256 is accepted: the `alg` header is
//! checked, never trusted to pick the algorithm. Claims:
//!
//! | claim | meaning |
//! | --- | --- |
//! | `sub` | who: a user or service id |
//! | `role` | `provider_admin`, `account`, `network_admin`, `site_admin` or `user` |
//! | `account_id` | the account (`acc_...`); required for every role but `provider_admin` |
//! | `install_ids` | for `site_admin`/`user`: the installations they may see |
//! | `user_hash` | for `user`: their own user hash |
//! | `exp` | expiry, unix seconds (required) |
//! | `nbf`, `iat` | optional, unix seconds |

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use clap::Args;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: i64 = 30;
/// The development default; services warn loudly when it is in use.
pub const DEV_SECRET: &str = "dev-only-jwt-secret-change-me";

#[derive(Clone, Args)]
pub struct JwtArgs {
    /// HMAC secret of the HS256 bearer tokens. The default is for local use only.
    #[arg(
        long = "jwt-secret",
        env = "USAGE_JWT_SECRET",
        default_value = DEV_SECRET,
        hide_env_values = true,
        hide_default_value = true
    )]
    pub secret: String,
}

impl std::fmt::Debug for JwtArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = if self.secret == DEV_SECRET {
            "<dev default>"
        } else {
            "***"
        };
        f.debug_struct("JwtArgs").field("secret", &shown).finish()
    }
}

impl JwtArgs {
    pub fn verifier(&self) -> JwtVerifier {
        if self.secret == DEV_SECRET {
            tracing::warn!("USAGE_JWT_SECRET is the development default: set it in production");
        }
        JwtVerifier::new(self.secret.as_bytes())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    ProviderAdmin,
    Account,
    NetworkAdmin,
    SiteAdmin,
    User,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_hash: Option<String>,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
}

impl Claims {
    pub fn is_admin(&self) -> bool {
        self.role == Role::ProviderAdmin
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("unsupported token algorithm (only HS256)")]
    Algorithm,
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token claims are invalid: {0}")]
    Claims(String),
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Clone)]
pub struct JwtVerifier {
    key: Vec<u8>,
}

impl JwtVerifier {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: secret.to_vec(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as KeyInit>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!())
    }

    /// Verifies an `Authorization` header value (`Bearer <jwt>`).
    pub fn verify_header(&self, header: Option<&str>, now: i64) -> Result<Claims, JwtError> {
        let header = header.ok_or(JwtError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(JwtError::Missing)?;
        self.verify(token.trim(), now)
    }

    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Header = decode_json(h)?;
        if header.alg != "HS256" {
            return Err(JwtError::Algorithm);
        }
        let signature = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed)?;
        let mut mac = self.mac();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| JwtError::Signature)?;
        let claims: Claims = decode_json(p)?;
        if claims.exp + LEEWAY_SECS < now {
            return Err(JwtError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf - LEEWAY_SECS > now) {
            return Err(JwtError::NotYetValid);
        }
        if claims.role != Role::ProviderAdmin && claims.account_id.is_none() {
            return Err(JwtError::Claims("account_id is required".into()));
        }
        Ok(claims)
    }

    /// Issues a token (tests, the load generator, `usagectl token`).
    pub fn sign(&self, claims: &Claims) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let mut mac = self.mac();
        mac.update(header.as_bytes());
        mac.update(b".");
        mac.update(payload.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{header}.{payload}.{sig}")
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|e| JwtError::Claims(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(role: Role, account: Option<&str>, exp: i64) -> Claims {
        Claims {
            sub: "u1".into(),
            role,
            account_id: account.map(str::to_string),
            install_ids: None,
            user_hash: None,
            exp,
            nbf: None,
            iat: None,
        }
    }

    #[test]
    fn signed_tokens_verify_and_carry_their_claims() {
        let v = JwtVerifier::new(b"k");
        let c = claims(Role::Account, Some("acc_1"), 2_000);
        let token = v.sign(&c);
        assert_eq!(v.verify(&token, 1_000), Ok(c.clone()));
        assert_eq!(
            v.verify_header(Some(&format!("Bearer {token}")), 1_000),
            Ok(c)
        );
    }

    #[test]
    fn a_token_made_with_openssl_verifies() {
        // h=$(printf '%s' '{"alg":"HS256","typ":"JWT"}' | base64url)
        // p=$(printf '%s' '{"sub":"ops","role":"provider_admin","exp":4102444800}' | base64url)
        // s=$(printf '%s' "$h.$p" | openssl dgst -sha256 -hmac k -binary | base64url)
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
                     eyJzdWIiOiJvcHMiLCJyb2xlIjoicHJvdmlkZXJfYWRtaW4iLCJleHAiOjQxMDI0NDQ4MDB9.\
                     4_J4XOToXRRRlmSkSwQpTCpivc_GfIAyucsYRKPaL38";
        let verified = JwtVerifier::new(b"k").verify(token, 1_800_000_000).unwrap();
        assert_eq!(verified.role, Role::ProviderAdmin);
        assert_eq!(verified.sub, "ops");
        assert_eq!(verified.exp, 4_102_444_800);
        // And our signer produces the same bytes for the same claims.
        let mut same = claims(Role::ProviderAdmin, None, 4_102_444_800);
        same.sub = "ops".into();
        assert_eq!(JwtVerifier::new(b"k").sign(&same), token);
    }

    #[test]
    fn refusals() {
        let v = JwtVerifier::new(b"k");
        let token = v.sign(&claims(Role::Account, Some("acc_1"), 1_000));
        assert_eq!(
            v.verify(&token, 1_000 + LEEWAY_SECS + 1),
            Err(JwtError::Expired)
        );
        assert_eq!(
            JwtVerifier::new(b"other").verify(&token, 0),
            Err(JwtError::Signature)
        );
        assert_eq!(v.verify("a.b", 0), Err(JwtError::Malformed));
        assert_eq!(v.verify_header(None, 0), Err(JwtError::Missing));
        assert_eq!(
            v.verify_header(Some("Basic abc"), 0),
            Err(JwtError::Missing)
        );
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            token.split('.').nth(1).unwrap()
        );
        assert_eq!(v.verify(&none_alg, 0), Err(JwtError::Algorithm));
        let no_account = v.sign(&claims(Role::Account, None, 1_000));
        assert!(matches!(v.verify(&no_account, 0), Err(JwtError::Claims(_))));
        let mut tampered = token.clone();
        tampered.insert(token.find('.').unwrap() + 2, 'x');
        assert!(v.verify(&tampered, 0).is_err());
    }
}

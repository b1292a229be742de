//! Bearer JWTs, shared by the gateway and the query API.
//!
//! Tokens are issued by the provider's account system, signed either with a
//! shared HMAC secret (HS256, `USAGE_JWT_SECRET`) or with an RSA private key
//! whose public key the services hold (RS256, `USAGE_JWT_PUBLIC_KEY_FILE`).
//! Each key is pinned to its algorithm: an HS256 token is checked with the
//! secret only and an RS256 token with the public key only, so a token cannot
//! pick its own algorithm (no "alg: none", no public key used as an HMAC
//! secret). `USAGE_JWT_RS256_ONLY` refuses HS256 altogether. Claims
//! (what each permission allows: `claims`):
//!
//! | claim | meaning |
//! | --- | --- |
//! | `sub` | who: a user or service id |
//! | `role` | `provider_admin`, `service`, `account` (the default), `network_admin`, `site_admin` or `user` |
//! | `account_id` | the account (`acc_...` or a number, as a string or a JSON number); required for every role but `provider_admin` and `service`; `USAGE_JWT_ACCOUNT_CLAIM` names another claim (e.g. `id` or `sub`) |
//! | `scope` | the permissions, space-separated (or a JSON array); without it, the role's defaults |
//! | `install_ids` | for `site_admin`/`user`: the installations they may see |
//! | `user_hash` | for `user`: their own user hash |
//! | `exp` | expiry, unix seconds (required); at most `USAGE_JWT_MAX_LIFETIME_SECS` after `iat` (or now) |
//! | `nbf`, `iat` | optional, unix seconds |
//! | `iss`, `aud` | checked against `USAGE_JWT_ISSUER` / `USAGE_JWT_AUDIENCE` when those are set |

mod claims;

pub use claims::{id_text, ClaimRules, Claims, Permission, Role};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use clap::Args;
use hmac::{Hmac, KeyInit, Mac};
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
    /// PEM file with the RSA public key of RS256 tokens (SPKI "PUBLIC KEY"
    /// or PKCS#1 "RSA PUBLIC KEY"); without it RS256 tokens are refused.
    #[arg(long = "jwt-public-key-file", env = "USAGE_JWT_PUBLIC_KEY_FILE")]
    pub public_key_file: Option<std::path::PathBuf>,
    /// Accept RS256 tokens only (requires the public key).
    #[arg(
        long = "jwt-rs256-only",
        env = "USAGE_JWT_RS256_ONLY",
        requires = "public_key_file"
    )]
    pub rs256_only: bool,
    /// The claim that carries the account id: `account_id`, or e.g. `id` or
    /// `sub` for tokens of the plugin's original account system.
    #[arg(
        long = "jwt-account-claim",
        env = "USAGE_JWT_ACCOUNT_CLAIM",
        default_value = "account_id"
    )]
    pub account_claim: String,
    /// The `iss` every token must carry (unchecked when unset).
    #[arg(long = "jwt-issuer", env = "USAGE_JWT_ISSUER")]
    pub issuer: Option<String>,
    /// The `aud` every token must carry (unchecked when unset).
    #[arg(long = "jwt-audience", env = "USAGE_JWT_AUDIENCE")]
    pub audience: Option<String>,
    /// Longest token lifetime accepted, in seconds (`exp` minus `iat`, or
    /// minus now): a token that leaks from a site stops working within it.
    #[arg(
        long = "jwt-max-lifetime-secs",
        env = "USAGE_JWT_MAX_LIFETIME_SECS",
        default_value_t = 366 * 86_400
    )]
    pub max_lifetime_secs: i64,
}

impl std::fmt::Debug for JwtArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = if self.secret == DEV_SECRET {
            "<dev default>"
        } else {
            "***"
        };
        f.debug_struct("JwtArgs")
            .field("secret", &shown)
            .field("public_key_file", &self.public_key_file)
            .field("rs256_only", &self.rs256_only)
            .field("account_claim", &self.account_claim)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("max_lifetime_secs", &self.max_lifetime_secs)
            .finish()
    }
}

impl JwtArgs {
    /// The verifier these settings describe; an unreadable or invalid public
    /// key is a startup error.
    pub fn verifier(&self) -> Result<JwtVerifier, String> {
        let mut verifier = if self.rs256_only {
            JwtVerifier::none()
        } else {
            if self.secret == DEV_SECRET {
                tracing::warn!("USAGE_JWT_SECRET is the development default: set it in production");
            }
            JwtVerifier::new(self.secret.as_bytes())
        };
        if let Some(path) = &self.public_key_file {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| format!("JWT public key {}: {e}", path.display()))?;
            verifier = verifier
                .with_rs256_public_key(&pem)
                .map_err(|e| format!("JWT public key {}: {e}", path.display()))?;
        }
        Ok(verifier.with_rules(ClaimRules {
            account_claim: self.account_claim.clone(),
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            max_lifetime_secs: Some(self.max_lifetime_secs),
        }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm not accepted (HS256 with the shared secret, or RS256 when a public key is configured)")]
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

#[derive(serde::Deserialize)]
struct Header {
    alg: String,
}

type RsaVerifyingKey = rsa::pkcs1v15::VerifyingKey<rsa::sha2::Sha256>;

#[derive(Clone)]
pub struct JwtVerifier {
    /// The HS256 secret, if HS256 is accepted.
    key: Option<Vec<u8>>,
    /// The RS256 public key, if RS256 is accepted.
    rsa: Option<RsaVerifyingKey>,
    rules: ClaimRules,
}

impl JwtVerifier {
    /// Accepts HS256 tokens signed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: Some(secret.to_vec()),
            rsa: None,
            rules: ClaimRules::default(),
        }
    }

    /// Accepts nothing until a key is added.
    pub fn none() -> Self {
        Self {
            key: None,
            rsa: None,
            rules: ClaimRules::default(),
        }
    }

    /// Reads claims with these rules (account claim, issuer, audience,
    /// lifetime) instead of the defaults.
    pub fn with_rules(mut self, rules: ClaimRules) -> Self {
        self.rules = rules;
        self
    }

    /// Also accepts RS256 tokens verified with this PEM public key.
    pub fn with_rs256_public_key(mut self, pem: &str) -> Result<Self, String> {
        use rsa::pkcs1::DecodeRsaPublicKey;
        use rsa::pkcs8::DecodePublicKey;
        let key = rsa::RsaPublicKey::from_public_key_pem(pem)
            .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem))
            .map_err(|e| format!("not an RSA public key in PEM: {e}"))?;
        self.rsa = Some(RsaVerifyingKey::new(key));
        Ok(self)
    }

    fn mac(key: &[u8]) -> HmacSha256 {
        <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
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
        let signature = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed)?;
        match (header.alg.as_str(), &self.key, &self.rsa) {
            ("HS256", Some(key), _) => {
                let mut mac = Self::mac(key);
                mac.update(h.as_bytes());
                mac.update(b".");
                mac.update(p.as_bytes());
                mac.verify_slice(&signature)
                    .map_err(|_| JwtError::Signature)?;
            }
            ("RS256", _, Some(rsa_key)) => {
                use rsa::signature::Verifier;
                let signature = rsa::pkcs1v15::Signature::try_from(signature.as_slice())
                    .map_err(|_| JwtError::Signature)?;
                rsa_key
                    .verify(format!("{h}.{p}").as_bytes(), &signature)
                    .map_err(|_| JwtError::Signature)?;
            }
            _ => return Err(JwtError::Algorithm),
        }
        let payload: serde_json::Map<String, serde_json::Value> = decode_json(p)?;
        self.rules.read(&payload, now)
    }

    /// Issues an HS256 token (tests, the load generator, `usagectl token`).
    /// A verifier without an HMAC secret signs with an empty key, which no
    /// verifier with a secret accepts.
    pub fn sign(&self, claims: &Claims) -> String {
        self.sign_payload(claims)
    }

    /// Issues an HS256 token with any payload (e.g. the claims of another
    /// account system: a numeric `id`, no `role`).
    pub fn sign_payload(&self, payload: &impl serde::Serialize) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(payload).unwrap_or_default());
        let mut mac = Self::mac(self.key.as_deref().unwrap_or_default());
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
            ..Default::default()
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

    const RSA_PUBLIC: &str = include_str!("../../testdata/jwt-rs256-test-public.pem");
    const RSA_PRIVATE: &str = include_str!("../../testdata/jwt-rs256-test-private.pem");

    /// Signs RS256 as an account system would (PKCS#1 v1.5, SHA-256).
    fn sign_rs256(claims: &Claims) -> String {
        use rsa::pkcs8::DecodePrivateKey;
        use rsa::signature::{SignatureEncoding, Signer};
        let key = rsa::RsaPrivateKey::from_pkcs8_pem(RSA_PRIVATE)
            .or_else(|_| {
                use rsa::pkcs1::DecodeRsaPrivateKey;
                rsa::RsaPrivateKey::from_pkcs1_pem(RSA_PRIVATE)
            })
            .unwrap();
        let signer = rsa::pkcs1v15::SigningKey::<rsa::sha2::Sha256>::new(key);
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
        let sig = signer.sign(format!("{header}.{payload}").as_bytes());
        format!(
            "{header}.{payload}.{}",
            URL_SAFE_NO_PAD.encode(sig.to_bytes())
        )
    }

    #[test]
    fn an_rs256_token_made_with_openssl_verifies_with_the_public_key() {
        let token = include_str!("../../testdata/openssl-rs256-token.txt").trim();
        let v = JwtVerifier::new(b"k")
            .with_rs256_public_key(RSA_PUBLIC)
            .unwrap();
        let claims = v.verify(token, 1_800_000_000).unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.role),
            ("ops", Role::ProviderAdmin)
        );
        // Our test signer makes the same bytes (PKCS#1 v1.5 is deterministic).
        let mut same = super::tests::claims(Role::ProviderAdmin, None, 4_102_444_800);
        same.sub = "ops".into();
        assert_eq!(sign_rs256(&same), token);
    }

    #[test]
    fn each_key_is_pinned_to_its_algorithm() {
        let c = claims(Role::Account, Some("acc_1"), 2_000);
        let rs = sign_rs256(&c);
        // Without a public key, RS256 is refused.
        assert_eq!(
            JwtVerifier::new(b"k").verify(&rs, 1_000),
            Err(JwtError::Algorithm)
        );
        // RS256-only refuses HS256 even with the right secret...
        let rs_only = JwtVerifier::none()
            .with_rs256_public_key(RSA_PUBLIC)
            .unwrap();
        assert_eq!(rs_only.verify(&rs, 1_000), Ok(c.clone()));
        let hs = JwtVerifier::new(b"k").sign(&c);
        assert_eq!(rs_only.verify(&hs, 1_000), Err(JwtError::Algorithm));
        // ...and an HS256 token keyed with the public key (algorithm
        // confusion) is just a bad signature.
        let confused = JwtVerifier::new(RSA_PUBLIC.as_bytes()).sign(&c);
        let both = JwtVerifier::new(b"k")
            .with_rs256_public_key(RSA_PUBLIC)
            .unwrap();
        assert_eq!(both.verify(&confused, 1_000), Err(JwtError::Signature));
        // A tampered payload fails; exp is enforced for RS256 too.
        let mut parts: Vec<&str> = rs.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"sub":"u1","role":"provider_admin","exp":2000}"#);
        parts[1] = &forged;
        assert_eq!(
            both.verify(&parts.join("."), 1_000),
            Err(JwtError::Signature)
        );
        assert_eq!(
            both.verify(&rs, 2_000 + LEEWAY_SECS + 1),
            Err(JwtError::Expired)
        );
        // "alg": "none" is never accepted.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap())
        );
        assert_eq!(both.verify(&none, 1_000), Err(JwtError::Algorithm));
        assert!(JwtVerifier::none()
            .with_rs256_public_key("not a key")
            .is_err());
    }

    #[test]
    fn the_settings_load_the_public_key_file_and_can_refuse_hs256() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/jwt-rs256-test-public.pem");
        let args = JwtArgs {
            secret: "s".into(),
            public_key_file: Some(path.clone()),
            rs256_only: true,
            account_claim: "account_id".into(),
            issuer: None,
            audience: None,
            max_lifetime_secs: 86_400,
        };
        let v = args.verifier().unwrap();
        let c = claims(Role::Account, Some("acc_1"), 2_000);
        assert_eq!(v.verify(&sign_rs256(&c), 1_000), Ok(c.clone()));
        assert_eq!(
            v.verify(&JwtVerifier::new(b"s").sign(&c), 1_000),
            Err(JwtError::Algorithm)
        );
        let missing = JwtArgs {
            public_key_file: Some(path.with_file_name("nope.pem")),
            ..args
        };
        assert!(missing.verifier().is_err());
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

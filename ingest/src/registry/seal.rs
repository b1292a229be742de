//! Installation secrets at rest: sealed with AES-256-GCM before they reach
//! the installations topic, so Kafka (its disks, its backups, anyone who can
//! read the topic) never holds a usable secret. Only gateways hold the
//! registry key and open them, in memory.
//!
//! Sealed form: 12-byte random nonce || ciphertext || 16-byte tag, with the
//! install_id as associated data, so a sealed secret copied onto another
//! installation's record does not open.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};

/// The development default key (64 hex chars); gateways warn while it is in use.
pub const DEV_KEY_HEX: &str = "6465762d6f6e6c792d72656769737472792d6b65792d6368616e67652d6d6521";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("registry key must be 64 hex characters (32 bytes)")]
    BadKey,
    #[error("sealed secret does not open with this registry key")]
    Open,
    #[error("could not seal the secret")]
    Seal,
}

#[derive(Clone)]
pub struct Sealer {
    cipher: Aes256Gcm,
}

impl Sealer {
    pub fn from_hex(key_hex: &str) -> Result<Self, SealError> {
        let bytes = hex::decode(key_hex.trim()).map_err(|_| SealError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SealError::BadKey);
        }
        Ok(Self {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes)),
        })
    }

    pub fn seal(&self, install_id: &str, secret: &[u8]) -> Result<Vec<u8>, SealError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: secret,
                    aad: install_id.as_bytes(),
                },
            )
            .map_err(|_| SealError::Seal)?;
        let mut out = Vec::with_capacity(12 + ciphertext.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    pub fn open(&self, install_id: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < 12 + 16 {
            return Err(SealError::Open);
        }
        let (nonce, ciphertext) = sealed.split_at(12);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: install_id.as_bytes(),
                },
            )
            .map_err(|_| SealError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_bound_to_the_installation() {
        let s = Sealer::from_hex(DEV_KEY_HEX).unwrap();
        let sealed = s.seal("inst_a", b"plugin-secret").unwrap();
        assert!(!sealed.windows(13).any(|w| w == b"plugin-secret"));
        assert_eq!(s.open("inst_a", &sealed).unwrap(), b"plugin-secret");
        assert_eq!(s.open("inst_b", &sealed), Err(SealError::Open));
        let other = Sealer::from_hex(&"11".repeat(32)).unwrap();
        assert_eq!(other.open("inst_a", &sealed), Err(SealError::Open));
        // A fresh nonce each time: the same secret never seals the same way twice.
        assert_ne!(s.seal("inst_a", b"plugin-secret").unwrap(), sealed);
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(Sealer::from_hex("abcd").is_err());
        assert!(Sealer::from_hex(&"zz".repeat(32)).is_err());
    }
}

//! The installation registry, event-sourced on the compacted installations
//! topic (key: install_id, value: the Avro `Installation`, null erases).
//!
//! Every gateway holds the whole registry in memory, built at start by
//! reading the topic from the beginning and kept current by following it
//! (`follower`), so a registration accepted by one gateway is usable on every
//! gateway as soon as they read it (well under a second). The gateway is not
//! ready until it has caught up with the topic. Writes (`commands`) go to the
//! topic first and are applied locally once Kafka has them. The following is
//! `usage_service_kit::follower`; this module is the table it fills.

pub mod accounts;
pub mod commands;
pub mod seal;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use usage_schemas::wire::AvroRecord;
use usage_schemas::Installation;

pub use seal::{SealError, Sealer};

/// One installation with its secrets opened (memory only).
pub struct Entry {
    pub record: Installation,
    secret: Vec<u8>,
    previous: Option<(Vec<u8>, i64)>,
}

// Secrets stay out of every log line.
impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("install_id", &self.record.install_id)
            .field("revision", &self.record.revision)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// The secrets a signature may use at `now_ms`: the current one, and the
    /// previous one while its rotation overlap lasts.
    pub fn secrets(&self, now_ms: i64) -> Vec<&[u8]> {
        let mut out = vec![self.secret.as_slice()];
        if let Some((previous, until)) = &self.previous {
            if now_ms <= *until {
                out.push(previous.as_slice());
            }
        }
        out
    }

    /// Whether `secret` is the current secret, compared in constant time
    /// (the comparison's duration says nothing about how much matched).
    pub fn has_secret(&self, secret: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.secret.as_slice().ct_eq(secret))
    }

    /// The current secret only (what proves a rotation: not one rotated out).
    pub fn current_secret(&self) -> &[u8] {
        &self.secret
    }

    pub fn v2_only(&self) -> bool {
        self.record.signature_policy == "v2_only"
    }
}

pub struct Registry {
    sealer: Sealer,
    map: RwLock<Entries>,
    caught_up: AtomicBool,
}

#[derive(Default)]
struct Entries {
    by_id: HashMap<String, Arc<Entry>>,
    /// Installations per account (the per-account limit).
    per_account: HashMap<String, usize>,
}

impl Entries {
    fn insert(&mut self, entry: Entry) {
        let account = entry.record.account_id.clone();
        if let Some(old) = self
            .by_id
            .insert(entry.record.install_id.clone(), Arc::new(entry))
        {
            self.forget_account(&old.record.account_id);
        }
        *self.per_account.entry(account).or_default() += 1;
    }

    fn remove(&mut self, install_id: &str) {
        if let Some(old) = self.by_id.remove(install_id) {
            self.forget_account(&old.record.account_id);
        }
    }

    fn forget_account(&mut self, account: &str) {
        if let Some(n) = self.per_account.get_mut(account) {
            *n -= 1;
            if *n == 0 {
                self.per_account.remove(account);
            }
        }
    }
}

impl Registry {
    pub fn new(sealer: Sealer) -> Self {
        Self {
            sealer,
            map: RwLock::new(Entries::default()),
            caught_up: AtomicBool::new(false),
        }
    }

    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    pub fn get(&self, install_id: &str) -> Option<Arc<Entry>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .get(install_id)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .len()
    }

    /// How many installations `account_id` has registered.
    pub fn count_of(&self, account_id: &str) -> usize {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .per_account
            .get(account_id)
            .copied()
            .unwrap_or(0)
    }

    /// The installations of `account_id` (a provider changing the account's plan).
    pub fn of_account(&self, account_id: &str) -> Vec<Arc<Entry>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .values()
            .filter(|e| e.record.account_id == account_id)
            .cloned()
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies a record unless the one held supersedes it (records arrive
    /// twice: once from our own write, once from the topic; and two gateways
    /// may write one revision at once, of which every reader keeps the same,
    /// `Installation::supersedes`).
    pub fn apply(&self, record: Installation) -> Result<(), SealError> {
        let secret = self
            .sealer
            .open(&record.install_id, &record.secret_sealed)?;
        let previous = match (
            &record.previous_secret_sealed,
            record.previous_secret_valid_until,
        ) {
            (Some(sealed), Some(until)) => {
                Some((self.sealer.open(&record.install_id, sealed)?, until))
            }
            _ => None,
        };
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map
            .by_id
            .get(&record.install_id)
            .is_some_and(|e| !record.supersedes(&e.record))
        {
            return Ok(());
        }
        map.insert(Entry {
            record,
            secret,
            previous,
        });
        Ok(())
    }

    pub fn remove(&self, install_id: &str) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(install_id);
    }
}

impl usage_service_kit::follower::Table for Registry {
    fn apply(&self, key: Option<&[u8]>, payload: Option<&[u8]>) {
        self.apply_message(key, payload);
    }

    fn caught_up(&self) {
        self.set_caught_up();
    }

    fn is_caught_up(&self) -> bool {
        Registry::is_caught_up(self)
    }
}

impl Registry {
    /// Applies one message of the installations topic.
    pub fn apply_message(&self, key: Option<&[u8]>, payload: Option<&[u8]>) {
        match payload {
            None => {
                if let Some(id) = key.and_then(|k| std::str::from_utf8(k).ok()) {
                    self.remove(id);
                }
            }
            Some(bytes) => match Installation::from_wire(bytes) {
                Ok(record) => {
                    let id = record.install_id.clone();
                    if let Err(err) = self.apply(record) {
                        tracing::error!(install_id = %id, %err, "cannot open installation secret: is USAGE_REGISTRY_KEY the key that sealed it?");
                    }
                }
                Err(err) => tracing::error!(%err, "undecodable installation record skipped"),
            },
        }
    }

    pub fn set_caught_up(&self) {
        if !self.caught_up.swap(true, Ordering::SeqCst) {
            tracing::info!(
                installations = self.len(),
                "installation registry caught up"
            );
        }
    }

    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }
}

/// Locks that serialise this gateway's registry writes per account: the
/// per-account limit is checked and the record written under one, and a
/// first sync retried at once enrolls its installation once. (Across
/// gateways, `Installation::supersedes` makes every reader keep the same
/// record of a revision written twice.)
pub struct WriteLocks {
    shards: Vec<tokio::sync::Mutex<()>>,
}

impl Default for WriteLocks {
    fn default() -> Self {
        Self {
            shards: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }
}

impl WriteLocks {
    pub async fn lock(&self, account_id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        account_id.hash(&mut h);
        self.shards[(h.finish() as usize) % self.shards.len()]
            .lock()
            .await
    }
}

//! The accounts the provider has set a plan or a limit for, followed from the
//! compacted accounts topic (key: account_id, value: the Avro `Account`).
//!
//! An account's plan is the plan its installations get when they register
//! or enroll; its `max_installations` overrides the gateway's default limit
//! on how many installations it may register. Only a provider-level token
//! with `plans:write` writes here (`PUT /api/usage/accounts/{account_id}`);
//! an account the provider never set has the configured default plan.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use usage_schemas::wire::AvroRecord;
use usage_schemas::Account;
use usage_service_kit::follower::Table;

#[derive(Default)]
pub struct Accounts {
    map: RwLock<HashMap<String, Arc<Account>>>,
    caught_up: AtomicBool,
}

impl Accounts {
    pub fn get(&self, account_id: &str) -> Option<Arc<Account>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(account_id)
            .cloned()
    }

    /// Applies a record unless a later revision is held (our own writes
    /// arrive again from the topic).
    pub fn apply_record(&self, account: Account) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&account.account_id)
            .is_some_and(|held| held.revision >= account.revision)
        {
            return;
        }
        map.insert(account.account_id.clone(), Arc::new(account));
    }
}

impl Table for Accounts {
    fn apply(&self, key: Option<&[u8]>, value: Option<&[u8]>) {
        match value.map(Account::from_wire) {
            Some(Ok(account)) => self.apply_record(account),
            Some(Err(err)) => tracing::error!(%err, "undecodable account record skipped"),
            None => {
                if let Some(id) = key.and_then(|k| std::str::from_utf8(k).ok()) {
                    self.map
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(id);
                }
            }
        }
    }

    fn caught_up(&self) {
        if !self.caught_up.swap(true, Ordering::SeqCst) {
            tracing::info!("accounts caught up");
        }
    }

    fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }
}

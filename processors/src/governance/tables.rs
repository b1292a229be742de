//! The two compacted topics every processor instance follows into memory:
//! the installation registry (each installation's plan history) and the governance
//! state it and its peers published (the last state of each installation,
//! which a rebuilt installation resumes from).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use usage_schemas::wire::AvroRecord;
use usage_schemas::{GovernanceState, Installation as RegistryRecord};
use usage_service_kit::follower::Table;

fn key_str(key: Option<&[u8]>) -> Option<&str> {
    key.and_then(|k| std::str::from_utf8(k).ok())
}

/// Every installation's plan history, followed from the registry topic by
/// every processor instance; changes of the plan in force are sent to the
/// engine to re-evaluate.
pub struct Plans {
    records: RwLock<HashMap<String, Arc<RegistryRecord>>>,
    changes: tokio::sync::mpsc::UnboundedSender<String>,
    caught_up: AtomicBool,
    /// Installations known (a processor reading the registry late decides
    /// with defaults or reads ClickHouse to be safe: worth watching).
    known: Option<prometheus::IntGauge>,
}

impl Plans {
    pub fn new(
        known: Option<prometheus::IntGauge>,
    ) -> (Arc<Self>, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Arc::new(Self {
                records: RwLock::default(),
                changes: tx,
                caught_up: Default::default(),
                known,
            }),
            rx,
        )
    }

    fn report_known(&self, records: &HashMap<String, Arc<RegistryRecord>>) {
        if let Some(g) = &self.known {
            g.set(records.len() as i64);
        }
    }

    /// Reports a plan change again after `delay`: acting on it failed, and
    /// nothing else may wake the consumer for it (a blocked site may send nothing).
    pub fn retry_later(&self, install_id: String, delay: std::time::Duration) {
        let changes = self.changes.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = changes.send(install_id);
        });
    }

    fn record(&self, install_id: &str) -> Option<Arc<RegistryRecord>> {
        self.records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(install_id)
            .cloned()
    }

    /// The installation's plan now.
    pub fn plan(&self, install_id: &str) -> Option<String> {
        self.record(install_id).map(|r| r.plan.clone())
    }

    /// The plan in force at governance time `at`.
    pub fn plan_at(&self, install_id: &str, at: i64) -> Option<String> {
        self.record(install_id).map(|r| r.plan_at(at).to_string())
    }

    /// The latest plan change in `(after, upto]`: when, and to which plan.
    pub fn change_between(&self, install_id: &str, after: i64, upto: i64) -> Option<(i64, String)> {
        let record = self.record(install_id)?;
        record
            .plan_history
            .iter()
            .skip(1)
            .rev()
            .find(|p| p.since > after && p.since <= upto)
            .map(|p| (p.since, p.plan.clone()))
    }

    /// When the installation was registered.
    pub fn registered_at(&self, install_id: &str) -> Option<i64> {
        self.record(install_id).map(|r| r.registered_at)
    }

    /// When the current plan took effect.
    pub fn current_since(&self, install_id: &str) -> Option<i64> {
        let record = self.record(install_id)?;
        Some(
            record
                .periods()
                .last()
                .map_or(record.updated_at, |p| p.since),
        )
    }
}

impl Table for Plans {
    fn apply(&self, key: Option<&[u8]>, value: Option<&[u8]>) {
        let Some(record) = value.and_then(|v| RegistryRecord::from_wire(v).ok()) else {
            if let Some(id) = key_str(key) {
                let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
                records.remove(id);
                self.report_known(&records);
            }
            return;
        };
        let id = record.install_id.clone();
        let previous = {
            let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
            // The same record every gateway keeps (`Installation::supersedes`).
            if records.get(&id).is_some_and(|r| !record.supersedes(r)) {
                return;
            }
            let previous = records.insert(id.clone(), Arc::new(record.clone()));
            self.report_known(&records);
            previous
        };
        // The initial load is not a change: plan changes made while no
        // owner was listening are caught up on assignment instead (see
        // `Published::stale_plans`).
        if self.is_caught_up() && previous.is_some_and(|p| p.plan != record.plan) {
            let _ = self.changes.send(id);
        }
    }

    fn caught_up(&self) {
        self.caught_up.store(true, Ordering::SeqCst);
    }

    fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }
}

/// The latest governance state per installation, as published on the
/// compacted governance topic (by this instance or the previous owner).
#[derive(Default)]
pub struct Published {
    states: RwLock<HashMap<String, GovernanceState>>,
    caught_up: AtomicBool,
}

impl Published {
    pub fn get(&self, install_id: &str) -> Option<GovernanceState> {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(install_id)
            .cloned()
    }

    /// True when `state` is exactly what the topic already holds.
    pub fn holds(&self, state: &GovernanceState) -> bool {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&state.install_id)
            == Some(state)
    }

    /// Records a state this instance just published (the follower will see
    /// it again later; applying is idempotent).
    pub fn insert(&self, state: GovernanceState) {
        self.states
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(state.install_id.clone(), state);
    }
}

impl Published {
    /// Installations whose published state was decided under another plan
    /// than the registry's current one.
    pub fn stale_plans(&self, plans: &Plans) -> Vec<String> {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| plans.plan(&s.install_id).is_some_and(|p| p != s.plan))
            .map(|s| s.install_id.clone())
            .collect()
    }
}

impl Table for Published {
    fn apply(&self, key: Option<&[u8]>, value: Option<&[u8]>) {
        match value.and_then(|v| GovernanceState::from_wire(v).ok()) {
            Some(state) => self.insert(state),
            None => {
                if let Some(id) = key_str(key) {
                    self.states
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(id);
                }
            }
        }
    }

    fn caught_up(&self) {
        self.caught_up.store(true, Ordering::SeqCst);
    }

    fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }
}

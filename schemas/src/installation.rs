//! The installation registry record as it travels on the compacted
//! installations topic (key: install_id; a null value erases).

use serde::{Deserialize, Serialize};

/// Mirrors `schemas/avro/installation.v2.avsc`; timestamps are Unix ms (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installation {
    pub install_id: String,
    pub account_id: String,
    pub plan: String,
    pub site_hash: String,
    pub wp_site_id: Option<i64>,
    pub is_multisite: bool,
    pub plugin_version: Option<String>,
    pub wordpress_version: Option<String>,
    pub php_version: Option<String>,
    pub signature_policy: String,
    // Avro `bytes` must be serialised as serde bytes, not as a sequence of u8.
    #[serde(with = "apache_avro::serde::bytes")]
    pub secret_sealed: Vec<u8>,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub previous_secret_sealed: Option<Vec<u8>>,
    pub previous_secret_valid_until: Option<i64>,
    pub registered_at: i64,
    pub updated_at: i64,
    pub revision: i64,
    /// Every plan the installation has had, oldest first (empty in v1
    /// data: `plan` since `registered_at`).
    #[serde(default)]
    pub plan_history: Vec<PlanPeriod>,
    /// `admin:<sub>`, `account:<sub>` or `first_sync`.
    #[serde(default)]
    pub registered_by: Option<String>,
}

/// One plan and when it took effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanPeriod {
    pub plan: String,
    pub since: i64,
    pub changed_by: String,
}

impl Installation {
    /// The plan in force at `at` (ms): the last period that started at or
    /// before it; before the first one, the first one's plan.
    pub fn plan_at(&self, at: i64) -> &str {
        self.plan_history
            .iter()
            .rev()
            .find(|p| p.since <= at)
            .or(self.plan_history.first())
            .map_or(self.plan.as_str(), |p| p.plan.as_str())
    }

    /// The plan history, with v1 data's single plan spelled out.
    pub fn periods(&self) -> Vec<PlanPeriod> {
        if self.plan_history.is_empty() {
            vec![PlanPeriod {
                plan: self.plan.clone(),
                since: self.registered_at,
                changed_by: "system".into(),
            }]
        } else {
            self.plan_history.clone()
        }
    }

    /// Whether this record replaces `other` (same installation): the higher
    /// revision wins. Two different records of one revision (two gateways
    /// wrote at once) are ordered so that every reader keeps the same one,
    /// whatever order it read them in: a plan change first (a longer plan
    /// history), then a secret rotation (a later overlap end), then the
    /// earlier write, then the bytes.
    pub fn supersedes(&self, other: &Installation) -> bool {
        let key = |r: &Installation| {
            (
                r.revision,
                r.plan_history.len(),
                r.previous_secret_valid_until.unwrap_or(i64::MIN),
                -r.updated_at,
            )
        };
        match key(self).cmp(&key(other)) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => self.secret_sealed < other.secret_sealed,
        }
    }
}

crate::avro_record!(
    Installation,
    "Installation",
    ["installation.v1.avsc", "installation.v2.avsc"]
);

#[cfg(test)]
mod tests {
    use super::*;

    fn record(revision: i64, updated_at: i64, sealed: u8) -> Installation {
        Installation {
            install_id: "i".into(),
            account_id: "acc_1".into(),
            plan: "pro".into(),
            site_hash: "ab".into(),
            wp_site_id: None,
            is_multisite: false,
            plugin_version: None,
            wordpress_version: None,
            php_version: None,
            signature_policy: "v1_or_v2".into(),
            secret_sealed: vec![sealed],
            previous_secret_sealed: None,
            previous_secret_valid_until: None,
            registered_at: 100,
            updated_at,
            revision,
            plan_history: vec![],
            registered_by: None,
        }
    }

    #[test]
    fn the_plan_in_force_follows_the_history() {
        let mut r = record(3, 300, 1);
        assert_eq!(r.plan_at(0), "pro", "v1 data: the one plan");
        r.plan_history = vec![
            PlanPeriod {
                plan: "free".into(),
                since: 100,
                changed_by: "account:acc_1".into(),
            },
            PlanPeriod {
                plan: "pro".into(),
                since: 200,
                changed_by: "admin:ops".into(),
            },
        ];
        assert_eq!(r.plan_at(50), "free", "before registration: the first plan");
        assert_eq!(r.plan_at(199), "free");
        assert_eq!(r.plan_at(200), "pro");
        assert_eq!(r.plan_at(10_000), "pro");
    }

    #[test]
    fn every_reader_keeps_the_same_record_of_a_revision() {
        let first = record(1, 100, 7);
        let racing = record(1, 105, 3);
        // The earlier write of one revision wins, in either order of reading.
        assert!(first.supersedes(&racing) && !racing.supersedes(&first));
        // Same time: the smaller sealed bytes.
        let twin = record(1, 100, 9);
        assert!(first.supersedes(&twin) && !twin.supersedes(&first));
        // A plan change outranks a later metadata write of its revision.
        let mut plan_change = record(2, 300, 5);
        plan_change.plan_history = first.periods();
        plan_change.plan_history.push(PlanPeriod {
            plan: "agency".into(),
            since: 300,
            changed_by: "admin:ops".into(),
        });
        plan_change
            .plan_history
            .insert(0, plan_change.plan_history[0].clone());
        let metadata = record(2, 200, 1);
        assert!(plan_change.supersedes(&metadata) && !metadata.supersedes(&plan_change));
        // A record never replaces itself; a higher revision always wins.
        assert!(!first.supersedes(&first.clone()));
        assert!(record(2, 999, 9).supersedes(&first));
    }
}

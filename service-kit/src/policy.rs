//! The governance rules as configuration: limits, plans and thresholds,
//! read the same way by the processors (which decide) and the gateways
//! (which admit generations and mark what arrives over a limit).
//!
//! Defaults are the plugin contract's; every value can be overridden per
//! plan from a JSON file (`USAGE_GOVERNANCE_CONFIG`), e.g.
//!
//! ```json
//! {"plans": {"agency": {"monthly_cap": 250000, "rate_requests": 500}},
//!  "thresholds": {"warning": 0.8}}
//! ```

use std::collections::BTreeMap;

use clap::Args;
use serde::{Deserialize, Serialize};

/// The governance settings every gateway and processor must share.
#[derive(Debug, Clone, Args)]
pub struct GovernanceArgs {
    /// JSON file overriding the governance policy (limits per plan,
    /// thresholds); without it, the contract's defaults apply. Gateways and
    /// processors must read the same file.
    #[arg(long = "governance-config", env = "USAGE_GOVERNANCE_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// How far behind its arrival (the gateway's received_at) an event's
    /// created_at still counts as is in the rate and abuse windows, in ms;
    /// an older created_at counts at received_at minus this, a future one
    /// at received_at. The windows keep this much history per active
    /// installation (at most 7 days, for tests that replay old traffic).
    #[arg(
        long = "governance-grace-ms",
        env = "USAGE_GOVERNANCE_GRACE_MS",
        default_value_t = 60_000,
        value_parser = clap::value_parser!(i64).range(0..=604_800_000)
    )]
    pub grace_ms: i64,
    /// How long after a month has closed an event created in it still
    /// counts toward it for caps and billing, in hours; later, it counts
    /// toward the month it arrived in (and keeps its created_at for reports).
    #[arg(
        long = "billing-late-grace-hours",
        env = "USAGE_BILLING_LATE_GRACE_HOURS",
        default_value_t = 48,
        value_parser = clap::value_parser!(i64).range(0..=720)
    )]
    pub late_grace_hours: i64,
}

impl GovernanceArgs {
    /// The policy: the defaults, with the overrides of the configured file.
    pub fn policy(&self) -> Result<Policy, PolicyError> {
        let Some(path) = &self.config else {
            return Ok(Policy::default());
        };
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Policy::from_json(&path.display().to_string(), &text)
    }

    pub fn late_grace_ms(&self) -> i64 {
        self.late_grace_hours * 3_600_000
    }
}

/// Limits for one plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlanPolicy {
    /// Generations per calendar month (UTC); `null` = unlimited.
    pub monthly_cap: Option<u64>,
    /// Requests in the rate-limit window (5 minutes).
    pub rate_requests: u64,
    /// Tokens in the rate-limit window.
    pub rate_tokens: u64,
    /// Requests in the abuse window (1 hour) that flag abuse.
    pub abuse_requests: u64,
    /// Tokens in the abuse window that flag abuse.
    pub abuse_tokens: u64,
    /// The last hour counts as a spike when it is at least this many times
    /// the installation's trailing hourly average ...
    pub spike_factor: f64,
    /// ... and at least this many requests (quiet sites do not spike on 3 events).
    pub spike_min_requests: u64,
    /// What the plan costs an account per installation and month, in USD:
    /// the revenue the dashboard sets against model cost.
    pub monthly_price_usd: f64,
}

impl Default for PlanPolicy {
    fn default() -> Self {
        Self {
            monthly_cap: None,
            rate_requests: 100,
            rate_tokens: 50_000,
            abuse_requests: 200,
            abuse_tokens: 100_000,
            spike_factor: 10.0,
            spike_min_requests: 50,
            monthly_price_usd: 0.0,
        }
    }
}

/// Where on the monthly cap warnings, critical alerts and the block start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    pub warning: f64,
    pub critical: f64,
    pub block: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            warning: 0.75,
            critical: 0.90,
            block: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    Warning,
    Critical,
    Blocked,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Critical => "critical",
            Level::Blocked => "blocked",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    pub plans: BTreeMap<String, PlanPolicy>,
    /// Used for a plan missing from `plans` (and before an installation's plan is known).
    pub default_plan: PlanPolicy,
    pub thresholds: Thresholds,
}

impl Default for Policy {
    fn default() -> Self {
        // The contract's caps and the plugin's published prices.
        let plan = |c: Option<u64>, price: f64| PlanPolicy {
            monthly_cap: c,
            monthly_price_usd: price,
            ..PlanPolicy::default()
        };
        Self {
            plans: BTreeMap::from([
                ("free".to_string(), plan(Some(50), 0.0)),
                ("pro".to_string(), plan(Some(10_000), 12.99)),
                ("agency".to_string(), plan(Some(100_000), 49.99)),
                ("credits".to_string(), plan(None, 0.0)),
            ]),
            default_plan: plan(Some(50), 0.0),
            thresholds: Thresholds::default(),
        }
    }
}

/// Per-plan overrides as read from the JSON file: any field may be left out.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    plans: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    thresholds: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("governance config {path}: {message}")]
    Invalid { path: String, message: String },
}

fn merge<T: Serialize + serde::de::DeserializeOwned>(
    base: &T,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<T, String> {
    let mut value = serde_json::to_value(base).map_err(|e| e.to_string())?;
    if let Some(obj) = value.as_object_mut() {
        for (k, v) in overrides {
            obj.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

impl Policy {
    /// The defaults with the overrides of `json` (the content of the file at `path`).
    pub fn from_json(path: &str, json: &str) -> Result<Self, PolicyError> {
        let invalid = |message: String| PolicyError::Invalid {
            path: path.to_string(),
            message,
        };
        let file: PolicyFile = serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
        let mut policy = Policy::default();
        for (plan, overrides) in &file.plans {
            let base = policy.plans.get(plan).cloned().unwrap_or_default();
            policy.plans.insert(
                plan.clone(),
                merge(&base, overrides).map_err(|e| invalid(format!("plan {plan}: {e}")))?,
            );
        }
        if let Some(t) = &file.thresholds {
            policy.thresholds =
                merge(&policy.thresholds, t).map_err(|e| invalid(format!("thresholds: {e}")))?;
        }
        let t = &policy.thresholds;
        if !(0.0 < t.warning && t.warning <= t.critical && t.critical <= t.block) {
            return Err(invalid(
                "thresholds must satisfy 0 < warning <= critical <= block".into(),
            ));
        }
        Ok(policy)
    }

    pub fn plan(&self, plan: &str) -> &PlanPolicy {
        self.plans.get(plan).unwrap_or(&self.default_plan)
    }

    /// Whether `plan` is one of the policy's plans (the contract's four,
    /// and any the configuration adds).
    pub fn knows(&self, plan: &str) -> bool {
        self.plans.contains_key(plan)
    }

    /// The plans, for messages.
    pub fn plan_names(&self) -> String {
        self.plans.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The generation counts at which each level starts for `cap`
    /// (fractions rounded up: 75% of 50 is reached at the 38th generation).
    pub fn level_starts(&self, cap: u64) -> [(Level, u64); 3] {
        let at = |f: f64| ((cap as f64) * f).ceil() as u64;
        [
            (Level::Warning, at(self.thresholds.warning)),
            (Level::Critical, at(self.thresholds.critical)),
            (Level::Blocked, at(self.thresholds.block)),
        ]
    }

    /// The level of an installation that used `used` generations of `cap`.
    pub fn level(&self, used: u64, cap: Option<u64>) -> Level {
        let Some(cap) = cap else { return Level::Ok };
        self.level_starts(cap)
            .iter()
            .rev()
            .find(|(_, start)| used >= *start)
            .map_or(Level::Ok, |(level, _)| *level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_defaults() {
        let p = Policy::default();
        assert_eq!(p.plan("free").monthly_cap, Some(50));
        assert_eq!(p.plan("pro").monthly_cap, Some(10_000));
        assert_eq!(p.plan("agency").monthly_cap, Some(100_000));
        assert_eq!(p.plan("credits").monthly_cap, None);
        assert_eq!(p.plan("free").rate_requests, 100);
        assert_eq!(p.plan("free").rate_tokens, 50_000);
        assert_eq!(p.plan("free").abuse_requests, 200);
        assert_eq!(p.plan("free").abuse_tokens, 100_000);
        assert_eq!(p.plan("pro").monthly_price_usd, 12.99);
        assert_eq!(p.plan("agency").monthly_price_usd, 49.99);
        assert_eq!(p.plan("free").monthly_price_usd, 0.0);
    }

    #[test]
    fn free_plan_levels_start_at_38_45_and_50() {
        let p = Policy::default();
        assert_eq!(
            p.level_starts(50),
            [
                (Level::Warning, 38),
                (Level::Critical, 45),
                (Level::Blocked, 50)
            ]
        );
        assert_eq!(p.level(37, Some(50)), Level::Ok);
        assert_eq!(p.level(38, Some(50)), Level::Warning);
        assert_eq!(p.level(44, Some(50)), Level::Warning);
        assert_eq!(p.level(45, Some(50)), Level::Critical);
        assert_eq!(p.level(50, Some(50)), Level::Blocked);
        assert_eq!(p.level(1_000_000, None), Level::Ok);
    }

    #[test]
    fn overrides_merge_per_plan_and_bad_files_say_why() {
        let p = Policy::from_json(
            "g.json",
            r#"{"plans": {"agency": {"monthly_cap": 250000, "rate_requests": 500}, "enterprise": {"monthly_cap": null}},
                "thresholds": {"warning": 0.8}}"#,
        )
        .unwrap();
        assert_eq!(p.plan("agency").monthly_cap, Some(250_000));
        assert_eq!(p.plan("agency").rate_requests, 500);
        assert_eq!(
            p.plan("agency").rate_tokens,
            50_000,
            "untouched fields keep their default"
        );
        assert_eq!(p.plan("enterprise").monthly_cap, None);
        assert_eq!(p.thresholds.warning, 0.8);
        assert_eq!(p.thresholds.critical, 0.9);
        for bad in [
            r#"{"plans": {"pro": {"monthly_cap": "lots"}}}"#,
            r#"{"plans": {"pro": {"rate_requets": 5}}}"#,
            r#"{"thresholds": {"warning": 0.95}}"#,
            r#"{"tresholds": {}}"#,
        ] {
            assert!(Policy::from_json("g.json", bad).is_err(), "{bad}");
        }
    }
}

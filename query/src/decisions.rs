//! `GET /provider/usage/decisions`: an installation's governance history:
//! rate limits, abuse and spike flags, cap warnings and alerts, blocks, and
//! their ends, newest first.
//!
//! Parameters: `install_id` (required unless the token is provider-level),
//! `date_from`/`date_to` (UTC days of the decision, default the last 30),
//! `kind` (one of the decision kinds), `limit` (1..=1000, default 200),
//! `offset`. A decision is an episode's `start`, an `extended` (at most once
//! a minute per kind while it holds), its `end`, or a cap `alert`;
//! `episode_id` links them.

use chrono::NaiveDate;
use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use crate::access::Scope;
use crate::error::QueryError;
use crate::events::iso_millis;
use crate::params::{self, DateRange, Query};

pub const MAX_LIMIT: u64 = 1000;
pub const KINDS: [&str; 10] = [
    "rate_limited",
    "rate_limit_ended",
    "abuse_flagged",
    "abuse_cleared",
    "spike_flagged",
    "spike_cleared",
    "cap_warning",
    "cap_critical",
    "blocked",
    "unblocked",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionsParams {
    pub install_id: Option<String>,
    pub range: DateRange,
    pub kind: Option<String>,
    pub limit: u64,
    pub offset: u64,
}

impl DecisionsParams {
    pub fn parse(params: &Query, today: NaiveDate) -> Result<Self, QueryError> {
        let kind = params.get("kind").filter(|s| !s.is_empty()).cloned();
        if let Some(k) = &kind {
            if !KINDS.contains(&k.as_str()) {
                return Err(QueryError::BadRequest(format!(
                    "kind must be one of {}, not {k:?}",
                    KINDS.join(", ")
                )));
            }
        }
        Ok(Self {
            install_id: params.get("install_id").filter(|s| !s.is_empty()).cloned(),
            range: DateRange::parse(params, today)?,
            kind,
            limit: params::limit(params, 200, MAX_LIMIT)?,
            offset: params::number(params, "offset", 0)?,
        })
    }
}

#[derive(Debug, Row, Deserialize)]
struct DecisionRow {
    decision_id: String,
    install_id: String,
    kind_name: String,
    phase_name: String,
    episode_id: String,
    reason: String,
    at_ms: i64,
    until_ms: Option<i64>,
    total: u64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Decision {
    pub decision_id: String,
    pub install_id: String,
    pub kind: String,
    /// `start`, `extended`, `end` or `alert`.
    pub phase: String,
    pub episode_id: String,
    pub reason: String,
    pub at: String,
    pub until: Option<String>,
}

pub async fn decisions(
    client: &Client,
    params: &DecisionsParams,
    scope: &Scope,
) -> Result<(Vec<Decision>, crate::summary::Meta), QueryError> {
    let mut filter = String::from(
        "at >= toDateTime64({date_from:Date}, 3)
         AND at < toDateTime64({date_to:Date} + 1, 3)",
    );
    if scope.install_id.is_some() {
        filter.push_str(" AND install_id = {install_id:String}");
    }
    if params.kind.is_some() {
        filter.push_str(" AND kind = {kind:String}");
    }
    let sql = format!(
        "SELECT decision_id, install_id, toString(kind) AS kind_name, toString(phase) AS phase_name,
                episode_id, reason, toUnixTimestamp64Milli(at) AS at_ms,
                toUnixTimestamp64Milli(until) AS until_ms, count() OVER () AS total
         FROM governance_decisions FINAL
         WHERE {filter}
         ORDER BY at DESC, decision_id
         LIMIT {{limit:UInt64}} OFFSET {{offset:UInt64}}"
    );
    let mut q = client
        .query(&sql)
        .param("date_from", params.range.from.to_string())
        .param("date_to", params.range.to.to_string())
        .param("limit", params.limit)
        .param("offset", params.offset);
    if let Some(id) = &scope.install_id {
        q = q.param("install_id", id);
    }
    if let Some(kind) = &params.kind {
        q = q.param("kind", kind);
    }
    let rows: Vec<DecisionRow> = q.fetch_all().await?;
    let total = rows.first().map_or(0, |r| r.total);
    let decisions = rows
        .into_iter()
        .map(|r| Decision {
            decision_id: r.decision_id,
            install_id: r.install_id,
            kind: r.kind_name,
            phase: r.phase_name,
            episode_id: r.episode_id,
            reason: r.reason,
            at: iso_millis(r.at_ms),
            until: r.until_ms.map(iso_millis),
        })
        .collect();
    Ok((
        decisions,
        crate::summary::Meta {
            total,
            limit: params.limit,
            offset: params.offset,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::query_of as q;

    #[test]
    fn kinds_are_checked() {
        let today = "2026-12-02".parse().unwrap();
        let p =
            DecisionsParams::parse(&q(&[("kind", "blocked"), ("install_id", "i")]), today).unwrap();
        assert_eq!(
            (p.kind.as_deref(), p.install_id.as_deref(), p.limit),
            (Some("blocked"), Some("i"), 200)
        );
        let err = DecisionsParams::parse(&q(&[("kind", "banned")]), today).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("kind must be one of rate_limited, "));
    }
}

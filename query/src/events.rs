//! `GET /provider/usage/events`: raw events of one installation, newest first.
//!
//! Parameters: `install_id` (required), `date_from`/`date_to` (default the
//! last 30 days), filters `user_hash`, `source`, `model`, `limit` (1..=1000,
//! default 100), and either `offset` (the contract's paging) or `cursor`.
//!
//! Offset paging re-counts from the top, so events arriving meanwhile shift
//! the pages (duplicates or gaps). Keyset paging does not: every answer
//! carries `meta.next_cursor`, an opaque token for "strictly after the last
//! row of this page" in the order (created_at DESC, event_id DESC). Newer
//! events sort before the cursor and never enter later pages; each page is
//! an index range read, equally fast at any depth.

use base64::Engine as _;
use chrono::NaiveDate;
use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use crate::access::Scope;
use crate::error::QueryError;
use crate::params::{self, DateRange, Filters, Query};
use crate::summary::{bind_scoped, scoped_where};

pub const MAX_LIMIT: u64 = 1000;

/// Where the next page starts: the last row of the previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at_ms: i64,
    pub event_id: String,
}

const CURSOR_VERSION: &str = "v1";

impl Cursor {
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "{CURSOR_VERSION}|{}|{}",
            self.created_at_ms, self.event_id
        ))
    }

    pub fn decode(token: &str) -> Result<Self, QueryError> {
        let malformed = || {
            QueryError::BadRequest("cursor is malformed: pass meta.next_cursor as it came".into())
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| malformed())?;
        let text = String::from_utf8(bytes).map_err(|_| malformed())?;
        let mut parts = text.splitn(3, '|');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(CURSOR_VERSION), Some(ms), Some(id)) if !id.is_empty() => Ok(Self {
                created_at_ms: ms.parse().map_err(|_| malformed())?,
                event_id: id.to_string(),
            }),
            _ => Err(malformed()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsParams {
    pub install_id: String,
    pub range: DateRange,
    pub filters: Filters,
    pub limit: u64,
    pub offset: u64,
    pub cursor: Option<Cursor>,
}

impl EventsParams {
    pub fn parse(params: &Query, today: NaiveDate) -> Result<Self, QueryError> {
        let install_id = params
            .get("install_id")
            .filter(|s| !s.is_empty())
            .cloned()
            .ok_or_else(|| QueryError::BadRequest("install_id is required".into()))?;
        let offset = params::number(params, "offset", 0)?;
        let cursor = params
            .get("cursor")
            .filter(|s| !s.is_empty())
            .map(|c| Cursor::decode(c))
            .transpose()?;
        if cursor.is_some() && offset > 0 {
            return Err(QueryError::BadRequest(
                "use either offset or cursor, not both".into(),
            ));
        }
        Ok(Self {
            install_id,
            range: DateRange::parse(params, today)?,
            filters: Filters::parse(params)?,
            limit: params::limit(params, 100, MAX_LIMIT)?,
            offset,
            cursor,
        })
    }
}

#[derive(Debug, Row, Deserialize)]
struct EventRow {
    event_id: String,
    install_id: String,
    user_hash: String,
    source: String,
    model: String,
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    created_ms: i64,
    processed_ms: Option<i64>,
    #[serde(rename = "ol")]
    over_limit: String,
    #[serde(rename = "bm")]
    billing_month: String,
}

#[derive(Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct EventItem {
    pub event_id: String,
    pub install_id: String,
    pub user_hash: String,
    pub source: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub created_at: String,
    pub processed_at: Option<String>,
    /// Why it arrived over a limit (`plan_limit_reached`, `rate_limited`,
    /// `abuse_flagged`), `null` when it did not.
    pub over_limit: Option<String>,
    /// `YYYY-MM`: the month it counts toward for caps and billing.
    pub billing_month: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventsMeta {
    pub total: u64,
    pub limit: u64,
    pub offset: u64,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// ISO 8601, UTC, milliseconds, `Z`.
pub fn iso_millis(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub async fn events(
    client: &Client,
    params: &EventsParams,
    scope: &Scope,
) -> Result<(Vec<EventItem>, EventsMeta), QueryError> {
    let filter = scoped_where("toDate(created_at)", scope, &params.filters);
    let bind = |q| bind_scoped(q, &params.range, scope, &params.filters);
    let keyset = if params.cursor.is_some() {
        " AND (created_at, event_id) < (fromUnixTimestamp64Milli({cursor_ms:Int64}, 'UTC'), {cursor_id:String})"
    } else {
        ""
    };
    let sql = format!(
        "SELECT event_id, install_id, user_hash, source, model,
                prompt_tokens, completion_tokens, total_tokens,
                toUnixTimestamp64Milli(created_at) AS created_ms,
                toUnixTimestamp64Milli(processed_at) AS processed_ms,
                toString(over_limit) AS ol, formatDateTime(billing_month, '%Y-%m') AS bm
         FROM usage_events FINAL
         WHERE {filter}{keyset}
         ORDER BY created_at DESC, event_id DESC
         LIMIT {{limit:UInt64}} OFFSET {{offset:UInt64}}"
    );
    let mut query = bind(client.query(&sql))
        .param("limit", params.limit)
        .param("offset", params.offset);
    if let Some(c) = &params.cursor {
        query = query
            .param("cursor_ms", c.created_at_ms)
            .param("cursor_id", &c.event_id);
    }
    let rows: Vec<EventRow> = query.fetch_all().await?;
    let total: u64 = bind(client.query(&format!(
        "SELECT count() FROM usage_events FINAL WHERE {filter}"
    )))
    .fetch_one()
    .await?;
    let next_cursor = (rows.len() as u64 == params.limit)
        .then(|| rows.last())
        .flatten()
        .map(|r| {
            Cursor {
                created_at_ms: r.created_ms,
                event_id: r.event_id.clone(),
            }
            .encode()
        });
    let items = rows
        .into_iter()
        .map(|r| EventItem {
            event_id: r.event_id,
            install_id: r.install_id,
            user_hash: r.user_hash,
            source: r.source,
            model: r.model,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            total_tokens: r.total_tokens,
            created_at: iso_millis(r.created_ms),
            processed_at: r.processed_ms.map(iso_millis),
            over_limit: Some(r.over_limit).filter(|o| !o.is_empty()),
            billing_month: r.billing_month,
        })
        .collect();
    Ok((
        items,
        EventsMeta {
            total,
            limit: params.limit,
            offset: params.offset,
            next_cursor,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::params::query_of as q;

    fn today() -> NaiveDate {
        "2025-11-30".parse().unwrap()
    }

    #[test]
    fn cursors_round_trip_and_tampering_is_a_400() {
        let c = Cursor {
            created_at_ms: 1_764_547_200_123,
            event_id: "evt_a|b".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        for bad in ["", "!!!", "djF8eHx5", "djJ8MXxl"] {
            assert!(
                matches!(Cursor::decode(bad), Err(QueryError::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn install_id_is_required_and_offset_excludes_cursor() {
        assert!(EventsParams::parse(&q(&[]), today()).is_err());
        let cursor = Cursor {
            created_at_ms: 1,
            event_id: "e".into(),
        }
        .encode();
        let err = EventsParams::parse(
            &q(&[("install_id", "i"), ("offset", "10"), ("cursor", &cursor)]),
            today(),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "use either offset or cursor, not both");
        let p =
            EventsParams::parse(&q(&[("install_id", "i"), ("cursor", &cursor)]), today()).unwrap();
        assert_eq!(p.cursor.unwrap().event_id, "e");
    }
}

//! `POST /api/usage/export`: CSV (the contract's header, byte for byte) or
//! JSON Lines, streamed from ClickHouse as it produces them.
//!
//! Body: `{"install_id", "date_from", "date_to", "group_by", "format"}` plus
//! the optional filters `source`, `model`, `user_hash`. `group_by` is `day`
//! (the contract's rows: one per day, user hash and source), `user`,
//! `source`, `model` or `events` (raw events); `format` is `csv` or `jsonl`.
//!
//! ClickHouse renders every line (CSV fields quoted only when they must be,
//! RFC 4180), and the bytes go to the client in the chunks ClickHouse sends,
//! through a small bounded channel: memory stays flat whatever the size, and
//! a slow client slows the query instead of filling memory. The first chunk
//! is read before answering, so a failing query is still a proper error
//! status; a failure after that cuts the transfer short (the chunked
//! encoding is not terminated), which clients report as an incomplete body.

use bytes::Bytes;
use chrono::NaiveDate;
use clickhouse::Client;
use serde::Deserialize;
use warp::http::HeaderValue;
use warp::reply::Response;
use warp::Reply;

use crate::access::Scope;
use crate::error::QueryError;
use crate::params::{DateRange, Filters, Query};
use crate::summary::{bind_scoped, scoped_where};

/// The contract's CSV header for `group_by` day, user and source.
pub const CONTRACT_HEADER: &str =
    "Date,User Hash,Source,Requests,Prompt Tokens,Completion Tokens,Total Tokens,Cost USD";
const MODEL_HEADER: &str = "Model,Requests,Prompt Tokens,Completion Tokens,Total Tokens,Cost USD";
const EVENTS_HEADER: &str = "Event ID,Install ID,User Hash,Source,Model,Prompt Tokens,Completion Tokens,Total Tokens,Cost USD,Created At,Processed At";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportGroup {
    Day,
    User,
    Source,
    Model,
    Events,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
}

/// The request body as sent; every field optional so that a missing one is
/// a clear 400 (or a default), not a deserialisation error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportBody {
    pub install_id: Option<String>,
    pub date_from: Option<String>,
    pub date_to: Option<String>,
    pub group_by: Option<String>,
    pub format: Option<String>,
    pub source: Option<String>,
    pub model: Option<String>,
    pub user_hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportParams {
    pub install_id: Option<String>,
    pub range: DateRange,
    pub group_by: ExportGroup,
    pub format: Format,
    pub filters: Filters,
}

impl ExportParams {
    pub fn parse(body: ExportBody, today: NaiveDate) -> Result<Self, QueryError> {
        let as_query = |pairs: &[(&str, &Option<String>)]| -> Query {
            pairs
                .iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
                .collect()
        };
        let query = as_query(&[
            ("date_from", &body.date_from),
            ("date_to", &body.date_to),
            ("source", &body.source),
            ("model", &body.model),
            ("user_hash", &body.user_hash),
        ]);
        let group_by = match body.group_by.as_deref() {
            None | Some("day") => ExportGroup::Day,
            Some("user") => ExportGroup::User,
            Some("source") => ExportGroup::Source,
            Some("model") => ExportGroup::Model,
            Some("events") => ExportGroup::Events,
            Some(other) => {
                return Err(QueryError::BadRequest(format!(
                    "group_by must be day, user, source, model or events, not {other:?}"
                )))
            }
        };
        let format = match body.format.as_deref() {
            None | Some("csv") => Format::Csv,
            Some("jsonl") | Some("ndjson") => Format::JsonLines,
            Some(other) => {
                return Err(QueryError::BadRequest(format!(
                    "format must be csv or jsonl, not {other:?}"
                )))
            }
        };
        Ok(Self {
            install_id: body.install_id.filter(|s| !s.is_empty()),
            range: DateRange::parse(&query, today)?,
            group_by,
            format,
            filters: Filters::parse(&query)?,
        })
    }
}

/// A DateTime64(3) as ISO 8601 with milliseconds and `Z` (NULL stays NULL).
fn iso(expr: &str) -> String {
    format!(
        "concat(formatDateTime({expr}, '%Y-%m-%dT%H:%i:%S'), '.', leftPad(toString(toUnixTimestamp64Milli({expr}) % 1000), 3, '0'), 'Z')"
    )
}

/// A string column as an RFC 4180 field: quoted only when it must be.
fn csv(expr: &str) -> String {
    format!(
        "if(match({expr}, '[\",\\r\\n]'), concat('\"', replaceAll({expr}, '\"', '\"\"'), '\"'), {expr})"
    )
}

/// The dimensions of a rollup export: (output name, expression). Inside the
/// query they are aliased `k_<name>` so that no alias shadows a column.
fn keys(group: ExportGroup) -> &'static [(&'static str, &'static str)] {
    match group {
        ExportGroup::Day => &[
            ("date", "toString(date)"),
            ("user_hash", "user_hash"),
            ("source", "toString(source)"),
        ],
        ExportGroup::User => &[("user_hash", "user_hash")],
        ExportGroup::Source => &[("source", "toString(source)")],
        ExportGroup::Model => &[("model", "toString(model)")],
        ExportGroup::Events => &[],
    }
}

/// The sums of a rollup export: (output name, inner alias, aggregate).
const SUMS: [(&str, &str, &str); 5] = [
    ("total_requests", "s_requests", "sum(requests)"),
    ("prompt_tokens", "s_prompt", "sum(prompt_tokens)"),
    (
        "completion_tokens",
        "s_completion",
        "sum(completion_tokens)",
    ),
    ("total_tokens", "s_total", "sum(total_tokens)"),
    ("estimated_cost_usd", "s_cost", "sum(cost_usd)"),
];

/// The grouped, ordered rollup rows the export is made of.
fn rollup(group: ExportGroup, filter: &str) -> String {
    let keys = keys(group);
    let named: Vec<String> = keys
        .iter()
        .map(|(n, e)| format!("{e} AS k_{n}"))
        .chain(
            SUMS.iter()
                .map(|(_, alias, agg)| format!("{agg} AS {alias}")),
        )
        .collect();
    let grouped: Vec<String> = keys.iter().map(|(n, _)| format!("k_{n}")).collect();
    format!(
        "SELECT {} FROM usage_daily FINAL WHERE {filter} GROUP BY {} ORDER BY {}",
        named.join(", "),
        grouped.join(", "),
        grouped.join(", ")
    )
}

/// The SELECT producing one CSV line per row (`csv`) or one JSON object per
/// row (`jsonl`), and the CSV header.
fn sql(params: &ExportParams, filter: &str) -> (String, &'static str) {
    let group = params.group_by;
    if group == ExportGroup::Events {
        return match params.format {
            Format::Csv => (
                format!(
                    "SELECT concat({}, ',', {}, ',', {}, ',', {}, ',', {}, ',', toString(prompt_tokens), ',',
                            toString(completion_tokens), ',', toString(total_tokens), ',', toString(cost_usd), ',',
                            {}, ',', ifNull({}, ''))
                     FROM usage_events FINAL WHERE {filter} ORDER BY install_id, toDate(created_at), created_at, event_id",
                    csv("event_id"),
                    csv("install_id"),
                    csv("user_hash"),
                    csv("toString(source)"),
                    csv("toString(model)"),
                    iso("created_at"),
                    iso("processed_at"),
                ),
                EVENTS_HEADER,
            ),
            Format::JsonLines => (
                format!(
                    "SELECT event_id, install_id, user_hash, k_source AS source, k_model AS model,
                            prompt_tokens, completion_tokens, total_tokens, k_cost AS estimated_cost_usd,
                            k_created AS created_at, k_processed AS processed_at
                     FROM (SELECT event_id, install_id, user_hash, toString(source) AS k_source,
                                  toString(model) AS k_model, prompt_tokens, completion_tokens, total_tokens,
                                  cost_usd AS k_cost, {} AS k_created, {} AS k_processed
                           FROM usage_events FINAL WHERE {filter} ORDER BY install_id, toDate(created_at), created_at, event_id)",
                    iso("created_at"),
                    iso("processed_at"),
                ),
                "",
            ),
        };
    }
    let rows = rollup(group, filter);
    match params.format {
        Format::Csv => {
            let present = |name: &str| keys(group).iter().any(|(n, _)| *n == name);
            let (dimensions, header): (Vec<String>, &'static str) = if group == ExportGroup::Model {
                (vec![csv("k_model")], MODEL_HEADER)
            } else {
                (
                    ["date", "user_hash", "source"]
                        .iter()
                        .map(|n| {
                            if present(n) {
                                csv(&format!("k_{n}"))
                            } else {
                                "''".to_string()
                            }
                        })
                        .collect(),
                    CONTRACT_HEADER,
                )
            };
            let sums: Vec<String> = SUMS
                .iter()
                .map(|(_, alias, _)| format!("toString({alias})"))
                .collect();
            let fields: Vec<String> = dimensions.into_iter().chain(sums).collect();
            (
                format!("SELECT concat({}) FROM ({rows})", fields.join(", ',', ")),
                header,
            )
        }
        Format::JsonLines => {
            let columns: Vec<String> = keys(group)
                .iter()
                .map(|(n, _)| format!("k_{n} AS {n}"))
                .chain(
                    SUMS.iter()
                        .map(|(name, alias, _)| format!("{alias} AS {name}")),
                )
                .collect();
            (format!("SELECT {} FROM ({rows})", columns.join(", ")), "")
        }
    }
}

/// Starts the export and answers with its streamed body.
pub async fn export(
    client: &Client,
    params: &ExportParams,
    scope: &Scope,
    today: NaiveDate,
) -> Result<Response, QueryError> {
    let date_column = if params.group_by == ExportGroup::Events {
        "toDate(created_at)"
    } else {
        "date"
    };
    let filter = scoped_where(date_column, scope, &params.filters);
    let (select, header) = sql(params, &filter);
    let (format, content_type, extension) = match params.format {
        Format::Csv => ("TabSeparatedRaw", "text/csv; charset=utf-8", "csv"),
        Format::JsonLines => ("JSONEachRow", "application/x-ndjson", "jsonl"),
    };
    // Uncompressed: the bytes are passed through as they come, and LZ4 on
    // both ends of a local link cost more CPU than they save.
    let client = client
        .clone()
        .with_compression(clickhouse::Compression::None);
    let query = bind_scoped(client.query(&select), &params.range, scope, &params.filters)
        // Counts as JSON numbers, as in every other answer.
        .with_setting("output_format_json_quote_64bit_integers", "0")
        .with_setting("output_format_json_quote_decimals", "0");
    let mut cursor = query.fetch_bytes(format)?;
    // Read before answering: a failing query is still a proper error status.
    let first = cursor.next().await?;
    let prefix = if header.is_empty() {
        Bytes::new()
    } else {
        Bytes::from(format!("{header}\n"))
    };

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        for chunk in [Some(prefix), first].into_iter().flatten() {
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
        loop {
            match cursor.next().await {
                Ok(Some(chunk)) => {
                    if tx.send(Ok(chunk)).await.is_err() {
                        // The client went away: dropping the cursor cancels the query.
                        return;
                    }
                }
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!(%err, "export failed mid-stream; the transfer is cut short");
                    let _ = tx.send(Err(std::io::Error::other(err.to_string()))).await;
                    return;
                }
            }
        }
    });
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut response = warp::reply::stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static(content_type));
    let disposition = format!("attachment; filename=\"usage-export-{today}.{extension}\"");
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        headers.insert("content-disposition", v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn today() -> NaiveDate {
        "2025-11-30".parse().unwrap()
    }

    #[test]
    fn defaults_are_a_daily_csv_of_the_last_30_days() {
        let p = ExportParams::parse(ExportBody::default(), today()).unwrap();
        assert_eq!((p.group_by, p.format), (ExportGroup::Day, Format::Csv));
        assert_eq!(p.range.from.to_string(), "2025-11-01");
    }

    #[test]
    fn bad_bodies_say_what_to_fix() {
        let bad = |b: ExportBody| ExportParams::parse(b, today()).unwrap_err().to_string();
        assert_eq!(
            bad(ExportBody {
                group_by: Some("week".into()),
                ..Default::default()
            }),
            "group_by must be day, user, source, model or events, not \"week\""
        );
        assert_eq!(
            bad(ExportBody {
                format: Some("xlsx".into()),
                ..Default::default()
            }),
            "format must be csv or jsonl, not \"xlsx\""
        );
        assert!(bad(ExportBody {
            date_from: Some("2025-11-10".into()),
            date_to: Some("2025-11-01".into()),
            ..Default::default()
        })
        .contains("before"));
    }

    #[test]
    fn the_csv_header_is_the_contracts() {
        assert_eq!(
            CONTRACT_HEADER,
            "Date,User Hash,Source,Requests,Prompt Tokens,Completion Tokens,Total Tokens,Cost USD"
        );
    }
}

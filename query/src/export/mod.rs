//! `POST /api/usage/export`: CSV (the contract's header, byte for byte) or
//! JSON Lines, streamed from ClickHouse as it produces them.
//!
//! Body: `{"install_id", "date_from", "date_to", "group_by", "format"}` plus
//! the optional filters `source`, `model`, `user_hash`. `group_by` is `day`
//! (the contract's rows: one per day, user hash and source), `user`,
//! `source`, `model` or `events` (raw events); `format` is `csv` or `jsonl`.
//! JSON Lines always carry the overage (`over_limit_requests`,
//! `over_limit_tokens`; `over_limit` per raw event); CSV keeps the
//! contract's columns byte for byte unless `"include_over_limit": true`
//! appends them.
//!
//! Grouped rows are rendered by ClickHouse (CSV fields quoted only when they
//! must be, RFC 4180) and passed through in the chunks it sends; raw events
//! are read as RowBinary and rendered here, which spares ClickHouse `FINAL`
//! (see `raw_events`). Either way the bytes go to the client through a small
//! bounded channel: memory stays flat whatever the size, and a slow client
//! slows the query instead of filling memory. The first rows are read before
//! answering, so a failing query is still a proper error status; a failure
//! after that cuts the transfer short (the chunked encoding is not
//! terminated), which clients report as an incomplete body.

use bytes::{BufMut, Bytes, BytesMut};
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

mod raw_events;

use raw_events::{RawEvent, Repeats};

/// The contract's CSV header for `group_by` day, user and source.
pub const CONTRACT_HEADER: &str =
    "Date,User Hash,Source,Requests,Prompt Tokens,Completion Tokens,Total Tokens,Cost USD";
const MODEL_HEADER: &str = "Model,Requests,Prompt Tokens,Completion Tokens,Total Tokens,Cost USD";
/// Appended to a CSV header with `include_over_limit`.
const OVER_LIMIT_HEADER: &str = ",Over Limit Requests,Over Limit Tokens";

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
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
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
    /// CSV: append the over-limit columns to the contract's.
    pub include_over_limit: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportParams {
    pub install_id: Option<String>,
    pub range: DateRange,
    pub group_by: ExportGroup,
    pub format: Format,
    pub filters: Filters,
    pub include_over_limit: bool,
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
            include_over_limit: body.include_over_limit.unwrap_or(false),
        })
    }
}

/// A column as an RFC 4180 field: quoted only when it must be. (A search
/// for the four bytes, not a regular expression: a fifth of the export's
/// ClickHouse time over 9M rows.)
fn csv(expr: &str) -> String {
    format!(
        "if(multiSearchAny(toString({expr}), ['\"', ',', '\\r', '\\n']), \
         concat('\"', replaceAll(toString({expr}), '\"', '\"\"'), '\"'), toString({expr}))"
    )
}

/// The dimensions of a rollup export: (output name, expression). Inside the
/// query they are aliased `k_<name>` so that no alias shadows a column.
/// They are grouped and sorted as stored (a date, a LowCardinality string),
/// and made text only for the lines: grouping by their text cost a tenth
/// more.
fn keys(group: ExportGroup) -> &'static [(&'static str, &'static str)] {
    match group {
        ExportGroup::Day => &[
            ("date", "date"),
            ("user_hash", "user_hash"),
            ("source", "source"),
        ],
        ExportGroup::User => &[("user_hash", "user_hash")],
        ExportGroup::Source => &[("source", "source")],
        ExportGroup::Model => &[("model", "model")],
        ExportGroup::Events => &[],
    }
}

/// The sums of a rollup export: (output name, inner alias, aggregate). The
/// contract's CSV has the first five.
const SUMS: [(&str, &str, &str); 7] = [
    ("total_requests", "s_requests", "sum(requests)"),
    ("prompt_tokens", "s_prompt", "sum(prompt_tokens)"),
    (
        "completion_tokens",
        "s_completion",
        "sum(completion_tokens)",
    ),
    ("total_tokens", "s_total", "sum(total_tokens)"),
    ("estimated_cost_usd", "s_cost", "sum(cost_usd)"),
    ("over_limit_requests", "s_over", "sum(over_limit_requests)"),
    (
        "over_limit_tokens",
        "s_over_tokens",
        "sum(over_limit_tokens)",
    ),
];
const CONTRACT_SUMS: usize = 5;

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
        "SELECT {} FROM usage_daily WHERE {filter} GROUP BY {} ORDER BY {}",
        named.join(", "),
        grouped.join(", "),
        grouped.join(", ")
    )
}

/// The SELECT producing one CSV line per grouped row (`csv`) or one JSON
/// object per row (`jsonl`), and the CSV header. Raw events are rendered
/// in [`raw_events`] instead.
fn sql(params: &ExportParams, filter: &str) -> (String, String) {
    let group = params.group_by;
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
                            if *n == "date" && present(n) {
                                // A date's text never needs quotes.
                                "toString(k_date)".to_string()
                            } else if present(n) {
                                csv(&format!("k_{n}"))
                            } else {
                                "''".to_string()
                            }
                        })
                        .collect(),
                    CONTRACT_HEADER,
                )
            };
            let sums_shown = if params.include_over_limit {
                SUMS.len()
            } else {
                CONTRACT_SUMS
            };
            let sums: Vec<String> = SUMS[..sums_shown]
                .iter()
                .map(|(_, alias, _)| format!("toString({alias})"))
                .collect();
            let fields: Vec<String> = dimensions.into_iter().chain(sums).collect();
            let mut header = header.to_string();
            if params.include_over_limit {
                header.push_str(OVER_LIMIT_HEADER);
            }
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
            (
                format!("SELECT {} FROM ({rows})", columns.join(", ")),
                String::new(),
            )
        }
    }
}

/// The body's chunks on their way to the client.
type Chunks = tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Bytes rendered before they are handed to the client, for raw events.
const CHUNK_BYTES: usize = 64 * 1024;

/// Starts the export and answers with its streamed body.
pub async fn export(
    client: &Client,
    params: &ExportParams,
    scope: &Scope,
    today: NaiveDate,
) -> Result<Response, QueryError> {
    // Uncompressed: LZ4 on both ends of a local link costs more CPU than it
    // saves, and the two cores are shared with ClickHouse.
    let client = client
        .clone()
        .with_compression(clickhouse::Compression::None);
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    if params.group_by == ExportGroup::Events {
        start_raw_events(&client, params, scope, tx).await?;
    } else {
        start_rollup(&client, params, scope, tx).await?;
    }
    let (content_type, extension) = match params.format {
        Format::Csv => ("text/csv; charset=utf-8", "csv"),
        Format::JsonLines => ("application/x-ndjson", "jsonl"),
    };
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

/// Hands one chunk to the client; false once it went away (dropping the
/// cursor then cancels the query).
async fn send(tx: &Chunks, chunk: Bytes) -> bool {
    tx.send(Ok(chunk)).await.is_ok()
}

/// Cuts the transfer short: the chunked encoding is not terminated, which
/// clients report as an incomplete body.
async fn fail(tx: &Chunks, err: clickhouse::error::Error) {
    tracing::warn!(%err, "export failed mid-stream; the transfer is cut short");
    let _ = tx.send(Err(std::io::Error::other(err.to_string()))).await;
}

/// Grouped rows, rendered by ClickHouse and passed through as they come.
async fn start_rollup(
    client: &Client,
    params: &ExportParams,
    scope: &Scope,
    tx: Chunks,
) -> Result<(), QueryError> {
    let filter = scoped_where("date", scope, &params.filters);
    let (select, header) = sql(params, &filter);
    let format = match params.format {
        Format::Csv => "TabSeparatedRaw",
        Format::JsonLines => "JSONEachRow",
    };
    let query = bind_scoped(client.query(&select), &params.range, scope, &params.filters)
        // Counts as JSON numbers, as in every other answer.
        .with_setting("output_format_json_quote_64bit_integers", "0")
        .with_setting("output_format_json_quote_decimals", "0");
    let mut cursor = query.fetch_bytes(format)?;
    // Read before answering: a failing query is still a proper error status.
    let first = cursor.next().await?;
    let prefix = (!header.is_empty()).then(|| Bytes::from(format!("{header}\n")));
    tokio::spawn(async move {
        for chunk in [prefix, first].into_iter().flatten() {
            if !send(&tx, chunk).await {
                return;
            }
        }
        loop {
            match cursor.next().await {
                Ok(Some(chunk)) => {
                    if !send(&tx, chunk).await {
                        return;
                    }
                }
                Ok(None) => return,
                Err(err) => return fail(&tx, err).await,
            }
        }
    });
    Ok(())
}

/// Raw events, read as RowBinary in the table's order, copies dropped and
/// lines rendered here (see [`raw_events`]).
async fn start_raw_events(
    client: &Client,
    params: &ExportParams,
    scope: &Scope,
    tx: Chunks,
) -> Result<(), QueryError> {
    let filter = scoped_where("toDate(created_at)", scope, &params.filters);
    let select = format!(
        "SELECT {} FROM usage_events WHERE {filter} {}",
        raw_events::COLUMNS,
        raw_events::ORDER
    );
    // Plain RowBinary, without the per-row type checks: the hot loop of the
    // export. The row type is pinned by the export's integration test.
    let client = client.clone().with_validation(false);
    let mut cursor = bind_scoped(client.query(&select), &params.range, scope, &params.filters)
        .fetch::<RawEvent<'static>>()?;
    let write = match (params.format, params.include_over_limit) {
        (Format::Csv, false) => raw_events::write_csv,
        (Format::Csv, true) => raw_events::write_csv_with_over_limit,
        (Format::JsonLines, _) => raw_events::write_json_line,
    };
    let mut out = BytesMut::with_capacity(2 * CHUNK_BYTES);
    if params.format == Format::Csv {
        out.put_slice(raw_events::CSV_HEADER.as_bytes());
        if params.include_over_limit {
            out.put_slice(b",Over Limit");
        }
        out.put_u8(b'\n');
    }
    let mut repeats = Repeats::default();
    // Read before answering: a failing query is still a proper error status.
    if let Some(first) = cursor.next().await? {
        repeats.is_repeat(&first);
        write(&mut out, &first);
    }
    tokio::spawn(async move {
        let mut copies = 0u64;
        loop {
            match cursor.next().await {
                Ok(Some(event)) if repeats.is_repeat(&event) => copies += 1,
                Ok(Some(event)) => write(&mut out, &event),
                Ok(None) => break,
                Err(err) => return fail(&tx, err).await,
            }
            if out.len() >= CHUNK_BYTES && !send(&tx, out.split().freeze()).await {
                return;
            }
        }
        if copies > 0 {
            tracing::info!(
                copies,
                "raw export dropped unmerged copies of stored events"
            );
        }
        if !out.is_empty() {
            send(&tx, out.freeze()).await;
        }
    });
    Ok(())
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

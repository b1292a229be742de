//! What a build will read and write, before it writes anything.
//!
//! The raw events' retention (90 days) bounds what any rebuild recomputes:
//! a rollup row is the sum of raw events, and rows of days whose raw
//! events may already be expiring cannot be recomputed from them. So the
//! scope's first day is at most 89 days ago; older rollups are kept as the
//! live tables hold them, and the plan says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{Duration, NaiveDate, Utc};

use crate::config::Source;
use crate::error::RebuildError;
use crate::scope::Scope;
use crate::state::TABLES;
use crate::{topic, Ctx};

/// Days of raw events a rebuild may recompute (the raw table's TTL is
/// 90 days; the oldest of them may be expiring).
pub const RAW_DAYS: i64 = 89;

#[derive(Debug, Clone)]
pub struct Plan {
    pub source: Source,
    /// The scope as asked, with its first day clipped to the raw retention.
    pub scope: Scope,
    pub clipped_since: Option<NaiveDate>,
    /// Per partition of the events topic: (log start, end).
    pub marks: BTreeMap<i32, (i64, i64)>,
    /// The live group's committed offsets.
    pub committed: BTreeMap<i32, i64>,
    /// Messages the bulk phase reads (topic source).
    pub messages: u64,
    /// Live raw rows in the scope (the table source reads them; for the
    /// topic source, what the live table holds to compare with).
    pub live_rows_in_scope: u64,
    /// Per live table: (rows, bytes on disk).
    pub live_sizes: BTreeMap<String, (u64, u64)>,
    pub free_bytes: u64,
}

/// The oldest first day a rebuild may have.
pub fn oldest_day() -> NaiveDate {
    Utc::now().date_naive() - Duration::days(RAW_DAYS)
}

impl Plan {
    pub async fn make(ctx: &Ctx, asked: &Scope, source: Source) -> Result<Self, RebuildError> {
        let mut scope = asked.clone();
        let oldest = oldest_day();
        let clipped_since = match scope.since {
            Some(s) if s >= oldest => None,
            _ => {
                scope.since = Some(oldest);
                Some(oldest)
            }
        };
        if scope.until.is_some_and(|u| u < scope.since_or_min()) {
            return Err(RebuildError::refused(format!(
                "nothing to rebuild: --until {} is before the first day a rebuild can recompute ({})",
                scope.until_or_max(),
                scope.since_or_min()
            )));
        }
        let kafka = ctx.kafka.clone();
        let group = ctx.group.clone();
        let (marks, committed) = tokio::task::spawn_blocking(move || {
            let marks = topic::watermarks(&kafka)?;
            let committed = topic::committed(&kafka, &group, &marks)?;
            Ok::<_, RebuildError>((marks, committed))
        })
        .await
        .map_err(|e| RebuildError::refused(format!("Kafka metadata task failed: {e}")))??;
        if source == Source::Topic {
            check_topic_covers(ctx, &marks, &scope).await?;
        }
        let messages = marks.values().map(|(lo, hi)| (hi - lo).max(0) as u64).sum();
        let live_rows_in_scope: u64 = scope
            .bind(ctx.live.query(&format!(
                "SELECT count() FROM usage_events FINAL WHERE {}",
                Scope::sql("toDate(created_at)")
            )))
            .fetch_one()
            .await?;
        let sizes: Vec<(String, u64, u64)> = ctx
            .live
            .query(
                "SELECT table, sum(rows), sum(bytes_on_disk) FROM system.parts
                 WHERE database = currentDatabase() AND active AND table IN {tables:Array(String)}
                 GROUP BY table",
            )
            .param("tables", &TABLES[..])
            .fetch_all()
            .await?;
        let free_bytes: u64 = ctx
            .live
            .query("SELECT min(free_space) FROM system.disks")
            .fetch_one()
            .await?;
        Ok(Self {
            source,
            scope,
            clipped_since,
            marks,
            committed,
            messages,
            live_rows_in_scope,
            live_sizes: sizes.into_iter().map(|(t, r, b)| (t, (r, b))).collect(),
            free_bytes,
        })
    }

    /// Bytes the shadow tables need for the scope, from the live tables'
    /// bytes per row.
    pub fn bytes_needed(&self) -> u64 {
        let (raw_rows, raw_bytes) = self
            .live_sizes
            .get("usage_events")
            .copied()
            .unwrap_or((0, 0));
        let per_row = raw_bytes as f64 / raw_rows.max(1) as f64;
        let scoped = self.live_rows_in_scope.max(match self.source {
            Source::Topic => self.messages,
            Source::Table => 0,
        }) as f64;
        let rollups: u64 = self
            .live_sizes
            .iter()
            .filter(|(t, _)| t.as_str() != "usage_events")
            .map(|(_, (_, b))| *b)
            .sum();
        let fraction = (scoped / raw_rows.max(1) as f64).min(1.0);
        (scoped * per_row + rollups as f64 * fraction) as u64
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "rebuild plan");
        let _ = writeln!(out, "  scope:   {}", self.scope.describe());
        if let Some(d) = self.clipped_since {
            let _ = writeln!(
                out,
                "           (from {d}: the raw events keep 90 days; rollups of earlier days stay as they are)"
            );
        }
        let _ = writeln!(
            out,
            "  source:  {}",
            match self.source {
                Source::Topic => "the events topic (every copy of every event; first copy wins)",
                Source::Table => "the live raw table (usage_events FINAL), re-priced",
            }
        );
        let _ = writeln!(out, "  reads:");
        match self.source {
            Source::Topic => {
                for (p, (lo, hi)) in &self.marks {
                    let _ = writeln!(
                        out,
                        "    partition {p:>3}: offsets {lo}..{hi} ({} messages)",
                        hi - lo
                    );
                }
                let _ = writeln!(
                    out,
                    "    {} messages in all (events outside the scope are read and skipped)",
                    self.messages
                );
            }
            Source::Table => {
                let _ = writeln!(
                    out,
                    "    {} live raw rows in the scope",
                    self.live_rows_in_scope
                );
            }
        }
        let _ = writeln!(
            out,
            "    then what arrives meanwhile, from the topic, until the swap"
        );
        let _ = writeln!(
            out,
            "  builds:  {} in the shadow database",
            TABLES.join(", ")
        );
        let _ = writeln!(
            out,
            "  live:    {} raw rows in the scope now",
            self.live_rows_in_scope
        );
        for (table, (rows, bytes)) in &self.live_sizes {
            let _ = writeln!(
                out,
                "           {table}: {rows} rows, {}",
                human_bytes(*bytes)
            );
        }
        let _ = writeln!(
            out,
            "  disk:    about {} for the build ({} free); at the swap, rows outside the scope are \
             copied (whole months hard-linked, no extra disk)",
            human_bytes(self.bytes_needed()),
            human_bytes(self.free_bytes)
        );
        out
    }
}

/// The topic source needs every event of the scope: refused when the
/// topic's retention removed events received on or after the scope's
/// first day.
async fn check_topic_covers(
    ctx: &Ctx,
    marks: &BTreeMap<i32, (i64, i64)>,
    scope: &Scope,
) -> Result<(), RebuildError> {
    let trimmed: BTreeMap<i32, (i64, i64)> = marks
        .iter()
        .filter(|(_, (lo, hi))| *lo > 0 && lo < hi)
        .map(|(p, (lo, _))| (*p, (*lo, lo + 1)))
        .collect();
    let emptied = marks.iter().any(|(_, (lo, hi))| *lo > 0 && lo == hi);
    if trimmed.is_empty() && !emptied {
        return Ok(());
    }
    let kafka = ctx.kafka.clone();
    let first_received = tokio::task::spawn_blocking(move || {
        let mut latest = 0i64;
        topic::read_ranges(
            &kafka,
            "usage-rebuild-plan",
            &trimmed,
            |_, _, _, payload| {
                if let Some(e) = payload.and_then(|b| {
                    <usage_schemas::UsageEvent as usage_schemas::AvroRecord>::from_wire(b).ok()
                }) {
                    latest = latest.max(e.received_at);
                }
                std::ops::ControlFlow::Continue(())
            },
        )?;
        Ok::<_, RebuildError>(latest)
    })
    .await
    .map_err(|e| RebuildError::refused(format!("Kafka read task failed: {e}")))??;
    let kept_from = chrono::DateTime::from_timestamp_millis(first_received)
        .map(|t| t.date_naive())
        .unwrap_or_else(|| Utc::now().date_naive());
    if emptied || scope.since_or_min() <= kept_from {
        return Err(RebuildError::refused(format!(
            "the events topic no longer holds every event of the scope (retention removed what \
             arrived before {kept_from}): rebuild with --since {} or later, or with --source table",
            kept_from + Duration::days(1)
        )));
    }
    Ok(())
}

pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

/// The columns of `usage_events`, in table order (and in the order of
/// `UsageEventRow`, which a test checks).
pub const RAW_COLUMNS: [&str; 20] = [
    "event_id",
    "install_id",
    "account_id",
    "wp_site_id",
    "user_hash",
    "source",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "context",
    "created_at",
    "processed_at",
    "batch_sent_at",
    "received_at",
    "signature_scheme",
    "gateway_instance",
    "over_limit",
    "billing_month",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_columns_are_the_rows_fields() {
        let names = <usage_schemas::rows::UsageEventRow as clickhouse::Row>::COLUMN_NAMES;
        assert_eq!(&RAW_COLUMNS[..], names);
    }

    #[test]
    fn bytes_read_as_people_say_them() {
        assert_eq!(human_bytes(0), "0.0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}

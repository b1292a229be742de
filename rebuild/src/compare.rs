//! Shadow against live, in the rebuild's scope: per (installation, day)
//! of `usage_daily`, requests, tokens and cost; totals; installations one
//! side has and the other lacks. Every difference is listed with what
//! explains it, or marked unexplained:
//!
//! - `repriced`: requests and tokens agree, and the shadow's cost is what
//!   the live row's tokens cost at today's `model_prices` (a retroactive
//!   price change);
//! - `in_flight` (only when not fenced): the live side has more, and the
//!   live processors wrote that installation's partition during the
//!   compare, so the live tables moved on;
//! - anything else is `unexplained`, and the swap refuses it unless forced.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use chrono::NaiveDate;
use clickhouse::Row;
use serde::{Deserialize, Serialize};
use usage_processors::pricing::PriceTable;
use usage_service_kit::kafka::partition_for_key;

use crate::error::RebuildError;
use crate::scope::Scope;
use crate::state::RebuildState;
use crate::Ctx;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    pub requests: u64,
    pub total_tokens: u64,
    /// USD × 10^12.
    pub cost: i128,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Explanation {
    Repriced,
    InFlight,
    Unexplained,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    pub install_id: String,
    pub date: NaiveDate,
    pub live: Figures,
    pub shadow: Figures,
    pub explanation: Explanation,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub scope: Scope,
    pub fenced: bool,
    pub rows_compared: u64,
    pub live: Figures,
    pub shadow: Figures,
    pub differences: Vec<Difference>,
    pub repriced: usize,
    pub in_flight: usize,
    pub unexplained: usize,
    /// Installations with rows on one side only.
    pub missing_in_shadow: Vec<String>,
    pub extra_in_shadow: Vec<String>,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.unexplained == 0
    }

    fn count(&mut self) {
        let n = |e: Explanation| {
            self.differences
                .iter()
                .filter(|d| d.explanation == e)
                .count()
        };
        (self.repriced, self.in_flight, self.unexplained) = (
            n(Explanation::Repriced),
            n(Explanation::InFlight),
            n(Explanation::Unexplained),
        );
    }

    /// An unexplained difference where the live side has more, in a
    /// partition the live processors wrote during an unfenced compare, is
    /// the live tables moving on.
    pub fn mark_in_flight(&mut self, moved: &BTreeSet<i32>, partitions: i32) {
        for d in &mut self.differences {
            if d.explanation == Explanation::Unexplained
                && d.shadow.requests < d.live.requests
                && moved.contains(&partition_for_key(d.install_id.as_bytes(), partitions))
            {
                d.explanation = Explanation::InFlight;
            }
        }
        self.count();
    }
}

#[derive(Debug, Row, Deserialize)]
struct KeyRow {
    install_id: String,
    #[serde(with = "clickhouse::serde::chrono::date")]
    date: NaiveDate,
    // Live then shadow: requests, tokens, cost, rows.
    lr: u64,
    lt: u64,
    lc: i128,
    sr: u64,
    st: u64,
    sc: i128,
    #[allow(dead_code)]
    ln: u64,
    #[allow(dead_code)]
    sn: u64,
}

/// Differences listed at most (the totals cover every row).
const MAX_DIFFERENCES: usize = 100_000;

#[derive(Debug, Row, Deserialize)]
struct PricedRow {
    install_id: String,
    #[serde(with = "clickhouse::serde::chrono::date")]
    date: NaiveDate,
    model: String,
    prompt: u64,
    completion: u64,
}

/// Compares the shadow database's `usage_daily` with the live one over
/// `state.scope` (unfenced, [`Report::mark_in_flight`] then tells what the
/// live processors wrote meanwhile).
pub async fn compare(
    ctx: &Ctx,
    state: &RebuildState,
    fenced: bool,
) -> Result<Report, RebuildError> {
    let scope = &state.scope;
    let both = format!(
        "SELECT 0 AS side, install_id, date, requests AS r, total_tokens AS t, cost_usd AS c
         FROM {}.usage_daily WHERE {scoped}
         UNION ALL
         SELECT 1 AS side, install_id, date, requests, total_tokens, cost_usd
         FROM {}.usage_daily WHERE {scoped}",
        ctx.live_db,
        ctx.shadow_db,
        scoped = Scope::sql("date")
    );
    let per_key = format!(
        "SELECT install_id, date, sumIf(r, side = 0) AS lr, sumIf(t, side = 0) AS lt, sumIf(c, side = 0) AS lc,
                sumIf(r, side = 1) AS sr, sumIf(t, side = 1) AS st, sumIf(c, side = 1) AS sc,
                countIf(side = 0) AS ln, countIf(side = 1) AS sn
         FROM ({both}) GROUP BY install_id, date"
    );
    let rows: Vec<KeyRow> = scope
        .bind(ctx.server.query(&format!(
            "SELECT * FROM ({per_key}) WHERE lr != sr OR lt != st OR lc != sc
             ORDER BY install_id, date LIMIT {MAX_DIFFERENCES}"
        )))
        .fetch_all()
        .await?;
    let (keys, lr, lt, lc, sr, st, sc): (u64, u64, u64, i128, u64, u64, i128) = scope
        .bind(ctx.server.query(&format!(
            "SELECT count(), sum(lr), sum(lt), sum(lc), sum(sr), sum(st), sum(sc) FROM ({per_key})"
        )))
        .fetch_one()
        .await?;
    let one_sided: Vec<(String, u64, u64)> = scope
        .bind(ctx.server.query(&format!(
            "SELECT install_id, countIf(side = 0), countIf(side = 1) FROM ({both})
             GROUP BY install_id HAVING countIf(side = 0) = 0 OR countIf(side = 1) = 0
             ORDER BY install_id"
        )))
        .fetch_all()
        .await?;
    let prices = PriceTable::load(&ctx.live).await?;
    let mut report = Report {
        scope: scope.clone(),
        fenced,
        rows_compared: keys,
        live: Figures {
            requests: lr,
            total_tokens: lt,
            cost: lc,
        },
        shadow: Figures {
            requests: sr,
            total_tokens: st,
            cost: sc,
        },
        differences: Vec::new(),
        repriced: 0,
        in_flight: 0,
        unexplained: 0,
        missing_in_shadow: Vec::new(),
        extra_in_shadow: Vec::new(),
    };
    let mut cost_only = Vec::new();
    for r in &rows {
        let live = Figures {
            requests: r.lr,
            total_tokens: r.lt,
            cost: r.lc,
        };
        let shadow = Figures {
            requests: r.sr,
            total_tokens: r.st,
            cost: r.sc,
        };
        if live == shadow {
            continue;
        }
        let counts_agree =
            live.requests == shadow.requests && live.total_tokens == shadow.total_tokens;
        if counts_agree {
            cost_only.push((r.install_id.clone(), r.date));
        }
        report.differences.push(Difference {
            install_id: r.install_id.clone(),
            date: r.date,
            live,
            shadow,
            explanation: Explanation::Unexplained,
        });
    }
    // A cost-only difference is a re-pricing when the live row's tokens
    // cost, at today's prices, what the shadow says.
    if !cost_only.is_empty() {
        let repriced = live_costs_today(ctx, &cost_only, &prices).await?;
        for d in &mut report.differences {
            if d.live.requests == d.shadow.requests
                && d.live.total_tokens == d.shadow.total_tokens
                && repriced.get(&(d.install_id.clone(), d.date)) == Some(&d.shadow.cost)
            {
                d.explanation = Explanation::Repriced;
            }
        }
    }
    report.count();
    for (install, live_rows, shadow_rows) in one_sided {
        if shadow_rows == 0 {
            report.missing_in_shadow.push(install);
        } else if live_rows == 0 {
            report.extra_in_shadow.push(install);
        }
    }
    Ok(report)
}

/// What the live rows of these (installation, day) pairs cost at today's
/// prices (exact for prices of at most 9 decimals per 1,000 tokens).
async fn live_costs_today(
    ctx: &Ctx,
    keys: &[(String, NaiveDate)],
    prices: &PriceTable,
) -> Result<BTreeMap<(String, NaiveDate), i128>, RebuildError> {
    let mut out = BTreeMap::new();
    for chunk in keys.chunks(1_000) {
        let param: Vec<(String, String)> = chunk
            .iter()
            .map(|(i, d)| (i.clone(), d.to_string()))
            .collect();
        let rows: Vec<PricedRow> = ctx
            .live
            .query(
                "SELECT install_id, date, model, sum(prompt_tokens) AS prompt, sum(completion_tokens) AS completion
                 FROM usage_daily WHERE (install_id, date) IN {keys:Array(Tuple(String, Date))}
                 GROUP BY install_id, date, model",
            )
            .param("keys", param)
            .fetch_all()
            .await?;
        for r in rows {
            let p = prices.price(&r.model, r.date);
            let cost = p.map_or(0, |p| {
                let scaled = i128::from(r.prompt) * i128::from(p.prompt_per_1k)
                    + i128::from(r.completion) * i128::from(p.completion_per_1k);
                (scaled + 500) / 1000
            });
            *out.entry((r.install_id, r.date)).or_insert(0) += cost;
        }
    }
    Ok(out)
}

fn usd(cost: i128) -> String {
    let sign = if cost < 0 { "-" } else { "" };
    let c = cost.unsigned_abs();
    format!(
        "{sign}{}.{:012}",
        c / 1_000_000_000_000,
        c % 1_000_000_000_000
    )
}

impl Report {
    pub fn render(&self, show: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "compare: {} (installation, day) rows in {}{}",
            self.rows_compared,
            self.scope.describe(),
            if self.fenced {
                ", processors fenced"
            } else {
                ""
            }
        );
        let line = |f: &Figures| {
            format!(
                "requests {:>12}  tokens {:>14}  cost {:>22} USD",
                f.requests,
                f.total_tokens,
                usd(f.cost)
            )
        };
        let _ = writeln!(out, "  live:   {}", line(&self.live));
        let _ = writeln!(out, "  shadow: {}", line(&self.shadow));
        let _ = writeln!(
            out,
            "  differences: {} ({} re-priced, {} in flight, {} unexplained)",
            self.differences.len(),
            self.repriced,
            self.in_flight,
            self.unexplained
        );
        for d in self.differences.iter().take(show) {
            let _ = writeln!(
                out,
                "    {} {}  requests {} -> {}  tokens {} -> {}  cost {} -> {}  {:?}",
                d.install_id,
                d.date,
                d.live.requests,
                d.shadow.requests,
                d.live.total_tokens,
                d.shadow.total_tokens,
                usd(d.live.cost),
                usd(d.shadow.cost),
                d.explanation
            );
        }
        if self.differences.len() > show {
            let _ = writeln!(
                out,
                "    ... {} more (all in the JSON report)",
                self.differences.len() - show
            );
        }
        if !self.missing_in_shadow.is_empty() {
            let _ = writeln!(
                out,
                "  installations only live: {}",
                self.missing_in_shadow.join(", ")
            );
        }
        if !self.extra_in_shadow.is_empty() {
            let _ = writeln!(
                out,
                "  installations only in the shadow: {}",
                self.extra_in_shadow.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "  verdict: {}",
            if self.clean() {
                "every difference is explained"
            } else {
                "UNEXPLAINED differences: the swap refuses them (unless --force)"
            }
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_live_side_ahead_in_a_moved_partition_is_in_flight() {
        let f = |requests| Figures {
            requests,
            total_tokens: requests,
            cost: 0,
        };
        let d = |install: &str, live, shadow| Difference {
            install_id: install.into(),
            date: "2026-12-08".parse().unwrap(),
            live: f(live),
            shadow: f(shadow),
            explanation: Explanation::Unexplained,
        };
        let mut r = Report {
            scope: Scope::default(),
            fenced: false,
            rows_compared: 3,
            live: f(0),
            shadow: f(0),
            differences: vec![d("a", 5, 3), d("a", 3, 5), d("b", 5, 3)],
            repriced: 0,
            in_flight: 0,
            unexplained: 3,
            missing_in_shadow: vec![],
            extra_in_shadow: vec![],
        };
        let pa = partition_for_key(b"a", 4);
        let pb = partition_for_key(b"b", 4);
        let moved: BTreeSet<i32> = [pa].into();
        r.mark_in_flight(&moved, 4);
        assert_eq!(r.differences[0].explanation, Explanation::InFlight);
        assert_eq!(r.differences[1].explanation, Explanation::Unexplained);
        let b_moved = pb == pa;
        assert_eq!(
            r.differences[2].explanation == Explanation::InFlight,
            b_moved
        );
        assert_eq!(r.in_flight + r.unexplained, 3);
        assert!(!r.clean());
    }

    #[test]
    fn costs_print_as_exact_usd() {
        assert_eq!(usd(37_500_000), "0.000037500000");
        assert_eq!(usd(-1_500_000_000_000), "-1.500000000000");
    }
}

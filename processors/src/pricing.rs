//! Estimated cost from the dated price table.
//!
//! Prices are data, not code: the `model_prices` ClickHouse table (seeded by
//! migration 0006 with the contract's prices) holds, per model, the USD price
//! per 1,000 prompt and completion tokens and the date it takes effect. An
//! event is priced with the row of its model whose `effective_from` is the
//! latest on or before the event's `created_at` day; a model without a price
//! is priced as `gpt-4o-mini` (the contract's rule). To change a price, insert
//! a row with a new `effective_from`; events from that day on use it.
//!
//! Arithmetic is exact: prices and costs are integers of 10^-12 USD (the
//! ClickHouse Decimal(_, 12) scale); a cost is tokens × price-per-1k / 1000,
//! rounded half up to 10^-12 USD when a price has more than 9 decimals.

use std::collections::BTreeMap;
use std::collections::HashMap;

use chrono::NaiveDate;
use clickhouse::Row;
use serde::Deserialize;

/// The model whose price applies to models without one of their own.
pub const FALLBACK_MODEL: &str = "gpt-4o-mini";

/// Per-1k-token prices in 10^-12 USD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub prompt_per_1k: i64,
    pub completion_per_1k: i64,
}

#[derive(Debug, Clone, Row, Deserialize)]
pub struct PriceRow {
    pub model: String,
    #[serde(with = "clickhouse::serde::chrono::date")]
    pub effective_from: NaiveDate,
    /// Decimal(18, 12) as its scaled integer.
    pub prompt_usd_per_1k: i64,
    pub completion_usd_per_1k: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    by_model: HashMap<String, BTreeMap<NaiveDate, Price>>,
}

impl PriceTable {
    pub fn from_rows(rows: impl IntoIterator<Item = PriceRow>) -> Self {
        let mut by_model: HashMap<String, BTreeMap<NaiveDate, Price>> = HashMap::new();
        for r in rows {
            by_model.entry(r.model).or_default().insert(
                r.effective_from,
                Price {
                    prompt_per_1k: r.prompt_usd_per_1k,
                    completion_per_1k: r.completion_usd_per_1k,
                },
            );
        }
        Self { by_model }
    }

    pub async fn load(client: &clickhouse::Client) -> Result<Self, clickhouse::error::Error> {
        let rows: Vec<PriceRow> = client
            .query(
                "SELECT model, effective_from, prompt_usd_per_1k, completion_usd_per_1k
                 FROM model_prices FINAL",
            )
            .fetch_all()
            .await?;
        Ok(Self::from_rows(rows))
    }

    fn price_of(&self, model: &str, day: NaiveDate) -> Option<Price> {
        self.by_model
            .get(model)
            .and_then(|dated| dated.range(..=day).next_back().map(|(_, p)| *p))
    }

    /// The price in force for `model` on `day`, with the fallback rule.
    pub fn price(&self, model: &str, day: NaiveDate) -> Option<Price> {
        self.price_of(model, day)
            .or_else(|| self.price_of(FALLBACK_MODEL, day))
    }

    /// Cost in 10^-12 USD; 0 when no price is in force at all (logged by the caller).
    pub fn cost(&self, model: &str, day: NaiveDate, prompt: u32, completion: u32) -> Option<i64> {
        let p = self.price(model, day)?;
        let scaled = i128::from(prompt) * i128::from(p.prompt_per_1k)
            + i128::from(completion) * i128::from(p.completion_per_1k);
        // Round half up at the 10^-12 USD unit.
        Some(((scaled + 500) / 1000) as i64)
    }

    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UNIT: i64 = 1_000_000_000_000; // 1 USD

    fn usd(x: f64) -> i64 {
        (x * UNIT as f64).round() as i64
    }

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn contract() -> PriceTable {
        let row = |model: &str, from: &str, p: f64, c: f64| PriceRow {
            model: model.into(),
            effective_from: day(from),
            prompt_usd_per_1k: usd(p),
            completion_usd_per_1k: usd(c),
        };
        PriceTable::from_rows([
            row("gpt-4o-mini", "1970-01-01", 0.00015, 0.0006),
            row("gpt-4o", "1970-01-01", 0.0025, 0.01),
            row("gpt-4-turbo", "1970-01-01", 0.01, 0.03),
            // A price change taking effect on 2026-01-01.
            row("gpt-4o", "2026-01-01", 0.002, 0.008),
        ])
    }

    #[test]
    fn the_contract_example_costs_what_the_contract_says() {
        // 150 prompt + 25 completion tokens of gpt-4o-mini:
        // 150 * 0.00015 / 1000 + 25 * 0.0006 / 1000 = 0.0000375 USD
        let cost = contract()
            .cost("gpt-4o-mini", day("2025-11-03"), 150, 25)
            .unwrap();
        assert_eq!(cost, 37_500_000); // 0.0000375 * 10^12
    }

    #[test]
    fn a_price_change_applies_from_its_date() {
        let t = contract();
        assert_eq!(
            t.cost("gpt-4o", day("2025-12-31"), 1000, 1000),
            Some(usd(0.0125))
        );
        assert_eq!(
            t.cost("gpt-4o", day("2026-01-01"), 1000, 1000),
            Some(usd(0.010))
        );
        assert_eq!(
            t.cost("gpt-4o", day("2027-06-01"), 1000, 1000),
            Some(usd(0.010))
        );
    }

    #[test]
    fn unknown_models_are_priced_as_gpt_4o_mini() {
        let t = contract();
        assert_eq!(
            t.cost("some-new-model", day("2025-11-03"), 150, 25),
            t.cost("gpt-4o-mini", day("2025-11-03"), 150, 25)
        );
        assert_eq!(
            PriceTable::default().cost("gpt-4o", day("2025-11-03"), 1, 1),
            None
        );
    }

    proptest! {
        #[test]
        fn cost_is_additive_over_tokens(p1 in 0u32..1_000_000, p2 in 0u32..1_000_000, c in 0u32..1_000_000) {
            // With prices of at most 9 decimals per 1k tokens there is no rounding,
            // so splitting a generation's tokens never changes the total.
            let t = contract();
            let d = day("2025-11-03");
            let whole = t.cost("gpt-4-turbo", d, p1 + p2, c).unwrap();
            let parts = t.cost("gpt-4-turbo", d, p1, c).unwrap() + t.cost("gpt-4-turbo", d, p2, 0).unwrap();
            prop_assert_eq!(whole, parts);
        }

        #[test]
        fn cost_is_monotonic(p in 0u32..10_000_000, c in 0u32..10_000_000) {
            let t = contract();
            let d = day("2025-11-03");
            prop_assert!(t.cost("gpt-4o", d, p, c) <= t.cost("gpt-4o", d, p + 1, c));
            prop_assert!(t.cost("gpt-4o", d, p, c) <= t.cost("gpt-4o", d, p, c + 1));
        }
    }
}

//! Expensive answers kept, refreshed behind the readers' backs, computed once
//! however many ask.
//!
//! A figure over a large fleet reads millions of rollup rows (seconds over
//! 100 million events), and the dashboard asks for the same ones on every
//! page view. So:
//! - an answer that took longer than `keep_above` (100 ms) to compute is
//!   kept; a cheaper one (a small account, a test) never is, so it is always
//!   current;
//! - a kept answer is fresh for the ttl (`USAGE_DASHBOARD_CACHE_SECS`, 60 s)
//!   or ten times what it cost to compute, whichever is longer: a figure
//!   that takes 20 s is recomputed every few minutes, not every minute;
//! - past that, a request still gets the kept answer at once (for up to
//!   [`STALE_LIMIT`]) while one recomputation runs in the background:
//!   readers never wait for a refresh, only for a first computation;
//! - the warmer ([`Cache::warm`]) recomputes, one at a time, what was asked
//!   for in the last `warm_for` (10 minutes) once it is half its freshness
//!   old, and what is pinned (the provider's default pages, see
//!   `routes::default_pages`) at least every [`PINNED_EVERY`].
//!
//! Every answer says when it was computed and how old it may be. A ttl of 0
//! turns all of this off: every answer is computed when asked.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::error::QueryError;

type Computation<T> = Pin<Box<dyn Future<Output = Result<T, QueryError>> + Send>>;
/// How to compute one answer again (for refreshes).
pub type Recipe<T> = Arc<dyn Fn() -> Computation<T> + Send + Sync>;

/// How long past its freshness a kept answer may still be served while it
/// is recomputed.
pub const STALE_LIMIT: Duration = Duration::from_secs(30 * 60);
/// Pinned answers nobody asked for lately are recomputed this often.
pub const PINNED_EVERY: Duration = Duration::from_secs(10 * 60);

/// An answer and when it was computed.
pub struct Kept<T> {
    pub value: Arc<T>,
    pub computed_at: DateTime<Utc>,
    at: Instant,
    /// How long it stays fresh (the ttl, or ten times its cost).
    pub fresh_for: Duration,
}

impl<T> Clone for Kept<T> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            computed_at: self.computed_at,
            at: self.at,
            fresh_for: self.fresh_for,
        }
    }
}

struct Slot<T> {
    kept: Mutex<Option<Kept<T>>>,
    /// Held while computing: one computation per key at a time.
    computing: tokio::sync::Mutex<()>,
    recipe: Recipe<T>,
    asked: Mutex<Instant>,
    pinned: Mutex<bool>,
    /// Its last computation was too cheap to keep: computing it ahead is
    /// no use.
    cheap: Mutex<bool>,
}

impl<T> Slot<T> {
    fn kept(&self) -> Option<Kept<T>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn asked_within(&self, d: Duration) -> bool {
        self.asked.lock().map(|a| a.elapsed() < d).unwrap_or(false)
    }

    fn is_pinned(&self) -> bool {
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone, Copy)]
struct Rules {
    ttl: Duration,
    keep_above: Duration,
}

pub struct Cache<T> {
    slots: Mutex<HashMap<String, Arc<Slot<T>>>>,
    rules: Rules,
    warm_for: Duration,
}

/// Keys kept at most: the scopes and parameters a busy dashboard asks for.
const MAX_ENTRIES: usize = 10_000;

impl<T: Send + Sync + 'static> Cache<T> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            slots: Mutex::default(),
            rules: Rules {
                ttl,
                keep_above: Duration::from_millis(100),
            },
            warm_for: Duration::from_secs(600),
        }
    }

    /// Keeps every answer, however cheap (tests).
    #[cfg(test)]
    pub fn keeping_everything(mut self) -> Self {
        self.rules.keep_above = Duration::ZERO;
        self
    }

    fn slot(&self, key: &str, recipe: Recipe<T>) -> Arc<Slot<T>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() >= MAX_ENTRIES && !slots.contains_key(key) {
            // Forget what nobody asked for lately (the next ask recomputes).
            let warm_for = self.warm_for;
            slots.retain(|_, s| s.is_pinned() || s.asked_within(warm_for));
        }
        slots
            .entry(key.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    kept: Mutex::new(None),
                    computing: tokio::sync::Mutex::new(()),
                    recipe,
                    asked: Mutex::new(Instant::now()),
                    pinned: Mutex::new(false),
                    cheap: Mutex::new(false),
                })
            })
            .clone()
    }

    /// The answer for `key` (see the module docs). Each key keeps the
    /// recipe it was first asked with: a key names the parameters, so any
    /// later recipe computes the same thing.
    pub async fn get(&self, key: &str, recipe: Recipe<T>) -> Result<Kept<T>, QueryError> {
        if self.is_off() {
            return Ok(Kept {
                value: Arc::new(recipe().await?),
                computed_at: Utc::now(),
                at: Instant::now(),
                fresh_for: Duration::ZERO,
            });
        }
        let slot = self.slot(key, recipe);
        if let Ok(mut asked) = slot.asked.lock() {
            *asked = Instant::now();
        }
        if let Some(kept) = slot.kept() {
            let age = kept.at.elapsed();
            if age < kept.fresh_for {
                return Ok(kept);
            }
            if age < kept.fresh_for + STALE_LIMIT {
                let (slot, rules) = (slot.clone(), self.rules);
                tokio::spawn(async move {
                    if let Err(err) = refresh(&slot, rules, Duration::ZERO).await {
                        tracing::warn!(%err, "could not recompute a dashboard figure");
                    }
                });
                return Ok(kept);
            }
        }
        compute(&slot, self.rules).await
    }

    /// Keeps `key` computed and fresh whether asked for or not (computing it
    /// now if it is not kept); every other key loses its pin.
    pub async fn pin_only(&self, pins: Vec<(String, Recipe<T>)>) {
        if self.is_off() {
            return;
        }
        let mut fresh = Vec::new();
        {
            let keys: Vec<&String> = pins.iter().map(|(k, _)| k).collect();
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            for (key, slot) in slots.iter() {
                if let Ok(mut pinned) = slot.pinned.lock() {
                    *pinned = keys.contains(&key);
                }
            }
        }
        for (key, recipe) in pins {
            let slot = self.slot(&key, recipe);
            if let Ok(mut pinned) = slot.pinned.lock() {
                *pinned = true;
            }
            let cheap = *slot.cheap.lock().unwrap_or_else(|p| p.into_inner());
            if slot.kept().is_none() && !cheap {
                fresh.push(slot);
            }
        }
        for slot in fresh {
            if let Err(err) = refresh(&slot, self.rules, Duration::ZERO).await {
                tracing::warn!(%err, "could not compute a dashboard figure ahead");
            }
        }
    }

    /// Recomputes, one after the other, the kept answers asked for lately
    /// that are half their freshness old, and the pinned ones older than
    /// [`PINNED_EVERY`]; forgets the rest. Returns how many it recomputed.
    pub async fn warm(&self) -> usize {
        let slots: Vec<Arc<Slot<T>>> = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            // Forget what nobody asked for lately and nothing pins
            // (yesterday's default keys, a range looked at once): its
            // answer may be large, and the next ask computes it again.
            let warm_for = self.warm_for;
            slots.retain(|_, s| s.is_pinned() || s.asked_within(warm_for));
            slots.values().cloned().collect()
        };
        let mut recomputed = 0;
        for slot in slots {
            let Some(kept) = slot.kept() else { continue };
            let due = if slot.asked_within(self.warm_for) {
                kept.fresh_for / 2
            } else if slot.is_pinned() {
                PINNED_EVERY.max(kept.fresh_for / 2)
            } else {
                continue;
            };
            if kept.at.elapsed() >= due {
                match refresh(&slot, self.rules, due).await {
                    Ok(true) => recomputed += 1,
                    Ok(false) => {}
                    Err(err) => tracing::warn!(%err, "could not recompute a dashboard figure"),
                }
            }
        }
        recomputed
    }

    /// A ttl of 0 turns keeping off: every answer is computed when asked
    /// (tests that write and read at once, or a small fleet).
    fn is_off(&self) -> bool {
        self.rules.ttl.is_zero()
    }
}

/// Computes `slot`'s answer (waiting for one already being computed, and
/// using it if it is fresh).
async fn compute<T>(slot: &Slot<T>, rules: Rules) -> Result<Kept<T>, QueryError> {
    let _computing = slot.computing.lock().await;
    if let Some(kept) = slot.kept() {
        if kept.at.elapsed() < kept.fresh_for {
            return Ok(kept);
        }
    }
    run(slot, rules).await
}

/// Recomputes `slot` unless it is being computed or is younger than
/// `older_than`; whether it did.
async fn refresh<T>(
    slot: &Slot<T>,
    rules: Rules,
    older_than: Duration,
) -> Result<bool, QueryError> {
    let Ok(_computing) = slot.computing.try_lock() else {
        return Ok(false);
    };
    if slot.kept().is_some_and(|k| k.at.elapsed() < older_than) {
        return Ok(false);
    }
    run(slot, rules).await.map(|_| true)
}

async fn run<T>(slot: &Slot<T>, rules: Rules) -> Result<Kept<T>, QueryError> {
    let started = Instant::now();
    let value = (slot.recipe)().await?;
    let cost = started.elapsed();
    let kept = Kept {
        value: Arc::new(value),
        computed_at: Utc::now(),
        at: Instant::now(),
        fresh_for: rules.ttl.max(cost * 10),
    };
    let keep = cost >= rules.keep_above;
    // A cheap answer replaces a kept one too (which may date from a cold
    // start): from now on this figure is computed when asked.
    *slot.kept.lock().unwrap_or_else(|p| p.into_inner()) = keep.then(|| kept.clone());
    *slot.cheap.lock().unwrap_or_else(|p| p.into_inner()) = !keep;
    Ok(kept)
}

/// A recipe from an async closure.
pub fn recipe<T, F, Fut>(f: F) -> Recipe<T>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, QueryError>> + Send + 'static,
{
    Arc::new(move || Box::pin(f()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn counting(runs: Arc<AtomicU32>, delay: Duration) -> Recipe<u32> {
        recipe(move || {
            let runs = runs.clone();
            async move {
                tokio::time::sleep(delay).await;
                Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
            }
        })
    }

    #[tokio::test]
    async fn one_computation_serves_every_concurrent_caller() {
        let cache = Arc::new(Cache::new(Duration::from_millis(300)).keeping_everything());
        let runs = Arc::new(AtomicU32::new(0));
        let mut handles = Vec::new();
        for _ in 0..4 {
            let (cache, runs) = (cache.clone(), runs.clone());
            handles.push(tokio::spawn(async move {
                *cache
                    .get("k", counting(runs, Duration::from_millis(50)))
                    .await
                    .unwrap()
                    .value
            }));
        }
        for h in handles {
            assert_eq!(h.await.unwrap(), 1);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stale_answer_is_served_at_once_while_it_is_recomputed() {
        let cache = Cache::new(Duration::from_millis(200)).keeping_everything();
        let runs = Arc::new(AtomicU32::new(0));
        // 10 ms to compute: fresh for the ttl (10 x 10 ms is less).
        let slow = counting(runs.clone(), Duration::from_millis(10));
        let first = cache.get("k", slow.clone()).await.unwrap();
        assert_eq!(
            (*first.value, first.fresh_for),
            (1, Duration::from_millis(200))
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let stale = cache.get("k", slow.clone()).await.unwrap();
        assert_eq!(*stale.value, 1, "the kept answer, not a wait");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "served before the recomputation ends"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "recomputed behind");
        assert_eq!(
            *cache.get("k", slow).await.unwrap().value,
            2,
            "refreshed behind"
        );
    }

    #[tokio::test]
    async fn a_ttl_of_zero_computes_every_answer_when_asked() {
        let cache = Cache::new(Duration::ZERO);
        let runs = Arc::new(AtomicU32::new(0));
        let slow = counting(runs.clone(), Duration::from_millis(120));
        cache.pin_only(vec![("k".into(), slow.clone())]).await;
        assert_eq!(runs.load(Ordering::SeqCst), 0, "nothing computed ahead");
        assert_eq!(*cache.get("k", slow.clone()).await.unwrap().value, 1);
        assert_eq!(*cache.get("k", slow).await.unwrap().value, 2);
        assert_eq!(cache.warm().await, 0);
    }

    #[tokio::test]
    async fn a_cheap_recomputation_replaces_a_kept_answer() {
        let cache = Cache::new(Duration::from_millis(50));
        let runs = Arc::new(AtomicU32::new(0));
        // Expensive the first time (a cold start), cheap afterwards.
        let cold_then_cheap: Recipe<u32> = {
            let runs = runs.clone();
            recipe(move || {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == 1 {
                        tokio::time::sleep(Duration::from_millis(120)).await;
                    }
                    Ok(n)
                }
            })
        };
        assert_eq!(
            *cache.get("k", cold_then_cheap.clone()).await.unwrap().value,
            1
        );
        tokio::time::sleep(Duration::from_millis(1300)).await;
        // Stale: served once while recomputed (cheaply) behind.
        assert_eq!(
            *cache.get("k", cold_then_cheap.clone()).await.unwrap().value,
            1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Not kept any more: every ask computes.
        assert_eq!(
            *cache.get("k", cold_then_cheap.clone()).await.unwrap().value,
            3
        );
        assert_eq!(*cache.get("k", cold_then_cheap).await.unwrap().value, 4);
    }

    #[tokio::test]
    async fn the_warmer_forgets_what_nobody_asks_for_or_pins() {
        let mut cache = Cache::new(Duration::from_secs(60)).keeping_everything();
        cache.warm_for = Duration::from_millis(100);
        let runs = Arc::new(AtomicU32::new(0));
        cache
            .get("old", counting(runs.clone(), Duration::ZERO))
            .await
            .unwrap();
        cache
            .pin_only(vec![(
                "pinned".into(),
                counting(runs.clone(), Duration::ZERO),
            )])
            .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        cache.warm().await;
        let keys: Vec<String> = cache.slots.lock().unwrap().keys().cloned().collect();
        assert_eq!(keys, vec!["pinned".to_string()]);
    }

    #[tokio::test]
    async fn an_expensive_answer_stays_fresh_ten_times_its_cost() {
        let cache = Cache::new(Duration::from_millis(10));
        let runs = Arc::new(AtomicU32::new(0));
        let kept = cache
            .get("k", counting(runs, Duration::from_millis(120)))
            .await
            .unwrap();
        assert!(
            kept.fresh_for >= Duration::from_millis(1200),
            "{:?}",
            kept.fresh_for
        );
    }

    #[tokio::test]
    async fn cheap_answers_and_failures_are_not_kept() {
        let cache = Cache::new(Duration::from_secs(60));
        let runs = Arc::new(AtomicU32::new(0));
        for expected in 1..=3 {
            let got = cache
                .get("k", counting(runs.clone(), Duration::ZERO))
                .await
                .unwrap();
            assert_eq!(*got.value, expected);
        }
        let tries = Arc::new(AtomicU32::new(0));
        let failing_once: Recipe<u32> = {
            let tries = tries.clone();
            recipe(move || {
                let tries = tries.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(120)).await;
                    match tries.fetch_add(1, Ordering::SeqCst) {
                        0 => Err(QueryError::BadRequest("no".into())),
                        n => Ok(n),
                    }
                }
            })
        };
        assert!(cache.get("f", failing_once.clone()).await.is_err());
        assert_eq!(
            *cache.get("f", failing_once.clone()).await.unwrap().value,
            1
        );
        // That one was expensive: kept.
        let again = cache.get("f", failing_once).await.unwrap();
        assert_eq!((*again.value, tries.load(Ordering::SeqCst)), (1, 2));
    }

    #[tokio::test]
    async fn the_warmer_refreshes_what_is_asked_for_and_what_is_pinned() {
        let cache = Cache::new(Duration::from_millis(400)).keeping_everything();
        let runs = Arc::new(AtomicU32::new(0));
        cache
            .get("asked", counting(runs.clone(), Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(cache.warm().await, 0, "still fresh");
        tokio::time::sleep(Duration::from_millis(220)).await;
        assert_eq!(cache.warm().await, 1);
        let got = cache
            .get("asked", counting(runs.clone(), Duration::ZERO))
            .await
            .unwrap();
        assert_eq!((*got.value, runs.load(Ordering::SeqCst)), (2, 2));

        let pinned = Arc::new(AtomicU32::new(0));
        cache
            .pin_only(vec![(
                "pinned".into(),
                counting(pinned.clone(), Duration::ZERO),
            )])
            .await;
        assert_eq!(pinned.load(Ordering::SeqCst), 1, "computed ahead");
        let got = cache
            .get("pinned", counting(pinned.clone(), Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(*got.value, 1);
    }
}

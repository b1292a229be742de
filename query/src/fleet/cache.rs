//! Expensive answers kept for a short while, computed once however many ask.
//!
//! A figure over a large fleet reads millions of rollup rows (seconds over
//! 100 million events), and the dashboard asks for the same ones on every
//! page view. An answer that took longer than `keep_above` (100 ms) to
//! compute is kept `ttl` (`USAGE_DASHBOARD_CACHE_SECS`, 60 s); a cheaper one
//! (a small account, a test) is never kept, so it is always current. Every
//! answer says when it was computed. Concurrent requests for one missing
//! answer wait for one computation.
//!
//! What was asked for in the last `warm_for` (10 minutes) and is kept is
//! recomputed in the background once it is older than half the ttl
//! ([`Cache::warm`]), one answer at a time: while someone looks at the
//! dashboard, its requests find their answers ready.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::error::QueryError;

type Computation<T> = Pin<Box<dyn Future<Output = Result<T, QueryError>> + Send>>;
/// How to compute one answer again (for the warmer).
pub type Recipe<T> = Arc<dyn Fn() -> Computation<T> + Send + Sync>;

/// An answer and when it was computed.
pub struct Kept<T> {
    pub value: Arc<T>,
    pub computed_at: DateTime<Utc>,
    at: Instant,
}

impl<T> Clone for Kept<T> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            computed_at: self.computed_at,
            at: self.at,
        }
    }
}

struct Slot<T> {
    kept: tokio::sync::Mutex<Option<Kept<T>>>,
    recipe: Recipe<T>,
    asked: Mutex<Instant>,
}

pub struct Cache<T> {
    slots: Mutex<HashMap<String, Arc<Slot<T>>>>,
    ttl: Duration,
    keep_above: Duration,
    warm_for: Duration,
}

/// Keys kept at most: the scopes and parameters a busy dashboard asks for.
const MAX_ENTRIES: usize = 10_000;

impl<T: Send + Sync + 'static> Cache<T> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            slots: Mutex::default(),
            ttl,
            keep_above: Duration::from_millis(100),
            warm_for: Duration::from_secs(600),
        }
    }

    /// Keeps every answer, however cheap (tests).
    pub fn keeping_everything(mut self) -> Self {
        self.keep_above = Duration::ZERO;
        self
    }

    fn slot(&self, key: &str, recipe: Recipe<T>) -> Arc<Slot<T>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() >= MAX_ENTRIES && !slots.contains_key(key) {
            // Forget what nobody asked for lately (the next ask recomputes).
            let warm_for = self.warm_for;
            slots.retain(|_, s| {
                s.asked
                    .lock()
                    .map(|a| a.elapsed() < warm_for)
                    .unwrap_or(false)
            });
        }
        slots
            .entry(key.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    kept: tokio::sync::Mutex::new(None),
                    recipe,
                    asked: Mutex::new(Instant::now()),
                })
            })
            .clone()
    }

    /// The answer for `key`: kept if younger than the ttl, else computed by
    /// `recipe` (once, while concurrent callers wait for it).
    pub async fn get(&self, key: &str, recipe: Recipe<T>) -> Result<Kept<T>, QueryError> {
        let slot = self.slot(key, recipe);
        if let Ok(mut asked) = slot.asked.lock() {
            *asked = Instant::now();
        }
        self.fill(&slot, self.ttl).await
    }

    async fn fill(&self, slot: &Slot<T>, max_age: Duration) -> Result<Kept<T>, QueryError> {
        let mut held = slot.kept.lock().await;
        if let Some(kept) = held.as_ref() {
            if kept.at.elapsed() < max_age {
                return Ok(kept.clone());
            }
        }
        let started = Instant::now();
        let value = (slot.recipe)().await?;
        let kept = Kept {
            value: Arc::new(value),
            computed_at: Utc::now(),
            at: Instant::now(),
        };
        *held = (started.elapsed() >= self.keep_above).then(|| kept.clone());
        Ok(kept)
    }

    /// Recomputes, one after the other, the kept answers asked for lately
    /// that are older than half the ttl. Returns how many it recomputed.
    pub async fn warm(&self) -> usize {
        let due: Vec<Arc<Slot<T>>> = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .values()
                .filter(|s| {
                    s.asked
                        .lock()
                        .map(|a| a.elapsed() < self.warm_for)
                        .unwrap_or(false)
                })
                .cloned()
                .collect()
        };
        let mut recomputed = 0;
        for slot in due {
            let stale = match slot.kept.try_lock() {
                Ok(kept) => kept
                    .as_ref()
                    .is_some_and(|k| k.at.elapsed() >= self.ttl / 2),
                Err(_) => false, // being computed now
            };
            if stale {
                if let Err(err) = self.fill(&slot, self.ttl / 2).await {
                    tracing::warn!(%err, "could not recompute a dashboard figure");
                }
                recomputed += 1;
            }
        }
        recomputed
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
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
    async fn one_computation_serves_every_concurrent_caller_until_it_expires() {
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
        tokio::time::sleep(Duration::from_millis(350)).await;
        let again = cache
            .get("k", counting(runs.clone(), Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(*again.value, 2, "recomputed once expired");
    }

    #[tokio::test]
    async fn cheap_answers_and_failures_are_not_kept() {
        let cache = Cache::new(Duration::from_secs(60));
        let runs = Arc::new(AtomicU32::new(0));
        // Each key keeps the recipe it was first asked with (a key names
        // the parameters, so any later recipe computes the same thing).
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
        let ok = cache.get("f", failing_once.clone()).await.unwrap();
        assert_eq!(*ok.value, 1);
        // That one was expensive: kept.
        let again = cache.get("f", failing_once).await.unwrap();
        assert_eq!((*again.value, tries.load(Ordering::SeqCst)), (1, 2));
    }

    #[tokio::test]
    async fn the_warmer_recomputes_what_was_asked_for_before_it_expires() {
        let cache = Cache::new(Duration::from_millis(400)).keeping_everything();
        let runs = Arc::new(AtomicU32::new(0));
        cache
            .get("k", counting(runs.clone(), Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(cache.warm().await, 0, "still fresh");
        tokio::time::sleep(Duration::from_millis(220)).await;
        assert_eq!(cache.warm().await, 1);
        // Asked again: the warmed answer, not a new computation.
        let got = cache
            .get("k", counting(runs.clone(), Duration::ZERO))
            .await
            .unwrap();
        assert_eq!((*got.value, runs.load(Ordering::SeqCst)), (2, 2));
    }
}

//! The one limit the gateway refuses requests for: floods that threaten the
//! service itself.
//!
//! Usage is never refused for governance (every generation is recorded;
//! limits are enforced at admission). But a client sending HTTP requests
//! far faster than any honest plugin (which sends an inline generation as
//! it happens and a queued batch every 5 minutes) gets 429 `too_many_requests`
//! with `Retry-After`: nothing of the refused request was stored, and the
//! plugin's retry after that delay loses nothing. A token bucket per
//! installation (`USAGE_INGEST_FLOOD_RPS` sustained, `USAGE_INGEST_FLOOD_BURST`
//! at once), counted after the request is authenticated, so nobody but the
//! holder of an installation's secret can use up its budget.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

const SHARDS: usize = 64;

struct Bucket {
    tokens: f64,
    at: i64,
}

pub struct FloodGuard {
    shards: Vec<Mutex<HashMap<String, Bucket>>>,
    per_sec: f64,
    burst: f64,
}

impl FloodGuard {
    pub fn new(per_sec: f64, burst: u32) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_sec,
            burst: f64::from(burst.max(1)),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Bucket>> {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// Takes one request from `key`'s budget at `now` (ms); `Err(seconds)`
    /// to wait when it is spent.
    pub fn take(&self, key: &str, now: i64) -> Result<(), u64> {
        let mut map = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        let bucket = map.entry(key.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = (now - bucket.at).max(0) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.per_sec;
            Err((wait.ceil() as u64).max(1))
        }
    }

    /// Forgets buckets that have refilled (memory follows the active
    /// installations).
    pub fn sweep(&self, now: i64) -> usize {
        let full_after_ms = (self.burst / self.per_sec * 1000.0) as i64;
        let mut dropped = 0;
        for shard in &self.shards {
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = map.len();
            map.retain(|_, b| now - b.at < full_after_ms);
            dropped += before - map.len();
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_and_the_wait_is_said() {
        let g = FloodGuard::new(10.0, 20);
        let passed = (0..50).filter(|_| g.take("i", 1_000).is_ok()).count();
        assert_eq!(passed, 20);
        assert_eq!(g.take("i", 1_000), Err(1));
        // 10 per second refill.
        assert!(g.take("i", 1_100).is_ok());
        assert!(g.take("i", 1_100).is_err());
        // Other installations have their own budget.
        assert!(g.take("j", 1_100).is_ok());
    }

    #[test]
    fn refilled_buckets_leave_memory() {
        let g = FloodGuard::new(10.0, 20);
        g.take("i", 0).unwrap();
        assert_eq!(g.sweep(1_000), 0);
        assert_eq!(g.sweep(2_000), 1);
    }
}

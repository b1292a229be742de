//! Event-time rolling windows, as small tumbling buckets summed over the
//! window (the Arroyo way: bins in a `BTreeMap` keyed by bucket start, dropped
//! once the watermark has passed them).
//!
//! A window of `n` buckets of `b` ms "at time t" is the `n` buckets ending
//! with the bucket that contains `t`: `[bucket(t) - (n-1)·b, bucket(t) + b)`.
//! With 10 s buckets, "100 requests in any 5 minutes" is evaluated over the
//! 30 buckets ending with the current event's bucket.
//!
//! Time is governance time (`usage_service_kit::periods`): an event's
//! `created_at` clamped to `[received_at - grace, received_at]`, so it
//! follows the gateways' clocks, never a site's. Each installation has a
//! watermark: the latest governance time seen minus the grace and the
//! arrival skew (two gateways' events of one installation may reach its
//! partition a little out of order). Since every event's time is at least
//! its arrival minus the grace, an event arriving in order is never behind
//! the watermark: no site can hide events from the windows by dating them
//! early, nor push the watermark by dating one late. An event behind it
//! (only possible after a stall longer than the skew) moves no window
//! counter and is counted in a metric; it is still stored and counted in
//! every rollup and in the monthly cap, which come from ClickHouse.

use std::collections::BTreeMap;

/// Requests and tokens in one bucket or window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub tokens: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.requests += o.requests;
        self.tokens += o.tokens;
    }
}

/// A window: `buckets` tumbling buckets of `bucket_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub bucket_ms: i64,
    pub buckets: i64,
}

impl WindowSpec {
    pub fn length_ms(&self) -> i64 {
        self.bucket_ms * self.buckets
    }

    pub fn bucket_of(&self, t: i64) -> i64 {
        t.div_euclid(self.bucket_ms) * self.bucket_ms
    }

    /// First bucket start inside the window at `t`.
    pub fn first_bucket(&self, t: i64) -> i64 {
        self.bucket_of(t) - (self.buckets - 1) * self.bucket_ms
    }
}

/// The buckets of one installation for one window size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Buckets {
    bins: BTreeMap<i64, Counts>,
}

impl Buckets {
    pub fn add(&mut self, spec: &WindowSpec, t: i64, tokens: u64) {
        *self.bins.entry(spec.bucket_of(t)).or_default() += Counts {
            requests: 1,
            tokens,
        };
    }

    /// The window's sum at time `t`.
    pub fn window(&self, spec: &WindowSpec, t: i64) -> Counts {
        let mut sum = Counts::default();
        for (_, c) in self.bins.range(spec.first_bucket(t)..=spec.bucket_of(t)) {
            sum += *c;
        }
        sum
    }

    /// When the window, as it stands at `t`, falls back under `limit`: the
    /// end of the window that starts just after the oldest buckets that must
    /// slide out. `None` if it is already under.
    pub fn frees_at(
        &self,
        spec: &WindowSpec,
        t: i64,
        limit: impl Fn(Counts) -> bool,
    ) -> Option<i64> {
        let mut remaining = self.window(spec, t);
        if !limit(remaining) {
            return None;
        }
        for (start, c) in self.bins.range(spec.first_bucket(t)..=spec.bucket_of(t)) {
            remaining.requests -= c.requests;
            remaining.tokens -= c.tokens;
            if !limit(remaining) {
                // Once this bucket has slid out of the window, it is under.
                return Some(start + spec.length_ms());
            }
        }
        Some(spec.bucket_of(t) + spec.length_ms())
    }

    /// Drops every bucket that ends before `t` (no window can reach it again).
    pub fn evict_before(&mut self, spec: &WindowSpec, t: i64) {
        let keep_from = spec.bucket_of(t);
        self.bins = self.bins.split_off(&keep_from);
    }

    pub fn len(&self) -> usize {
        self.bins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bins.is_empty()
    }
}

/// Both windows of one installation and its watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallationWindows {
    pub short: Buckets,
    pub long: Buckets,
    /// Latest event time seen (ms).
    pub max_event_time: i64,
}

impl Default for InstallationWindows {
    fn default() -> Self {
        Self {
            short: Buckets::default(),
            long: Buckets::default(),
            max_event_time: i64::MIN,
        }
    }
}

/// The two window shapes and the clocks' slack, shared by every installation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// The rate-limit window (default 30 × 10 s = 5 minutes).
    pub short: WindowSpec,
    /// The abuse window (default 60 × 1 min = 1 hour).
    pub long: WindowSpec,
    /// How far before its arrival an event's `created_at` still counts as
    /// is (`USAGE_GOVERNANCE_GRACE_MS`).
    pub grace_ms: i64,
    /// How far out of arrival order events may reach the partition
    /// (`USAGE_GOVERNANCE_ARRIVAL_SKEW_MS`).
    pub skew_ms: i64,
}

impl WindowConfig {
    /// How far behind the latest governance time the watermark trails.
    pub fn lateness_ms(&self) -> i64 {
        self.grace_ms + self.skew_ms
    }
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            short: WindowSpec {
                bucket_ms: 10_000,
                buckets: 30,
            },
            long: WindowSpec {
                bucket_ms: 60_000,
                buckets: 60,
            },
            grace_ms: 60_000,
            skew_ms: 10_000,
        }
    }
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Counted,
    /// Older than the watermark: not counted in the windows.
    TooLate,
}

impl InstallationWindows {
    pub fn watermark(&self, config: &WindowConfig) -> i64 {
        self.max_event_time.saturating_sub(config.lateness_ms())
    }

    pub fn apply(&mut self, config: &WindowConfig, t: i64, tokens: u64) -> Applied {
        if t < self.watermark(config) {
            return Applied::TooLate;
        }
        self.short.add(&config.short, t, tokens);
        self.long.add(&config.long, t, tokens);
        if t > self.max_event_time {
            self.max_event_time = t;
            // Buckets no window at or after the watermark can reach again.
            let wm = self.watermark(config);
            self.short
                .evict_before(&config.short, config.short.first_bucket(wm));
            self.long
                .evict_before(&config.long, config.long.first_bucket(wm));
        }
        Applied::Counted
    }

    /// Buckets held: the state size of this installation.
    pub fn buckets(&self) -> usize {
        self.short.len() + self.long.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> WindowConfig {
        WindowConfig::default()
    }

    /// The brute-force oracle: every event kept, counted by definition.
    struct Oracle {
        counted: Vec<(i64, u64)>,
        max: i64,
    }

    impl Oracle {
        fn apply(&mut self, c: &WindowConfig, t: i64, tokens: u64) {
            if t < self.max.saturating_sub(c.lateness_ms()) {
                return;
            }
            self.counted.push((t, tokens));
            self.max = self.max.max(t);
        }

        fn window(&self, spec: &WindowSpec, t: i64) -> Counts {
            let (from, to) = (spec.first_bucket(t), spec.bucket_of(t) + spec.bucket_ms);
            let mut c = Counts::default();
            for (e, tok) in &self.counted {
                if *e >= from && *e < to {
                    c += Counts {
                        requests: 1,
                        tokens: *tok,
                    };
                }
            }
            c
        }
    }

    /// Streams of events over ~3 hours: in order with jitter, shuffled within
    /// the grace period, some very late, some duplicated (as the processor
    /// would see them if dedup failed: the windows must just count what they get).
    fn stream() -> impl Strategy<Value = Vec<(i64, u64)>> {
        proptest::collection::vec((0i64..10_800_000, 0u64..5000, 0u8..10), 1..400).prop_map(|raw| {
            let mut events: Vec<(i64, u64)> = Vec::new();
            let mut clock = 0i64;
            for (step, tokens, kind) in raw {
                clock += step / 200;
                let t = match kind {
                    0 => clock - 600_000,             // very late (10 min)
                    1 | 2 => clock - (step % 60_000), // late within the grace
                    _ => clock,
                };
                events.push((t, tokens));
                if kind == 9 {
                    events.push((t, tokens)); // duplicate delivery
                }
            }
            events
        })
    }

    proptest! {
        #[test]
        fn window_counts_equal_the_brute_force_oracle(events in stream()) {
            let c = cfg();
            let mut w = InstallationWindows::default();
            let mut oracle = Oracle { counted: vec![], max: i64::MIN };
            for (t, tokens) in &events {
                w.apply(&c, *t, *tokens);
                oracle.apply(&c, *t, *tokens);
                // Evaluated at the event's time and at the watermark's edge.
                for probe in [*t, w.max_event_time] {
                    if probe >= w.watermark(&c) {
                        prop_assert_eq!(w.short.window(&c.short, probe), oracle.window(&c.short, probe));
                        prop_assert_eq!(w.long.window(&c.long, probe), oracle.window(&c.long, probe));
                    }
                }
            }
        }

        #[test]
        fn state_stays_bounded_by_the_buckets(events in stream()) {
            let c = cfg();
            let mut w = InstallationWindows::default();
            for (t, tokens) in &events {
                w.apply(&c, *t, *tokens);
                // Window buckets plus the grace period's, plus the current one.
                let max_short = c.short.buckets + c.lateness_ms() / c.short.bucket_ms + 2;
                let max_long = c.long.buckets + c.lateness_ms() / c.long.bucket_ms + 2;
                prop_assert!(w.short.len() as i64 <= max_short);
                prop_assert!(w.long.len() as i64 <= max_long);
            }
        }

        #[test]
        fn replaying_the_same_stream_gives_the_same_state(events in stream()) {
            let c = cfg();
            let mut a = InstallationWindows::default();
            let mut b = InstallationWindows::default();
            for (t, tokens) in &events { a.apply(&c, *t, *tokens); }
            for (t, tokens) in &events { b.apply(&c, *t, *tokens); }
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn a_window_frees_when_its_oldest_buckets_slide_out() {
        let spec = cfg().short;
        let mut b = Buckets::default();
        for i in 0..100 {
            b.add(&spec, i * 100, 10); // 100 requests in the first 10 s
        }
        let full = |c: Counts| c.requests >= 100;
        assert_eq!(b.window(&spec, 20_000).requests, 100);
        // All in bucket 0: the window is under again once bucket 0 slides out.
        assert_eq!(b.frees_at(&spec, 20_000, full), Some(300_000));
        assert_eq!(b.window(&spec, 300_000).requests, 0);
        assert_eq!(b.window(&spec, 299_999).requests, 100);
        assert_eq!(
            b.frees_at(&spec, 20_000, |c: Counts| c.requests >= 101),
            None
        );
    }

    #[test]
    fn events_behind_the_watermark_are_not_counted() {
        let c = cfg();
        let mut w = InstallationWindows::default();
        assert_eq!(w.apply(&c, 1_000_000, 1), Applied::Counted);
        assert_eq!(w.apply(&c, 1_000_000 - 69_000, 1), Applied::Counted); // within grace + skew
        assert_eq!(w.apply(&c, 1_000_000 - 71_000, 1), Applied::TooLate);
        assert_eq!(w.short.window(&c.short, 1_000_000).requests, 2);
    }
}

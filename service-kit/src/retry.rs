//! One retry policy for work that must succeed in the end (a batch of
//! billing events is never dropped): a capped exponential backoff, and a
//! verdict on each ClickHouse error that tells a fault a retry cures
//! (network, timeouts, overload, a restarting server) from one it cannot
//! (a missing table or column, a type that drifted, refused credentials).
//!
//! A permanent fault is still retried, since nothing may be lost, but
//! slowly and loudly: it is logged as an error, and the caller marks itself
//! stalled (a metric and `/ready`) so that an operator is paged instead of
//! finding a partition that stopped hours ago behind a wall of warnings.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::Probe;

/// Whether retrying can cure a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Retry soon: the fault passes by itself.
    Transient,
    /// Needs an operator (schema, grants, credentials): retrying only
    /// waits for the fix.
    Permanent,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Transient => "transient",
            Verdict::Permanent => "permanent",
        }
    }
}

/// ClickHouse error codes (`src/Common/ErrorCodes.cpp`) that no retry cures.
const PERMANENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    10,  // NOT_FOUND_COLUMN_IN_BLOCK
    16,  // NO_SUCH_COLUMN_IN_TABLE
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    36,  // BAD_ARGUMENTS
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    44,  // ILLEGAL_COLUMN
    47,  // UNKNOWN_IDENTIFIER
    48,  // NOT_IMPLEMENTED
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR
    70,  // CANNOT_CONVERT_TYPE
    81,  // UNKNOWN_DATABASE
    115, // UNKNOWN_SETTING
    117, // INCORRECT_DATA
    164, // READONLY
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    386, // NO_COMMON_TYPE
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

/// The code of a ClickHouse exception ("Code: 60. DB::Exception: ...").
pub fn clickhouse_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + "Code: ".len()..];
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

/// The verdict on an error known only by its text: permanent when it
/// carries a ClickHouse code no retry cures.
pub fn message_verdict(message: &str) -> Verdict {
    match clickhouse_code(message) {
        Some(code) if PERMANENT_CODES.contains(&code) => Verdict::Permanent,
        _ => Verdict::Transient,
    }
}

/// Whether retrying can cure `err`. What the server refused for a reason
/// that lasts, and rows that no longer match the table's columns, are
/// permanent; the network, timeouts and anything unknown are transient.
pub fn clickhouse_verdict(err: &clickhouse::error::Error) -> Verdict {
    use clickhouse::error::Error;
    match err {
        Error::BadResponse(message) => message_verdict(message),
        // The rows and the table disagree: the schema drifted.
        Error::NotEnoughData
        | Error::SchemaMismatch(_)
        | Error::InvalidColumnsHeader(_)
        | Error::InvalidTagEncoding(_)
        | Error::DeserializeAnyNotSupported
        | Error::SequenceMustHaveLength => Verdict::Permanent,
        _ => Verdict::Transient,
    }
}

/// Capped exponential backoff: `initial`, doubled after each failure up to
/// `max`; a permanent failure waits `permanent` (at least `max`).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    permanent: Duration,
    next: Duration,
}

impl Default for Backoff {
    /// 100 ms, doubling up to 5 s; 30 s after a permanent failure.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            permanent: max.max(Duration::from_secs(30)),
            next: initial,
        }
    }

    /// How long to wait after a permanent failure (never less than `max`).
    pub fn with_permanent(mut self, wait: Duration) -> Self {
        self.permanent = wait.max(self.max);
        self
    }

    /// The wait before the next try after a failure judged `verdict`.
    pub fn delay(&mut self, verdict: Verdict) -> Duration {
        match verdict {
            Verdict::Permanent => self.permanent,
            Verdict::Transient => {
                let delay = self.next;
                self.next = (self.next * 2).min(self.max);
                delay
            }
        }
    }

    /// Back to `initial` after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// Sleeps the next transient delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.delay(Verdict::Transient)).await;
    }

    /// Sleeps the delay for `verdict`; false when `shutdown` came first.
    pub async fn wait_unless(
        &mut self,
        verdict: Verdict,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let delay = self.delay(verdict);
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shutdown.changed() => false,
        }
    }
}

/// The stages of a service held up by a permanent fault, and why: shown
/// by `/ready` (the "pipeline" probe) and counted by the caller's metric.
/// Each worker of a process reports through its own handle
/// ([`Stalls::for_worker`]): one worker's stage moving again does not hide
/// another's that is still held up.
#[derive(Clone, Default)]
pub struct Stalls {
    stages: Arc<Mutex<BTreeMap<(usize, &'static str), String>>>,
    worker: usize,
}

impl Stalls {
    /// The handle of worker `worker` on the same stalls.
    pub fn for_worker(&self, worker: usize) -> Self {
        Self {
            stages: Arc::clone(&self.stages),
            worker,
        }
    }

    /// `stage` is held up by `detail` (logged by the caller).
    pub fn stalled(&self, stage: &'static str, detail: String) {
        self.lock().insert((self.worker, stage), detail);
    }

    /// `stage` moves again (for this handle's worker).
    pub fn moving(&self, stage: &'static str) {
        self.lock().remove(&(self.worker, stage));
    }

    /// How many stages are held up, over every worker.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// A readiness probe that fails while any stage is held up.
    pub fn probe(&self) -> Probe {
        let stalls = self.clone();
        Probe::new("pipeline", move || {
            let stalled: Vec<String> = stalls
                .lock()
                .iter()
                .map(|((worker, stage), detail)| {
                    format!("{stage} stalled (worker {worker}): {detail}")
                })
                .collect();
            async move {
                if stalled.is_empty() {
                    Ok(())
                } else {
                    Err(stalled.join("; "))
                }
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(usize, &'static str), String>> {
        self.stages.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_workers_stage_moving_does_not_clear_anothers_stall() {
        let stalls = Stalls::default();
        let (one, two) = (stalls.for_worker(0), stalls.for_worker(1));
        one.stalled("governance", "no grant".into());
        two.moving("governance");
        assert_eq!(stalls.count(), 1);
        two.stalled("write", "no table".into());
        assert_eq!(stalls.count(), 2);
        one.moving("governance");
        two.moving("write");
        assert_eq!(stalls.count(), 0);
    }

    fn bad(message: &str) -> clickhouse::error::Error {
        clickhouse::error::Error::BadResponse(message.into())
    }

    #[test]
    fn the_code_is_read_from_the_exception_text() {
        assert_eq!(
            clickhouse_code("Code: 60. DB::Exception: Table usage.usage_events does not exist. (UNKNOWN_TABLE) (version 26.9.2.1)"),
            Some(60)
        );
        assert_eq!(clickhouse_code("Code: 241"), Some(241));
        assert_eq!(clickhouse_code("connection reset by peer"), None);
        assert_eq!(clickhouse_code("Code: x"), None);
    }

    #[test]
    fn schema_and_access_faults_are_permanent() {
        for message in [
            "Code: 16. DB::Exception: No such column tokens in table usage.usage_events. (NO_SUCH_COLUMN_IN_TABLE)",
            "Code: 60. DB::Exception: Table usage.usage_daily does not exist. (UNKNOWN_TABLE)",
            "Code: 497. DB::Exception: processors: Not enough privileges. (ACCESS_DENIED)",
            "Code: 516. DB::Exception: default: Authentication failed. (AUTHENTICATION_FAILED)",
        ] {
            assert_eq!(clickhouse_verdict(&bad(message)), Verdict::Permanent, "{message}");
        }
        assert_eq!(
            clickhouse_verdict(&clickhouse::error::Error::NotEnoughData),
            Verdict::Permanent
        );
    }

    #[test]
    fn overload_timeouts_and_the_network_are_transient() {
        for message in [
            "Code: 241. DB::Exception: Memory limit (total) exceeded. (MEMORY_LIMIT_EXCEEDED)",
            "Code: 252. DB::Exception: Too many parts (300). (TOO_MANY_PARTS)",
            "Code: 159. DB::Exception: Timeout exceeded. (TIMEOUT_EXCEEDED)",
            "Code: 202. DB::Exception: Too many simultaneous queries. (TOO_MANY_SIMULTANEOUS_QUERIES)",
            "502 Bad Gateway",
        ] {
            assert_eq!(clickhouse_verdict(&bad(message)), Verdict::Transient, "{message}");
        }
        assert_eq!(
            clickhouse_verdict(&clickhouse::error::Error::TimedOut),
            Verdict::Transient
        );
    }

    #[tokio::test]
    async fn a_stalled_stage_fails_the_pipeline_probe_until_it_moves() {
        let stalls = Stalls::default();
        let probe = stalls.probe();
        assert_eq!(probe.run().await, Ok(()));
        stalls.stalled("write", "Code: 60. UNKNOWN_TABLE".into());
        assert_eq!(
            probe.run().await,
            Err("write stalled (worker 0): Code: 60. UNKNOWN_TABLE".to_string())
        );
        assert_eq!(stalls.count(), 1);
        stalls.moving("write");
        assert_eq!(probe.run().await, Ok(()));
    }

    #[test]
    fn the_backoff_doubles_to_its_cap_and_waits_longer_on_permanent_faults() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let waits: Vec<u128> = (0..5)
            .map(|_| b.delay(Verdict::Transient).as_millis())
            .collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
        assert_eq!(b.delay(Verdict::Permanent), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.delay(Verdict::Transient), Duration::from_millis(100));
        let mut quick = Backoff::default().with_permanent(Duration::from_millis(10));
        // Never below the transient cap.
        assert_eq!(quick.delay(Verdict::Permanent), Duration::from_secs(5));
    }
}

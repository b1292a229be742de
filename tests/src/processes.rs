//! Real processes for failure tests: processor instances that can be killed
//! with SIGKILL, and the local engines stopped and restarted via `./stack`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use usage_service_kit::clickhouse::ClickHouseArgs;
use usage_service_kit::kafka::KafkaArgs;

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub struct ProcessorProcess {
    pub child: Child,
    pub port: u16,
}

impl ProcessorProcess {
    /// Starts the processors binary (an integration test passes
    /// `env!("CARGO_BIN_EXE_e2e-processors")`); `extra` adds flags.
    pub fn spawn(
        binary: &str,
        kafka: &KafkaArgs,
        clickhouse: &ClickHouseArgs,
        group: &str,
        extra: &[&str],
    ) -> Self {
        let port = free_port();
        let child = Command::new(binary)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--group",
                group,
                "--kafka-brokers",
                &kafka.brokers,
                "--events-topic",
                &kafka.events_topic,
                "--installations-topic",
                &kafka.installations_topic,
                "--governance-topic",
                &kafka.governance_topic,
                "--decisions-topic",
                &kafka.decisions_topic,
                "--accounts-topic",
                &kafka.accounts_topic,
                "--events-partitions",
                &kafka.events_partitions.to_string(),
                "--clickhouse-url",
                &clickhouse.url,
                "--clickhouse-database",
                &clickhouse.database,
                "--batch-wait-ms",
                "50",
                "--session-timeout-ms",
                "6000",
                "--log",
                &std::env::var("USAGE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            ])
            .args(extra)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the e2e-processors binary starts");
        Self { child, port }
    }

    /// Runs an instance with a fault injected (`fault`, e.g.
    /// `["--crash-after-flush", "1"]`) until it aborts, and asserts that it
    /// did (within 60 s, and not by exiting cleanly).
    pub async fn run_until_fault(
        binary: &str,
        kafka: &KafkaArgs,
        clickhouse: &ClickHouseArgs,
        group: &str,
        fault: &[&str],
    ) {
        let mut crashing = Self::spawn(binary, kafka, clickhouse, group, fault);
        let status =
            tokio::time::timeout(std::time::Duration::from_secs(60), crashing.child.wait())
                .await
                .expect("the fault injection fires")
                .unwrap();
        assert!(!status.success(), "it aborted: {status:?}");
    }

    /// SIGKILL: no flush, no commit, no goodbye.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// A value of this instance's /metrics (0 until it answers).
    pub async fn metric(&self, name: &str) -> u64 {
        crate::metric(([127, 0, 0, 1], self.port).into(), name).await
    }

    /// Messages this instance consumed so far.
    pub async fn consumed(&self) -> u64 {
        self.metric("usage_processor_messages_consumed_total").await
    }

    /// Events-topic partitions this instance owns now.
    pub async fn partitions(&self) -> u64 {
        self.metric("usage_processor_assigned_partitions").await
    }

    /// `usage_processor_consumer_lag` per partition, as exported now.
    pub async fn lag(&self) -> std::collections::BTreeMap<u32, i64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        let Ok(r) = crate::http().get(url).send().await else {
            return Default::default();
        };
        let text = r.text().await.unwrap_or_default();
        text.lines()
            .filter_map(|l| l.strip_prefix("usage_processor_consumer_lag{partition=\""))
            .filter_map(|l| {
                let (partition, rest) = l.split_once('"')?;
                let value = rest.rsplit(' ').next()?;
                Some((partition.parse().ok()?, value.parse().ok()?))
            })
            .collect()
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn data_dir() -> PathBuf {
    std::env::var_os("USAGE_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".data"))
}

/// The pid `./stack` recorded for `component` (kafka or clickhouse).
pub fn engine_pid(component: &str) -> i32 {
    let path = data_dir().join("run").join(format!("{component}.pid"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|_| {
            panic!(
                "{} not found: outage tests need the engines started by ./stack",
                path.display()
            )
        })
        .trim()
        .parse()
        .expect("a pid")
}

/// An engine killed by a test. Dropped before `restart_engines` took it
/// (the test failed mid-outage), it brings the engines back itself, so one
/// failing outage test does not fail every test after it.
#[must_use = "restart the engines with restart_engines(outage)"]
pub struct Outage {
    armed: bool,
}

impl Drop for Outage {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::process::Command::new(repo_root().join("stack"))
                .arg("engines")
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// Stops an engine for real (SIGKILL: a crash, not a clean shutdown).
pub async fn kill_engine(component: &str) -> Outage {
    let pid = engine_pid(component);
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "kill {component} ({pid})");
    // Wait until it is really gone.
    for _ in 0..100 {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Outage { armed: true };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{component} ({pid}) did not die");
}

/// Brings the engines back with `./stack engines` (idempotent).
pub async fn restart_engines(mut outage: Outage) {
    outage.armed = false;
    let status = Command::new(repo_root().join("stack"))
        .arg("engines")
        .stdout(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(
        status.success(),
        "./stack engines failed to restart the engines"
    );
}

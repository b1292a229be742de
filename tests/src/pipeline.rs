//! A whole pipeline for one test: its own topics and database, a gateway, a
//! processor and a query API in this process, against the real engines.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use usage_ingest::signature::{sign_legacy, sign_v2};
use usage_service_kit::auth::{Claims, JwtVerifier, Role, DEV_SECRET};
use usage_service_kit::clickhouse::ClickHouseArgs;
use usage_service_kit::kafka::KafkaArgs;
use usage_service_kit::service::Service;
use usage_service_kit::telemetry::LogArgs;

use crate::{drop_database, eventually, http, kafka_args, require_kafka};

pub fn quiet_log() -> LogArgs {
    LogArgs {
        filter: std::env::var("USAGE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        log_format: usage_service_kit::telemetry::LogFormat::Text,
    }
}

pub fn ingest_config(kafka: &KafkaArgs) -> usage_ingest::Config {
    let mut c = <usage_ingest::Config as clap::Parser>::parse_from(["usage-ingest"]);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.instance = "test-gateway".into();
    c.kafka = kafka.clone();
    c.log = quiet_log();
    c
}

pub fn processors_config(
    kafka: &KafkaArgs,
    clickhouse: &ClickHouseArgs,
    group: &str,
) -> usage_processors::Config {
    let mut c = <usage_processors::Config as clap::Parser>::parse_from(["usage-processors"]);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.group = group.into();
    c.kafka = kafka.clone();
    c.clickhouse = clickhouse.clone();
    c.batch_wait_ms = 50;
    c.session_timeout_ms = 6000;
    c.log = quiet_log();
    c
}

pub fn query_config(kafka: &KafkaArgs, clickhouse: &ClickHouseArgs) -> usage_query::Config {
    let mut c = <usage_query::Config as clap::Parser>::parse_from(["usage-query"]);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.clickhouse = clickhouse.clone();
    c.kafka = kafka.clone();
    // Tests write and read at once: every figure computed when asked.
    c.dashboard.cache_secs = 0;
    c.log = quiet_log();
    c
}

/// A token signed with the services' (development default) JWT secret.
pub fn token(role: Role, account: Option<&str>) -> String {
    JwtVerifier::new(DEV_SECRET.as_bytes()).sign(&Claims {
        sub: "test".into(),
        role,
        account_id: account.map(str::to_string),
        install_ids: None,
        user_hash: None,
        exp: chrono::Utc::now().timestamp() + 3600,
        nbf: None,
        iat: None,
        ..Default::default()
    })
}

/// A token the account system issues with exactly `scope` (space-separated
/// permissions), e.g. `"usage:read data:erase"` for a privacy tool.
pub fn scoped_token(account: &str, scope: &str) -> String {
    JwtVerifier::new(DEV_SECRET.as_bytes()).sign(&Claims {
        sub: "scoped".into(),
        role: Role::Account,
        account_id: Some(account.to_string()),
        scope: Some(scope.to_string()),
        exp: chrono::Utc::now().timestamp() + 3600,
        ..Default::default()
    })
}

pub fn admin_token() -> String {
    token(Role::ProviderAdmin, None)
}

/// A plugin installation as the tests simulate it.
#[derive(Debug, Clone)]
pub struct Site {
    pub install_id: String,
    pub account_id: String,
    pub secret: String,
}

impl Site {
    pub fn new(n: u32) -> Self {
        let uuid = uuid::Uuid::new_v4();
        Self {
            install_id: format!("{uuid}_{:012x}", n),
            account_id: format!("acc_test{n}"),
            secret: format!("plugin-secret-{uuid}"),
        }
    }

    pub fn registration(&self, plan: &str) -> Value {
        json!({
            "install_id": self.install_id,
            "account_id": self.account_id,
            "secret": self.secret,
            "plan": plan,
            "site_hash": "a3b4c5d6e7f8",
            "wp_site_id": null,
            "plugin_version": "2.4.1",
            "wordpress_version": "6.8.3",
            "php_version": "8.2.12",
            "is_multisite": false
        })
    }

    pub fn user_hash(&self, wp_user_id: u32) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(format!(
            "{}:{wp_user_id}:user",
            self.install_id
        )))
    }

    pub fn batch(&self, events: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "install_id": self.install_id,
            "account_id": self.account_id,
            "events": events,
            "batch_sent_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }))
        .unwrap()
    }

    pub fn legacy_signature(&self, ts: i64) -> String {
        sign_legacy(self.secret.as_bytes(), &self.install_id, ts)
    }

    pub fn v2_signature(&self, ts: i64, body: &[u8]) -> String {
        sign_v2(self.secret.as_bytes(), ts, body)
    }
}

/// One event as the plugin writes it.
pub fn event(
    id: u128,
    user_hash: &str,
    source: &str,
    model: &str,
    prompt: u32,
    completion: u32,
    created_at: &str,
) -> Value {
    json!({
        "event_id": format!("evt_{id:032x}"),
        "wp_user_id_hash": user_hash,
        "source": source,
        "model": model,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "context": {"attachment_id": id as u64 % 100_000, "source_detail": "media_library"},
        "created_at": created_at,
        "processed_at": created_at,
    })
}

pub struct Pipeline {
    pub kafka: KafkaArgs,
    pub clickhouse: ClickHouseArgs,
    pub gateway: Option<usage_ingest::IngestService>,
    pub processors: Option<usage_processors::Processors>,
    pub query: usage_query::QueryApi,
    pub ingest_addr: SocketAddr,
    pub query_addr: SocketAddr,
}

impl Pipeline {
    /// Everything up and ready; `with_processor: false` leaves processing to the test.
    pub async fn start(with_processor: bool) -> Self {
        Self::start_with(with_processor, |_, _| {}).await
    }

    /// Like [`Pipeline::start`], with the gateway's and the processor's
    /// settings changed by `customize` first.
    pub async fn start_with(
        with_processor: bool,
        customize: impl FnOnce(&mut usage_ingest::Config, &mut usage_processors::Config),
    ) -> Self {
        usage_service_kit::telemetry::init(&quiet_log());
        let kafka = kafka_args();
        require_kafka(&kafka).await;
        let clickhouse = crate::migrated_database().await;
        let mut ingest = ingest_config(&kafka);
        let mut processor = processors_config(&kafka, &clickhouse, &crate::unique("group"));
        customize(&mut ingest, &mut processor);
        let gateway = usage_ingest::IngestService::start(ingest).await.unwrap();
        let processors = if with_processor {
            Some(
                usage_processors::Processors::start(processor)
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        let query = usage_query::QueryApi::start(query_config(&kafka, &clickhouse))
            .await
            .unwrap();
        let ingest_addr = gateway.http.addr;
        let query_addr = query.http.addr;
        let p = Self {
            kafka,
            clickhouse,
            gateway: Some(gateway),
            processors,
            query,
            ingest_addr,
            query_addr,
        };
        p.wait_ready(ingest_addr).await;
        p.wait_ready(query_addr).await;
        p
    }

    pub async fn wait_ready(&self, addr: SocketAddr) {
        crate::wait_ready_status(addr, 200, Duration::from_secs(30)).await;
    }

    /// The provider onboards `site` on `plan` (a provider admin's
    /// registration: 201 when created, 200 when re-registered).
    pub async fn register(&self, site: &Site, plan: &str) -> (u16, Value) {
        self.register_with(&admin_token(), &site.registration(plan))
            .await
    }

    /// The site's own account registers it, naming `plan` or none.
    pub async fn register_as_account(&self, site: &Site, plan: Option<&str>) -> (u16, Value) {
        let mut body = site.registration(plan.unwrap_or(""));
        if plan.is_none() {
            body.as_object_mut().unwrap().remove("plan");
        }
        self.register_with(&token(Role::Account, Some(&site.account_id)), &body)
            .await
    }

    pub async fn register_with(&self, bearer: &str, body: &Value) -> (u16, Value) {
        let r = http()
            .post(format!(
                "http://{}/api/usage/installations",
                self.ingest_addr
            ))
            .bearer_auth(bearer)
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// The provider sets `site`'s plan (`PUT .../plan`, an admin token).
    pub async fn set_plan(&self, site: &Site, plan: &str) -> (u16, Value) {
        let path = format!("/api/usage/installations/{}/plan", site.install_id);
        self.put_ingest(&path, &admin_token(), &json!({ "plan": plan }))
            .await
    }

    /// `PUT <path>` on the gateway with `body`; the status and the answer.
    pub async fn put_ingest(&self, path: &str, bearer: &str, body: &Value) -> (u16, Value) {
        let r = http()
            .put(format!("http://{}{path}", self.ingest_addr))
            .bearer_auth(bearer)
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// `POST /api/usage/admit` as the site asks it: its account token and
    /// the body signed with its secret (v2).
    pub async fn admit(&self, site: &Site, generations: u64, tokens: u64) -> (u16, Value) {
        let body = serde_json::to_vec(&json!({
            "install_id": site.install_id, "generations": generations, "tokens": tokens
        }))
        .unwrap();
        let ts = chrono::Utc::now().timestamp();
        let r = http()
            .post(format!("http://{}/api/usage/admit", self.ingest_addr))
            .bearer_auth(token(Role::Account, Some(&site.account_id)))
            .header("X-Usage-Signature", site.v2_signature(ts, &body))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// `GET /api/usage/governance` for `site`, as its account reads it.
    pub async fn governance(&self, site: &Site) -> Value {
        let r = http()
            .get(format!(
                "http://{}/api/usage/governance?install_id={}",
                self.ingest_addr, site.install_id
            ))
            .bearer_auth(token(Role::Account, Some(&site.account_id)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["governance"].clone()
    }

    /// Sends a batch signed the legacy way, as every deployed plugin does.
    pub async fn send(&self, site: &Site, body: Vec<u8>) -> (u16, Value) {
        let ts = chrono::Utc::now().timestamp();
        let r = http()
            .post(format!("http://{}/api/usage/event", self.ingest_addr))
            .bearer_auth(token(Role::Account, Some(&site.account_id)))
            .header("X-Install-Signature", site.legacy_signature(ts))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Sends events `ids` (`tokens` each), `per_batch` per request, created
    /// at `at(id)`; the status and answer of each request.
    pub async fn send_events(
        &self,
        site: &Site,
        ids: std::ops::Range<u128>,
        per_batch: usize,
        tokens: u32,
        at: impl Fn(u128) -> i64,
    ) -> Vec<(u16, Value)> {
        let iso = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        let ids: Vec<u128> = ids.collect();
        let mut out = vec![];
        for chunk in ids.chunks(per_batch) {
            let events = chunk
                .iter()
                .map(|i| {
                    event(
                        *i,
                        &site.user_hash(1),
                        "bulk",
                        "gpt-4o-mini",
                        tokens - 10,
                        10,
                        &iso(at(*i)),
                    )
                })
                .collect();
            out.push(self.send(site, site.batch(events)).await);
        }
        out
    }

    pub async fn summary(&self, query: &str) -> Value {
        let r = http()
            .get(format!(
                "http://{}/provider/usage/summary?{query}",
                self.query_addr
            ))
            .bearer_auth(admin_token())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// A value of the in-process processors' /metrics.
    pub async fn processor_metric(&self, name: &str) -> u64 {
        let processors = self.processors.as_ref().expect("started with processors");
        crate::metric(processors.http.addr, name).await
    }

    /// Rows of `usage_events` (deduplicated) and their token sum for a site.
    pub async fn raw_totals(&self, site: &Site) -> (u64, u64) {
        self.clickhouse
            .client()
            .query("SELECT count(), sum(total_tokens) FROM usage_events FINAL WHERE install_id = ?")
            .bind(&site.install_id)
            .fetch_one()
            .await
            .unwrap()
    }

    /// The installation's requests in all, as each rollup holds them:
    /// `usage_daily`, `usage_install_daily`, `usage_monthly`.
    pub async fn rollup_requests(&self, site: &Site) -> [u64; 3] {
        let sum = |table: &str| {
            let sql = format!("SELECT sum(requests) FROM {table} FINAL WHERE install_id = ?");
            let client = self.clickhouse.client();
            async move {
                client
                    .query(&sql)
                    .bind(&site.install_id)
                    .fetch_one::<u64>()
                    .await
                    .unwrap()
            }
        };
        [
            sum("usage_daily").await,
            sum("usage_install_daily").await,
            sum("usage_monthly").await,
        ]
    }

    /// Waits until the day-grouped summary of `site` has `requests` requests
    /// in all, its other rollups agree with its daily rows (a batch writes
    /// `usage_daily` first, then the other two) and its raw events are
    /// stored (they go in after the rollups).
    pub async fn wait_for_requests(&self, site: &Site, date_from: &str, requests: u64) -> Value {
        let q = format!(
            "install_id={}&date_from={date_from}&group_by=day",
            site.install_id
        );
        eventually(
            "the summary to count every event",
            Duration::from_secs(30),
            || {
                let q = q.clone();
                async move {
                    let s = self.summary(&q).await;
                    let n: u64 = s["data"]
                        .as_array()?
                        .iter()
                        .map(|r| r["total_requests"].as_u64().unwrap_or(0))
                        .sum();
                    if n != requests {
                        return None;
                    }
                    let [daily, install_daily, monthly] = self.rollup_requests(site).await;
                    if install_daily != daily || monthly != daily {
                        return None;
                    }
                    // The raw events go in after the rollups' deltas.
                    let raw: u64 = self
                        .clickhouse
                        .client()
                        .query(
                            "SELECT count() FROM usage_events FINAL
                             WHERE install_id = ? AND toDate(created_at) >= toDate(?)",
                        )
                        .bind(&site.install_id)
                        .bind(date_from)
                        .fetch_one()
                        .await
                        .ok()?;
                    (raw >= requests).then_some(s)
                }
            },
        )
        .await
    }

    /// Waits until `installation_metadata` (the registry's mirror, which
    /// follows registrations within ~200 ms) holds `n` installations.
    pub async fn wait_for_registry_mirror(&self, n: u64) {
        eventually("the registry mirror", Duration::from_secs(10), || async {
            let rows: u64 = self
                .clickhouse
                .client()
                .query("SELECT count() FROM installation_metadata FINAL")
                .fetch_one()
                .await
                .unwrap();
            (rows == n).then_some(())
        })
        .await;
    }

    pub async fn stop(mut self) {
        if let Some(p) = self.processors.take() {
            p.stop().await;
        }
        if let Some(g) = self.gateway.take() {
            g.stop().await;
        }
        self.query.stop().await;
        drop_database(&self.clickhouse).await;
        crate::drop_topics(&self.kafka).await;
    }
}

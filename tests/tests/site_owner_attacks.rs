//! What a site owner can do with what every WordPress site holds (its
//! account's token and its installation's secret), tried against the real
//! gateway, Kafka, processors and ClickHouse: each attack is refused or
//! changes nothing.
//!
//! - self-upgrade: re-registering one's own installation on a better plan;
//! - backdating: events dated in the previous month to lift a block;
//! - future-dating: one event dated ahead to blind the rate windows;
//! - secret takeover: rotating a sibling's secret with the account token;
//! - the token's reach: erasing, setting plans, registering past the limit.

use std::time::Duration;

use serde_json::{json, Value};
use usage_e2e::pipeline::{admin_token, event, scoped_token, token, Pipeline, Site};
use usage_e2e::{eventually, http};
use usage_service_kit::auth::Role;
use usage_service_kit::periods;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Sends events `ids`, `per_batch` per request, created at `at(id)`; each
/// request must be recorded.
async fn send(
    p: &Pipeline,
    site: &Site,
    ids: std::ops::Range<u128>,
    per_batch: usize,
    at: impl Fn(u128) -> i64,
) {
    for (status, body) in p.send_events(site, ids, per_batch, 100, at).await {
        assert_eq!(status, 200, "{body}");
    }
}

async fn wait_governance(
    p: &Pipeline,
    site: &Site,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    eventually(what, Duration::from_secs(30), || async {
        let g = p.governance(site).await;
        ok(&g).then_some(g)
    })
    .await
}

async fn stored(p: &Pipeline, site: &Site, n: u64) {
    eventually("the events stored", Duration::from_secs(30), || async {
        (p.raw_totals(site).await.0 == n).then_some(())
    })
    .await;
}

async fn kinds(p: &Pipeline, site: &Site) -> Vec<String> {
    p.clickhouse
        .client()
        .query("SELECT kind FROM governance_decisions FINAL WHERE install_id = ? ORDER BY at, kind")
        .bind(&site.install_id)
        .fetch_all()
        .await
        .unwrap()
}

/// Waits until the day of `ms` is at least `span_ms` from its end (UTC).
async fn not_near_midnight(span_ms: i64) {
    loop {
        let now = now_ms();
        let next_day = now - now.rem_euclid(86_400_000) + 86_400_000;
        if next_day - now > span_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis((next_day - now + 1000) as u64)).await;
    }
}

#[tokio::test]
async fn a_site_cannot_upgrade_its_own_plan() {
    let p = Pipeline::start(true).await;
    let site = Site::new(1);
    // The account registers its installation: it gets the account's plan.
    let (status, body) = p.register_as_account(&site, None).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["installation"]["plan"], "free");
    // Re-registering it with the same secret and "credits": refused, unchanged.
    let (status, body) = p.register_as_account(&site, Some("credits")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "plan_change_forbidden");
    assert_eq!(body["success"], false);
    let (status, body) = p.register_as_account(&site, None).await;
    assert_eq!(
        (status, body["installation"]["revision"].as_i64()),
        (200, Some(1))
    );
    // Nor through the provider's endpoints.
    let account = token(Role::Account, Some(&site.account_id));
    let credits = json!({"plan": "credits"});
    let plan_path = format!("/api/usage/installations/{}/plan", site.install_id);
    let account_path = format!("/api/usage/accounts/{}", site.account_id);
    assert_eq!(p.put_ingest(&plan_path, &account, &credits).await.0, 403);
    assert_eq!(p.put_ingest(&account_path, &account, &credits).await.0, 403);
    // The cap stays: 50.
    let g = p.governance(&site).await;
    assert_eq!(
        (g["plan"].as_str(), g["monthly_cap"].as_i64()),
        (Some("free"), Some(50))
    );
    p.wait_for_registry_mirror(1).await;
    let plan: String = p
        .clickhouse
        .client()
        .query("SELECT plan FROM installation_metadata FINAL WHERE install_id = ?")
        .bind(&site.install_id)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(plan, "free");

    // The provider sets the account's plan: its installations follow, and
    // the change is recorded with who made it.
    let (status, body) = p
        .put_ingest(&account_path, &admin_token(), &json!({"plan": "pro"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            body["account"]["plan"].as_str(),
            body["installations_changed"].as_u64()
        ),
        (Some("pro"), Some(1))
    );
    let (_, body) = p.register_as_account(&site, None).await;
    let history = body["installation"]["plan_history"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(history.len(), 2);
    assert_eq!(
        (
            history[0]["plan"].as_str(),
            history[0]["changed_by"].as_str()
        ),
        (Some("free"), Some("account:acc_test1"))
    );
    assert_eq!(
        (
            history[1]["plan"].as_str(),
            history[1]["changed_by"].as_str()
        ),
        (Some("pro"), Some("admin:test"))
    );
    // And a new installation of the account now gets pro.
    let mut sibling = Site::new(2);
    sibling.account_id = site.account_id.clone();
    let (status, body) = p.register_as_account(&sibling, None).await;
    assert_eq!(
        (status, body["installation"]["plan"].as_str()),
        (201, Some("pro"))
    );
    p.stop().await;
}

#[tokio::test]
async fn backdated_events_do_not_lift_a_block() {
    let p = Pipeline::start(true).await;
    let site = Site::new(3);
    assert_eq!(p.register(&site, "free").await.0, 201);
    not_near_midnight(120_000).await;
    send(&p, &site, 0..50, 10, |_| now_ms()).await;
    wait_governance(&p, &site, "the block", |g| g["level"] == "blocked").await;
    assert_eq!(p.admit(&site, 1, 100).await.1["allowed"], false);

    // One batch dated in the previous month (the gateway takes up to 35
    // days back): recorded, and counted toward the month it belongs to.
    let now = now_ms();
    // Noon on the last day of the previous month.
    let this_month = periods::month_start(now)
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_millis();
    let previous_month = this_month - 12 * 3_600_000;
    send(&p, &site, 50..60, 10, |_| previous_month).await;
    stored(&p, &site, 60).await;
    let billed = periods::month_key(periods::billing_month(previous_month, now, 48 * 3_600_000));
    let months: Vec<(String, u64)> = p
        .clickhouse
        .client()
        .query("SELECT formatDateTime(billing_month, '%Y-%m') AS m, count() FROM usage_events FINAL WHERE install_id = ? GROUP BY m ORDER BY m")
        .bind(&site.install_id)
        .fetch_all()
        .await
        .unwrap();
    assert!(
        months.contains(&(
            billed.clone(),
            if billed == periods::month_key(periods::month_start(now)) {
                60
            } else {
                10
            }
        )),
        "{months:?}"
    );

    // The processors govern a batch right after storing it; once they
    // have, the block stays, at the gateway and at admission, and nothing
    // was unblocked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let g = p.governance(&site).await;
    assert_eq!(g["level"], "blocked", "{g}");
    assert_eq!(
        p.admit(&site, 1, 100).await.1["reason"],
        "plan_limit_reached"
    );
    assert!(!kinds(&p, &site).await.contains(&"unblocked".to_string()));
    // Current events are still overage.
    send(&p, &site, 60..61, 1, |_| now_ms()).await;
    stored(&p, &site, 61).await;
    let marked: u64 = p
        .clickhouse
        .client()
        .query("SELECT count() FROM usage_events FINAL WHERE install_id = ? AND over_limit = 'plan_limit_reached'")
        .bind(&site.install_id)
        .fetch_one()
        .await
        .unwrap();
    assert!(marked >= 1, "the event after the backdated batch is marked");
    // Reports keep created_at; caps and billing, the billing month.
    let this = periods::month_key(periods::month_start(now));
    let want: Vec<(String, u64)> = if billed == this {
        vec![(this, 61)]
    } else {
        vec![(billed, 10), (this, 51)]
    };
    let query = format!(
        "install_id={}&group_by=billing_month&date_from={}",
        site.install_id,
        periods::month_start(previous_month)
    );
    eventually(
        "the summary by billing month",
        Duration::from_secs(30),
        || async {
            let s = p.summary(&query).await;
            let got: Vec<(String, u64)> = s["data"]
                .as_array()?
                .iter()
                .map(|r| {
                    (
                        r["billing_month"].as_str().unwrap().to_string(),
                        r["total_requests"].as_u64().unwrap(),
                    )
                })
                .collect();
            (got == want).then_some(())
        },
    )
    .await;
    p.stop().await;
}

#[tokio::test]
async fn a_future_dated_event_does_not_blind_the_rate_window() {
    let p = Pipeline::start(true).await;
    let site = Site::new(4);
    assert_eq!(p.register(&site, "agency").await.0, 201);
    not_near_midnight(120_000).await;
    // One event 290 s ahead (the gateway takes up to 300 s)...
    send(&p, &site, 0..1, 1, |_| now_ms() + 290_000).await;
    // ...then 150 single events now.
    send(&p, &site, 1..151, 1, |_| now_ms()).await;
    // The window sees the burst: rate limited from the 100th request.
    let g = wait_governance(&p, &site, "the burst in the window", |g| {
        g["rate_limited"] == true
    })
    .await;
    assert_eq!(g["requests_left_in_window"], 0);
    let (_, a) = p.admit(&site, 1, 100).await;
    assert_eq!(
        (a["allowed"].as_bool(), a["reason"].as_str()),
        (Some(false), Some("rate_limited"))
    );
    stored(&p, &site, 151).await;
    assert_eq!(kinds(&p, &site).await, ["rate_limited"]);
    let marked: u64 = p
        .clickhouse
        .client()
        .query("SELECT count() FROM usage_events FINAL WHERE install_id = ? AND over_limit = 'rate_limited'")
        .bind(&site.install_id)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(marked, 51, "the 101st to the 151st arrived over the limit");
    assert_eq!(
        p.processor_metric("usage_governance_events_too_late_total")
            .await,
        0
    );
    p.stop().await;
}

#[tokio::test]
async fn the_account_token_alone_cannot_take_over_an_installations_secret() {
    let p = Pipeline::start(false).await;
    let site = Site::new(5);
    let mut sibling = Site::new(6);
    sibling.account_id = site.account_id.clone();
    assert_eq!(p.register(&site, "pro").await.0, 201);
    assert_eq!(p.register(&sibling, "pro").await.0, 201);
    let rotate = |target: &Site, bearer: String, proof: Option<String>, new_secret: &str| {
        let body =
            serde_json::to_vec(&json!({"secret": new_secret, "overlap_seconds": 0})).unwrap();
        let url = format!(
            "http://{}/api/usage/installations/{}/rotate-secret",
            p.ingest_addr, target.install_id
        );
        let proof = proof.map(|secret| {
            usage_ingest::signature::sign_v2(secret.as_bytes(), now_ms() / 1000, &body)
        });
        async move {
            let mut r = http().post(url).bearer_auth(bearer).body(body);
            if let Some(sig) = proof {
                r = r.header("X-Usage-Signature", sig);
            }
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let account = token(Role::Account, Some(&site.account_id));
    let attacker = "attacker-chosen-secret-0001";
    // The token alone: refused.
    let (status, body) = rotate(&sibling, account.clone(), None, attacker).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("rotation_proof_required"))
    );
    // Signed with the secret this site holds, not the sibling's: refused.
    let (status, body) = rotate(
        &sibling,
        account.clone(),
        Some(site.secret.clone()),
        attacker,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("invalid_signature"))
    );
    // The sibling's secret still signs; the attacker's does not.
    let batch = sibling.batch(vec![event(
        1,
        &sibling.user_hash(1),
        "inline",
        "gpt-4o-mini",
        90,
        10,
        &iso(now_ms()),
    )]);
    assert_eq!(p.send(&sibling, batch.clone()).await.0, 200);
    let mut forged = sibling.clone();
    forged.secret = attacker.into();
    assert_eq!(p.send(&forged, batch.clone()).await.0, 403);

    // The site itself rotates with proof of its current secret; a provider
    // admin may without.
    let (status, _) = rotate(
        &sibling,
        account,
        Some(sibling.secret.clone()),
        "sibling-new-secret-0001",
    )
    .await;
    assert_eq!(status, 200);
    let mut rotated = sibling.clone();
    rotated.secret = "sibling-new-secret-0001".into();
    assert_eq!(p.send(&rotated, batch.clone()).await.0, 200);
    let (status, _) = rotate(&sibling, admin_token(), None, "sibling-new-secret-0002").await;
    assert_eq!(status, 200);
    p.stop().await;
}

#[tokio::test]
async fn a_site_token_sends_and_reads_but_cannot_erase_set_plans_or_register_past_the_limit() {
    let p = Pipeline::start_with(true, |ingest, _| {
        ingest.max_installations_per_account = 2;
    })
    .await;
    let site = Site::new(7);
    let account = token(Role::Account, Some(&site.account_id));
    assert_eq!(p.register_as_account(&site, None).await.0, 201);
    send(&p, &site, 0..1, 1, |_| now_ms()).await;
    // Reading its own usage: yes (once the query service's mirror of the
    // registry knows the installation is the account's).
    p.wait_for_registry_mirror(1).await;
    let r = http()
        .get(format!(
            "http://{}/provider/usage/summary?install_id={}",
            p.query_addr, site.install_id
        ))
        .bearer_auth(&account)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Erasing: no (that takes a token with data:erase).
    let r = http()
        .delete(format!(
            "http://{}/api/usage/installations/{}",
            p.query_addr, site.install_id
        ))
        .bearer_auth(&account)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("data:erase permission"),
        "{body}"
    );
    // A token the account system issued for erasure may.
    let eraser = scoped_token(&site.account_id, "usage:read data:erase");
    let r = http()
        .delete(format!(
            "http://{}/api/usage/installations/{}",
            p.query_addr, site.install_id
        ))
        .bearer_auth(&eraser)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The account may register 2 installations; the third is refused,
    // until the provider raises the limit.
    let (a, b, c) = (Site::new(8), Site::new(9), Site::new(10));
    let mine = |mut s: Site| {
        s.account_id = "acc_limited".into();
        s
    };
    let (a, b, c) = (mine(a), mine(b), mine(c));
    assert_eq!(p.register_as_account(&a, None).await.0, 201);
    assert_eq!(p.register_as_account(&b, None).await.0, 201);
    let (status, body) = p.register_as_account(&c, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("installation_limit_reached"))
    );
    let (status, body) = p
        .put_ingest(
            "/api/usage/accounts/acc_limited",
            &admin_token(),
            &json!({"max_installations": 3}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            body["account"]["max_installations"].as_u64(),
            body["account"]["installations"].as_u64()
        ),
        (Some(3), Some(2))
    );
    assert_eq!(p.register_as_account(&c, None).await.0, 201);
    p.stop().await;
}

//! The deployed fleet enrolls itself: an unknown installation becomes known
//! on its first signed sync that brings its secret (`X-Install-Secret`),
//! as the plugin's original backend did, and never again after that.

use std::time::Duration;

use serde_json::{json, Value};
use usage_e2e::pipeline::{admin_token, event, Pipeline, Site};
use usage_e2e::{eventually, http};
use usage_ingest::signature::sign_legacy;
use usage_service_kit::auth::{JwtVerifier, DEV_SECRET};

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

/// A token as the plugin's original account system issues it: no role, the
/// account's numeric id in `id`.
fn legacy_token(account: u64) -> String {
    JwtVerifier::new(DEV_SECRET.as_bytes()).sign_payload(&json!({
        "id": account, "email": "owner@example.com", "exp": now().timestamp() + 3600
    }))
}

/// A deployed plugin's sync: the legacy signature, its metadata headers, and
/// (with `secret_header`) the secret it was activated with.
async fn sync(
    p: &Pipeline,
    site: &Site,
    bearer: &str,
    signing_secret: &str,
    secret_header: Option<&str>,
    plugin_version: &str,
    event_id: u128,
) -> (u16, Value) {
    let ts = now().timestamp();
    let created = now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // The deployed plugin sends the account as a JSON number.
    let body = serde_json::to_vec(&json!({
        "install_id": site.install_id,
        "account_id": site.account_id.parse::<u64>().unwrap(),
        "events": [event(event_id, &site.user_hash(1), "inline", "gpt-4o-mini", 90, 10, &created)],
    }))
    .unwrap();
    let mut r = http()
        .post(format!("http://{}/api/usage/event", p.ingest_addr))
        .bearer_auth(bearer)
        .header(
            "X-Install-Signature",
            sign_legacy(signing_secret.as_bytes(), &site.install_id, ts),
        )
        .header("X-Plugin-Version", plugin_version)
        .header("X-WP-Version", "6.8.3")
        .header("X-PHP-Version", "8.2.12")
        .header("X-Is-Multisite", "0")
        .header("X-Plan", "agency")
        .header("Content-Type", "application/json")
        .body(body);
    if let Some(secret) = secret_header {
        r = r.header("X-Install-Secret", secret);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn metadata(p: &Pipeline, site: &Site) -> Option<(String, String, String)> {
    p.clickhouse
        .client()
        .query("SELECT account_id, plan, plugin_version FROM installation_metadata FINAL WHERE install_id = ?")
        .bind(&site.install_id)
        .fetch_optional()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_unknown_installation_enrolls_on_its_first_signed_sync_and_only_then() {
    let p = Pipeline::start_with(true, |ingest, _| {
        ingest.jwt.account_claim = "id".into();
        // Metadata revisions as often as they change (10 minutes apart by default).
        ingest.metadata_every_secs = 0;
    })
    .await;
    let mut site = Site::new(1);
    site.account_id = "4217".into();
    let bearer = legacy_token(4217);

    // Unknown, without its secret: refused as before.
    let (status, body) = sync(&p, &site, &bearer, &site.secret, None, "2.4.1", 1).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("unknown_installation"))
    );
    // With a secret that does not sign the request: refused, nothing enrolled.
    let (status, body) = sync(
        &p,
        &site,
        &bearer,
        &site.secret,
        Some("some-other-secret-0001"),
        "2.4.1",
        1,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("invalid_signature"))
    );
    // Another account's token: refused.
    let (status, _) = sync(
        &p,
        &site,
        &legacy_token(99),
        &site.secret,
        Some(&site.secret),
        "2.4.1",
        1,
    )
    .await;
    assert_eq!(status, 403);

    // The first signed sync that brings its secret: enrolled, stored, counted.
    let (status, body) = sync(
        &p,
        &site,
        &bearer,
        &site.secret,
        Some(&site.secret),
        "2.4.1",
        1,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["received"], 1);
    // With the account's plan, never the one the site claims (X-Plan: agency).
    assert_eq!(body["governance"]["plan"], "free");
    let m = eventually("the registry mirror", Duration::from_secs(10), || async {
        metadata(&p, &site).await
    })
    .await;
    assert_eq!(
        m,
        ("4217".to_string(), "free".to_string(), "2.4.1".to_string())
    );

    // A later sync bringing another secret changes nothing: its signature
    // is checked against the enrolled secret.
    let attacker = "attacker-secret-000000001";
    let (status, body) = sync(&p, &site, &bearer, attacker, Some(attacker), "2.4.1", 2).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("invalid_signature"))
    );
    let (status, _) = sync(&p, &site, &bearer, &site.secret, Some(attacker), "2.5.0", 3).await;
    assert_eq!(status, 200);
    // ...and the metadata headers update what changed (a new plugin version).
    let m = eventually(
        "the new plugin version",
        Duration::from_secs(10),
        || async { metadata(&p, &site).await.filter(|m| m.2 == "2.5.0") },
    )
    .await;
    assert_eq!(m.1, "free");
    p.wait_for_requests(&site, &now().date_naive().to_string(), 2)
        .await;

    // The registry says how it became known (the provider's registration
    // of the same installation and secret is one more revision).
    let r = http()
        .post(format!("http://{}/api/usage/installations", p.ingest_addr))
        .bearer_auth(admin_token())
        .json(&site.registration("free"))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["installation"]["registered_by"], "first_sync");
    assert_eq!(
        body["installation"]["plan_history"][0]["changed_by"],
        "first_sync"
    );
    assert_eq!(
        body["installation"]["revision"], 3,
        "enrolled, the new plugin version, the provider's registration"
    );
    p.stop().await;
}

#[tokio::test]
async fn enrollment_respects_the_policy_and_the_accounts_limit() {
    let p = Pipeline::start_with(false, |ingest, _| {
        ingest.max_installations_per_account = 1;
    })
    .await;
    let (a, b) = (Site::new(2), Site::new(3));
    let mut b = b;
    b.account_id = a.account_id.clone();
    let bearer =
        usage_e2e::pipeline::token(usage_service_kit::auth::Role::Account, Some(&a.account_id));
    let send = |site: &Site| {
        let site = site.clone();
        let bearer = bearer.clone();
        let p = &p;
        async move {
            let ts = now().timestamp();
            let batch = site.batch(vec![event(
                1,
                &site.user_hash(1),
                "inline",
                "gpt-4o-mini",
                90,
                10,
                &now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            )]);
            let r = http()
                .post(format!("http://{}/api/usage/event", p.ingest_addr))
                .bearer_auth(bearer)
                .header("X-Install-Signature", site.legacy_signature(ts))
                .header("X-Install-Secret", &site.secret)
                .body(batch)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(send(&a).await.0, 200);
    let (status, body) = send(&b).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("installation_limit_reached"))
    );
    p.stop().await;

    // With enrollment off, only explicit registration makes an installation known.
    let p = Pipeline::start_with(false, |ingest, _| {
        ingest.enrollment = "off".into();
    })
    .await;
    let c = Site::new(4);
    let ts = now().timestamp();
    let r = http()
        .post(format!("http://{}/api/usage/event", p.ingest_addr))
        .bearer_auth(usage_e2e::pipeline::token(
            usage_service_kit::auth::Role::Account,
            Some(&c.account_id),
        ))
        .header("X-Install-Signature", c.legacy_signature(ts))
        .header("X-Install-Secret", &c.secret)
        .body(c.batch(vec![]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    p.stop().await;
}

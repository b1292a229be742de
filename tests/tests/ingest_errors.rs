//! Every way the gateway refuses a request: the exact status and JSON body,
//! and nothing stored. Only the gateway runs (no processor needed).

use serde_json::{json, Value};
use usage_e2e::http;
use usage_e2e::pipeline::{event, token, Pipeline, Site};
use usage_service_kit::auth::{Claims, JwtVerifier, Role, DEV_SECRET};
use usage_service_kit::service::Service;

struct Call<'a> {
    p: &'a Pipeline,
    path: &'a str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

impl<'a> Call<'a> {
    fn new(p: &'a Pipeline, body: Vec<u8>) -> Self {
        Self {
            p,
            path: "/api/usage/event",
            body,
            headers: vec![],
        }
    }
    fn header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }
    async fn send(self) -> (u16, Value, Option<String>) {
        let mut req = http()
            .post(format!("http://{}{}", self.p.ingest_addr, self.path))
            .header("Content-Type", "application/json")
            .body(self.body);
        for (k, v) in self.headers {
            req = req.header(k, v);
        }
        let r = req.send().await.unwrap();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), r.json().await.unwrap(), retry)
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn recent() -> String {
    (chrono::Utc::now() - chrono::Duration::minutes(2))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn good(site: &Site, id: u128) -> Value {
    event(
        id,
        &site.user_hash(1),
        "inline",
        "gpt-4o-mini",
        150,
        25,
        &recent(),
    )
}

fn signed<'a>(p: &'a Pipeline, site: &Site, body: Vec<u8>) -> Call<'a> {
    Call::new(p, body)
        .header(
            "Authorization",
            format!("Bearer {}", token(Role::Account, Some(&site.account_id))),
        )
        .header("X-Install-Signature", site.legacy_signature(now()))
}

fn error_body(code: &str) -> impl Fn(&Value) {
    let code = code.to_string();
    move |body: &Value| {
        assert_eq!(body["success"], false, "{body}");
        assert_eq!(body["error"], code.as_str(), "{body}");
        assert_eq!(body["received"], 0, "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
}

#[tokio::test]
async fn refusals_have_the_contract_status_and_body() {
    let p = Pipeline::start(false).await;
    let site = Site::new(1);
    let other = Site::new(2);
    assert_eq!(p.register(&site, "pro").await.0, 201);
    assert_eq!(p.register(&other, "pro").await.0, 201);
    let body = site.batch(vec![good(&site, 1)]);

    // 400: not JSON, wrong top-level types.
    let (s, b, _) = signed(&p, &site, b"{not json".to_vec()).send().await;
    assert_eq!(s, 400);
    error_body("malformed_payload")(&b);
    let (s, b, _) = signed(
        &p,
        &site,
        br#"{"install_id": 1, "account_id": "acc", "events": []}"#.to_vec(),
    )
    .send()
    .await;
    assert_eq!(s, 400);
    error_body("malformed_payload")(&b);

    // 401: no token, bad token, expired token.
    let (s, b, _) = Call::new(&p, body.clone())
        .header("X-Install-Signature", site.legacy_signature(now()))
        .send()
        .await;
    assert_eq!(s, 401);
    error_body("invalid_token")(&b);
    let forged = JwtVerifier::new(b"not-the-secret").sign(&Claims {
        sub: "x".into(),
        role: Role::ProviderAdmin,
        account_id: None,
        install_ids: None,
        user_hash: None,
        exp: now() + 60,
        nbf: None,
        iat: None,
        ..Default::default()
    });
    let (s, b, _) = Call::new(&p, body.clone())
        .header("Authorization", format!("Bearer {forged}"))
        .send()
        .await;
    assert_eq!(s, 401);
    error_body("invalid_token")(&b);
    let expired = JwtVerifier::new(DEV_SECRET.as_bytes()).sign(&Claims {
        sub: "x".into(),
        role: Role::Account,
        account_id: Some(site.account_id.clone()),
        install_ids: None,
        user_hash: None,
        exp: now() - 3600,
        nbf: None,
        iat: None,
        ..Default::default()
    });
    let (s, b, _) = Call::new(&p, body.clone())
        .header("Authorization", format!("Bearer {expired}"))
        .send()
        .await;
    assert_eq!(s, 401);
    error_body("token_expired")(&b);

    // 403: unknown installation, someone else's account, forged, stale and
    // missing signatures, legacy signature on a v2-only installation.
    let stranger = Site::new(3);
    let (s, b, _) = signed(&p, &stranger, stranger.batch(vec![good(&stranger, 9)]))
        .send()
        .await;
    assert_eq!(s, 403);
    error_body("unknown_installation")(&b);
    let (s, b, _) = Call::new(&p, body.clone())
        .header(
            "Authorization",
            format!("Bearer {}", token(Role::Account, Some(&other.account_id))),
        )
        .header("X-Install-Signature", site.legacy_signature(now()))
        .send()
        .await;
    assert_eq!(s, 403);
    error_body("account_mismatch")(&b);
    let (s, b, _) = Call::new(&p, body.clone())
        .header(
            "Authorization",
            format!("Bearer {}", token(Role::Account, Some(&site.account_id))),
        )
        .header("X-Install-Signature", other.legacy_signature(now()))
        .send()
        .await;
    assert_eq!(s, 403);
    error_body("invalid_signature")(&b);
    assert_eq!(b["message"], "Installation signature validation failed");
    // Clear of the 300 s bound, so that a second ticking between this
    // signature and the gateway's check cannot bring it back in (the exact
    // bound is unit-tested in the gateway).
    for skew in [-330, 400, 3600] {
        let (s, b, _) = Call::new(&p, body.clone())
            .header(
                "Authorization",
                format!("Bearer {}", token(Role::Account, Some(&site.account_id))),
            )
            .header("X-Install-Signature", site.legacy_signature(now() - skew))
            .send()
            .await;
        assert_eq!(s, 403, "skew {skew}");
        error_body("signature_expired")(&b);
    }
    let (s, b, _) = Call::new(&p, body.clone())
        .header(
            "Authorization",
            format!("Bearer {}", token(Role::Account, Some(&site.account_id))),
        )
        .send()
        .await;
    assert_eq!(s, 403);
    error_body("missing_signature")(&b);
    // v2: the body is covered; a tampered body fails, the signed one passes.
    let ts = now();
    let v2 = site.v2_signature(ts, &body);
    let tampered = site.batch(vec![event(
        1,
        &site.user_hash(1),
        "inline",
        "gpt-4o-mini",
        15_000,
        25,
        &recent(),
    )]);
    let (s, b, _) = Call::new(&p, tampered)
        .header(
            "Authorization",
            format!("Bearer {}", token(Role::Account, Some(&site.account_id))),
        )
        .header("X-Usage-Signature", v2.clone())
        .send()
        .await;
    assert_eq!(s, 403);
    error_body("invalid_signature")(&b);
    let (s, b, _) = Call::new(&p, body.clone())
        .header(
            "Authorization",
            format!("Bearer {}", token(Role::Account, Some(&site.account_id))),
        )
        .header("X-Usage-Signature", v2)
        .send()
        .await;
    assert_eq!(s, 200, "{b}");
    // A v2-only installation refuses the legacy scheme.
    let mut v2_only = site.registration("pro");
    v2_only["signature_policy"] = json!("v2_only");
    let r = http()
        .post(format!("http://{}/api/usage/installations", p.ingest_addr))
        .bearer_auth(token(Role::Account, Some(&site.account_id)))
        .json(&v2_only)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, b, _) = signed(&p, &site, body.clone()).send().await;
    assert_eq!(s, 403);
    error_body("body_signature_required")(&b);
    let ts = now();
    let (s, _, _) = Call::new(&p, body.clone())
        .header(
            "Authorization",
            format!("Bearer {}", token(Role::Account, Some(&site.account_id))),
        )
        .header("X-Usage-Signature", site.v2_signature(ts, &body))
        .send()
        .await;
    assert_eq!(s, 200);

    // 413: body over the configured limit (1 MiB).
    let huge = vec![b' '; (1 << 20) + 1];
    let (s, b, _) = signed(&p, &other, huge).send().await;
    assert_eq!(s, 413);
    error_body("payload_too_large")(&b);

    // 422: nothing valid in the batch; every refusal says which and why.
    let mut bad = good(&other, 5);
    bad["total_tokens"] = json!(1);
    let mut worse = good(&other, 6);
    worse["source"] = json!("api");
    let (s, b, _) = signed(&p, &other, other.batch(vec![bad, worse]))
        .send()
        .await;
    assert_eq!(s, 422);
    error_body("validation_failed")(&b);
    assert_eq!(
        b["rejected"],
        json!([
            {"index": 0, "event_id": "evt_00000000000000000000000000000005", "error": "inconsistent_tokens",
             "message": "total_tokens 1 is not prompt_tokens 150 + completion_tokens 25"},
            {"index": 1, "event_id": "evt_00000000000000000000000000000006", "error": "invalid_source",
             "message": "source \"api\" is not one of inline, bulk, queue, manual"}
        ])
    );
    let (s, b, _) = signed(&p, &other, other.batch(vec![])).send().await;
    assert_eq!(s, 422);
    error_body("empty_batch")(&b);

    // 200 with a partial refusal: the good event is accepted, the bad one named.
    let mut future = good(&other, 8);
    future["created_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339());
    let (s, b, _) = signed(&p, &other, other.batch(vec![good(&other, 7), future]))
        .send()
        .await;
    assert_eq!(s, 200);
    assert_eq!(b["success"], true);
    assert_eq!(b["received"], 1);
    assert_eq!(
        b["event_ids"],
        json!(["evt_00000000000000000000000000000007"])
    );
    assert_eq!(b["rejected"][0]["error"], "timestamp_in_future");
    assert_eq!(b["message"], "1 events recorded, 1 rejected");

    // 404 in the same shape.
    let r = http()
        .get(format!("http://{}/nope", p.ingest_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    error_body("not_found")(&r.json().await.unwrap());
    let r = http()
        .get(format!("http://{}/api/usage/event", p.ingest_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    error_body("method_not_allowed")(&r.json().await.unwrap());
    p.stop().await;
}

#[tokio::test]
async fn registration_is_idempotent_checked_and_scoped() {
    let p = Pipeline::start(false).await;
    let site = Site::new(1);
    let (s, b) = p.register(&site, "free").await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["installation"]["revision"], 1);
    assert!(
        b["installation"].get("secret").is_none(),
        "secrets are never returned"
    );
    assert!(!b.to_string().contains(&site.secret));
    // Same request again: same record, nothing written.
    let (s, again) = p.register(&site, "free").await;
    assert_eq!(s, 200);
    assert_eq!(again, b);
    // A plan change is a new revision.
    let (s, b) = p.register(&site, "agency").await;
    assert_eq!(s, 200);
    assert_eq!(b["installation"]["plan"], "agency");
    assert_eq!(b["installation"]["revision"], 2);
    // Another secret for the same installation is a conflict (rotate instead).
    let mut other_secret = site.clone();
    other_secret.secret = "a-completely-different-secret".into();
    let (s, b) = p.register(&other_secret, "agency").await;
    assert_eq!(s, 409);
    assert_eq!(b["error"], "secret_mismatch");
    // Invalid fields are 422, another account's token 403.
    let mut bad = site.registration("gold");
    let r = http()
        .post(format!("http://{}/api/usage/installations", p.ingest_addr))
        .bearer_auth(token(Role::Account, Some(&site.account_id)))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "invalid_installation"
    );
    bad["plan"] = json!("pro");
    let r = http()
        .post(format!("http://{}/api/usage/installations", p.ingest_addr))
        .bearer_auth(token(Role::Account, Some("acc_somebody_else")))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Rotation: proved with the current secret (the request signed with
    // it); the old secret keeps working during the overlap only.
    let rotate = |overlap: i64, secret: &str, proof: &str| {
        let body =
            serde_json::to_vec(&json!({"secret": secret, "overlap_seconds": overlap})).unwrap();
        let url = format!(
            "http://{}/api/usage/installations/{}/rotate-secret",
            p.ingest_addr, site.install_id
        );
        let auth = token(Role::Account, Some(&site.account_id));
        let signature = usage_ingest::signature::sign_v2(proof.as_bytes(), now(), &body);
        async move {
            http()
                .post(url)
                .bearer_auth(auth)
                .header("X-Usage-Signature", signature)
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let r = rotate(600, "rotated-secret-number-one", &site.secret).await;
    assert_eq!(r.status(), 200);
    let batch = site.batch(vec![good(&site, 1)]);
    assert_eq!(
        p.send(&site, batch.clone()).await.0,
        200,
        "old secret within the overlap"
    );
    let mut rotated = site.clone();
    rotated.secret = "rotated-secret-number-one".into();
    assert_eq!(p.send(&rotated, batch.clone()).await.0, 200, "new secret");
    // The rotated-out secret proves nothing, even within its overlap.
    let r = rotate(0, "rotated-secret-number-two", &site.secret).await;
    assert_eq!(r.status(), 403);
    let r = rotate(0, "rotated-secret-number-two", &rotated.secret).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        p.send(&rotated, batch.clone()).await.0,
        403,
        "overlap 0: the previous secret is dead"
    );
    p.stop().await;
}

#[tokio::test]
async fn a_registration_on_one_gateway_is_usable_on_another_within_a_second() {
    let p = Pipeline::start(false).await;
    let second = usage_ingest::IngestService::start(usage_e2e::pipeline::ingest_config(&p.kafka))
        .await
        .unwrap();
    p.wait_ready(second.http.addr).await;
    let site = Site::new(1);
    assert_eq!(p.register(&site, "pro").await.0, 201);
    let started = std::time::Instant::now();
    usage_e2e::eventually(
        "the second gateway to know the installation",
        std::time::Duration::from_secs(1),
        || {
            let known = second.registry.get(&site.install_id).is_some();
            async move { known.then_some(()) }
        },
    )
    .await;
    println!(
        "registration visible on the second gateway after {:?}",
        started.elapsed()
    );
    // And a fresh gateway (a restart) rebuilds the registry from the topic.
    let third = usage_ingest::IngestService::start(usage_e2e::pipeline::ingest_config(&p.kafka))
        .await
        .unwrap();
    p.wait_ready(third.http.addr).await;
    assert_eq!(
        third.registry.get(&site.install_id).unwrap().record.plan,
        "pro"
    );
    second.stop().await;
    third.stop().await;
    p.stop().await;
}

//! Who sees what: every role × every query endpoint × own and foreign
//! installations, asserting the status and exactly the rows visible.
//!
//! Account X owns a multisite network of two sub-sites (A1, A2); account Y
//! owns B. A1 has 3 generations by user 1 and 2 by user 2, A2 has 4, B has 6.

use serde_json::{json, Value};
use usage_e2e::http;
use usage_e2e::pipeline::{admin_token, event, scoped_token, Pipeline, Site};
use usage_service_kit::auth::{Claims, JwtVerifier, Role, DEV_SECRET};

fn token(
    role: Role,
    account: Option<&str>,
    installs: &[&Site],
    user_hash: Option<String>,
) -> String {
    JwtVerifier::new(DEV_SECRET.as_bytes()).sign(&Claims {
        sub: format!("{role:?}"),
        role,
        account_id: account.map(str::to_string),
        install_ids: (!installs.is_empty())
            .then(|| installs.iter().map(|s| s.install_id.clone()).collect()),
        user_hash,
        exp: chrono::Utc::now().timestamp() + 3600,
        nbf: None,
        iat: None,
        ..Default::default()
    })
}

/// A call's status and the generations it made visible.
type Seen = (u16, Option<u64>);

async fn call(p: &Pipeline, bearer: &str, method: &str, path: &str, body: Option<Value>) -> Seen {
    let url = format!("http://{}{path}", p.query_addr);
    let request = match method {
        "GET" => http().get(url),
        "POST" => http().post(url).json(&body.unwrap()),
        _ => http().delete(url),
    };
    let r = request.bearer_auth(bearer).send().await.unwrap();
    let status = r.status().as_u16();
    let is_csv = r
        .headers()
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap().starts_with("text/csv"));
    let text = r.text().await.unwrap();
    if status != 200 {
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["success"], false, "{text}");
        return (status, None);
    }
    if is_csv {
        // Requests are the 4th column of the contract's CSV.
        let n = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(3).unwrap().parse::<u64>().unwrap())
            .sum();
        return (status, Some(n));
    }
    let body: Value = serde_json::from_str(&text).unwrap();
    let visible = if let Some(n) = body["data"]["usage"]["all_time"]["generations"].as_u64() {
        // The fleet overview and an installation's detail.
        n
    } else if let Some(rows) = body["data"].as_array() {
        rows.iter()
            .map(|r| r["total_requests"].as_u64().unwrap())
            .sum()
    } else if let Some(events) = body["events"].as_array() {
        events.len() as u64
    } else if let Some(list) = body["installations"].as_array() {
        list.iter()
            .map(|i| i["total_requests"].as_u64().unwrap())
            .sum()
    } else {
        0
    };
    (status, Some(visible))
}

#[tokio::test]
async fn every_role_sees_exactly_its_own_rows_on_every_endpoint() {
    let p = Pipeline::start(true).await;
    let (a1, mut a2, b) = (Site::new(1), Site::new(2), Site::new(3));
    a2.account_id = a1.account_id.clone();
    for s in [&a1, &a2, &b] {
        assert_eq!(p.register(s, "pro").await.0, 201);
    }
    let when = usage_e2e::a_minute_ago_today();
    let at = when.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let data = [
        (&a1, vec![1, 1, 1, 2, 2]),
        (&a2, vec![1, 1, 1, 1]),
        (&b, vec![1; 6]),
    ];
    for (site, users) in &data {
        let events = users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                event(
                    i as u128,
                    &site.user_hash(*u),
                    "inline",
                    "gpt-4o-mini",
                    10,
                    5,
                    &at,
                )
            })
            .collect();
        assert_eq!(p.send(site, site.batch(events)).await.0, 200);
    }
    let today = when.date_naive().to_string();
    for (site, users) in &data {
        p.wait_for_requests(site, &today, users.len() as u64).await;
    }
    p.wait_for_registry_mirror(3).await;

    let x = Some(a1.account_id.as_str());
    let roles = [
        ("provider_admin", admin_token()),
        ("account X", token(Role::Account, x, &[], None)),
        (
            "network admin of A1+A2",
            token(Role::NetworkAdmin, x, &[&a1, &a2], None),
        ),
        ("site admin of A1", token(Role::SiteAdmin, x, &[&a1], None)),
        (
            "user 1 of A1",
            token(Role::User, x, &[&a1], Some(a1.user_hash(1))),
        ),
        // A token listing a foreign installation still sees nothing of it.
        (
            "site admin of X listing B",
            token(Role::SiteAdmin, x, &[&b], None),
        ),
    ];
    let summary = |s: &Site| {
        format!(
            "/provider/usage/summary?install_id={}&date_from={today}",
            s.install_id
        )
    };
    let events = |s: &Site| {
        format!(
            "/provider/usage/events?install_id={}&date_from={today}",
            s.install_id
        )
    };
    // Expected (status, visible generations) per role, in the order above.
    let ok = |n: u64| (200u16, Some(n));
    let no = (403u16, None);
    let matrix: Vec<(String, &str, Option<Value>, [Seen; 6])> = vec![
        (
            summary(&a1),
            "GET",
            None,
            [ok(5), ok(5), ok(5), ok(5), ok(3), no],
        ),
        (summary(&a2), "GET", None, [ok(4), ok(4), ok(4), no, no, no]),
        (summary(&b), "GET", None, [ok(6), no, no, no, no, no]),
        (
            events(&a1),
            "GET",
            None,
            [ok(5), ok(5), ok(5), ok(5), ok(3), no],
        ),
        (events(&a2), "GET", None, [ok(4), ok(4), ok(4), no, no, no]),
        (events(&b), "GET", None, [ok(6), no, no, no, no, no]),
        (
            "/api/usage/export".into(),
            "POST",
            Some(json!({"install_id": a1.install_id, "date_from": today})),
            [ok(5), ok(5), ok(5), ok(5), ok(3), no],
        ),
        (
            "/api/usage/export".into(),
            "POST",
            Some(json!({"install_id": b.install_id, "date_from": today})),
            [ok(6), no, no, no, no, no],
        ),
        // Lists and fleet figures cover what the token may see; a token
        // listing a foreign installation sees an empty fleet.
        (
            format!("/api/usage/installations?date_from={today}"),
            "GET",
            None,
            [ok(15), ok(9), ok(9), ok(5), no, ok(0)],
        ),
        (
            "/provider/fleet/overview".into(),
            "GET",
            None,
            [ok(15), ok(9), ok(9), ok(5), no, ok(0)],
        ),
        (
            format!("/provider/installations/{}", a1.install_id),
            "GET",
            None,
            [ok(5), ok(5), ok(5), ok(5), no, no],
        ),
        (
            format!("/provider/installations/{}", b.install_id),
            "GET",
            None,
            [ok(6), no, no, no, no, no],
        ),
    ];
    for (path, method, body, expected) in &matrix {
        for ((role, bearer), want) in roles.iter().zip(expected) {
            let got = call(&p, bearer, method, path, body.clone()).await;
            assert_eq!(got, *want, "{role}: {method} {path}");
        }
    }

    // Erasure: a token with data:erase of the owning account (or a provider
    // admin). The account token every site holds may not (it lacks
    // data:erase), nor may anybody else, nor B's account with data:erase.
    let eraser = |account: &str| scoped_token(account, "usage:read data:erase");
    let erase_a2 = format!("/api/usage/installations/{}", a2.install_id);
    let mut forbidden: Vec<(&str, String)> = roles[1..].to_vec();
    forbidden.push(("account Y with data:erase", eraser(&b.account_id)));
    for (role, bearer) in &forbidden {
        assert_eq!(
            call(&p, bearer, "DELETE", &erase_a2, None).await.0,
            403,
            "{role}"
        );
    }
    let (status, _) = call(&p, &eraser(&a2.account_id), "DELETE", &erase_a2, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        call(&p, &roles[0].1, "GET", &summary(&a2), None).await,
        ok(0)
    );
    assert_eq!(
        call(&p, &roles[0].1, "GET", &summary(&a1), None).await,
        ok(5)
    );
    p.stop().await;
}

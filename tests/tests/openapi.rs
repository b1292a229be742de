//! Every service serves its OpenAPI 3 document at /openapi.json, and the
//! document is true: each documented operation is called for real and must
//! answer a documented status with a body that has every required field of
//! the documented schema; calls without a token must answer a documented
//! status too; and the documented operations are exactly the ones the
//! service's route table (in its `routes.rs`) lists.

use std::net::SocketAddr;

use serde_json::{json, Value};
use usage_e2e::http;
use usage_e2e::pipeline::{admin_token, event, token, Pipeline, Site};
use usage_service_kit::auth::Role;

async fn document(addr: SocketAddr) -> Value {
    let r = http()
        .get(format!("http://{addr}/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    doc
}

fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut ops: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    ops.sort();
    ops
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Checks `body` against `schema`'s required fields and types, recursively
/// (OpenAPI 3.0's `nullable` and 3.1's type lists, `oneOf`/`anyOf`/`allOf`,
/// maps as `additionalProperties`).
fn conforms(doc: &Value, schema: &Value, body: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    for (key, any) in [("oneOf", true), ("anyOf", true), ("allOf", false)] {
        if let Some(alternatives) = schema[key].as_array() {
            let results: Vec<Result<(), String>> = alternatives
                .iter()
                .map(|alt| conforms(doc, alt, body, at))
                .collect();
            return if any {
                results
                    .iter()
                    .any(Result::is_ok)
                    .then_some(())
                    .ok_or_else(|| format!("{at} matches none of {key}: {results:?}"))
            } else {
                results.into_iter().collect()
            };
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if body.is_null() {
        return if schema["nullable"] == true
            || types.contains(&"null")
            || schema.as_object().is_some_and(|o| o.is_empty())
        {
            Ok(())
        } else {
            Err(format!("{at} is null"))
        };
    }
    match types.iter().copied().find(|t| *t != "null") {
        Some("object") => {
            let object = body.as_object().ok_or(format!("{at} is not an object"))?;
            for field in schema["required"].as_array().into_iter().flatten() {
                let name = field.as_str().unwrap();
                if !object.contains_key(name) {
                    return Err(format!("{at}.{name} is missing"));
                }
            }
            if let Some(props) = schema["properties"].as_object() {
                for (name, sub) in props {
                    if let Some(v) = object.get(name) {
                        conforms(doc, sub, v, &format!("{at}.{name}"))?;
                    }
                }
            }
            if schema["additionalProperties"].is_object() {
                for (name, v) in object {
                    if schema["properties"].get(name).is_none_or(|p| p.is_null()) {
                        conforms(
                            doc,
                            &schema["additionalProperties"],
                            v,
                            &format!("{at}.{name}"),
                        )?;
                    }
                }
            }
            Ok(())
        }
        Some("array") => {
            let items = body.as_array().ok_or(format!("{at} is not an array"))?;
            for (i, item) in items.iter().enumerate() {
                conforms(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        Some("integer") if !body.is_i64() && !body.is_u64() => {
            Err(format!("{at} is not an integer"))
        }
        Some("number") if !body.is_number() => Err(format!("{at} is not a number")),
        Some("string") if !body.is_string() => Err(format!("{at} is not a string")),
        Some("boolean") if !body.is_boolean() => Err(format!("{at} is not a boolean")),
        _ => {
            if let (Some(allowed), Some(_)) = (schema["enum"].as_array(), body.as_str()) {
                if !allowed.contains(body) {
                    return Err(format!("{at} = {body} is not one of {allowed:?}"));
                }
            }
            Ok(())
        }
    }
}

/// One real call of a documented operation.
struct Call {
    method: &'static str,
    path: &'static str,
    url: String,
    bearer: Option<String>,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
}

async fn check(doc: &Value, call: Call) -> u16 {
    let mut request = match call.method {
        "GET" => http().get(&call.url),
        "POST" => http().post(&call.url),
        "PUT" => http().put(&call.url),
        "DELETE" => http().delete(&call.url),
        m => panic!("{m}"),
    };
    if let Some(t) = &call.bearer {
        request = request.bearer_auth(t);
    }
    for (k, v) in &call.headers {
        request = request.header(*k, v);
    }
    if let Some(b) = call.body {
        request = request.header("content-type", "application/json").body(b);
    }
    let r = request.send().await.unwrap();
    let code = r.status().as_u16();
    let status = code.to_string();
    let content_type = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    let op = &doc["paths"][call.path][call.method.to_lowercase()];
    let documented = &op["responses"][&status];
    assert!(
        documented.is_object(),
        "{} {}: status {status} is not documented ({text})",
        call.method,
        call.path
    );
    if content_type.starts_with("application/json") {
        let schema = &documented["content"]["application/json"]["schema"];
        let body: Value = serde_json::from_str(&text).unwrap();
        if let Err(why) = conforms(doc, schema, &body, "body") {
            panic!("{} {} ({status}): {why}: {body}", call.method, call.path);
        }
    } else {
        let media = content_type.split(';').next().unwrap_or_default();
        assert!(
            documented["content"][media].is_object(),
            "{} {}: content type {content_type} is not documented",
            call.method,
            call.path
        );
    }
    code
}

/// The operations a `routes.rs` route table lists (its module docs), plus
/// the operational endpoints every service has.
fn route_table(source: &str) -> Vec<(String, String)> {
    let mut ops: Vec<(String, String)> = ["/health", "/ready", "/metrics", "/openapi.json"]
        .iter()
        .map(|p| ("GET".to_string(), p.to_string()))
        .collect();
    for line in source.lines().filter(|l| l.starts_with("//! | `")) {
        let cell = line.split('|').nth(1).unwrap();
        for route in cell.split(',') {
            let route = route.trim().trim_matches('`');
            let mut parts = route.splitn(2, ' ');
            let (method, path) = (parts.next().unwrap(), parts.next().unwrap());
            let path = path.split('?').next().unwrap();
            ops.push((method.to_string(), path.to_string()));
        }
    }
    ops.sort();
    ops
}

fn now_iso() -> String {
    (chrono::Utc::now() - chrono::Duration::seconds(30))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::test]
async fn every_service_documents_exactly_its_routes_and_answers_as_documented() {
    let p = Pipeline::start(true).await;
    let site = Site::new(1);
    let gone = Site::new(2);
    let ingest = document(p.ingest_addr).await;
    let query = document(p.query_addr).await;
    let processors_addr = p.processors.as_ref().unwrap().http.addr;
    let processors = document(processors_addr).await;

    assert_eq!(
        operations(&ingest),
        route_table(include_str!("../../ingest/src/routes.rs"))
    );
    assert_eq!(
        operations(&query),
        route_table(include_str!("../../query/src/routes.rs"))
    );
    assert_eq!(
        operations(&processors),
        route_table("//! no routes of its own")
    );

    let admin = Some(admin_token());
    let account = |s: &Site| Some(token(Role::Account, Some(&s.account_id)));
    let ingest_url = |path: &str| format!("http://{}{path}", p.ingest_addr);
    let query_url = |path: &str| format!("http://{}{path}", p.query_addr);

    // The gateway, in an order that makes each call meaningful: the
    // provider onboards both sites on pro.
    for s in [&site, &gone] {
        check(
            &ingest,
            Call {
                method: "POST",
                path: "/api/usage/installations",
                url: ingest_url("/api/usage/installations"),
                bearer: admin.clone(),
                headers: vec![],
                body: Some(serde_json::to_vec(&s.registration("pro")).unwrap()),
            },
        )
        .await;
    }
    let account_path = format!("/api/usage/accounts/{}", site.account_id);
    for (method, body) in [("PUT", Some(json!({"plan": "pro"}))), ("GET", None)] {
        check(
            &ingest,
            Call {
                method,
                path: "/api/usage/accounts/{account_id}",
                url: ingest_url(&account_path),
                bearer: admin.clone(),
                headers: vec![],
                body: body.map(|b| serde_json::to_vec(&b).unwrap()),
            },
        )
        .await;
    }
    check(
        &ingest,
        Call {
            method: "PUT",
            path: "/api/usage/installations/{install_id}/plan",
            url: ingest_url(&format!(
                "/api/usage/installations/{}/plan",
                site.install_id
            )),
            bearer: admin.clone(),
            headers: vec![],
            body: Some(serde_json::to_vec(&json!({"plan": "pro"})).unwrap()),
        },
    )
    .await;
    let admission =
        serde_json::to_vec(&json!({"install_id": site.install_id, "generations": 1})).unwrap();
    check(
        &ingest,
        Call {
            method: "POST",
            path: "/api/usage/admit",
            url: ingest_url("/api/usage/admit"),
            bearer: account(&site),
            headers: vec![(
                "X-Usage-Signature",
                site.v2_signature(chrono::Utc::now().timestamp(), &admission),
            )],
            body: Some(admission),
        },
    )
    .await;
    for (n, path) in [(1u128, "/api/usage/event"), (2, "/usage/event")] {
        let ts = chrono::Utc::now().timestamp();
        check(
            &ingest,
            Call {
                method: "POST",
                path,
                url: ingest_url(path),
                bearer: account(&site),
                headers: vec![("X-Install-Signature", site.legacy_signature(ts))],
                body: Some(site.batch(vec![event(
                    n,
                    &site.user_hash(1),
                    "bulk",
                    "gpt-4o-mini",
                    10,
                    5,
                    &now_iso(),
                )])),
            },
        )
        .await;
    }
    check(
        &ingest,
        Call {
            method: "GET",
            path: "/api/usage/governance",
            url: ingest_url(&format!(
                "/api/usage/governance?install_id={}",
                site.install_id
            )),
            bearer: account(&site),
            headers: vec![],
            body: None,
        },
    )
    .await;
    check(
        &ingest,
        Call {
            method: "POST",
            path: "/api/usage/installations/{install_id}/rotate-secret",
            url: ingest_url(&format!(
                "/api/usage/installations/{}/rotate-secret",
                gone.install_id
            )),
            bearer: admin.clone(),
            headers: vec![],
            body: Some(
                serde_json::to_vec(
                    &json!({"secret": "a-new-secret-for-the-test", "overlap_seconds": 60}),
                )
                .unwrap(),
            ),
        },
    )
    .await;
    p.wait_for_requests(
        &site,
        &(chrono::Utc::now().date_naive() - chrono::Duration::days(1)).to_string(),
        2,
    )
    .await;

    // The query API: every operation, each answering 2xx at least once
    // (once the registry's mirror knows both sites).
    p.wait_for_registry_mirror(2).await;
    let mut answered: Vec<(String, String)> = vec![];
    let read = |path: &'static str, url: String| Call {
        method: "GET",
        path,
        url: query_url(&url),
        bearer: admin.clone(),
        headers: vec![],
        body: None,
    };
    let id = &site.install_id;
    for (path, url) in [
        (
            "/provider/usage/summary",
            format!("/provider/usage/summary?install_id={id}&group_by=model"),
        ),
        (
            "/provider/usage/events",
            format!("/provider/usage/events?install_id={id}&limit=1"),
        ),
        (
            "/provider/usage/decisions",
            format!("/provider/usage/decisions?install_id={id}"),
        ),
        (
            "/provider/installations/{install_id}",
            format!("/provider/installations/{id}"),
        ),
        (
            "/provider/fleet/overview",
            "/provider/fleet/overview".to_string(),
        ),
        (
            "/provider/fleet/analytics",
            "/provider/fleet/analytics?months=2".to_string(),
        ),
        (
            "/provider/fleet/projection",
            "/provider/fleet/projection?limit=5".to_string(),
        ),
        (
            "/provider/fleet/anomalies",
            "/provider/fleet/anomalies?days=7".to_string(),
        ),
        (
            "/api/usage/installations",
            "/api/usage/installations".to_string(),
        ),
        (
            "/api/usage/installations",
            format!("/api/usage/installations?q={}", site.account_id),
        ),
        ("/dashboard/session", "/dashboard/session".to_string()),
        ("/dashboard/", "/dashboard/".to_string()),
    ] {
        let status = check(&query, read(path, url)).await;
        answered.push(("GET".into(), path.into()));
        assert!((200..300).contains(&status), "GET {path}: {status}");
    }
    for format in ["csv", "jsonl"] {
        let status = check(
            &query,
            Call {
                method: "POST",
                path: "/api/usage/export",
                url: query_url("/api/usage/export"),
                bearer: admin.clone(),
                headers: vec![],
                body: Some(
                    serde_json::to_vec(&json!({"install_id": site.install_id, "format": format}))
                        .unwrap(),
                ),
            },
        )
        .await;
        assert_eq!(status, 200);
        answered.push(("POST".into(), "/api/usage/export".into()));
    }
    // The dashboard's sign-in and sign-out, as its own page sends them.
    for (method, body) in [
        (
            "POST",
            Some(serde_json::to_vec(&json!({"token": admin_token()})).unwrap()),
        ),
        ("DELETE", None),
    ] {
        let status = check(
            &query,
            Call {
                method,
                path: "/dashboard/session",
                url: query_url("/dashboard/session"),
                bearer: None,
                headers: vec![("sec-fetch-site", "same-origin".into())],
                body,
            },
        )
        .await;
        assert_eq!(status, 200, "{method} /dashboard/session");
        answered.push((method.into(), "/dashboard/session".into()));
    }
    let status = check(
        &query,
        Call {
            method: "DELETE",
            path: "/api/usage/installations/{install_id}",
            url: query_url(&format!("/api/usage/installations/{}", gone.install_id)),
            bearer: admin.clone(),
            headers: vec![],
            body: None,
        },
    )
    .await;
    assert_eq!(status, 200);
    answered.push((
        "DELETE".into(),
        "/api/usage/installations/{install_id}".into(),
    ));
    for op in operations(&query) {
        let ops_endpoint =
            ["/health", "/ready", "/metrics", "/openapi.json"].contains(&op.1.as_str());
        assert!(
            ops_endpoint || answered.contains(&op),
            "{op:?} was never called"
        );
    }

    // Without a token, every secured operation answers a documented error.
    for (doc, base) in [(&ingest, p.ingest_addr), (&query, p.query_addr)] {
        for (method, path) in operations(doc) {
            let op = &doc["paths"][&path][method.to_lowercase()];
            if op["security"].is_null() {
                continue;
            }
            let concrete = path
                .replace("{install_id}", &site.install_id)
                .replace("{account_id}", &site.account_id);
            let body = (method == "POST" || method == "PUT").then(|| b"{}".to_vec());
            let method: &'static str = match method.as_str() {
                "GET" => "GET",
                "POST" => "POST",
                "PUT" => "PUT",
                _ => "DELETE",
            };
            let path: &'static str = Box::leak(path.into_boxed_str());
            check(
                doc,
                Call {
                    method,
                    path,
                    url: format!("http://{base}{concrete}"),
                    bearer: None,
                    headers: vec![],
                    body,
                },
            )
            .await;
        }
    }

    // The operational endpoints of all three.
    for (doc, base) in [
        (&ingest, p.ingest_addr),
        (&query, p.query_addr),
        (&processors, processors_addr),
    ] {
        for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
            check(
                doc,
                Call {
                    method: "GET",
                    path,
                    url: format!("http://{base}{path}"),
                    bearer: None,
                    headers: vec![],
                    body: None,
                },
            )
            .await;
        }
    }
    p.stop().await;
}

//! The gateway's HTTP surface (warp filters), every outcome mapped through
//! `IngestError` so even warp's own rejections answer in the contract's shape.
//!
//! | route | handler |
//! | --- | --- |
//! | `POST /api/usage/event`, `POST /usage/event` | [`Gateway::post_events`] |
//! | `POST /api/usage/installations` | [`Gateway::register`] |
//! | `POST /api/usage/installations/{install_id}/rotate-secret` | [`Gateway::rotate_secret`] |
//! | `PUT /api/usage/installations/{install_id}/plan` | [`Gateway::set_plan`] |
//! | `GET /api/usage/accounts/{account_id}`, `PUT /api/usage/accounts/{account_id}` | [`Gateway::get_account`], [`Gateway::put_account`] |
//! | `POST /api/usage/admit` | [`Gateway::admit`] |
//! | `GET /api/usage/governance?install_id=` | [`Gateway::governance_report`] |

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use warp::filters::BoxedFilter;
use warp::http::HeaderMap;
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::error::IngestError;
use crate::handlers::Gateway;
use crate::sink::RecordSink;

fn outcome(
    result: Result<Response, IngestError>,
    endpoint: &'static str,
    metrics: &crate::metrics::IngestMetrics,
) -> Response {
    match result {
        Ok(response) => {
            metrics.requests.with_label_values(&[endpoint, "ok"]).inc();
            response
        }
        Err(err) => {
            metrics
                .requests
                .with_label_values(&[endpoint, err.code()])
                .inc();
            if err.retryable() {
                tracing::warn!(endpoint, %err, "request not stored");
            } else {
                tracing::debug!(endpoint, %err, "request refused");
            }
            err.into_response()
        }
    }
}

pub fn routes<S: RecordSink>(
    gateway: Arc<Gateway<S>>,
    max_body_bytes: u64,
) -> BoxedFilter<(Response,)> {
    let gw = warp::any().map(move || gateway.clone());
    let body = warp::body::content_length_limit(max_body_bytes).and(warp::body::bytes());

    // Path before method, so an unknown path is 404 and a known one with the
    // wrong method is 405.
    let events = warp::path!("api" / "usage" / "event")
        .or(warp::path!("usage" / "event"))
        .unify()
        .and(warp::post())
        .and(gw.clone())
        .and(warp::header::headers_cloned())
        .and(body)
        .then(
            |gw: Arc<Gateway<S>>, headers: HeaderMap, body: Bytes| async move {
                outcome(gw.post_events(headers, body).await, "event", &gw.metrics)
            },
        );
    let register = warp::path!("api" / "usage" / "installations")
        .and(warp::post())
        .and(gw.clone())
        .and(warp::header::headers_cloned())
        .and(body)
        .then(
            |gw: Arc<Gateway<S>>, headers: HeaderMap, body: Bytes| async move {
                outcome(gw.register(headers, body).await, "register", &gw.metrics)
            },
        );
    let rotate = warp::path!("api" / "usage" / "installations" / String / "rotate-secret")
        .and(warp::post())
        .and(gw.clone())
        .and(warp::header::headers_cloned())
        .and(body)
        .then(
            |id: String, gw: Arc<Gateway<S>>, headers: HeaderMap, body: Bytes| async move {
                outcome(
                    gw.rotate_secret(id, headers, body).await,
                    "rotate",
                    &gw.metrics,
                )
            },
        );

    let set_plan = warp::path!("api" / "usage" / "installations" / String / "plan")
        .and(warp::put())
        .and(gw.clone())
        .and(warp::header::headers_cloned())
        .and(body)
        .then(
            |id: String, gw: Arc<Gateway<S>>, headers: HeaderMap, body: Bytes| async move {
                outcome(gw.set_plan(id, headers, body).await, "plan", &gw.metrics)
            },
        );
    let account_path = warp::path!("api" / "usage" / "accounts" / String);
    let put_account = account_path
        .and(warp::put())
        .and(gw.clone())
        .and(warp::header::headers_cloned())
        .and(body)
        .then(
            |id: String, gw: Arc<Gateway<S>>, headers: HeaderMap, body: Bytes| async move {
                outcome(
                    gw.put_account(id, headers, body).await,
                    "account",
                    &gw.metrics,
                )
            },
        );
    let get_account = account_path
        .and(warp::get())
        .and(gw.clone())
        .and(warp::header::headers_cloned())
        .then(
            |id: String, gw: Arc<Gateway<S>>, headers: HeaderMap| async move {
                outcome(gw.get_account(id, headers).await, "account", &gw.metrics)
            },
        );
    let admit = warp::path!("api" / "usage" / "admit")
        .and(warp::post())
        .and(gw.clone())
        .and(warp::header::headers_cloned())
        .and(body)
        .then(
            |gw: Arc<Gateway<S>>, headers: HeaderMap, body: Bytes| async move {
                outcome(gw.admit(headers, body).await, "admit", &gw.metrics)
            },
        );

    let governance = warp::path!("api" / "usage" / "governance")
        .and(warp::get())
        .and(gw)
        .and(warp::header::headers_cloned())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .then(
            |gw: Arc<Gateway<S>>, headers: HeaderMap, query| async move {
                outcome(
                    gw.governance_report(headers, query).await,
                    "governance",
                    &gw.metrics,
                )
            },
        );

    events
        .or(governance)
        .unify()
        .or(register)
        .unify()
        .or(rotate)
        .unify()
        .or(set_plan)
        .unify()
        .or(put_account)
        .unify()
        .or(get_account)
        .unify()
        .or(admit)
        .unify()
        .recover(move |r| rejection(r, max_body_bytes))
        .unify()
        .boxed()
}

async fn rejection(r: Rejection, limit: u64) -> Result<Response, Infallible> {
    let err = if r.is_not_found() {
        IngestError::NotFound
    } else if r.find::<warp::reject::PayloadTooLarge>().is_some() {
        IngestError::PayloadTooLarge { limit }
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        IngestError::MethodNotAllowed
    } else if r.find::<warp::reject::LengthRequired>().is_some() {
        IngestError::Malformed("a Content-Length header is required".into())
    } else {
        IngestError::Malformed(format!("bad request: {r:?}"))
    };
    Ok(err.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Limits;
    use crate::registry::{Registry, Sealer};
    use crate::sink::{Record, SinkError};

    struct NoSink;
    impl RecordSink for NoSink {
        async fn send_all(&self, _: &str, _: Vec<Record>) -> Result<(), SinkError> {
            Err(SinkError::Unavailable("no Kafka in unit tests".into()))
        }
    }

    fn filter() -> BoxedFilter<(Response,)> {
        let metrics = usage_service_kit::Metrics::new("test");
        let gateway = Gateway {
            governance: Default::default(),
            registry: Arc::new(Registry::new(
                Sealer::from_hex(crate::registry::seal::DEV_KEY_HEX).unwrap(),
            )),
            accounts: Default::default(),
            ledger: crate::governance::ledger::Ledger::new(120_000, 0, 1),
            flood: crate::flood::FloodGuard::new(20.0, 200),
            policy: Default::default(),
            trust: crate::handlers::Trust {
                enroll_on_first_sync: true,
                max_installations_per_account: 10,
                default_plan: "free".into(),
                late_grace_ms: 0,
                metadata_every_ms: 0,
            },
            writes: Default::default(),
            sink: NoSink,
            jwt: usage_service_kit::auth::JwtVerifier::new(b"k"),
            limits: Limits::default(),
            signature_window_secs: 300,
            instance: "t".into(),
            events_topic: "e".into(),
            installations_topic: "i".into(),
            accounts_topic: "a".into(),
            metrics: crate::metrics::IngestMetrics::register(&metrics),
        };
        routes(Arc::new(gateway), 1024)
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_wrong_methods_405() {
        let f = filter();
        let r = warp::test::request()
            .method("GET")
            .path("/nope")
            .reply(&f)
            .await;
        assert_eq!(r.status(), 404, "{:?}", r.body());
        let r = warp::test::request()
            .method("GET")
            .path("/api/usage/event")
            .reply(&f)
            .await;
        assert_eq!(r.status(), 405);
        let r = warp::test::request()
            .method("POST")
            .path("/usage/event")
            .body(vec![b'x'; 2048])
            .reply(&f)
            .await;
        assert_eq!(r.status(), 413);
    }
}

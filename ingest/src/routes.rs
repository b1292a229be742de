//! The gateway's HTTP surface (warp filters), every outcome mapped through
//! `IngestError` so even warp's own rejections answer in the contract's shape.
//!
//! | route | handler |
//! | --- | --- |
//! | `POST /api/usage/event`, `POST /usage/event` | [`Gateway::post_events`] |
//! | `POST /api/usage/installations` | [`Gateway::register`] |
//! | `POST /api/usage/installations/{install_id}/rotate-secret` | [`Gateway::rotate_secret`] |

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

    let events = warp::post()
        .and(
            warp::path!("api" / "usage" / "event")
                .or(warp::path!("usage" / "event"))
                .unify(),
        )
        .and(gw.clone())
        .and(warp::header::headers_cloned())
        .and(body)
        .then(
            |gw: Arc<Gateway<S>>, headers: HeaderMap, body: Bytes| async move {
                outcome(gw.post_events(headers, body).await, "event", &gw.metrics)
            },
        );
    let register = warp::post()
        .and(warp::path!("api" / "usage" / "installations"))
        .and(gw.clone())
        .and(warp::header::headers_cloned())
        .and(body)
        .then(
            |gw: Arc<Gateway<S>>, headers: HeaderMap, body: Bytes| async move {
                outcome(gw.register(headers, body).await, "register", &gw.metrics)
            },
        );
    let rotate = warp::post()
        .and(warp::path!(
            "api" / "usage" / "installations" / String / "rotate-secret"
        ))
        .and(gw)
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

    events
        .or(register)
        .unify()
        .or(rotate)
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

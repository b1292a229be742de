//! Binding and serving a service's HTTP listener, plus the operational routes
//! (`/health`, `/ready`, `/metrics`) every service mounts beside its own.

use std::future::Future;
use std::net::SocketAddr;

use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::{Metrics, Readiness};

/// `/health`'s answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`: the process answers.
    pub status: &'static str,
    pub service: &'static str,
}

#[derive(Debug, Clone, Copy, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReadyStatus {
    Ready,
    NotReady,
}

/// `/ready`'s answer: each dependency's last probe.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ReadinessReport {
    pub status: ReadyStatus,
    pub service: &'static str,
    pub dependencies: std::collections::BTreeMap<&'static str, crate::health::DependencyStatus>,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "alive", body = Health)))]
fn health(service: &'static str) -> Response {
    warp::reply::json(&Health {
        status: "ok",
        service,
    })
    .into_response()
}

/// Readiness: every dependency answered its last probe.
#[utoipa::path(get, path = "/ready", tag = "operations", responses(
    (status = 200, description = "ready", body = ReadinessReport),
    (status = 503, description = "a dependency is down", body = ReadinessReport)))]
fn ready(service: &'static str, readiness: &Readiness) -> Response {
    let dependencies = readiness.snapshot();
    let ok = dependencies.values().all(|d| d.ok);
    let report = ReadinessReport {
        status: if ok {
            ReadyStatus::Ready
        } else {
            ReadyStatus::NotReady
        },
        service,
        dependencies,
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    warp::reply::with_status(warp::reply::json(&report), status).into_response()
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "metrics", body = String, content_type = "text/plain")))]
fn metrics(metrics: &Metrics) -> Response {
    warp::reply::with_header(
        metrics.render(),
        "content-type",
        "text/plain; version=0.0.4; charset=utf-8",
    )
    .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses(
    (status = 200, description = "the service's OpenAPI document", body = Object)))]
fn openapi(document: &'static str) -> Response {
    warp::reply::with_header(document, "content-type", "application/json").into_response()
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(health, ready, metrics, openapi))]
struct Operations;

/// The operational endpoints as OpenAPI, for each service's document.
pub fn operations_openapi() -> utoipa::openapi::OpenApi {
    <Operations as utoipa::OpenApi>::openapi()
}

/// A service's whole document as served: its own operations, the
/// operational ones, its version.
pub fn render_openapi(mut doc: utoipa::openapi::OpenApi, version: &str) -> String {
    doc.info.version = version.to_string();
    doc.merge(operations_openapi());
    doc.to_pretty_json().unwrap_or_else(|e| {
        // Cannot happen for a document built from types; say so if it does.
        format!("{{\"error\": \"the OpenAPI document cannot be written: {e}\"}}")
    })
}

/// A document with no operations of its own (a service with only the
/// operational endpoints), for [`render_openapi`].
pub fn bare_openapi(title: &str, description: &str) -> utoipa::openapi::OpenApi {
    let mut info = utoipa::openapi::Info::new(title, "");
    info.description = Some(description.to_string());
    utoipa::openapi::OpenApi::new(info, utoipa::openapi::Paths::new())
}

/// The bearer token every API takes (the account system's JWT).
pub fn bearer_scheme() -> utoipa::openapi::security::SecurityScheme {
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
    SecurityScheme::Http(
        HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT (HS256 or RS256)")
            .build(),
    )
}

/// `GET /health`, `GET /ready`, `GET /metrics` and `GET /openapi.json`.
pub fn ops_routes(
    service: &'static str,
    document: &'static str,
    readiness: Readiness,
    registry: Metrics,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let health = warp::path!("health")
        .and(warp::get())
        .map(move || health(service));
    let ready = warp::path!("ready")
        .and(warp::get())
        .map(move || ready(service, &readiness));
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .map(move || metrics(&registry));
    // The service's OpenAPI document, kept true by tests/tests/openapi.rs.
    let openapi = warp::path!("openapi.json")
        .and(warp::get())
        .map(move || openapi(document));
    health
        .or(ready)
        .unify()
        .or(metrics)
        .unify()
        .or(openapi)
        .unify()
}

/// Binds `addr` (port 0 picks a free port) and returns the bound address with
/// the future that serves until `shutdown` resolves.
pub async fn bind(
    addr: SocketAddr,
    routes: BoxedFilter<(Response,)>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let serve = warp::serve(routes)
        .incoming(listener)
        .graceful(shutdown)
        .run();
    Ok((local, serve))
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}

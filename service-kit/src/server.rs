//! Binding and serving a service's HTTP listener, plus the operational routes
//! (`/health`, `/ready`, `/metrics`) every service mounts beside its own.

use std::future::Future;
use std::net::SocketAddr;

use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::{Metrics, Readiness};

/// `GET /health`, `GET /ready` and `GET /metrics`.
pub fn ops_routes(
    service: &'static str,
    openapi: &'static str,
    readiness: Readiness,
    metrics: Metrics,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let health = warp::path!("health").and(warp::get()).map(move || {
        warp::reply::json(&serde_json::json!({"status": "ok", "service": service})).into_response()
    });
    let ready = warp::path!("ready").and(warp::get()).map(move || {
        let deps = readiness.snapshot();
        let ok = deps.values().all(|d| d.ok);
        let body = serde_json::json!({
            "status": if ok { "ready" } else { "not_ready" },
            "service": service,
            "dependencies": deps,
        });
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        warp::reply::with_status(warp::reply::json(&body), status).into_response()
    });
    let metrics = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(
            metrics.render(),
            "content-type",
            "text/plain; version=0.0.4; charset=utf-8",
        )
        .into_response()
    });
    // The service's OpenAPI document, kept true by tests/tests/openapi.rs.
    let openapi = warp::path!("openapi.json").and(warp::get()).map(move || {
        warp::reply::with_header(openapi, "content-type", "application/json").into_response()
    });
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

//! Starting and stopping one service's HTTP side: the service's own routes
//! plus `/health`, `/ready` and `/metrics`, served until `stop`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::Filter;

use crate::server::{bind, ops_routes};
use crate::{Metrics, Probe, Readiness};

/// How often dependencies are probed for `/ready`.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A running service's HTTP listener.
pub struct HttpService {
    pub addr: SocketAddr,
    pub readiness: Readiness,
    pub metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl HttpService {
    /// Binds `listen` and serves `routes` beside the operational routes.
    pub async fn start(
        name: &'static str,
        openapi: &'static str,
        listen: SocketAddr,
        metrics: Metrics,
        probes: Vec<Probe>,
        routes: BoxedFilter<(Response,)>,
    ) -> std::io::Result<Self> {
        let readiness = Readiness::start(probes, PROBE_INTERVAL, metrics.clone());
        let all = ops_routes(name, openapi, readiness.clone(), metrics.clone())
            .or(routes)
            .unify()
            .boxed();
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr, serve) = bind(listen, all, async {
            let _ = stopped.await;
        })
        .await?;
        tracing::info!(service = name, %addr, "listening");
        let task = tokio::spawn(serve);
        Ok(Self {
            addr,
            readiness,
            metrics,
            stop: Some(stop),
            task,
        })
    }

    /// Stops accepting, lets in-flight requests finish, then returns.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// No routes of the service's own (only the operational ones).
pub fn no_routes() -> BoxedFilter<(Response,)> {
    warp::any()
        .and_then(|| async { Err::<Response, _>(warp::reject::not_found()) })
        .boxed()
}

/// What a service binary needs to be run by [`main`].
pub trait Service: Sized {
    type Config: clap::Parser + std::fmt::Debug;
    type Error: std::fmt::Display;
    /// The binary's name, e.g. `usage-ingest`.
    const BINARY: &'static str;

    fn log_args(config: &Self::Config) -> &crate::telemetry::LogArgs;
    fn start(config: Self::Config) -> impl std::future::Future<Output = Result<Self, Self::Error>>;
    fn stop(self) -> impl std::future::Future<Output = ()>;
}

/// The body of every service's `main`: parse the config, set up logging,
/// start, wait for SIGTERM/SIGINT, stop gracefully.
pub async fn main<S: Service>() -> std::process::ExitCode {
    let config = <S::Config as clap::Parser>::parse();
    crate::telemetry::init(S::log_args(&config));
    tracing::info!(?config, "starting {}", S::BINARY);
    match S::start(config).await {
        Ok(service) => {
            crate::server::shutdown_signal().await;
            service.stop().await;
            tracing::info!("{} stopped", S::BINARY);
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(%err, "{} failed to start", S::BINARY);
            std::process::ExitCode::FAILURE
        }
    }
}

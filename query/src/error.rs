//! The query API's one error type, mapped once to an HTTP status and the
//! contract's JSON error body (`{"success": false, "error", "message"}`).

use std::net::SocketAddr;

use usage_service_kit::auth::JwtError;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Reply;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start: {0}")]
    Startup(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Jwt(#[from] JwtError),
    #[error("this token may not {0}")]
    Forbidden(String),
    #[error("a request that changes something with the dashboard's session must come from the dashboard's own pages")]
    CrossSite,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("storage unavailable")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("event log unavailable: {0}")]
    Kafka(String),
    #[error("{0}")]
    Incomplete(String),
}

pub const RETRY_AFTER_SECS: u32 = 5;

impl QueryError {
    pub fn status(&self) -> StatusCode {
        match self {
            QueryError::Bind { .. } | QueryError::Startup(_) => StatusCode::INTERNAL_SERVER_ERROR,
            QueryError::BadRequest(_) => StatusCode::BAD_REQUEST,
            QueryError::Jwt(_) => StatusCode::UNAUTHORIZED,
            QueryError::Forbidden(_) | QueryError::CrossSite => StatusCode::FORBIDDEN,
            QueryError::NotFound => StatusCode::NOT_FOUND,
            QueryError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            QueryError::ClickHouse(_) | QueryError::Kafka(_) | QueryError::Incomplete(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            QueryError::Bind { .. } | QueryError::Startup(_) => "server_error",
            QueryError::BadRequest(_) => "invalid_parameters",
            QueryError::Jwt(JwtError::Expired) => "token_expired",
            QueryError::Jwt(_) => "invalid_token",
            QueryError::Forbidden(_) => "forbidden",
            QueryError::CrossSite => "cross_site_request",
            QueryError::NotFound => "not_found",
            QueryError::MethodNotAllowed => "method_not_allowed",
            QueryError::ClickHouse(_) => "storage_unavailable",
            QueryError::Kafka(_) => "queue_unavailable",
            QueryError::Incomplete(_) => "erasure_incomplete",
        }
    }

    pub fn into_response(self) -> Response {
        if let QueryError::ClickHouse(err) = &self {
            tracing::warn!(%err, "ClickHouse query failed");
        }
        let body = crate::openapi::ErrorBody {
            success: false,
            error: self.code().to_string(),
            message: self.to_string(),
        };
        let status = self.status();
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), status).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

//! The gateway's one error type, mapped once to an HTTP status and the
//! contract's JSON error body:
//! `{"success": false, "error": <code>, "message": <text>, "received": 0}`.
//!
//! Final errors (the plugin must not retry the same request: 400, 401, 403,
//! 413, 422) are kept apart from retryable ones (503 with `Retry-After`: the
//! plugin keeps the events and sends them again; nothing was acknowledged;
//! and 429 `too_many_requests`, a request flood, likewise). No batch is ever
//! refused for a governance limit: those are enforced at admission.

use std::net::SocketAddr;

use usage_service_kit::auth::JwtError;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Reply;

use crate::batch::{BatchError, Refusal};
use crate::registry::commands::CommandError;
use crate::signature::SignatureError;
use crate::sink::SinkError;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start: {0}")]
    Startup(String),

    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("{0}")]
    Batch(#[from] BatchError),
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Jwt(#[from] JwtError),
    #[error("installation is not registered")]
    UnknownInstallation,
    #[error("account_id does not match the installation or the token")]
    AccountMismatch,
    #[error("{0}")]
    Signature(#[from] SignatureError),
    #[error("this token may not {0}")]
    Forbidden(&'static str),
    #[error("no event of the batch is valid")]
    Validation { refused: Vec<Refusal> },
    #[error("{0}")]
    Command(#[from] CommandError),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Unavailable(#[from] SinkError),
    #[error("installation registry is still loading")]
    RegistryLoading,
    #[error("too many requests for this installation; nothing of this one was recorded: retry in {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    #[error("rotating a secret needs proof of the current one: sign the request with it (X-Usage-Signature over the body)")]
    RotationProofRequired,
}

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = 5;

impl IngestError {
    pub fn status(&self) -> StatusCode {
        use IngestError::*;
        match self {
            Bind { .. } | Startup(_) => StatusCode::INTERNAL_SERVER_ERROR,
            PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Batch(BatchError::Malformed(_)) | Malformed(_) => StatusCode::BAD_REQUEST,
            Batch(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Jwt(_) => StatusCode::UNAUTHORIZED,
            UnknownInstallation | AccountMismatch | Signature(_) | Forbidden(_) => {
                StatusCode::FORBIDDEN
            }
            Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Command(CommandError::Invalid(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            Command(CommandError::OtherAccount(_)) => StatusCode::FORBIDDEN,
            Command(CommandError::SecretMismatch(_)) => StatusCode::CONFLICT,
            Command(CommandError::Unknown(_)) | NotFound => StatusCode::NOT_FOUND,
            Command(CommandError::Seal) => StatusCode::INTERNAL_SERVER_ERROR,
            Command(CommandError::PlanForbidden(_) | CommandError::LimitReached { .. })
            | RotationProofRequired => StatusCode::FORBIDDEN,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Unavailable(_) | RegistryLoading => StatusCode::SERVICE_UNAVAILABLE,
            TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The machine-readable `error` code of the body.
    pub fn code(&self) -> &'static str {
        use IngestError::*;
        match self {
            Bind { .. } | Startup(_) | Command(CommandError::Seal) => "server_error",
            PayloadTooLarge { .. } => "payload_too_large",
            Batch(BatchError::Malformed(_)) | Malformed(_) => "malformed_payload",
            Batch(BatchError::TooManyEvents { .. }) => "too_many_events",
            Batch(BatchError::Empty) => "empty_batch",
            Jwt(JwtError::Expired) => "token_expired",
            Jwt(_) => "invalid_token",
            UnknownInstallation => "unknown_installation",
            AccountMismatch => "account_mismatch",
            Signature(SignatureError::Missing) => "missing_signature",
            Signature(SignatureError::Stale { .. }) => "signature_expired",
            Signature(SignatureError::V2Required) => "body_signature_required",
            Signature(_) => "invalid_signature",
            Forbidden(_) => "forbidden",
            Validation { .. } => "validation_failed",
            Command(CommandError::Invalid(_)) => "invalid_installation",
            Command(CommandError::OtherAccount(_)) => "account_mismatch",
            Command(CommandError::SecretMismatch(_)) => "secret_mismatch",
            Command(CommandError::Unknown(_)) => "unknown_installation",
            Command(CommandError::PlanForbidden(_)) => "plan_change_forbidden",
            Command(CommandError::LimitReached { .. }) => "installation_limit_reached",
            RotationProofRequired => "rotation_proof_required",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            Unavailable(_) | RegistryLoading => "storage_unavailable",
            TooManyRequests { .. } => "too_many_requests",
        }
    }

    /// `Retry-After` seconds, for the answers that have one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            IngestError::TooManyRequests { retry_after_secs } => Some(*retry_after_secs),
            e if e.retryable() => Some(u64::from(RETRY_AFTER_SECS)),
            _ => None,
        }
    }

    /// True when the same request may succeed later (the plugin keeps the
    /// events): the service could not store now, or a flood was slowed.
    pub fn retryable(&self) -> bool {
        matches!(
            self.status(),
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        )
    }

    fn message(&self) -> String {
        match self {
            // The plugin's own wording for the signature failure.
            IngestError::Signature(SignatureError::Mismatch) => {
                "Installation signature validation failed".into()
            }
            // Never echo Kafka's internals to clients.
            IngestError::Unavailable(_) => {
                "Events could not be stored right now; nothing was recorded, retry later".into()
            }
            other => other.to_string(),
        }
    }

    pub fn into_response(self) -> Response {
        let refused = match &self {
            IngestError::Validation { refused } => Some(refused.clone()),
            _ => None,
        };
        let body = crate::openapi::ErrorBody {
            success: false,
            error: self.code(),
            message: self.message(),
            received: 0,
            event_ids: refused.as_ref().map(|_| Vec::new()),
            rejected: refused,
        };
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), self.status()).into_response();
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_contract() {
        let cases: Vec<(IngestError, u16, &str)> = vec![
            (
                BatchError::Malformed("x".into()).into(),
                400,
                "malformed_payload",
            ),
            (JwtError::Expired.into(), 401, "token_expired"),
            (JwtError::Signature.into(), 401, "invalid_token"),
            (
                IngestError::UnknownInstallation,
                403,
                "unknown_installation",
            ),
            (IngestError::AccountMismatch, 403, "account_mismatch"),
            (SignatureError::Mismatch.into(), 403, "invalid_signature"),
            (
                SignatureError::Stale {
                    skew: 400,
                    window: 300,
                }
                .into(),
                403,
                "signature_expired",
            ),
            (
                IngestError::PayloadTooLarge { limit: 10 },
                413,
                "payload_too_large",
            ),
            (
                IngestError::Validation { refused: vec![] },
                422,
                "validation_failed",
            ),
            (
                SinkError::Unavailable("down".into()).into(),
                503,
                "storage_unavailable",
            ),
            (
                IngestError::TooManyRequests {
                    retry_after_secs: 2,
                },
                429,
                "too_many_requests",
            ),
            (
                CommandError::PlanForbidden("x".into()).into(),
                403,
                "plan_change_forbidden",
            ),
            (
                CommandError::LimitReached {
                    account: "acc_1".into(),
                    limit: 3,
                }
                .into(),
                403,
                "installation_limit_reached",
            ),
            (
                IngestError::RotationProofRequired,
                403,
                "rotation_proof_required",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.code(), code);
            assert_eq!(err.retryable(), status == 503 || status == 429);
        }
    }

    #[test]
    fn retryable_errors_carry_retry_after_and_hide_internals() {
        let response = IngestError::from(SinkError::Unavailable("broker 127.0.0.1 down".into()))
            .into_response();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "5");
        let response = IngestError::UnknownInstallation.into_response();
        assert!(response.headers().get("retry-after").is_none());
        let response = IngestError::TooManyRequests {
            retry_after_secs: 3,
        }
        .into_response();
        assert_eq!(response.headers()["retry-after"], "3");
    }
}

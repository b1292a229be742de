//! The gateway's OpenAPI document, derived from the types its handlers
//! read and answer with (so a body cannot drift from its schema) and from
//! the operations below, one per route of `routes.rs`. The handlers are
//! methods of a gateway generic over its Kafka sink, which the annotation
//! cannot sit on; each operation is declared here instead, next to the
//! answers' envelopes, and `tests/tests/openapi.rs` calls every one of them
//! and checks each answer against this document. Served at `/openapi.json`.

use std::sync::OnceLock;

use serde::Serialize;
use utoipa::{Modify, OpenApi, ToSchema};

use crate::batch::{BatchIn, EventIn, Refusal};
use crate::governance::GovernanceReport;
use crate::handlers::registry::{AccountView, PlanRequest};
use crate::handlers::usage::AdmitRequest;
use crate::registry::commands::{AccountRequest, InstallationView, RegisterRequest, RotateRequest};

/// Every error: the contract's shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Always `false`.
    pub success: bool,
    /// A stable code, e.g. `invalid_signature`, `validation_failed`, `unavailable`.
    pub error: &'static str,
    pub message: String,
    /// Always 0: nothing of the request was stored.
    pub received: u64,
    /// `validation_failed`: each refused event, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Vec<Refusal>>,
    /// `validation_failed`: none stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_ids: Option<Vec<String>>,
}

/// Every listed event is stored. `governance` (an addition the deployed
/// plugin ignores) is the installation's state after this batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    pub success: bool,
    pub received: u64,
    pub event_ids: Vec<String>,
    pub message: String,
    pub governance: GovernanceReport,
    /// Events refused while the rest was stored, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Vec<Refusal>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InstallationAnswer {
    pub success: bool,
    pub installation: InstallationView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccountAnswer {
    pub success: bool,
    pub account: AccountView,
    /// `PUT`: installations moved to the account's new plan.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installations_changed: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdmissionAnswer {
    pub success: bool,
    pub allowed: bool,
    /// Why not: `plan_limit_reached`, `rate_limited` or `abuse_flagged`.
    pub reason: Option<&'static str>,
    /// When asking again may succeed.
    pub retry_after_seconds: Option<u64>,
    pub governance: GovernanceReport,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GovernanceAnswer {
    pub success: bool,
    pub governance: GovernanceReport,
}

/// The error answers of every request.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // documentation only
enum CommonErrors {
    /// malformed_payload: the body or a parameter cannot be read.
    #[response(status = 400)]
    Malformed(ErrorBody),
    /// invalid_token or token_expired.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// unavailable (Retry-After): nothing was stored; retry.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// A signed batch of usage events; acknowledged only once Kafka has it durably.
#[utoipa::path(post, path = "/api/usage/event", tag = "usage", security(("bearer" = [])),
    params(("X-Install-Signature" = Option<String>, Header, description = "The deployed plugin's signature: hex HMAC-SHA256 of `install_id:timestamp` with the installation's secret, then `:timestamp`."),
           ("X-Usage-Signature" = Option<String>, Header, description = "The stronger one: `t=<unix seconds>,v1=<hex HMAC-SHA256 of t.body>` (required by installations whose policy is `v2`).")),
    request_body(content = BatchIn, content_type = "application/json"),
    responses(
        (status = 200, description = "Stored.", body = Accepted),
        (status = 403, description = "unknown_installation, account_mismatch, invalid_signature, signature_expired, missing_signature, body_signature_required, installation_limit_reached, forbidden.", body = ErrorBody),
        (status = 413, description = "payload_too_large.", body = ErrorBody),
        (status = 422, description = "validation_failed: nothing stored; `rejected` says why, per event.", body = ErrorBody),
        (status = 429, description = "too_many_requests: far more requests than any plugin sends; retry after Retry-After.", body = ErrorBody),
        CommonErrors))]
#[allow(dead_code)]
fn post_events() {}

/// Alias of `POST /api/usage/event` (older plugins).
#[utoipa::path(post, path = "/usage/event", tag = "usage", security(("bearer" = [])),
    params(("X-Install-Signature" = Option<String>, Header, description = "As for /api/usage/event."),
           ("X-Usage-Signature" = Option<String>, Header, description = "As for /api/usage/event.")),
    request_body(content = BatchIn, content_type = "application/json"),
    responses(
        (status = 200, description = "Stored.", body = Accepted),
        (status = 403, description = "As for /api/usage/event.", body = ErrorBody),
        (status = 413, description = "payload_too_large.", body = ErrorBody),
        (status = 422, description = "validation_failed.", body = ErrorBody),
        (status = 429, description = "too_many_requests.", body = ErrorBody),
        CommonErrors))]
#[allow(dead_code)]
fn post_events_legacy() {}

/// Register or update an installation (its secret is sealed in the registry).
#[utoipa::path(post, path = "/api/usage/installations", tag = "installations", security(("bearer" = [])),
    request_body(content = RegisterRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Registered.", body = InstallationAnswer),
        (status = 200, description = "Updated (or nothing to change).", body = InstallationAnswer),
        (status = 403, description = "forbidden (another account's installation, or a token without installations:manage), plan_change_forbidden, installation_limit_reached.", body = ErrorBody),
        (status = 409, description = "secret_mismatch.", body = ErrorBody),
        (status = 422, description = "validation_failed.", body = ErrorBody),
        CommonErrors))]
#[allow(dead_code)]
fn register() {}

/// Rotate an installation's secret (a site proves the current one).
#[utoipa::path(post, path = "/api/usage/installations/{install_id}/rotate-secret", tag = "installations",
    security(("bearer" = [])),
    params(("install_id" = String, Path, description = "The installation."),
           ("X-Usage-Signature" = Option<String>, Header, description = "The site's proof: the v2 signature of the body with the current secret (provider-level tokens need none).")),
    request_body(content = RotateRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Rotated.", body = InstallationAnswer),
        (status = 403, description = "forbidden, rotation_proof_required, invalid_signature.", body = ErrorBody),
        (status = 404, description = "unknown_installation.", body = ErrorBody),
        (status = 422, description = "validation_failed.", body = ErrorBody),
        CommonErrors))]
#[allow(dead_code)]
fn rotate_secret() {}

/// Set an installation's plan (provider: plans:write).
#[utoipa::path(put, path = "/api/usage/installations/{install_id}/plan", tag = "installations",
    security(("bearer" = [])),
    params(("install_id" = String, Path, description = "The installation.")),
    request_body(content = PlanRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The installation with its plan.", body = InstallationAnswer),
        (status = 403, description = "forbidden: the token lacks plans:write.", body = ErrorBody),
        (status = 404, description = "unknown_installation.", body = ErrorBody),
        (status = 422, description = "invalid_installation: an unknown plan.", body = ErrorBody),
        CommonErrors))]
#[allow(dead_code)]
fn set_plan() {}

/// An account's plan, limit and installations (the provider, or the account itself).
#[utoipa::path(get, path = "/api/usage/accounts/{account_id}", tag = "accounts",
    security(("bearer" = [])),
    params(("account_id" = String, Path, description = "The account.")),
    responses(
        (status = 200, description = "The account.", body = AccountAnswer),
        (status = 403, description = "forbidden.", body = ErrorBody),
        CommonErrors))]
#[allow(dead_code)]
fn get_account() {}

/// Set an account's plan and limit on installations (provider: plans:write).
#[utoipa::path(put, path = "/api/usage/accounts/{account_id}", tag = "accounts",
    security(("bearer" = [])),
    params(("account_id" = String, Path, description = "The account.")),
    request_body(content = AccountRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The account, and how many installations moved to its plan.", body = AccountAnswer),
        (status = 403, description = "forbidden: the token lacks plans:write.", body = ErrorBody),
        (status = 422, description = "invalid_installation: an unknown plan or limit.", body = ErrorBody),
        CommonErrors))]
#[allow(dead_code)]
fn put_account() {}

/// May these generations be made now? (ask before generating)
#[utoipa::path(post, path = "/api/usage/admit", tag = "usage", security(("bearer" = [])),
    params(("X-Usage-Signature" = Option<String>, Header, description = "A site asking for itself: the v2 signature of the body (provider-level tokens with usage:admit need none).")),
    request_body(content = AdmitRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The answer.", body = AdmissionAnswer),
        (status = 403, description = "unknown_installation, account_mismatch, invalid_signature, missing_signature, forbidden.", body = ErrorBody),
        (status = 429, description = "too_many_requests.", body = ErrorBody),
        CommonErrors))]
#[allow(dead_code)]
fn admit() {}

/// Usage against the cap, what is left in the windows, flags and resets,
/// for the plugin's admin notice.
#[utoipa::path(get, path = "/api/usage/governance", tag = "usage", security(("bearer" = [])),
    params(("install_id" = String, Query, description = "The installation.")),
    responses(
        (status = 200, description = "The installation's governance.", body = GovernanceAnswer),
        (status = 403, description = "forbidden.", body = ErrorBody),
        (status = 404, description = "unknown_installation.", body = ErrorBody),
        CommonErrors))]
#[allow(dead_code)]
fn governance_report() {}

struct Authentication;

impl Modify for Authentication {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", usage_service_kit::server::bearer_scheme());
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "usage-ingest",
        description = "The gateway: verifies signed usage batches from plugin installations and \
appends them to Kafka; registers installations; answers admission checks and the governance \
report. Errors: {success: false, error, message, received: 0}."
    ),
    paths(post_events, post_events_legacy, register, rotate_secret, set_plan, get_account,
          put_account, admit, governance_report),
    components(schemas(ErrorBody, EventIn)),
    modifiers(&Authentication),
    tags(
        (name = "usage", description = "Sending usage, admission, the governance report."),
        (name = "installations", description = "The registry: registration, secrets, plans."),
        (name = "accounts", description = "What the provider sets per account."),
        (name = "operations", description = "Health, readiness, metrics, this document."),
    )
)]
struct IngestDoc;

/// The document, built once.
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        usage_service_kit::server::render_openapi(IngestDoc::openapi(), env!("CARGO_PKG_VERSION"))
    })
}

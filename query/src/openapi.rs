//! The query API's OpenAPI document, derived from the handlers' annotations
//! (`routes.rs`) and the types they answer with, so it cannot drift from
//! what the service does; `tests/tests/openapi.rs` calls every operation
//! and checks each answer against it. Served at `/openapi.json`.
//!
//! The answers' envelopes live here: each handler builds one of these, and
//! the document describes exactly that type.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::fleet::{analytics, anomalies, overview, projection};
use crate::{decisions, erasure, events, export, installation, installations, summary};

/// Every error: `{"success": false, "error": <code>, "message": <what to fix>}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Always `false`.
    pub success: bool,
    /// A stable code: `invalid_parameters`, `invalid_token`, `token_expired`,
    /// `forbidden`, `cross_site_request`, `not_found`, `method_not_allowed`,
    /// `storage_unavailable`, `queue_unavailable`, `erasure_incomplete`,
    /// `server_error`.
    pub error: String,
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SummaryAnswer {
    pub success: bool,
    pub data: Vec<summary::SummaryItem>,
    pub meta: summary::Meta,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventsAnswer {
    pub success: bool,
    pub events: Vec<events::EventItem>,
    pub meta: events::EventsMeta,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InstallationsAnswer {
    pub success: bool,
    pub installations: Vec<installations::InstallationItem>,
    pub meta: summary::Meta,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErasureAnswer {
    pub success: bool,
    pub erased: erasure::Erased,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DecisionsAnswer {
    pub success: bool,
    pub decisions: Vec<decisions::Decision>,
    pub meta: summary::Meta,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InstallationAnswer {
    pub success: bool,
    pub data: installation::Installation,
}

/// How fresh a fleet figure is: figures that were expensive to compute are
/// kept up to `max_age_secs` (and recomputed ahead while people look).
#[derive(Debug, Serialize, ToSchema)]
pub struct Freshness {
    pub computed_at: String,
    pub max_age_secs: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OverviewAnswer<'a> {
    pub success: bool,
    pub data: &'a overview::Overview,
    pub meta: Freshness,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AnalyticsAnswer<'a> {
    pub success: bool,
    pub data: &'a analytics::Analytics,
    pub meta: Freshness,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AnomaliesAnswer<'a> {
    pub success: bool,
    pub data: &'a anomalies::Anomalies,
    pub meta: Freshness,
}

/// Freshness, and the page of installations.
#[derive(Debug, Serialize, ToSchema)]
pub struct PagedFreshness {
    pub computed_at: String,
    pub max_age_secs: u64,
    /// Installations projected (with usage in the last 28 days or this month).
    pub total: u64,
    pub limit: u64,
    pub offset: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectionAnswer {
    pub success: bool,
    pub data: projection::ProjectionPage,
    pub meta: PagedFreshness,
}

/// Who the dashboard's session (or the token) is.
#[derive(Debug, Serialize, ToSchema)]
pub struct Session {
    pub sub: String,
    /// `provider_admin`, `account`, `network_admin`, `site_admin`, `user` or `service`.
    pub role: String,
    pub account_id: Option<String>,
    pub install_ids: Option<Vec<String>>,
    /// When the token (and so the session) expires, UTC.
    pub expires_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionAnswer {
    pub success: bool,
    pub session: Session,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Done {
    pub success: bool,
}

/// The sign-in form's body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SignIn {
    /// A JWT, as the API takes in `Authorization: Bearer`.
    pub token: String,
}

/// The two ways to authenticate: the bearer token (integrations) and the
/// dashboard's session cookie (browsers).
struct Authentication;

impl Modify for Authentication {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", usage_service_kit::server::bearer_scheme());
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::dashboard::session::COOKIE,
                "The dashboard's session (POST /dashboard/session). A request that changes \
                 something with it must come from the dashboard's own pages.",
            ))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "usage-query",
        description = "The query API: summaries, raw events, installations, exports and erasure, \
the fleet's figures (overview, analytics, cost projection, anomalies), an installation in depth \
and its governance history, served from ClickHouse; and the provider dashboard under /dashboard. \
Errors: {success: false, error, message}."
    ),
    paths(
        crate::routes::get_summary,
        crate::routes::get_events,
        crate::routes::get_decisions,
        crate::routes::get_installation,
        crate::routes::get_overview,
        crate::routes::get_analytics,
        crate::routes::get_projection,
        crate::routes::get_anomalies,
        crate::routes::get_installations,
        crate::routes::delete_installation,
        crate::routes::post_export,
        crate::routes::get_session,
        crate::routes::post_session,
        crate::routes::delete_session,
        crate::routes::get_dashboard,
    ),
    components(schemas(ErrorBody, export::ExportBody)),
    modifiers(&Authentication),
    tags(
        (name = "usage", description = "One installation's (or every one's) usage."),
        (name = "fleet", description = "Figures across the installations a token may see."),
        (name = "installations", description = "Installations: the list, one in depth, erasure."),
        (name = "dashboard", description = "The provider dashboard and its session."),
        (name = "operations", description = "Health, readiness, metrics, this document."),
    )
)]
struct QueryDoc;

/// The document, built once.
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        usage_service_kit::server::render_openapi(QueryDoc::openapi(), env!("CARGO_PKG_VERSION"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_every_route_of_the_route_table() {
        let doc: serde_json::Value = serde_json::from_str(document()).unwrap();
        let mut documented: Vec<String> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .map(move |m| format!("{} {path}", m.to_uppercase()))
            })
            .collect();
        documented.sort();
        let mut listed: Vec<String> = include_str!("routes.rs")
            .lines()
            .filter(|l| l.starts_with("//! | `"))
            .map(|l| l.split('`').nth(1).unwrap().to_string())
            .chain(
                ["/health", "/ready", "/metrics", "/openapi.json"]
                    .iter()
                    .map(|p| format!("GET {p}")),
            )
            .collect();
        listed.sort();
        assert_eq!(documented, listed);
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        assert!(doc["components"]["schemas"]["Overview"]["required"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("near_cap")));
    }
}

//! The query API's HTTP surface.
//!
//! | route | handler |
//! | --- | --- |
//! | `GET /provider/usage/summary` | [`crate::summary`] |
//! | `GET /provider/usage/events` | [`crate::events`] |
//! | `GET /api/usage/installations` | [`crate::installations`] |
//! | `DELETE /api/usage/installations/{install_id}` | [`crate::erasure`] |
//! | `POST /api/usage/export` | [`crate::export`] |

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
use usage_service_kit::auth::JwtVerifier;
use warp::filters::BoxedFilter;
use warp::http::HeaderMap;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::error::QueryError;
use crate::{access, erasure, events, export, installations, summary};

pub struct Api {
    pub clickhouse: clickhouse::Client,
    pub jwt: JwtVerifier,
    pub eraser: erasure::Eraser,
}

impl Api {
    fn claims(&self, headers: &HeaderMap) -> Result<usage_service_kit::auth::Claims, QueryError> {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
        Ok(self
            .jwt
            .verify_header(auth, chrono::Utc::now().timestamp())?)
    }

    async fn get_summary(
        &self,
        headers: HeaderMap,
        query: HashMap<String, String>,
    ) -> Result<Response, QueryError> {
        let claims = self.claims(&headers)?;
        let params = summary::SummaryParams::parse(&query, summary::today())?;
        let scope = access::scope(&self.clickhouse, &claims, params.install_id.as_deref()).await?;
        let (data, meta) = summary::summary(&self.clickhouse, &params, &scope).await?;
        Ok(
            warp::reply::json(&json!({"success": true, "data": data, "meta": meta}))
                .into_response(),
        )
    }

    async fn get_events(
        &self,
        headers: HeaderMap,
        query: HashMap<String, String>,
    ) -> Result<Response, QueryError> {
        let claims = self.claims(&headers)?;
        let params = events::EventsParams::parse(&query, summary::today())?;
        let scope = access::scope(&self.clickhouse, &claims, Some(&params.install_id)).await?;
        let (events, meta) = events::events(&self.clickhouse, &params, &scope).await?;
        Ok(
            warp::reply::json(&json!({"success": true, "events": events, "meta": meta}))
                .into_response(),
        )
    }

    async fn get_installations(
        &self,
        headers: HeaderMap,
        query: HashMap<String, String>,
    ) -> Result<Response, QueryError> {
        let claims = self.claims(&headers)?;
        if !(claims.role.is_provider()
            && claims.may(usage_service_kit::auth::Permission::ReadUsage))
        {
            return Err(QueryError::Forbidden(
                "read the installations list (provider admins only)".into(),
            ));
        }
        let params = installations::InstallationsParams::parse(&query, summary::today())?;
        let (list, meta) = installations::installations(&self.clickhouse, &params).await?;
        Ok(
            warp::reply::json(&json!({"success": true, "installations": list, "meta": meta}))
                .into_response(),
        )
    }

    async fn delete_installation(
        &self,
        headers: HeaderMap,
        install_id: String,
    ) -> Result<Response, QueryError> {
        let claims = self.claims(&headers)?;
        access::may_erase(&self.clickhouse, &claims, &install_id).await?;
        let by = format!("{}:{:?}", claims.sub, claims.role);
        let erased = self.eraser.erase(&install_id, &by).await?;
        Ok(warp::reply::json(&json!({"success": true, "erased": erased})).into_response())
    }

    async fn post_export(&self, headers: HeaderMap, body: Bytes) -> Result<Response, QueryError> {
        let claims = self.claims(&headers)?;
        let body: export::ExportBody = serde_json::from_slice(&body)
            .map_err(|e| QueryError::BadRequest(format!("the body must be a JSON object: {e}")))?;
        let today = summary::today();
        let params = export::ExportParams::parse(body, today)?;
        let scope = access::scope(&self.clickhouse, &claims, params.install_id.as_deref()).await?;
        export::export(&self.clickhouse, &params, &scope, today).await
    }
}

fn respond(result: Result<Response, QueryError>) -> Response {
    result.unwrap_or_else(QueryError::into_response)
}

pub fn routes(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    let api = warp::any().map(move || api.clone());
    let summary = warp::path!("provider" / "usage" / "summary")
        .and(warp::get())
        .and(api.clone())
        .and(warp::header::headers_cloned())
        .and(warp::query::<HashMap<String, String>>())
        .then(|api: Arc<Api>, headers, query| async move {
            respond(api.get_summary(headers, query).await)
        });
    let events = warp::path!("provider" / "usage" / "events")
        .and(warp::get())
        .and(api.clone())
        .and(warp::header::headers_cloned())
        .and(warp::query::<HashMap<String, String>>())
        .then(|api: Arc<Api>, headers, query| async move {
            respond(api.get_events(headers, query).await)
        });
    let installations = warp::path!("api" / "usage" / "installations")
        .and(warp::get())
        .and(api.clone())
        .and(warp::header::headers_cloned())
        .and(warp::query::<HashMap<String, String>>())
        .then(|api: Arc<Api>, headers, query| async move {
            respond(api.get_installations(headers, query).await)
        });
    let erase = warp::path!("api" / "usage" / "installations" / String)
        .and(warp::delete())
        .and(api.clone())
        .and(warp::header::headers_cloned())
        .then(|install_id: String, api: Arc<Api>, headers| async move {
            respond(api.delete_installation(headers, install_id).await)
        });
    let export = warp::path!("api" / "usage" / "export")
        .and(warp::post())
        .and(api)
        .and(warp::header::headers_cloned())
        .and(warp::body::content_length_limit(64 * 1024))
        .and(warp::body::bytes())
        .then(|api: Arc<Api>, headers, body| async move {
            respond(api.post_export(headers, body).await)
        });
    summary
        .or(events)
        .unify()
        .or(installations)
        .unify()
        .or(erase)
        .unify()
        .or(export)
        .unify()
        .recover(rejection)
        .unify()
        .boxed()
}

async fn rejection(r: Rejection) -> Result<Response, Infallible> {
    let err = if r.is_not_found() {
        QueryError::NotFound
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        QueryError::MethodNotAllowed
    } else {
        QueryError::BadRequest(format!("bad request: {r:?}"))
    };
    Ok(err.into_response())
}

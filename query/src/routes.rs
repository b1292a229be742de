//! The query API's HTTP surface.
//!
//! | route | handler |
//! | --- | --- |
//! | `GET /provider/usage/summary` | [`crate::summary`] |

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use serde_json::json;
use usage_service_kit::auth::JwtVerifier;
use warp::filters::BoxedFilter;
use warp::http::HeaderMap;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::error::QueryError;
use crate::{access, summary};

pub struct Api {
    pub clickhouse: clickhouse::Client,
    pub jwt: JwtVerifier,
}

impl Api {
    async fn get_summary(
        &self,
        headers: HeaderMap,
        query: HashMap<String, String>,
    ) -> Result<Response, QueryError> {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
        let claims = self
            .jwt
            .verify_header(auth, chrono::Utc::now().timestamp())?;
        let params = summary::SummaryParams::parse(&query, summary::today())?;
        let scope = access::scope(&self.clickhouse, &claims, params.install_id.as_deref()).await?;
        let (data, meta) = summary::summary(&self.clickhouse, &params, &scope).await?;
        Ok(
            warp::reply::json(&json!({"success": true, "data": data, "meta": meta}))
                .into_response(),
        )
    }
}

fn respond(result: Result<Response, QueryError>) -> Response {
    result.unwrap_or_else(QueryError::into_response)
}

pub fn routes(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    let api = warp::any().map(move || api.clone());
    let summary = warp::path!("provider" / "usage" / "summary")
        .and(warp::get())
        .and(api)
        .and(warp::header::headers_cloned())
        .and(warp::query::<HashMap<String, String>>())
        .then(|api: Arc<Api>, headers, query| async move {
            respond(api.get_summary(headers, query).await)
        });
    summary.recover(rejection).unify().boxed()
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

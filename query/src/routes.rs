//! The query API's HTTP surface.
//!
//! | route | handler |
//! | --- | --- |
//! | `GET /provider/usage/summary` | [`crate::summary`] |
//! | `GET /provider/usage/events` | [`crate::events`] |
//! | `GET /provider/usage/decisions` | [`crate::decisions`] |
//! | `GET /provider/installations/{install_id}` | [`crate::installation`] |
//! | `GET /provider/fleet/overview` | [`crate::fleet::overview`] |
//! | `GET /provider/fleet/analytics` | [`crate::fleet::analytics`] |
//! | `GET /provider/fleet/projection` | [`crate::fleet::projection`] |
//! | `GET /provider/fleet/anomalies` | [`crate::fleet::anomalies`] |
//! | `GET /api/usage/installations` | [`crate::installations`] |
//! | `DELETE /api/usage/installations/{install_id}` | [`crate::erasure`] |
//! | `POST /api/usage/export` | [`crate::export`] |
//! | `GET /dashboard/session` | [`crate::dashboard::session`] |
//! | `POST /dashboard/session` | [`crate::dashboard::session`] |
//! | `DELETE /dashboard/session` | [`crate::dashboard::session`] |
//! | `GET /dashboard/` | [`crate::dashboard`] |
//!
//! Every route authenticates with `Authorization: Bearer <jwt>` or the
//! dashboard's session cookie; a request that changes something with the
//! cookie must come from the dashboard's own pages.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use serde::Serialize;
use serde_json::{json, Value};
use usage_service_kit::auth::{Claims, JwtError, JwtVerifier};
use usage_service_kit::policy::Policy;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, HeaderValue};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::dashboard::{self, session};
use crate::error::QueryError;
use crate::fleet::cache::{recipe, Kept};
use crate::fleet::{analytics, anomalies, overview, projection, Caches, Fleet};
use crate::params::Query;
use crate::{access, decisions, erasure, events, export, installation, installations, summary};

pub struct Api {
    pub clickhouse: clickhouse::Client,
    pub jwt: JwtVerifier,
    pub eraser: erasure::Eraser,
    pub policy: Arc<Policy>,
    pub caches: Caches,
    pub sessions: Sessions,
}

/// How the dashboard's session cookie is set.
#[derive(Debug, Clone, Copy)]
pub struct Sessions {
    pub secure: bool,
    pub max_age_secs: i64,
}

fn ok(body: Value) -> Result<Response, QueryError> {
    Ok(warp::reply::json(&body).into_response())
}

/// `meta` of a kept answer: when it was computed and how old it may be.
fn freshness<T>(kept: &Kept<T>, caches_ttl: std::time::Duration) -> Value {
    json!({
        "computed_at": kept.computed_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "max_age_secs": caches_ttl.as_secs(),
    })
}

impl Api {
    fn claims(&self, headers: &HeaderMap) -> Result<Claims, QueryError> {
        let now = Utc::now().timestamp();
        Ok(match session::credentials(headers) {
            session::Credentials::Header(h) => self.jwt.verify_header(Some(h), now)?,
            session::Credentials::Cookie(token) => self.jwt.verify(token, now)?,
            session::Credentials::None => return Err(JwtError::Missing.into()),
        })
    }

    /// The claims of a request that changes something: with the session
    /// cookie, only from the dashboard's own pages.
    fn claims_to_change(&self, headers: &HeaderMap) -> Result<Claims, QueryError> {
        if matches!(
            session::credentials(headers),
            session::Credentials::Cookie(_)
        ) && !session::same_origin(headers)
        {
            return Err(QueryError::CrossSite);
        }
        self.claims(headers)
    }

    async fn get_summary(&self, headers: HeaderMap, query: Query) -> Result<Response, QueryError> {
        let claims = self.claims(&headers)?;
        let params = summary::SummaryParams::parse(&query, summary::today())?;
        let scope = access::scope(&self.clickhouse, &claims, params.install_id.as_deref()).await?;
        let (data, meta) = summary::summary(&self.clickhouse, &params, &scope).await?;
        ok(json!({"success": true, "data": data, "meta": meta}))
    }

    async fn get_events(&self, headers: HeaderMap, query: Query) -> Result<Response, QueryError> {
        let claims = self.claims(&headers)?;
        let params = events::EventsParams::parse(&query, summary::today())?;
        let scope = access::scope(&self.clickhouse, &claims, Some(&params.install_id)).await?;
        let (events, meta) = events::events(&self.clickhouse, &params, &scope).await?;
        ok(json!({"success": true, "events": events, "meta": meta}))
    }

    async fn get_decisions(
        &self,
        headers: HeaderMap,
        query: Query,
    ) -> Result<Response, QueryError> {
        let claims = self.claims(&headers)?;
        Fleet::of(&claims)?;
        let params = decisions::DecisionsParams::parse(&query, summary::today())?;
        let scope = access::scope(&self.clickhouse, &claims, params.install_id.as_deref()).await?;
        let (list, meta) = decisions::decisions(&self.clickhouse, &params, &scope).await?;
        ok(json!({"success": true, "decisions": list, "meta": meta}))
    }

    async fn get_installation(
        &self,
        headers: HeaderMap,
        install_id: String,
    ) -> Result<Response, QueryError> {
        let claims = self.claims(&headers)?;
        // Figures of the whole installation: not for a `user` token.
        Fleet::of(&claims)?;
        access::scope(&self.clickhouse, &claims, Some(&install_id)).await?;
        let data =
            installation::installation(&self.clickhouse, &self.policy, &install_id, Utc::now())
                .await?;
        ok(json!({"success": true, "data": data}))
    }

    async fn get_overview(&self, headers: HeaderMap, query: Query) -> Result<Response, QueryError> {
        let fleet = Fleet::of(&self.claims(&headers)?)?;
        let today = summary::today();
        let params = overview::OverviewParams::parse(&query, today)?;
        let key = format!("{}|{}|{today}", fleet.key(), params.key());
        let (client, policy) = (self.clickhouse.clone(), self.policy.clone());
        let kept = self
            .caches
            .overview
            .get(
                &key,
                recipe(move || {
                    let (client, fleet, policy, params) =
                        (client.clone(), fleet.clone(), policy.clone(), params.clone());
                    async move { overview::overview(&client, &fleet, &policy, &params, today).await }
                }),
            )
            .await?;
        self.kept(&kept, self.caches.overview.ttl())
    }

    fn kept<T: Serialize>(
        &self,
        kept: &Kept<T>,
        ttl: std::time::Duration,
    ) -> Result<Response, QueryError> {
        ok(json!({"success": true, "data": &*kept.value, "meta": freshness(kept, ttl)}))
    }

    async fn get_analytics(
        &self,
        headers: HeaderMap,
        query: Query,
    ) -> Result<Response, QueryError> {
        let fleet = Fleet::of(&self.claims(&headers)?)?;
        let today = summary::today();
        let params = analytics::AnalyticsParams::parse(&query, today)?;
        let key = format!("{}|{}|{today}", fleet.key(), params.key());
        let client = self.clickhouse.clone();
        let kept = self
            .caches
            .analytics
            .get(
                &key,
                recipe(move || {
                    let (client, fleet, params) = (client.clone(), fleet.clone(), params.clone());
                    async move { analytics::analytics(&client, &fleet, &params).await }
                }),
            )
            .await?;
        self.kept(&kept, self.caches.analytics.ttl())
    }

    async fn get_projection(
        &self,
        headers: HeaderMap,
        query: Query,
    ) -> Result<Response, QueryError> {
        let fleet = Fleet::of(&self.claims(&headers)?)?;
        let params = projection::ProjectionParams::parse(&query)?;
        let today = summary::today();
        let key = format!("{}|{today}", fleet.key());
        let client = self.clickhouse.clone();
        let kept = self
            .caches
            .projection
            .get(
                &key,
                recipe(move || {
                    let (client, fleet) = (client.clone(), fleet.clone());
                    async move {
                        let now = Utc::now();
                        let clock = if now.date_naive() == today {
                            projection::clock_at(now)
                        } else {
                            projection::Clock {
                                today,
                                elapsed: 1.0,
                            }
                        };
                        projection::projection(&client, &fleet, clock).await
                    }
                }),
            )
            .await?;
        let mut data = serde_json::to_value(&*kept.value)
            .map_err(|e| QueryError::Startup(format!("projection: {e}")))?;
        data["installations"] = serde_json::to_value(kept.value.page(&params))
            .map_err(|e| QueryError::Startup(format!("projection: {e}")))?;
        let mut meta = freshness(&kept, self.caches.projection.ttl());
        meta["total"] = json!(kept.value.installations.len());
        meta["limit"] = json!(params.limit);
        meta["offset"] = json!(params.offset);
        ok(json!({"success": true, "data": data, "meta": meta}))
    }

    async fn get_anomalies(
        &self,
        headers: HeaderMap,
        query: Query,
    ) -> Result<Response, QueryError> {
        let fleet = Fleet::of(&self.claims(&headers)?)?;
        let params = anomalies::AnomaliesParams::parse(&query)?;
        let today = summary::today();
        let key = format!("{}|{}:{}|{today}", fleet.key(), params.days, params.limit);
        let client = self.clickhouse.clone();
        let kept = self
            .caches
            .anomalies
            .get(
                &key,
                recipe(move || {
                    let (client, fleet, params) = (client.clone(), fleet.clone(), params.clone());
                    async move { anomalies::anomalies(&client, &fleet, &params, today).await }
                }),
            )
            .await?;
        self.kept(&kept, self.caches.anomalies.ttl())
    }

    async fn get_installations(
        &self,
        headers: HeaderMap,
        query: Query,
    ) -> Result<Response, QueryError> {
        let fleet = Fleet::of(&self.claims(&headers)?)?;
        let params = installations::InstallationsParams::parse(&query, summary::today())?;
        let key = format!(
            "{}|{}..{}|{}",
            fleet.key(),
            params.range.from,
            params.range.to,
            params.q.as_deref().unwrap_or("")
        );
        let client = self.clickhouse.clone();
        let (range, q) = (params.range, params.q.clone());
        let ranking =
            self.caches
                .rankings
                .get(
                    &key,
                    recipe(move || {
                        let (client, fleet, q) = (client.clone(), fleet.clone(), q.clone());
                        async move {
                            installations::ranking(&client, &fleet, &range, q.as_deref()).await
                        }
                    }),
                )
                .await?;
        let (list, meta) =
            installations::installations(&self.clickhouse, &ranking.value, &params).await?;
        ok(json!({"success": true, "installations": list, "meta": meta}))
    }

    async fn delete_installation(
        &self,
        headers: HeaderMap,
        install_id: String,
    ) -> Result<Response, QueryError> {
        let claims = self.claims_to_change(&headers)?;
        access::may_erase(&self.clickhouse, &claims, &install_id).await?;
        let by = format!("{}:{:?}", claims.sub, claims.role);
        let erased = self.eraser.erase(&install_id, &by).await?;
        ok(json!({"success": true, "erased": erased}))
    }

    async fn post_export(&self, headers: HeaderMap, body: Bytes) -> Result<Response, QueryError> {
        let claims = self.claims_to_change(&headers)?;
        let body: export::ExportBody = serde_json::from_slice(&body)
            .map_err(|e| QueryError::BadRequest(format!("the body must be a JSON object: {e}")))?;
        let today = summary::today();
        let params = export::ExportParams::parse(body, today)?;
        let scope = access::scope(&self.clickhouse, &claims, params.install_id.as_deref()).await?;
        export::export(&self.clickhouse, &params, &scope, today).await
    }

    fn session_of(claims: &Claims) -> Value {
        json!({
            "sub": claims.sub,
            "role": claims.role,
            "account_id": claims.account_id,
            "install_ids": claims.install_ids,
            "expires_at": chrono::DateTime::from_timestamp(claims.exp, 0)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        })
    }

    async fn get_session(&self, headers: HeaderMap) -> Result<Response, QueryError> {
        let claims = self.claims(&headers)?;
        ok(json!({"success": true, "session": Self::session_of(&claims)}))
    }

    async fn post_session(&self, headers: HeaderMap, body: Bytes) -> Result<Response, QueryError> {
        if !session::same_origin(&headers) {
            return Err(QueryError::CrossSite);
        }
        #[derive(serde::Deserialize)]
        struct SignIn {
            token: String,
        }
        let body: SignIn = serde_json::from_slice(&body).map_err(|_| {
            QueryError::BadRequest("the body must be {\"token\": \"<a JWT>\"}".into())
        })?;
        let token = body.token.trim();
        let now = Utc::now().timestamp();
        let claims = self.jwt.verify(token, now)?;
        let max_age = (claims.exp - now).min(self.sessions.max_age_secs);
        let mut response =
            warp::reply::json(&json!({"success": true, "session": Self::session_of(&claims)}))
                .into_response();
        let cookie = session::open(token, max_age, self.sessions.secure);
        response.headers_mut().insert(
            "set-cookie",
            HeaderValue::from_str(&cookie)
                .map_err(|_| QueryError::BadRequest("the token is not a JWT".into()))?,
        );
        Ok(response)
    }

    async fn delete_session(&self, headers: HeaderMap) -> Result<Response, QueryError> {
        if !session::same_origin(&headers) {
            return Err(QueryError::CrossSite);
        }
        let mut response = warp::reply::json(&json!({"success": true})).into_response();
        if let Ok(cookie) = HeaderValue::from_str(&session::close(self.sessions.secure)) {
            response.headers_mut().insert("set-cookie", cookie);
        }
        Ok(response)
    }
}

fn respond(result: Result<Response, QueryError>) -> Response {
    result.unwrap_or_else(QueryError::into_response)
}

/// A `GET` route with a query string, answered by `handler`.
fn read<P, H, Fut>(api: &Arc<Api>, path: P, handler: H) -> BoxedFilter<(Response,)>
where
    P: Filter<Extract = (), Error = Rejection> + Clone + Send + Sync + 'static,
    H: Fn(Arc<Api>, HeaderMap, Query) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, QueryError>> + Send + 'static,
{
    let api = api.clone();
    path.and(warp::get())
        .and(warp::header::headers_cloned())
        .and(warp::query::<Query>())
        .then(move |headers, query| {
            let (api, handler) = (api.clone(), handler.clone());
            async move { respond(handler(api, headers, query).await) }
        })
        .boxed()
}

pub fn routes(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    let with_api = {
        let api = api.clone();
        warp::any().map(move || api.clone())
    };
    let summary = read(
        &api,
        warp::path!("provider" / "usage" / "summary"),
        |a, h, q| async move { a.get_summary(h, q).await },
    );
    let events = read(
        &api,
        warp::path!("provider" / "usage" / "events"),
        |a, h, q| async move { a.get_events(h, q).await },
    );
    let decisions = read(
        &api,
        warp::path!("provider" / "usage" / "decisions"),
        |a, h, q| async move { a.get_decisions(h, q).await },
    );
    let overview = read(
        &api,
        warp::path!("provider" / "fleet" / "overview"),
        |a, h, q| async move { a.get_overview(h, q).await },
    );
    let analytics = read(
        &api,
        warp::path!("provider" / "fleet" / "analytics"),
        |a, h, q| async move { a.get_analytics(h, q).await },
    );
    let projection = read(
        &api,
        warp::path!("provider" / "fleet" / "projection"),
        |a, h, q| async move { a.get_projection(h, q).await },
    );
    let anomalies = read(
        &api,
        warp::path!("provider" / "fleet" / "anomalies"),
        |a, h, q| async move { a.get_anomalies(h, q).await },
    );
    let installations = read(
        &api,
        warp::path!("api" / "usage" / "installations"),
        |a, h, q| async move { a.get_installations(h, q).await },
    );
    let installation = warp::path!("provider" / "installations" / String)
        .and(warp::get())
        .and(with_api.clone())
        .and(warp::header::headers_cloned())
        .then(|install_id: String, api: Arc<Api>, headers| async move {
            respond(api.get_installation(headers, install_id).await)
        });
    let erase = warp::path!("api" / "usage" / "installations" / String)
        .and(warp::delete())
        .and(with_api.clone())
        .and(warp::header::headers_cloned())
        .then(|install_id: String, api: Arc<Api>, headers| async move {
            respond(api.delete_installation(headers, install_id).await)
        });
    let export = warp::path!("api" / "usage" / "export")
        .and(warp::post())
        .and(with_api.clone())
        .and(warp::header::headers_cloned())
        .and(warp::body::content_length_limit(64 * 1024))
        .and(warp::body::bytes())
        .then(|api: Arc<Api>, headers, body| async move {
            respond(api.post_export(headers, body).await)
        });
    let session_get = warp::path!("dashboard" / "session")
        .and(warp::get())
        .and(with_api.clone())
        .and(warp::header::headers_cloned())
        .then(|api: Arc<Api>, headers| async move { respond(api.get_session(headers).await) });
    let session_post = warp::path!("dashboard" / "session")
        .and(warp::post())
        .and(with_api.clone())
        .and(warp::header::headers_cloned())
        .and(warp::body::content_length_limit(16 * 1024))
        .and(warp::body::bytes())
        .then(|api: Arc<Api>, headers, body| async move {
            respond(api.post_session(headers, body).await)
        });
    let session_delete = warp::path!("dashboard" / "session")
        .and(warp::delete())
        .and(with_api)
        .and(warp::header::headers_cloned())
        .then(|api: Arc<Api>, headers| async move { respond(api.delete_session(headers).await) });
    // `/dashboard` and `/dashboard/` look alike to warp's path matching:
    // the full path tells them apart (the page's relative links need the slash).
    let dashboard_files = warp::path("dashboard")
        .and(warp::get())
        .and(warp::path::full())
        .and(warp::path::tail())
        .and_then(
            |full: warp::path::FullPath, tail: warp::path::Tail| async move {
                if full.as_str() == "/dashboard" {
                    return Ok(dashboard::redirect_to_index());
                }
                dashboard::serve(tail.as_str()).ok_or_else(warp::reject::not_found)
            },
        );
    summary
        .or(events)
        .unify()
        .or(decisions)
        .unify()
        .or(installation)
        .unify()
        .or(overview)
        .unify()
        .or(analytics)
        .unify()
        .or(projection)
        .unify()
        .or(anomalies)
        .unify()
        .or(installations)
        .unify()
        .or(erase)
        .unify()
        .or(export)
        .unify()
        .or(session_get)
        .unify()
        .or(session_post)
        .unify()
        .or(session_delete)
        .unify()
        .or(dashboard_files)
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
    } else if r.find::<warp::reject::PayloadTooLarge>().is_some() {
        QueryError::BadRequest("the body is too large".into())
    } else {
        QueryError::BadRequest(format!("bad request: {r:?}"))
    };
    Ok(err.into_response())
}

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
use usage_service_kit::auth::{Claims, JwtError, JwtVerifier};
use usage_service_kit::policy::Policy;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, HeaderValue};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::dashboard::{self, session};
use crate::error::QueryError;
use crate::export::ExportBody;
use crate::fleet::cache::{recipe, Kept};
use crate::fleet::{analytics, anomalies, overview, projection, Caches, Fleet};
use crate::openapi::{
    AnalyticsAnswer, AnomaliesAnswer, DecisionsAnswer, Done, ErasureAnswer, ErrorBody,
    EventsAnswer, Freshness, InstallationAnswer, InstallationsAnswer, OverviewAnswer,
    PagedFreshness, ProjectionAnswer, Session, SessionAnswer, SignIn, SummaryAnswer,
};
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

fn ok(body: &impl Serialize) -> Result<Response, QueryError> {
    Ok(warp::reply::json(body).into_response())
}

fn freshness<T>(kept: &Kept<T>) -> Freshness {
    Freshness {
        computed_at: kept
            .computed_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        max_age_secs: kept.fresh_for.as_secs(),
    }
}

/// Each fleet endpoint's cache key and recipe for a fleet and its
/// parameters: what a request asks for, and what the warmer computes ahead.
mod entries {
    use super::*;
    use crate::fleet::cache::Recipe;

    pub fn overview(
        api: &Api,
        fleet: Fleet,
        params: overview::OverviewParams,
        today: chrono::NaiveDate,
    ) -> (String, Recipe<overview::Overview>) {
        let key = format!("{}|{}|{today}", fleet.key(), params.key());
        let (client, policy) = (api.clickhouse.clone(), api.policy.clone());
        let recipe = recipe(move || {
            let (client, fleet, policy, params) = (
                client.clone(),
                fleet.clone(),
                policy.clone(),
                params.clone(),
            );
            async move { overview::overview(&client, &fleet, &policy, &params, today).await }
        });
        (key, recipe)
    }

    pub fn analytics(
        api: &Api,
        fleet: Fleet,
        params: analytics::AnalyticsParams,
        today: chrono::NaiveDate,
    ) -> (String, Recipe<analytics::Analytics>) {
        let key = format!("{}|{}|{today}", fleet.key(), params.key());
        let client = api.clickhouse.clone();
        let recipe = recipe(move || {
            let (client, fleet, params) = (client.clone(), fleet.clone(), params.clone());
            async move { analytics::analytics(&client, &fleet, &params).await }
        });
        (key, recipe)
    }

    pub fn projection(
        api: &Api,
        fleet: Fleet,
        today: chrono::NaiveDate,
    ) -> (String, Recipe<projection::Projection>) {
        let key = format!("{}|{today}", fleet.key());
        let client = api.clickhouse.clone();
        let recipe = recipe(move || {
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
        });
        (key, recipe)
    }

    pub fn anomalies(
        api: &Api,
        fleet: Fleet,
        params: anomalies::AnomaliesParams,
        today: chrono::NaiveDate,
    ) -> (String, Recipe<anomalies::Anomalies>) {
        let key = format!("{}|{}:{}|{today}", fleet.key(), params.days, params.limit);
        let client = api.clickhouse.clone();
        let recipe = recipe(move || {
            let (client, fleet, params) = (client.clone(), fleet.clone(), params.clone());
            async move { anomalies::anomalies(&client, &fleet, &params, today).await }
        });
        (key, recipe)
    }

    pub fn ranking(
        api: &Api,
        fleet: Fleet,
        range: crate::params::DateRange,
    ) -> (String, Recipe<installations::Ranking>) {
        let key = format!("{}|{}..{}", fleet.key(), range.from, range.to);
        let client = api.clickhouse.clone();
        let recipe = recipe(move || {
            let (client, fleet) = (client.clone(), fleet.clone());
            async move { installations::ranking(&client, &fleet, &range).await }
        });
        (key, recipe)
    }
}

/// Computes the provider's default dashboard pages ahead and keeps them
/// fresh (the pages ask exactly these): the overview, analytics, projection
/// and anomalies of the whole fleet, and the installations list's ranking,
/// for today. Called by the warmer; yesterday's pins are dropped.
pub async fn default_pages(api: &Api) {
    let today = summary::today();
    let none = Query::new();
    let fleet = Fleet::All;
    if let Ok(params) = overview::OverviewParams::parse(&none, today) {
        let entry = entries::overview(api, fleet.clone(), params, today);
        api.caches.overview.pin_only(vec![entry]).await;
    }
    if let Ok(params) = analytics::AnalyticsParams::parse(&none, today) {
        let entry = entries::analytics(api, fleet.clone(), params, today);
        api.caches.analytics.pin_only(vec![entry]).await;
    }
    let entry = entries::projection(api, fleet.clone(), today);
    api.caches.projection.pin_only(vec![entry]).await;
    if let Ok(params) = anomalies::AnomaliesParams::parse(&none) {
        let entry = entries::anomalies(api, fleet.clone(), params, today);
        api.caches.anomalies.pin_only(vec![entry]).await;
    }
    if let Ok(params) = installations::InstallationsParams::parse(&none, today) {
        let entry = entries::ranking(api, fleet, params.range);
        api.caches.rankings.pin_only(vec![entry]).await;
    }
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
}

/// The error answers every read may give.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // documentation only
enum ReadErrors {
    /// invalid_parameters: the message says what to fix.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// invalid_token or token_expired.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// forbidden: the token may not see this.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// storage_unavailable (Retry-After).
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The days a request covers.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only: params::DateRange parses them
struct Range {
    /// First day, inclusive, UTC (default: 29 days before `date_to`).
    #[param(format = Date)]
    date_from: Option<String>,
    /// Last day, inclusive, UTC (default: today).
    #[param(format = Date)]
    date_to: Option<String>,
}

/// Row filters (params::Filters).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only
struct RowFilters {
    /// `inline`, `bulk`, `queue` or `manual`.
    source: Option<String>,
    /// A model name.
    model: Option<String>,
    /// 64 hex characters.
    user_hash: Option<String>,
}

/// Usage rollups grouped by day, user, source, model, month or billing month.
#[utoipa::path(get, path = "/provider/usage/summary", tag = "usage",
    security(("bearer" = []), ("session" = [])),
    params(
        ("install_id" = Option<String>, Query, description = "Required unless the token is provider-level; without it, rows per installation across all."),
        Range,
        ("group_by" = Option<String>, Query, description = "`day` (default), `user`, `source`, `model`, `month` (of created_at), `billing_month` (the month usage counts toward for caps and billing)."),
        RowFilters,
        ("limit" = Option<u64>, Query, description = "1..=1000, default 100."),
        ("offset" = Option<u64>, Query, description = "Rows to skip."),
    ),
    responses((status = 200, description = "Rows and the exact number of groups.", body = SummaryAnswer), ReadErrors))]
pub async fn get_summary(
    api: &Api,
    headers: HeaderMap,
    query: Query,
) -> Result<Response, QueryError> {
    let claims = api.claims(&headers)?;
    let params = summary::SummaryParams::parse(&query, summary::today())?;
    let scope = access::scope(&api.clickhouse, &claims, params.install_id.as_deref()).await?;
    let (data, meta) = summary::summary(&api.clickhouse, &params, &scope).await?;
    ok(&SummaryAnswer {
        success: true,
        data,
        meta,
    })
}

/// Raw events of one installation, newest first; offset or keyset (cursor) paging.
#[utoipa::path(get, path = "/provider/usage/events", tag = "usage",
    security(("bearer" = []), ("session" = [])),
    params(
        ("install_id" = String, Query, description = "The installation."),
        Range,
        RowFilters,
        ("limit" = Option<u64>, Query, description = "1..=1000, default 100."),
        ("offset" = Option<u64>, Query, description = "Rows to skip (not with cursor)."),
        ("cursor" = Option<String>, Query, description = "`meta.next_cursor` of the previous page."),
    ),
    responses((status = 200, description = "A page of events.", body = EventsAnswer), ReadErrors))]
pub async fn get_events(
    api: &Api,
    headers: HeaderMap,
    query: Query,
) -> Result<Response, QueryError> {
    let claims = api.claims(&headers)?;
    let params = events::EventsParams::parse(&query, summary::today())?;
    let scope = access::scope(&api.clickhouse, &claims, Some(&params.install_id)).await?;
    let (events, meta) = events::events(&api.clickhouse, &params, &scope).await?;
    ok(&EventsAnswer {
        success: true,
        events,
        meta,
    })
}

/// An installation's governance history (rate limits, abuse and spike
/// flags, cap alerts, blocks and their ends), newest first.
#[utoipa::path(get, path = "/provider/usage/decisions", tag = "usage",
    security(("bearer" = []), ("session" = [])),
    params(
        ("install_id" = Option<String>, Query, description = "Required unless the token is provider-level."),
        Range,
        ("kind" = Option<String>, Query, description = "One decision kind, e.g. `rate_limited`, `cap_warning`, `blocked`."),
        ("limit" = Option<u64>, Query, description = "1..=1000, default 200."),
        ("offset" = Option<u64>, Query, description = "Rows to skip."),
    ),
    responses((status = 200, description = "Decisions, newest first.", body = DecisionsAnswer), ReadErrors))]
pub async fn get_decisions(
    api: &Api,
    headers: HeaderMap,
    query: Query,
) -> Result<Response, QueryError> {
    let claims = api.claims(&headers)?;
    Fleet::of(&claims)?;
    let params = decisions::DecisionsParams::parse(&query, summary::today())?;
    let scope = access::scope(&api.clickhouse, &claims, params.install_id.as_deref()).await?;
    let (list, meta) = decisions::decisions(&api.clickhouse, &params, &scope).await?;
    ok(&DecisionsAnswer {
        success: true,
        decisions: list,
        meta,
    })
}

/// One installation in depth: registry facts, first and last seen, usage,
/// cap progress against the thresholds, open governance episodes.
#[utoipa::path(get, path = "/provider/installations/{install_id}", tag = "installations",
    security(("bearer" = []), ("session" = [])),
    params(("install_id" = String, Path, description = "The installation.")),
    responses(
        (status = 200, description = "The installation.", body = InstallationAnswer),
        (status = 404, description = "not_found: no such installation (provider-level tokens).", body = ErrorBody),
        ReadErrors))]
pub async fn get_installation(
    api: &Api,
    headers: HeaderMap,
    install_id: String,
) -> Result<Response, QueryError> {
    let claims = api.claims(&headers)?;
    // Figures of the whole installation: not for a `user` token.
    Fleet::of(&claims)?;
    access::scope(&api.clickhouse, &claims, Some(&install_id)).await?;
    let data =
        installation::installation(&api.clickhouse, &api.policy, &install_id, Utc::now()).await?;
    ok(&InstallationAnswer {
        success: true,
        data,
    })
}

/// The fleet at a glance: installations, usage and cost all time, this
/// month and over 30 days, revenue and margin, the top 10 by tokens and by
/// cost, a daily trend against the period before, installations near their cap.
#[utoipa::path(get, path = "/provider/fleet/overview", tag = "fleet",
    security(("bearer" = []), ("session" = [])),
    params(Range),
    responses((status = 200, description = "The overview of the fleet the token may see.", body = OverviewAnswer), ReadErrors))]
pub async fn get_overview(
    api: &Api,
    headers: HeaderMap,
    query: Query,
) -> Result<Response, QueryError> {
    let fleet = Fleet::of(&api.claims(&headers)?)?;
    let today = summary::today();
    let params = overview::OverviewParams::parse(&query, today)?;
    let (key, recipe) = entries::overview(api, fleet, params, today);
    let kept = api.caches.overview.get(&key, recipe).await?;
    ok(&OverviewAnswer {
        success: true,
        data: &kept.value,
        meta: freshness(&kept),
    })
}

/// Trends across installations: daily totals, model adoption and source
/// popularity per month, cost by model, installations by monthly usage.
#[utoipa::path(get, path = "/provider/fleet/analytics", tag = "fleet",
    security(("bearer" = []), ("session" = [])),
    params(
        Range,
        ("months" = Option<u64>, Query, description = "Months of the monthly series, this one included: 1..=24, default 12."),
        ("month" = Option<String>, Query, description = "`YYYY-MM` of the distribution (default: this month)."),
    ),
    responses((status = 200, description = "The analytics of the fleet the token may see.", body = AnalyticsAnswer), ReadErrors))]
pub async fn get_analytics(
    api: &Api,
    headers: HeaderMap,
    query: Query,
) -> Result<Response, QueryError> {
    let fleet = Fleet::of(&api.claims(&headers)?)?;
    let today = summary::today();
    let params = analytics::AnalyticsParams::parse(&query, today)?;
    let (key, recipe) = entries::analytics(api, fleet, params, today);
    let kept = api.caches.analytics.get(&key, recipe).await?;
    ok(&AnalyticsAnswer {
        success: true,
        data: &kept.value,
        meta: freshness(&kept),
    })
}

/// This month's generations and cost at month end, for the fleet and each
/// installation, as 80% intervals; the method is stated in the answer.
#[utoipa::path(get, path = "/provider/fleet/projection", tag = "fleet",
    security(("bearer" = []), ("session" = [])),
    params(
        ("sort_by" = Option<String>, Query, description = "`cost` (default) or `generations`: the installations' order, by projected month end."),
        ("limit" = Option<u64>, Query, description = "1..=500, default 20."),
        ("offset" = Option<u64>, Query, description = "Installations to skip."),
    ),
    responses((status = 200, description = "The projection.", body = ProjectionAnswer), ReadErrors))]
pub async fn get_projection(
    api: &Api,
    headers: HeaderMap,
    query: Query,
) -> Result<Response, QueryError> {
    let fleet = Fleet::of(&api.claims(&headers)?)?;
    let params = projection::ProjectionParams::parse(&query)?;
    let today = summary::today();
    let (key, recipe) = entries::projection(api, fleet, today);
    let kept = api.caches.projection.get(&key, recipe).await?;
    let fresh = freshness(&kept);
    ok(&ProjectionAnswer {
        success: true,
        data: kept.value.page(&params),
        meta: PagedFreshness {
            computed_at: fresh.computed_at,
            max_age_secs: fresh.max_age_secs,
            total: kept.value.installations.len() as u64,
            limit: params.limit,
            offset: params.offset,
        },
    })
}

/// Installations whose usage departs from their own baseline (spikes,
/// drops) and governance episodes (abuse, spike flags, rate limits,
/// blocks), ranked; the method is stated in the answer.
#[utoipa::path(get, path = "/provider/fleet/anomalies", tag = "fleet",
    security(("bearer" = []), ("session" = [])),
    params(
        ("days" = Option<u64>, Query, description = "The last days examined: 1..=28, default 7."),
        ("limit" = Option<u64>, Query, description = "1..=500, default 100."),
    ),
    responses((status = 200, description = "Anomalies, highest score first.", body = AnomaliesAnswer), ReadErrors))]
pub async fn get_anomalies(
    api: &Api,
    headers: HeaderMap,
    query: Query,
) -> Result<Response, QueryError> {
    let fleet = Fleet::of(&api.claims(&headers)?)?;
    let params = anomalies::AnomaliesParams::parse(&query)?;
    let today = summary::today();
    let (key, recipe) = entries::anomalies(api, fleet, params, today);
    let kept = api.caches.anomalies.get(&key, recipe).await?;
    ok(&AnomaliesAnswer {
        success: true,
        data: &kept.value,
        meta: freshness(&kept),
    })
}

/// Every installation the token may see with usage in the range: totals,
/// first and last generation, unique users, active days, plan and level.
#[utoipa::path(get, path = "/api/usage/installations", tag = "installations",
    security(("bearer" = []), ("session" = [])),
    params(
        Range,
        ("q" = Option<String>, Query, description = "A search: part of an install id, the start of a site hash, or a whole account id (at most 100 characters)."),
        ("sort_by" = Option<String>, Query, description = "`tokens` (default), `cost`, `date` (last day with usage), `requests`."),
        ("order" = Option<String>, Query, description = "`desc` (default) or `asc`; ties by install_id."),
        ("limit" = Option<u64>, Query, description = "1..=500, default 50."),
        ("offset" = Option<u64>, Query, description = "Rows to skip."),
    ),
    responses((status = 200, description = "A page of installations.", body = InstallationsAnswer), ReadErrors))]
pub async fn get_installations(
    api: &Api,
    headers: HeaderMap,
    query: Query,
) -> Result<Response, QueryError> {
    let fleet = Fleet::of(&api.claims(&headers)?)?;
    let params = installations::InstallationsParams::parse(&query, summary::today())?;
    let matching = match &params.q {
        Some(q) => Some(installations::matching(&api.clickhouse, &fleet, q).await?),
        None => None,
    };
    let (key, recipe) = entries::ranking(api, fleet, params.range);
    let ranking = api.caches.rankings.get(&key, recipe).await?;
    let (list, meta) =
        installations::installations(&api.clickhouse, &ranking.value, matching.as_ref(), &params)
            .await?;
    ok(&InstallationsAnswer {
        success: true,
        installations: list,
        meta,
    })
}

/// Right to erasure: removes every row of the installation, tombstones it,
/// and keeps replays from restoring it.
#[utoipa::path(delete, path = "/api/usage/installations/{install_id}", tag = "installations",
    security(("bearer" = []), ("session" = [])),
    params(("install_id" = String, Path, description = "The installation.")),
    responses(
        (status = 200, description = "What was removed.", body = ErasureAnswer),
        (status = 401, description = "invalid_token or token_expired.", body = ErrorBody),
        (status = 403, description = "forbidden: the token lacks data:erase, or the installation is another account's; cross_site_request: the session cookie from another site's page.", body = ErrorBody),
        (status = 503, description = "storage_unavailable, queue_unavailable or erasure_incomplete (Retry-After).", body = ErrorBody)))]
pub async fn delete_installation(
    api: &Api,
    headers: HeaderMap,
    install_id: String,
) -> Result<Response, QueryError> {
    let claims = api.claims_to_change(&headers)?;
    access::may_erase(&api.clickhouse, &claims, &install_id).await?;
    let by = format!("{}:{:?}", claims.sub, claims.role);
    let erased = api.eraser.erase(&install_id, &by).await?;
    ok(&ErasureAnswer {
        success: true,
        erased,
    })
}

/// CSV (the contract's header) or JSON Lines, streamed.
#[utoipa::path(post, path = "/api/usage/export", tag = "usage",
    security(("bearer" = []), ("session" = [])),
    request_body(content = ExportBody, description = "What to export; every field optional.", content_type = "application/json"),
    responses(
        (status = 200, description = "The export, streamed; Content-Disposition: attachment; filename=\"usage-export-YYYY-MM-DD.csv\" (or .jsonl).",
            content((String = "text/csv"), (String = "application/x-ndjson"))),
        ReadErrors))]
pub async fn post_export(
    api: &Api,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, QueryError> {
    let claims = api.claims_to_change(&headers)?;
    let body: ExportBody = serde_json::from_slice(&body)
        .map_err(|e| QueryError::BadRequest(format!("the body must be a JSON object: {e}")))?;
    let today = summary::today();
    let params = export::ExportParams::parse(body, today)?;
    let scope = access::scope(&api.clickhouse, &claims, params.install_id.as_deref()).await?;
    export::export(&api.clickhouse, &params, &scope, today).await
}

fn session_of(claims: &Claims) -> Session {
    Session {
        sub: claims.sub.clone(),
        role: serde_json::to_value(claims.role)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        account_id: claims.account_id.clone(),
        install_ids: claims.install_ids.clone(),
        expires_at: chrono::DateTime::from_timestamp(claims.exp, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
    }
}

/// Who is signed in (the session cookie, or the bearer token).
#[utoipa::path(get, path = "/dashboard/session", tag = "dashboard",
    security(("session" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The session.", body = SessionAnswer),
        (status = 401, description = "invalid_token or token_expired: nobody is signed in.", body = ErrorBody)))]
pub async fn get_session(api: &Api, headers: HeaderMap) -> Result<Response, QueryError> {
    let claims = api.claims(&headers)?;
    ok(&SessionAnswer {
        success: true,
        session: session_of(&claims),
    })
}

/// Signs the browser in: verifies the token like any request and answers
/// with an HttpOnly, SameSite=Strict session cookie holding it, for at most
/// its lifetime. Only from the dashboard's own page.
#[utoipa::path(post, path = "/dashboard/session", tag = "dashboard",
    request_body(content = SignIn, content_type = "application/json"),
    responses(
        (status = 200, description = "Signed in; Set-Cookie: usage_session=...; HttpOnly; SameSite=Strict.", body = SessionAnswer),
        (status = 400, description = "invalid_parameters: the body is not {\"token\": ...}.", body = ErrorBody),
        (status = 401, description = "invalid_token or token_expired.", body = ErrorBody),
        (status = 403, description = "cross_site_request: not from the dashboard's own page.", body = ErrorBody)))]
pub async fn post_session(
    api: &Api,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, QueryError> {
    if !session::same_origin(&headers) {
        return Err(QueryError::CrossSite);
    }
    let body: SignIn = serde_json::from_slice(&body)
        .map_err(|_| QueryError::BadRequest("the body must be {\"token\": \"<a JWT>\"}".into()))?;
    let token = body.token.trim();
    let now = Utc::now().timestamp();
    let claims = api.jwt.verify(token, now)?;
    let max_age = (claims.exp - now).min(api.sessions.max_age_secs);
    let cookie = HeaderValue::from_str(&session::open(token, max_age, api.sessions.secure))
        .map_err(|_| QueryError::BadRequest("the token is not a JWT".into()))?;
    let mut response = ok(&SessionAnswer {
        success: true,
        session: session_of(&claims),
    })?;
    response.headers_mut().insert("set-cookie", cookie);
    Ok(response)
}

/// Signs the browser out (clears the cookie). Only from the dashboard's own page.
#[utoipa::path(delete, path = "/dashboard/session", tag = "dashboard",
    responses(
        (status = 200, description = "Signed out; Set-Cookie clears usage_session.", body = Done),
        (status = 403, description = "cross_site_request: not from the dashboard's own page.", body = ErrorBody)))]
pub async fn delete_session(api: &Api, headers: HeaderMap) -> Result<Response, QueryError> {
    if !session::same_origin(&headers) {
        return Err(QueryError::CrossSite);
    }
    let mut response = ok(&Done { success: true })?;
    if let Ok(cookie) = HeaderValue::from_str(&session::close(api.sessions.secure)) {
        response.headers_mut().insert("set-cookie", cookie);
    }
    Ok(response)
}

/// The provider dashboard (its script and stylesheet are beside it, under
/// `/dashboard/`; `/dashboard` redirects here).
#[utoipa::path(get, path = "/dashboard/", tag = "dashboard",
    responses((status = 200, description = "The page.", body = String, content_type = "text/html")))]
pub fn get_dashboard(file: &str) -> Option<Response> {
    dashboard::serve(file)
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
        |a, h, q| async move { get_summary(&a, h, q).await },
    );
    let events = read(
        &api,
        warp::path!("provider" / "usage" / "events"),
        |a, h, q| async move { get_events(&a, h, q).await },
    );
    let decisions = read(
        &api,
        warp::path!("provider" / "usage" / "decisions"),
        |a, h, q| async move { get_decisions(&a, h, q).await },
    );
    let overview = read(
        &api,
        warp::path!("provider" / "fleet" / "overview"),
        |a, h, q| async move { get_overview(&a, h, q).await },
    );
    let analytics = read(
        &api,
        warp::path!("provider" / "fleet" / "analytics"),
        |a, h, q| async move { get_analytics(&a, h, q).await },
    );
    let projection = read(
        &api,
        warp::path!("provider" / "fleet" / "projection"),
        |a, h, q| async move { get_projection(&a, h, q).await },
    );
    let anomalies = read(
        &api,
        warp::path!("provider" / "fleet" / "anomalies"),
        |a, h, q| async move { get_anomalies(&a, h, q).await },
    );
    let installations = read(
        &api,
        warp::path!("api" / "usage" / "installations"),
        |a, h, q| async move { get_installations(&a, h, q).await },
    );
    let installation = warp::path!("provider" / "installations" / String)
        .and(warp::get())
        .and(with_api.clone())
        .and(warp::header::headers_cloned())
        .then(|install_id: String, api: Arc<Api>, headers| async move {
            respond(get_installation(&api, headers, install_id).await)
        });
    let erase = warp::path!("api" / "usage" / "installations" / String)
        .and(warp::delete())
        .and(with_api.clone())
        .and(warp::header::headers_cloned())
        .then(|install_id: String, api: Arc<Api>, headers| async move {
            respond(delete_installation(&api, headers, install_id).await)
        });
    let export = warp::path!("api" / "usage" / "export")
        .and(warp::post())
        .and(with_api.clone())
        .and(warp::header::headers_cloned())
        .and(warp::body::content_length_limit(64 * 1024))
        .and(warp::body::bytes())
        .then(|api: Arc<Api>, headers, body| async move {
            respond(post_export(&api, headers, body).await)
        });
    let session_get = warp::path!("dashboard" / "session")
        .and(warp::get())
        .and(with_api.clone())
        .and(warp::header::headers_cloned())
        .then(|api: Arc<Api>, headers| async move { respond(get_session(&api, headers).await) });
    let session_post = warp::path!("dashboard" / "session")
        .and(warp::post())
        .and(with_api.clone())
        .and(warp::header::headers_cloned())
        .and(warp::body::content_length_limit(16 * 1024))
        .and(warp::body::bytes())
        .then(|api: Arc<Api>, headers, body| async move {
            respond(post_session(&api, headers, body).await)
        });
    let session_delete = warp::path!("dashboard" / "session")
        .and(warp::delete())
        .and(with_api)
        .and(warp::header::headers_cloned())
        .then(|api: Arc<Api>, headers| async move { respond(delete_session(&api, headers).await) });
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
                get_dashboard(tail.as_str()).ok_or_else(warp::reject::not_found)
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

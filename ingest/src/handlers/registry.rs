//! Registering installations, rotating secrets, and what only the provider
//! sets: plans and account limits.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use usage_schemas::Account;
use usage_service_kit::auth::Permission;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::Reply;

use super::{header, now_ms, Gateway};
use crate::error::IngestError;
use crate::openapi::{AccountAnswer, InstallationAnswer};
use crate::registry::commands::{
    self, AccountRequest, Asking, CommandError, Decision, InstallationView, RegisterRequest,
    RotateRequest,
};
use crate::signature;
use crate::sink::RecordSink;

/// `PUT /api/usage/installations/{install_id}/plan`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    pub plan: String,
}

/// What the API shows of an account.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AccountView {
    account_id: String,
    plan: String,
    /// The limit in force (the account's own, or the gateway's default).
    max_installations: usize,
    installations: usize,
    updated_at: Option<String>,
    updated_by: Option<String>,
}

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl<S: RecordSink> Gateway<S> {
    fn installation_answer(record: &usage_schemas::Installation, status: StatusCode) -> Response {
        let body = InstallationAnswer {
            success: true,
            installation: InstallationView::from(record),
        };
        warp::reply::with_status(warp::reply::json(&body), status).into_response()
    }

    fn check_plan(&self, plan: &str) -> Result<(), IngestError> {
        if self.policy.knows(plan) {
            Ok(())
        } else {
            Err(
                CommandError::Invalid(format!("plan must be one of {}", self.policy.plan_names()))
                    .into(),
            )
        }
    }

    /// `POST /api/usage/installations`: idempotent registration.
    pub async fn register(&self, headers: HeaderMap, body: Bytes) -> Result<Response, IngestError> {
        let claims = self.authorize(
            &headers,
            Permission::ManageInstallations,
            "manage installations",
        )?;
        let req: RegisterRequest = serde_json::from_slice(&body)
            .map_err(|e| IngestError::Malformed(format!("invalid registration: {e}")))?;
        Self::may_manage(&claims, &req.account_id)?;
        self.require_registry()?;
        let _write = self.writes.lock(&req.account_id).await;
        let existing = self.registry.get(&req.install_id);
        if existing.is_none() {
            let limit = self.installation_limit(&req.account_id);
            if self.registry.count_of(&req.account_id) >= limit {
                return Err(CommandError::LimitReached {
                    account: req.account_id.clone(),
                    limit,
                }
                .into());
            }
        }
        let account_plan = self.account_plan(&req.account_id);
        let asking = Asking {
            actor: claims.actor(),
            may_set_plans: claims.may(Permission::SetPlans),
            account_plan: &account_plan,
            policy: &self.policy,
        };
        let decision = commands::register(
            existing.as_deref(),
            &req,
            &asking,
            self.registry.sealer(),
            now_ms(),
        )?;
        Ok(match decision {
            Decision::Unchanged(record) => Self::installation_answer(&record, StatusCode::OK),
            Decision::Write { record, created } => {
                self.write_installation(&record).await?;
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Self::installation_answer(&record, status)
            }
        })
    }

    /// `POST /api/usage/installations/{install_id}/rotate-secret`: with
    /// proof of the current secret (the request signed with it,
    /// `X-Usage-Signature`), or by a provider admin. A leaked account token
    /// alone cannot take over an installation.
    pub async fn rotate_secret(
        &self,
        install_id: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, IngestError> {
        let claims = self.authorize(
            &headers,
            Permission::ManageInstallations,
            "manage installations",
        )?;
        let req: RotateRequest = serde_json::from_slice(&body)
            .map_err(|e| IngestError::Malformed(format!("invalid rotation: {e}")))?;
        self.require_registry()?;
        let entry = self
            .registry
            .get(&install_id)
            .ok_or_else(|| CommandError::Unknown(install_id.clone()))?;
        Self::may_manage(&claims, &entry.record.account_id)?;
        let now = now_ms();
        if !claims.is_admin() {
            let proof =
                header(&headers, signature::V2_HEADER).ok_or(IngestError::RotationProofRequired)?;
            signature::verify_v2(
                proof,
                &body,
                &[entry.current_secret()],
                now / 1000,
                self.signature_window_secs,
            )?;
        }
        let _write = self.writes.lock(&entry.record.account_id).await;
        let entry = self
            .registry
            .get(&install_id)
            .ok_or_else(|| CommandError::Unknown(install_id.clone()))?;
        let record = commands::rotate(&entry, &req, self.registry.sealer(), now)?;
        self.write_installation(&record).await?;
        Ok(Self::installation_answer(&record, StatusCode::OK))
    }

    /// `PUT /api/usage/installations/{install_id}/plan` (`plans:write`).
    pub async fn set_plan(
        &self,
        install_id: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, IngestError> {
        let claims = self.authorize(&headers, Permission::SetPlans, "set plans")?;
        let req: PlanRequest = serde_json::from_slice(&body)
            .map_err(|e| IngestError::Malformed(format!("invalid plan change: {e}")))?;
        self.check_plan(&req.plan)?;
        self.require_registry()?;
        let account = self
            .registry
            .get(&install_id)
            .ok_or_else(|| CommandError::Unknown(install_id.clone()))?
            .record
            .account_id
            .clone();
        let _write = self.writes.lock(&account).await;
        let entry = self
            .registry
            .get(&install_id)
            .ok_or_else(|| CommandError::Unknown(install_id.clone()))?;
        match commands::set_plan(&entry, &req.plan, &claims.actor(), now_ms()) {
            None => Ok(Self::installation_answer(&entry.record, StatusCode::OK)),
            Some(record) => {
                self.write_installation(&record).await?;
                Ok(Self::installation_answer(&record, StatusCode::OK))
            }
        }
    }

    fn account_view(&self, account_id: &str) -> AccountView {
        let account = self.accounts.get(account_id);
        AccountView {
            account_id: account_id.to_string(),
            plan: self.account_plan(account_id),
            max_installations: self.installation_limit(account_id),
            installations: self.registry.count_of(account_id),
            updated_at: account.as_ref().map(|a| iso(a.updated_at)),
            updated_by: account.map(|a| a.updated_by.clone()),
        }
    }

    /// `GET /api/usage/accounts/{account_id}`: its plan, limit and
    /// installations (the provider, or the account itself).
    pub async fn get_account(
        &self,
        account_id: String,
        headers: HeaderMap,
    ) -> Result<Response, IngestError> {
        let claims = self.claims(&headers)?;
        let allowed = claims.may(Permission::SetPlans)
            || (claims.may(Permission::ManageInstallations)
                && Self::speaks_for(&claims, &account_id));
        if !allowed {
            return Err(IngestError::Forbidden("read this account"));
        }
        let body = AccountAnswer {
            success: true,
            account: self.account_view(&account_id),
            installations_changed: None,
        };
        Ok(warp::reply::json(&body).into_response())
    }

    /// `PUT /api/usage/accounts/{account_id}` (`plans:write`): the account's
    /// plan (and, unless `apply_to_installations` is false, every one of its
    /// installations'), and its limit on installations.
    pub async fn put_account(
        &self,
        account_id: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, IngestError> {
        let claims = self.authorize(&headers, Permission::SetPlans, "set plans")?;
        let req: AccountRequest = serde_json::from_slice(&body)
            .map_err(|e| IngestError::Malformed(format!("invalid account: {e}")))?;
        if let Some(plan) = &req.plan {
            self.check_plan(plan)?;
        }
        self.require_registry()?;
        let actor = claims.actor();
        let now = now_ms();
        let _write = self.writes.lock(&account_id).await;
        let existing = self.accounts.get(&account_id);
        if let Some(record) = commands::account(
            &account_id,
            existing.as_deref(),
            &req,
            &self.trust.default_plan,
            &actor,
            now,
        )? {
            self.write_account(&record).await?;
        }
        let mut changed = 0;
        if let (Some(plan), true) = (&req.plan, req.apply_to_installations) {
            for entry in self.registry.of_account(&account_id) {
                if let Some(record) = commands::set_plan(&entry, plan, &actor, now) {
                    self.write_installation(&record).await?;
                    changed += 1;
                }
            }
        }
        let body = AccountAnswer {
            success: true,
            account: self.account_view(&account_id),
            installations_changed: Some(changed),
        };
        Ok(warp::reply::json(&body).into_response())
    }

    async fn write_account(&self, record: &Account) -> Result<(), IngestError> {
        self.write_record(&self.accounts_topic, &record.account_id, record)
            .await?;
        self.accounts.apply_record(record.clone());
        tracing::info!(account_id = %record.account_id, plan = %record.plan, by = %record.updated_by, "account written");
        Ok(())
    }
}

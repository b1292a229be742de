//! The gateway's request handlers: plain async functions from a parsed
//! request to a response or an `IngestError`.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
use usage_schemas::wire::AvroRecord;
use usage_schemas::{Installation, UsageEvent};
use usage_service_kit::auth::{Claims, JwtVerifier};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::Reply;

use crate::batch::{self, Limits};
use crate::error::IngestError;
use crate::metrics::IngestMetrics;
use crate::registry::commands::{self, Decision, InstallationView, RegisterRequest, RotateRequest};
use crate::registry::Registry;
use crate::signature::{self, Scheme, SignatureError};
use crate::sink::{Record, RecordSink};

/// Everything the handlers share.
pub struct Gateway<S> {
    pub registry: Arc<Registry>,
    pub governance: Arc<crate::governance::GovernanceView>,
    pub sink: S,
    pub jwt: JwtVerifier,
    pub limits: Limits,
    pub signature_window_secs: i64,
    pub instance: String,
    pub events_topic: String,
    pub installations_topic: String,
    pub metrics: IngestMetrics,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl<S: RecordSink> Gateway<S> {
    fn claims(&self, headers: &HeaderMap) -> Result<Claims, IngestError> {
        Ok(self
            .jwt
            .verify_header(header(headers, "authorization"), now_ms() / 1000)?)
    }

    /// `POST /api/usage/event` and `POST /usage/event`.
    pub async fn post_events(
        &self,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, IngestError> {
        let now = now_ms();
        let claims = self.claims(&headers)?;
        let batch = batch::parse(&body)?;
        if !self.registry.is_caught_up() {
            return Err(IngestError::RegistryLoading);
        }
        let entry = self
            .registry
            .get(&batch.install_id)
            .ok_or(IngestError::UnknownInstallation)?;
        let account_ok = batch.account_id == entry.record.account_id
            && (claims.is_admin()
                || claims.account_id.as_deref() == Some(batch.account_id.as_str()));
        if !account_ok {
            return Err(IngestError::AccountMismatch);
        }

        let secrets = entry.secrets(now);
        let scheme = if let Some(v2) = header(&headers, signature::V2_HEADER) {
            signature::verify_v2(v2, &body, &secrets, now / 1000, self.signature_window_secs)?;
            Scheme::BodySigV2
        } else if let Some(legacy) = header(&headers, signature::LEGACY_HEADER) {
            if entry.v2_only() {
                return Err(SignatureError::V2Required.into());
            }
            signature::verify_legacy(
                legacy,
                &batch.install_id,
                &secrets,
                now / 1000,
                self.signature_window_secs,
            )?;
            Scheme::InstallSigV1
        } else {
            return Err(SignatureError::Missing.into());
        };

        let validated = batch::validate(&batch, &self.limits, now)?;
        for refusal in &validated.refused {
            self.metrics
                .events_refused
                .with_label_values(&[refusal.error])
                .inc();
        }
        if validated.accepted.is_empty() {
            return Err(IngestError::Validation {
                refused: validated.refused,
            });
        }
        let created: Vec<i64> = validated.accepted.iter().map(|e| e.created_at).collect();
        match self.governance.check(&batch.install_id, &created, now) {
            Ok(()) => {}
            Err(crate::governance::Refusal::RateLimited {
                retry_after_secs,
                reason,
            }) => {
                return Err(IngestError::RateLimited {
                    retry_after_secs,
                    reason,
                })
            }
            Err(crate::governance::Refusal::PlanLimitReached {
                retry_after_secs,
                used,
                cap,
            }) => {
                return Err(IngestError::PlanLimitReached {
                    retry_after_secs,
                    used,
                    cap,
                })
            }
        }

        let mut records = Vec::with_capacity(validated.accepted.len());
        let mut event_ids = Vec::with_capacity(validated.accepted.len());
        for e in validated.accepted {
            let event = UsageEvent {
                event_id: e.event_id,
                install_id: batch.install_id.clone(),
                account_id: batch.account_id.clone(),
                wp_site_id: e.wp_site_id,
                wp_user_id_hash: e.wp_user_id_hash,
                source: e.source.to_string(),
                model: e.model,
                prompt_tokens: e.prompt_tokens,
                completion_tokens: e.completion_tokens,
                total_tokens: e.total_tokens,
                context_json: e.context_json,
                created_at: e.created_at,
                processed_at: e.processed_at,
                batch_sent_at: validated.batch_sent_at,
                received_at: now,
                signature_scheme: scheme.as_str().to_string(),
                gateway_instance: self.instance.clone(),
            };
            let value = event
                .to_wire()
                .map_err(|e| IngestError::Malformed(format!("event cannot be encoded: {e}")))?;
            records.push(Record {
                key: batch.install_id.clone(),
                value: Some(value),
            });
            event_ids.push(event.event_id);
        }

        let timer = self.metrics.kafka_write_seconds.start_timer();
        self.sink.send_all(&self.events_topic, records).await?;
        timer.observe_duration();
        self.metrics.events_accepted.inc_by(event_ids.len() as u64);

        let received = event_ids.len();
        let message = if validated.refused.is_empty() {
            "Events recorded successfully".to_string()
        } else {
            format!(
                "{received} events recorded, {} rejected",
                validated.refused.len()
            )
        };
        let mut body = json!({
            "success": true,
            "received": received,
            "event_ids": event_ids,
            "message": message,
        });
        if !validated.refused.is_empty() {
            body["rejected"] = json!(validated.refused);
        }
        Ok(warp::reply::json(&body).into_response())
    }

    /// `GET /api/usage/governance?install_id=...`: usage against the cap,
    /// what is left in the windows, flags, and when each resets.
    pub async fn governance_report(
        &self,
        headers: HeaderMap,
        query: std::collections::HashMap<String, String>,
    ) -> Result<Response, IngestError> {
        let claims = self.claims(&headers)?;
        let install_id = query
            .get("install_id")
            .ok_or_else(|| IngestError::Malformed("install_id is required".into()))?;
        let entry = self
            .registry
            .get(install_id)
            .ok_or(IngestError::UnknownInstallation)?;
        Self::may_manage(&claims, &entry.record.account_id)?;
        let state = self.governance.get(install_id);
        let report = crate::governance::GovernanceReport::new(
            install_id,
            &entry.record.plan,
            None,
            state.as_deref(),
            now_ms(),
        );
        Ok(warp::reply::json(&json!({"success": true, "governance": report})).into_response())
    }

    /// Who may register or change `account_id`'s installations.
    fn may_manage(claims: &Claims, account_id: &str) -> Result<(), IngestError> {
        use usage_service_kit::auth::Role;
        let allowed = claims.is_admin()
            || (claims.role == Role::Account && claims.account_id.as_deref() == Some(account_id));
        if allowed {
            Ok(())
        } else {
            Err(IngestError::Forbidden(
                "manage this account's installations",
            ))
        }
    }

    async fn write_installation(&self, record: &Installation) -> Result<(), IngestError> {
        let value = record
            .to_wire()
            .map_err(|e| IngestError::Malformed(format!("record cannot be encoded: {e}")))?;
        self.sink
            .send_all(
                &self.installations_topic,
                vec![Record {
                    key: record.install_id.clone(),
                    value: Some(value),
                }],
            )
            .await?;
        // Kafka has it: apply now so this gateway reads its own write at once.
        self.registry
            .apply(record.clone())
            .map_err(|e| IngestError::Startup(e.to_string()))?;
        tracing::info!(install_id = %record.install_id, revision = record.revision, "installation written");
        Ok(())
    }

    /// `POST /api/usage/installations`: idempotent registration.
    pub async fn register(&self, headers: HeaderMap, body: Bytes) -> Result<Response, IngestError> {
        let claims = self.claims(&headers)?;
        let req: RegisterRequest = serde_json::from_slice(&body)
            .map_err(|e| IngestError::Malformed(format!("invalid registration: {e}")))?;
        Self::may_manage(&claims, &req.account_id)?;
        if !self.registry.is_caught_up() {
            return Err(IngestError::RegistryLoading);
        }
        let existing = self.registry.get(&req.install_id);
        let (record, status) = match commands::register(
            existing.as_deref(),
            &req,
            self.registry.sealer(),
            now_ms(),
        )? {
            Decision::Unchanged(record) => (record, StatusCode::OK),
            Decision::Write { record, created } => {
                self.write_installation(&record).await?;
                (
                    record,
                    if created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    },
                )
            }
        };
        let body = json!({"success": true, "installation": InstallationView::from(&record)});
        Ok(warp::reply::with_status(warp::reply::json(&body), status).into_response())
    }

    /// `POST /api/usage/installations/{install_id}/rotate-secret`.
    pub async fn rotate_secret(
        &self,
        install_id: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, IngestError> {
        let claims = self.claims(&headers)?;
        let req: RotateRequest = serde_json::from_slice(&body)
            .map_err(|e| IngestError::Malformed(format!("invalid rotation: {e}")))?;
        if !self.registry.is_caught_up() {
            return Err(IngestError::RegistryLoading);
        }
        let entry = self
            .registry
            .get(&install_id)
            .ok_or_else(|| commands::CommandError::Unknown(install_id.clone()))?;
        Self::may_manage(&claims, &entry.record.account_id)?;
        let record = commands::rotate(&entry, &req, self.registry.sealer(), now_ms())?;
        self.write_installation(&record).await?;
        let body = json!({"success": true, "installation": InstallationView::from(&record)});
        Ok(warp::reply::json(&body).into_response())
    }
}

//! Sending usage, admission, and the governance report.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use usage_schemas::wire::AvroRecord;
use usage_schemas::{Installation, UsageEvent};
use usage_service_kit::auth::{Claims, Permission};
use usage_service_kit::periods;
use warp::http::HeaderMap;
use warp::reply::Response;
use warp::Reply;

use super::{header, now_ms, Gateway};
use crate::batch::{self, BatchIn};
use crate::error::IngestError;
use crate::governance::GovernanceReport;
use crate::openapi::{Accepted, AdmissionAnswer, GovernanceAnswer};
use crate::registry::commands::{self, Metadata};
use crate::registry::Entry;
use crate::signature::{self, Scheme, SignatureError};
use crate::sink::{Record, RecordSink};

/// The header a deployed plugin sends its secret in, for enrollment on
/// its first sync (ignored for a known installation).
pub const INSTALL_SECRET_HEADER: &str = "x-install-secret";

/// `POST /api/usage/admit`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct AdmitRequest {
    pub install_id: String,
    /// Generations about to be made (default 1).
    #[serde(default = "one")]
    pub generations: u64,
    /// Tokens they are expected to use (default 0: only the request count).
    #[serde(default)]
    pub tokens: u64,
}

fn one() -> u64 {
    1
}

/// What the plugin's headers say about its site.
fn metadata(headers: &HeaderMap) -> Metadata {
    Metadata {
        plugin_version: Metadata::version(header(headers, "x-plugin-version")),
        wordpress_version: Metadata::version(header(headers, "x-wp-version")),
        php_version: Metadata::version(header(headers, "x-php-version")),
        is_multisite: match header(headers, "x-is-multisite").map(str::trim) {
            Some("1" | "true") => Some(true),
            Some("0" | "false") => Some(false),
            _ => None,
        },
    }
}

impl<S: RecordSink> Gateway<S> {
    /// Checks the request's installation signature against `secrets`: v2
    /// (over the body) when sent, else the legacy one unless the
    /// installation accepts v2 only.
    fn verify_signature(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        install_id: &str,
        secrets: &[&[u8]],
        v2_only: bool,
        now: i64,
    ) -> Result<Scheme, IngestError> {
        if let Some(v2) = header(headers, signature::V2_HEADER) {
            signature::verify_v2(v2, body, secrets, now / 1000, self.signature_window_secs)?;
            Ok(Scheme::BodySigV2)
        } else if let Some(legacy) = header(headers, signature::LEGACY_HEADER) {
            if v2_only {
                return Err(SignatureError::V2Required.into());
            }
            signature::verify_legacy(
                legacy,
                install_id,
                secrets,
                now / 1000,
                self.signature_window_secs,
            )?;
            Ok(Scheme::InstallSigV1)
        } else {
            Err(SignatureError::Missing.into())
        }
    }

    /// Writes a record to `topic` under `key`, acknowledged by Kafka.
    pub(super) async fn write_record<R: AvroRecord>(
        &self,
        topic: &str,
        key: &str,
        record: &R,
    ) -> Result<(), IngestError> {
        let value = record
            .to_wire()
            .map_err(|e| IngestError::Startup(format!("record cannot be encoded: {e}")))?;
        let records = vec![Record {
            key: key.to_string(),
            value: Some(value),
        }];
        Ok(self.sink.send_all(topic, records).await?)
    }

    /// Writes a registry record to Kafka and applies it here at once (this
    /// gateway reads its own write; the others within a second).
    pub(super) async fn write_installation(
        &self,
        record: &Installation,
    ) -> Result<(), IngestError> {
        self.write_record(&self.installations_topic, &record.install_id, record)
            .await?;
        self.registry
            .apply(record.clone())
            .map_err(|e| IngestError::Startup(e.to_string()))?;
        tracing::info!(install_id = %record.install_id, revision = record.revision, "installation written");
        Ok(())
    }

    /// An unknown installation's first signed sync: enrolls it with the
    /// secret it brings once that secret verifies the request's signature,
    /// within the account's limit and with the account's plan. A sync that
    /// finds it enrolled meanwhile (a retry racing the first) is checked
    /// against the registered secret instead, never the one it brings.
    async fn enroll(
        &self,
        claims: &Claims,
        batch: &BatchIn<'_>,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<(Arc<Entry>, Scheme), IngestError> {
        let secret = header(headers, INSTALL_SECRET_HEADER)
            .filter(|_| self.trust.enroll_on_first_sync)
            .ok_or(IngestError::UnknownInstallation)?;
        if !Self::speaks_for(claims, &batch.account_id) {
            return Err(IngestError::AccountMismatch);
        }
        let _write = self.writes.lock(&batch.account_id).await;
        if let Some(entry) = self.registry.get(&batch.install_id) {
            let scheme = self.verify_signature(
                headers,
                body,
                &batch.install_id,
                &entry.secrets(now),
                entry.v2_only(),
                now,
            )?;
            return Ok((entry, scheme));
        }
        let scheme = self.verify_signature(
            headers,
            body,
            &batch.install_id,
            &[secret.as_bytes()],
            false,
            now,
        )?;
        // Nothing is enrolled for a batch that would store nothing.
        let validated = batch::validate(batch, &self.limits, now)?;
        if validated.accepted.is_empty() {
            return Err(IngestError::Validation {
                refused: validated.refused,
            });
        }
        let limit = self.installation_limit(&batch.account_id);
        if self.registry.count_of(&batch.account_id) >= limit {
            return Err(commands::CommandError::LimitReached {
                account: batch.account_id.clone(),
                limit,
            }
            .into());
        }
        let record = commands::enroll(
            &batch.install_id,
            &batch.account_id,
            secret,
            &self.account_plan(&batch.account_id),
            &metadata(headers),
            self.registry.sealer(),
            now,
        )?;
        self.write_installation(&record).await?;
        self.metrics.enrolled.inc();
        let entry = self
            .registry
            .get(&batch.install_id)
            .ok_or(IngestError::UnknownInstallation)?;
        Ok((entry, scheme))
    }

    /// Writes the metadata the plugin's headers carry when it changed, at
    /// most once per `Trust::metadata_every_ms` per installation (a site
    /// cannot churn the registry by changing its headers on every sync).
    /// Best effort: the batch is stored already, a failure is only logged.
    async fn refresh_metadata(&self, entry: &Entry, headers: &HeaderMap, now: i64) {
        let meta = metadata(headers);
        if meta == Metadata::default()
            || now - entry.record.updated_at < self.trust.metadata_every_ms
            || commands::update_metadata(entry, &meta, now).is_none()
        {
            return;
        }
        let _write = self.writes.lock(&entry.record.account_id).await;
        let Some(current) = self.registry.get(&entry.record.install_id) else {
            return;
        };
        if let Some(record) = commands::update_metadata(&current, &meta, now) {
            if let Err(err) = self.write_installation(&record).await {
                tracing::warn!(install_id = %record.install_id, %err, "installation metadata not updated");
            }
        }
    }

    /// `POST /api/usage/event` and `POST /usage/event`.
    pub async fn post_events(
        &self,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, IngestError> {
        let now = now_ms();
        let claims = self.authorize(&headers, Permission::SendUsage, "send usage")?;
        let batch = batch::parse(&body)?;
        self.require_registry()?;
        let (entry, scheme) = match self.registry.get(&batch.install_id) {
            Some(entry) => {
                let account_ok = batch.account_id == entry.record.account_id
                    && Self::speaks_for(&claims, &batch.account_id);
                if !account_ok {
                    return Err(IngestError::AccountMismatch);
                }
                let scheme = self.verify_signature(
                    &headers,
                    &body,
                    &batch.install_id,
                    &entry.secrets(now),
                    entry.v2_only(),
                    now,
                )?;
                (entry, scheme)
            }
            None => self.enroll(&claims, &batch, &headers, &body, now).await?,
        };
        if entry.record.account_id != batch.account_id {
            return Err(IngestError::AccountMismatch);
        }
        self.flood
            .take(&batch.install_id, now)
            .map_err(|retry_after_secs| IngestError::TooManyRequests { retry_after_secs })?;

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

        // Each event's billing month, then what arrived over a limit.
        let months: Vec<(String, u64)> = validated
            .accepted
            .iter()
            .map(|e| {
                let month = periods::billing_month(e.created_at, now, self.trust.late_grace_ms);
                (
                    periods::month_key(month),
                    u64::try_from(e.total_tokens).unwrap_or(0),
                )
            })
            .collect();
        let state = self.governance.get(&batch.install_id);
        let plan = self.plan_policy(&entry.record.plan);
        let marks = self
            .ledger
            .accept(&batch.install_id, state.as_deref(), plan, &months, now);

        let mut records = Vec::with_capacity(validated.accepted.len());
        let mut event_ids = Vec::with_capacity(validated.accepted.len());
        for ((e, (month, _)), mark) in validated.accepted.into_iter().zip(months).zip(marks) {
            if let Some(reason) = mark {
                self.metrics
                    .events_over_limit
                    .with_label_values(&[reason])
                    .inc();
            }
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
                billing_month: Some(month),
                over_limit: mark.map(str::to_string),
            };
            let value = event
                .to_wire()
                .map_err(|e| IngestError::Startup(format!("event cannot be encoded: {e}")))?;
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
        self.refresh_metadata(&entry, &headers, now).await;

        let received = event_ids.len();
        let message = if validated.refused.is_empty() {
            "Events recorded successfully".to_string()
        } else {
            format!(
                "{received} events recorded, {} rejected",
                validated.refused.len()
            )
        };
        let body = Accepted {
            success: true,
            received: received as u64,
            event_ids,
            message,
            governance: self.report(&entry, state.as_deref(), now),
            rejected: (!validated.refused.is_empty()).then_some(validated.refused),
        };
        Ok(warp::reply::json(&body).into_response())
    }

    fn report(
        &self,
        entry: &Entry,
        state: Option<&usage_schemas::GovernanceState>,
        now: i64,
    ) -> GovernanceReport {
        let install_id = &entry.record.install_id;
        let (used, _) = self.ledger.pending(install_id, state, now);
        GovernanceReport::new(
            install_id,
            &entry.record.plan,
            &self.policy,
            state,
            used,
            now,
        )
    }

    /// `POST /api/usage/admit`: may these generations be made now?
    pub async fn admit(&self, headers: HeaderMap, body: Bytes) -> Result<Response, IngestError> {
        let started = std::time::Instant::now();
        let now = now_ms();
        let claims = self.claims(&headers)?;
        let req: AdmitRequest = serde_json::from_slice(&body)
            .map_err(|e| IngestError::Malformed(format!("invalid admission request: {e}")))?;
        if !(1..=10_000).contains(&req.generations) || req.tokens > 100_000_000 {
            return Err(IngestError::Malformed(
                "generations must be 1 to 10,000 and tokens at most 100,000,000".into(),
            ));
        }
        if !claims.may(Permission::Admit) && !claims.may(Permission::SendUsage) {
            return Err(IngestError::Forbidden("ask for admission"));
        }
        self.require_registry()?;
        self.require_governance()?;
        let entry = self
            .registry
            .get(&req.install_id)
            .ok_or(IngestError::UnknownInstallation)?;
        if !claims.may(Permission::Admit) {
            // The site itself: its token and its signature over the body,
            // like sending usage but v2 only (the legacy signature covers no
            // body, so a captured one could spend the site's admissions).
            if !Self::speaks_for(&claims, &entry.record.account_id) {
                return Err(IngestError::AccountMismatch);
            }
            let v2 = header(&headers, signature::V2_HEADER)
                .ok_or(IngestError::Signature(SignatureError::V2Required))?;
            signature::verify_v2(
                v2,
                &body,
                &entry.secrets(now),
                now / 1000,
                self.signature_window_secs,
            )?;
            self.flood
                .take(&req.install_id, now)
                .map_err(|retry_after_secs| IngestError::TooManyRequests { retry_after_secs })?;
        }
        let state = self.governance.get(&req.install_id);
        let decision = self.ledger.admit(
            &req.install_id,
            state.as_deref(),
            self.plan_policy(&entry.record.plan),
            req.generations,
            req.tokens,
            now,
        );
        self.metrics
            .admissions
            .with_label_values(&[decision.reason.unwrap_or("allowed")])
            .inc();
        let body = AdmissionAnswer {
            success: true,
            allowed: decision.allowed,
            reason: decision.reason,
            retry_after_seconds: decision.retry_after_secs,
            governance: self.report(&entry, state.as_deref(), now),
        };
        self.metrics
            .admission_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(warp::reply::json(&body).into_response())
    }

    /// `GET /api/usage/governance?install_id=...`: usage against the cap,
    /// what is left in the windows, flags, and when each resets.
    pub async fn governance_report(
        &self,
        headers: HeaderMap,
        query: std::collections::HashMap<String, String>,
    ) -> Result<Response, IngestError> {
        let claims = self.authorize(&headers, Permission::ReadUsage, "read usage")?;
        let install_id = query
            .get("install_id")
            .ok_or_else(|| IngestError::Malformed("install_id is required".into()))?;
        let entry = self
            .registry
            .get(install_id)
            .ok_or(IngestError::UnknownInstallation)?;
        if !Self::may_read(&claims, &entry.record) {
            return Err(IngestError::Forbidden("read this installation's usage"));
        }
        let state = self.governance.get(install_id);
        let report = self.report(&entry, state.as_deref(), now_ms());
        Ok(warp::reply::json(&GovernanceAnswer {
            success: true,
            governance: report,
        })
        .into_response())
    }
}

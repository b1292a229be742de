//! Who may read which installation's usage (the contract's "who may see what").
//!
//! - `provider_admin`: every installation;
//! - `account`: every installation of its account;
//! - `network_admin`: the sub-sites of its multisite network, listed in the
//!   token's `install_ids` by the account system that issues it;
//! - `site_admin`: the one installation in its `install_ids`;
//! - `user`: that one installation, and only rows with its own `user_hash`.
//!
//! Every role but the provider admin also needs the installation to belong
//! to the token's account (in the registry), so a token listing a foreign
//! installation still sees nothing. Reading needs the `usage:read`
//! permission, erasing `data:erase` (which the tokens sites hold lack).

use clickhouse::Client;
use usage_service_kit::auth::{Claims, Permission, Role};

use crate::error::QueryError;

/// What a request may read after the access check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `None`: every installation (provider admins only).
    pub install_id: Option<String>,
    /// Restricts rows to one user hash.
    pub user_hash: Option<String>,
}

async fn account_of(client: &Client, install_id: &str) -> Result<Option<String>, QueryError> {
    let accounts: Vec<String> = client
        .query("SELECT account_id FROM installation_metadata FINAL WHERE install_id = {id:String}")
        .param("id", install_id)
        .fetch_all()
        .await?;
    Ok(accounts.into_iter().next())
}

/// Erasure: a token with `data:erase` of the provider, or of the account
/// that owns the installation.
pub async fn may_erase(
    client: &Client,
    claims: &Claims,
    install_id: &str,
) -> Result<(), QueryError> {
    if !claims.may(Permission::EraseData) {
        return Err(QueryError::Forbidden(
            "erase data: it lacks the data:erase permission".into(),
        ));
    }
    if claims.role.is_provider() {
        return Ok(());
    }
    let owner = account_of(client, install_id).await?;
    if claims.role == Role::Account
        && owner.is_some()
        && owner.as_deref() == claims.account_id.as_deref()
    {
        return Ok(());
    }
    Err(QueryError::Forbidden(format!(
        "erase installation {install_id}"
    )))
}

pub async fn scope(
    client: &Client,
    claims: &Claims,
    install_id: Option<&str>,
) -> Result<Scope, QueryError> {
    if !claims.may(Permission::ReadUsage) {
        return Err(QueryError::Forbidden(
            "read usage: it lacks the usage:read permission".into(),
        ));
    }
    if claims.role.is_provider() {
        return Ok(Scope {
            install_id: install_id.map(str::to_string),
            user_hash: None,
        });
    }
    let install_id =
        install_id.ok_or_else(|| QueryError::BadRequest("install_id is required".into()))?;
    let denied = || QueryError::Forbidden(format!("read installation {install_id}"));
    let listed = claims.install_ids.as_deref().unwrap_or_default();
    let allowed = match claims.role {
        Role::ProviderAdmin | Role::Service | Role::Account => true,
        Role::NetworkAdmin => listed.iter().any(|i| i == install_id),
        // One installation: a token listing several is not a site token.
        Role::SiteAdmin | Role::User => listed.len() == 1 && listed[0] == install_id,
    };
    if !allowed || account_of(client, install_id).await?.as_deref() != claims.account_id.as_deref()
    {
        return Err(denied());
    }
    let user_hash =
        if claims.role == Role::User {
            Some(claims.user_hash.clone().ok_or_else(|| {
                QueryError::Forbidden("read usage without a user_hash claim".into())
            })?)
        } else {
            None
        };
    Ok(Scope {
        install_id: Some(install_id.to_string()),
        user_hash,
    })
}

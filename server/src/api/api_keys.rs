//! `/api/v1/api-keys`: business API key management (admin scope).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{AdminAccess, ApiJson};
use super::SharedState;
use crate::domain::api_keys::Scope;
use crate::error::{Problem, Result};
use crate::model::store::ApiKeyRecord;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    pub name: String,
    pub scopes: Vec<Scope>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

impl From<ApiKeyRecord> for ApiKey {
    fn from(k: ApiKeyRecord) -> Self {
        Self { id: k.id, name: k.name, scopes: k.scopes, created_at: k.created_at, revoked_at: k.revoked_at }
    }
}

/// A new key. `key` is shown once; store it in your secret manager.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub meta: ApiKey,
    pub key: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub items: Vec<ApiKey>,
}

#[utoipa::path(post, path = "/api/v1/api-keys", tag = "api-keys", request_body = CreateApiKey,
    responses((status = 201, body = CreatedApiKey), (status = 422, body = Problem)), security(("api_key" = ["admin"])))]
pub async fn create(
    _: AdminAccess,
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<CreateApiKey>,
) -> Result<(StatusCode, Json<CreatedApiKey>)> {
    let (record, key) = state.api_keys.create(&req.name, &req.scopes).await?;
    Ok((StatusCode::CREATED, Json(CreatedApiKey { meta: record.into(), key: key.expose().to_string() })))
}

#[utoipa::path(get, path = "/api/v1/api-keys", tag = "api-keys", responses((status = 200, body = ApiKeyList)),
    security(("api_key" = ["admin"])))]
pub async fn list(_: AdminAccess, State(state): State<SharedState>) -> Result<Json<ApiKeyList>> {
    Ok(Json(ApiKeyList { items: state.api_keys.list().await?.into_iter().map(ApiKey::from).collect() }))
}

#[utoipa::path(delete, path = "/api/v1/api-keys/{key_id}", tag = "api-keys", params(("key_id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)), security(("api_key" = ["admin"])))]
pub async fn revoke(_: AdminAccess, State(state): State<SharedState>, Path(id): Path<String>) -> Result<StatusCode> {
    state.api_keys.revoke(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

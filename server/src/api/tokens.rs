//! `/api/v1/tokens`: short-lived MQTT JWTs for internal and ops clients (never for devices).
//!
//! Tokens are HS256, always carry `exp`, and use EMQX 5's `acl` claim format, so the same token works
//! with EMQX's JWT authenticator and with iothub's HTTP authenticator (embedded broker, EMQX 4, RMQTT).

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{ApiJson, WriteAccess};
use super::SharedState;
use crate::domain::access::AclClaim;
use crate::error::{Problem, Result};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueToken {
    /// MQTT username the token is bound to; must not contain `/` (reserved for devices).
    pub username: String,
    /// Lifetime in seconds (default 600, max `auth.jwt_max_ttl_secs`).
    pub ttl_seconds: Option<u64>,
    /// Topic rules, first match wins; without rules the client may do nothing.
    pub acl: Option<Vec<AclClaim>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedToken {
    /// Use as the MQTT password with the same username.
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = IssueToken,
    responses((status = 200, body = IssuedToken), (status = 422, body = Problem)), security(("api_key" = ["write"])))]
pub async fn issue(
    _: WriteAccess,
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<IssueToken>,
) -> Result<Json<IssuedToken>> {
    let (token, expires_at) = state.access.issue_token(&req.username, req.ttl_seconds, req.acl)?;
    Ok(Json(IssuedToken { token, expires_at }))
}

//! `/api/v1/tokens`: short-lived MQTT JWTs for internal and ops clients (never for devices).
//!
//! Tokens are HS256, always carry `exp`, and use EMQX 5's `acl` claim format, so the same token works
//! with EMQX's JWT authenticator and with iothub's HTTP authenticator (embedded broker, EMQX 4, RMQTT).
//!
//! Minting needs the `admin` scope: a token may be granted raw downlink topics (`cmd/…`, `tags/…`) that bypass
//! the command log, its idempotency and its audit trail, which is more than `write` lets a caller do.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{AdminAccess, ApiJson};
use super::SharedState;
use crate::domain::access::AclClaim;
use crate::error::{Problem, Result};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueToken {
    /// MQTT username the token is bound to: 1-128 printable ASCII characters with a `.`, `:` or `@` and none of
    /// `/ + # $ % { }`, quotes or backslashes (so it is never a device identity).
    pub username: String,
    /// The client id the token connects with (default: the username): the username or `{username}/{suffix}`
    /// (suffix `[A-Za-z0-9_-]{1,64}`). It travels in the token's `clientid` claim, which iothub and EMQX's JWT
    /// authenticator (`verify_claims`) both check.
    pub client_id: Option<String>,
    /// Lifetime in seconds (default 600, max `auth.jwt_max_ttl_secs`).
    pub ttl_seconds: Option<u64>,
    /// Topic rules, first match wins; without rules the client may do nothing. Topics are plain MQTT filters:
    /// no `eq ` prefix, `${…}` or `%` placeholders, nor `$share/`/`$queue/` prefixes.
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
    responses((status = 200, body = IssuedToken), (status = 403, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["admin"])))]
pub async fn issue(
    _: AdminAccess,
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<IssueToken>,
) -> Result<Json<IssuedToken>> {
    let (token, expires_at) =
        state.access.issue_token(&req.username, req.client_id.as_deref(), req.ttl_seconds, req.acl)?;
    Ok(Json(IssuedToken { token, expires_at }))
}

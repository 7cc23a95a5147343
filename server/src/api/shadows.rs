//! `/api/v1/products/{p}/devices/{d}/shadow`: reading a device's shadow and changing its desired state under
//! an optimistic version check.

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{device_ref, ApiJson, ReadAccess, WriteAccess};
use super::SharedState;
use crate::domain::shadows::Shadow;
use crate::error::{Error, Problem, Result};

/// A shadow as the API returns it: the document plus its `delta`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ShadowView {
    #[serde(flatten)]
    pub shadow: Shadow,
    /// Desired keys whose value differs from the reported one.
    #[schema(value_type = Object)]
    pub delta: serde_json::Map<String, serde_json::Value>,
}

impl From<Shadow> for ShadowView {
    fn from(shadow: Shadow) -> Self {
        Self { delta: shadow.delta(), shadow }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateShadow {
    pub state: DesiredOnly,
    /// The version you read; a stale one is refused with 409 (optimistic lock). 0 for a device whose
    /// shadow was never written.
    pub version: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DesiredOnly {
    /// Keys to set (deep merge); `null` deletes a key.
    #[schema(value_type = Object)]
    pub desired: serde_json::Map<String, serde_json::Value>,
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}/devices/{device_id}/shadow", tag = "commands",
    params(("product_id" = String, Path), ("device_id" = String, Path)),
    responses((status = 200, body = ShadowView), (status = 404, body = Problem)),
    security(("api_key" = ["read"])))]
pub async fn get_shadow(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
) -> Result<Json<ShadowView>> {
    Ok(Json(state.shadows.get(&device_ref(p, d)?).await?.into()))
}

#[utoipa::path(put, path = "/api/v1/products/{product_id}/devices/{device_id}/shadow", tag = "commands",
    params(("product_id" = String, Path), ("device_id" = String, Path)), request_body = UpdateShadow,
    responses((status = 200, body = ShadowView, description = "Stored as the next version; `$update_shadow` pushed to the device"),
        (status = 404, body = Problem), (status = 409, body = Problem, description = "`version` is not the current one"),
        (status = 422, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn update_shadow(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
    ApiJson(body): ApiJson<UpdateShadow>,
) -> Result<Json<ShadowView>> {
    if body.version < 0 {
        return Err(Error::validation("version", "must not be negative"));
    }
    Ok(Json(state.shadows.update_desired(&device_ref(p, d)?, body.version, &body.state.desired).await?.into()))
}

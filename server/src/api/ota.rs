//! OTA upgrades: pushing a package to one device or a tag (`/ota`), and following rollouts per device
//! (`/ota-rollouts/{id}`, a device's `/ota`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{device_ref, product_id, ApiJson, ApiQuery, ReadAccess, WriteAccess};
use super::page::{target_page, TargetPageQuery, FIRST_PAGE};
use super::SharedState;
use crate::domain::ota::{OtaPackage, OtaTarget};
use crate::error::{Problem, Result};
use crate::model::ota::{RolloutRecord, TargetRecord};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushOta {
    /// Package URL (http or https).
    pub url: String,
    /// The version the device will run; the target succeeds when its status reports `{type}_version` equal
    /// to it.
    pub version: String,
    /// Package size in bytes.
    pub size: i64,
    /// MD5 of the package, 32 hex digits.
    pub md5: String,
    /// What is upgraded (id rules), e.g. `firmware`.
    #[serde(rename = "type")]
    pub kind: String,
    /// How long an offline device may still get it (default 7 days).
    pub ttl_secs: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OtaTargetView {
    pub device_id: String,
    /// `pending`, `in_progress`, `installed` (100 %), `failed` or `succeeded` (the device reports the version).
    pub state: String,
    /// Last reported progress: 0-100, or -1 download, -2 checksum, -3 install, -4 other failure.
    pub progress: Option<i32>,
    pub error: Option<String>,
    pub progress_at: Option<i64>,
    pub succeeded_at: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Rollout {
    pub rollout_id: String,
    pub product_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub version: String,
    pub url: String,
    pub size: i64,
    pub md5: String,
    pub created_at: i64,
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// One page of the targets, by device id (`limit`, default 100).
    pub targets: Vec<OtaTargetView>,
    /// Pass as `cursor` to `GET …/ota-rollouts/{rollout_id}` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

fn target_view(t: TargetRecord) -> OtaTargetView {
    OtaTargetView {
        device_id: t.device.device.to_string(),
        state: t.state,
        progress: t.progress,
        error: t.error,
        progress_at: t.progress_at,
        succeeded_at: t.succeeded_at,
    }
}

fn rollout_view((record, targets): (RolloutRecord, Vec<TargetRecord>), page: &TargetPageQuery) -> Result<Rollout> {
    let r = record.rollout;
    let count = |state: &str| targets.iter().filter(|t| t.state == state).count();
    let (succeeded, failed, total) = (count("succeeded"), count("failed"), targets.len());
    let (targets, next_cursor) = target_page(targets, page, |t| t.device.device.as_str())?;
    Ok(Rollout {
        succeeded,
        failed,
        total,
        rollout_id: r.id,
        product_id: r.product.to_string(),
        tag: r.tag,
        kind: r.kind,
        version: r.version,
        url: r.url,
        size: r.size,
        md5: r.md5,
        created_at: record.created_at,
        targets: targets.into_iter().map(target_view).collect(),
        next_cursor,
    })
}

fn package(body: PushOta) -> (OtaPackage, Option<i64>) {
    let ttl = body.ttl_secs.map(|s| s.saturating_mul(1000));
    (OtaPackage { kind: body.kind, version: body.version, url: body.url, size: body.size, md5: body.md5 }, ttl)
}

#[utoipa::path(post, path = "/api/v1/products/{product_id}/devices/{device_id}/ota", tag = "ota",
    params(("product_id" = String, Path), ("device_id" = String, Path)), request_body = PushOta,
    responses((status = 201, body = Rollout, description = "`$ota_upgrade` logged (sent now if online, else on connect)"),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn push_ota_device(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
    ApiJson(body): ApiJson<PushOta>,
) -> Result<(StatusCode, Json<Rollout>)> {
    let device = device_ref(p, d)?;
    let (package, ttl) = package(body);
    let rollout = state.ota.push(&device.product, OtaTarget::Device(device.device.clone()), package, ttl).await?;
    Ok((StatusCode::CREATED, Json(rollout_view(rollout, &FIRST_PAGE)?)))
}

#[utoipa::path(post, path = "/api/v1/products/{product_id}/tags/{tag}/ota", tag = "ota",
    params(("product_id" = String, Path), ("tag" = String, Path)), request_body = PushOta,
    responses((status = 201, body = Rollout, description = "One rollout, one `$ota_upgrade` per active device of the tag"),
        (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn push_ota_tag(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path((p, tag)): Path<(String, String)>,
    ApiJson(body): ApiJson<PushOta>,
) -> Result<(StatusCode, Json<Rollout>)> {
    let product = product_id(p)?;
    let (package, ttl) = package(body);
    let rollout = state.ota.push(&product, OtaTarget::Tag(tag), package, ttl).await?;
    Ok((StatusCode::CREATED, Json(rollout_view(rollout, &FIRST_PAGE)?)))
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}/ota-rollouts/{rollout_id}", tag = "ota",
    params(("product_id" = String, Path), ("rollout_id" = String, Path), TargetPageQuery),
    responses((status = 200, body = Rollout), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["read"])))]
pub async fn get_rollout(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path((p, id)): Path<(String, String)>,
    ApiQuery(page): ApiQuery<TargetPageQuery>,
) -> Result<Json<Rollout>> {
    Ok(Json(rollout_view(state.ota.rollout(&product_id(p)?, &id).await?, &page)?))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceOta {
    /// The device's upgrades, newest first (at most 20).
    pub items: Vec<Rollout>,
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}/devices/{device_id}/ota", tag = "ota",
    params(("product_id" = String, Path), ("device_id" = String, Path)),
    responses((status = 200, body = DeviceOta), (status = 404, body = Problem)),
    security(("api_key" = ["read"])))]
pub async fn device_ota(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
) -> Result<Json<DeviceOta>> {
    let items = state.ota.device(&device_ref(p, d)?).await?;
    let items = items.into_iter().map(|(r, t)| rollout_view((r, vec![t]), &FIRST_PAGE)).collect::<Result<_>>()?;
    Ok(Json(DeviceOta { items }))
}

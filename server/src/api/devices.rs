//! `/api/v1/products/{product_id}/devices`: registration (single and bulk), listing, lifecycle, secrets.
//!
//! Registration and rotation responses are the only places a device secret ever appears.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{device_ref, product_id, ApiJson, ApiQuery, OptionalJson, ReadAccess, WriteAccess};
use super::page::{next_page, page_limit};
use super::SharedState;
use crate::domain::kicks::KickOutcome;
use crate::domain::registry::{IssuedDevice, MAX_BULK};
use crate::error::{Error, Problem, Result};
use crate::ids::DeviceId;
use crate::model::store::{ConnectionRecord, CredentialRecord, DeviceFilter, DeviceRecord, DeviceStatus};

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterDevice {
    /// `[A-Za-z0-9_-]{1,64}`; generated (32 hex chars) when absent.
    pub device_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBulk {
    /// Explicit devices to create. Give either `devices` or `count`.
    pub devices: Option<Vec<RegisterDevice>>,
    /// Number of devices with generated ids.
    pub count: Option<usize>,
}

/// The device triple. `secret` is shown here once and can never be read again.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceCredentials {
    pub product_id: String,
    pub device_id: String,
    pub secret: String,
    /// MQTT username: `{product_id}/{device_id}`.
    pub broker_username: String,
}

impl From<IssuedDevice> for DeviceCredentials {
    fn from(d: IssuedDevice) -> Self {
        Self {
            broker_username: d.device.broker_username(),
            product_id: d.device.product.to_string(),
            device_id: d.device.device.to_string(),
            secret: d.secret.expose().to_string(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BulkRegistered {
    pub items: Vec<DeviceCredentials>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Credential {
    pub id: i64,
    pub created_at: i64,
    /// When the credential stops authenticating (set by a rotation); absent = until rotated.
    pub expires_at: Option<i64>,
}

impl From<CredentialRecord> for Credential {
    fn from(c: CredentialRecord) -> Self {
        Self { id: c.id, created_at: c.created_at, expires_at: c.expires_at }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Device {
    pub product_id: String,
    pub device_id: String,
    pub broker_username: String,
    pub status: DeviceStatus,
    pub created_at: i64,
    pub updated_at: i64,
    /// Whether any broker session of the device is open (ordered by the broker's own timestamps).
    pub online: bool,
    /// Broker time of the latest connect or disconnect.
    pub last_seen_at: Option<i64>,
    /// Recent broker sessions, newest first (single-device reads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<Vec<Connection>>,
    /// Credential metadata only; hashes and secrets are never returned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Vec<Credential>>,
    /// The device's tags (single-device reads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags_version: Option<i64>,
}

/// One broker session of a device.
#[derive(Debug, Serialize, ToSchema)]
pub struct Connection {
    /// Open when `disconnected_at` is absent.
    pub connected: bool,
    #[serde(flatten)]
    pub session: ConnectionRecord,
}

impl From<ConnectionRecord> for Connection {
    fn from(session: ConnectionRecord) -> Self {
        Self { connected: session.disconnected_at.is_none(), session }
    }
}

/// Newest first. A session counts as connected only while it is the newest of its client id: an older one
/// whose disconnect never arrived (a lost webhook) was taken over, whatever its row says.
fn session_list(records: Vec<ConnectionRecord>) -> Vec<Connection> {
    let mut seen_clients = std::collections::HashSet::new();
    records
        .into_iter()
        .map(|record| {
            let newest_of_client = seen_clients.insert(record.client_id.clone());
            let mut view = Connection::from(record);
            view.connected &= newest_of_client;
            view
        })
        .collect()
}

impl Device {
    fn from_record(d: DeviceRecord, credentials: Option<Vec<CredentialRecord>>) -> Self {
        Self {
            broker_username: format!("{}/{}", d.product, d.device),
            product_id: d.product.to_string(),
            device_id: d.device.to_string(),
            status: d.status,
            created_at: d.created_at,
            updated_at: d.updated_at,
            online: d.online,
            last_seen_at: d.last_seen_at,
            connections: None,
            credentials: credentials.map(|c| c.into_iter().map(Credential::from).collect()),
            tags: None,
            tags_version: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DevicePage {
    pub items: Vec<Device>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusChanged {
    pub device: Device,
    /// Live connections the broker disconnected because of this change.
    pub connections_kicked: usize,
    /// `true` when the broker did not confirm the kick: it is stored and retried by iothub until it does
    /// (meanwhile nothing the device sends is stored or announced).
    pub kick_pending: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    pub connections_kicked: usize,
    /// As for a suspension: the kick is retried until the broker confirms it.
    pub kick_pending: bool,
}

fn kick_fields(outcome: KickOutcome) -> (usize, bool) {
    match outcome {
        KickOutcome::Kicked(n) => (n, false),
        KickOutcome::Pending => (0, true),
    }
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateSecret {
    /// How long the previous secret keeps working, in seconds (default: `auth.rotation_overlap_secs`).
    /// `0` revokes it at once and disconnects the device's live connections (use after a leak).
    pub overlap_seconds: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedSecret {
    pub product_id: String,
    pub device_id: String,
    pub secret: String,
    /// Unix ms after which previous secrets stop working.
    pub previous_secrets_expire_at: i64,
    /// With `overlap_seconds = 0` every live connection is kicked (it may be using the old secret).
    pub connections_kicked: usize,
    /// `true` when the broker did not confirm that kick: iothub retries it until it does.
    pub kick_pending: bool,
    /// Set when not even the kick's intent could be stored: the rotation itself succeeded; suspend and resume
    /// to disconnect the device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kick_error: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `active` or `suspended`.
    pub status: Option<String>,
    /// `true`: only devices with an open broker session; `false`: only offline ones.
    pub online: Option<bool>,
    /// Only devices with this tag.
    pub tag: Option<String>,
    pub cursor: Option<String>,
    /// Page size, 1-1000 (default 100).
    pub limit: Option<u32>,
}

fn parse_device_id(raw: Option<String>, field: &str) -> Result<Option<DeviceId>> {
    raw.map(|r| DeviceId::parse(r).map_err(|e| Error::validation(field, e))).transpose()
}

#[utoipa::path(post, path = "/api/v1/products/{product_id}/devices", tag = "devices",
    params(("product_id" = String, Path)), request_body = Option<RegisterDevice>,
    responses((status = 201, body = DeviceCredentials), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn register(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path(product): Path<String>,
    OptionalJson(req): OptionalJson<RegisterDevice>,
) -> Result<(StatusCode, Json<DeviceCredentials>)> {
    let product = product_id(product)?;
    let id = parse_device_id(req.device_id, "device_id")?;
    let mut issued = state.registry.register(&product, vec![id]).await?;
    let one = issued.pop().ok_or_else(|| Error::Internal(anyhow::anyhow!("registration returned nothing")))?;
    Ok((StatusCode::CREATED, Json(one.into())))
}

#[utoipa::path(post, path = "/api/v1/products/{product_id}/devices/bulk", tag = "devices",
    params(("product_id" = String, Path)), request_body = RegisterBulk,
    responses((status = 201, body = BulkRegistered), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn register_bulk(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path(product): Path<String>,
    ApiJson(req): ApiJson<RegisterBulk>,
) -> Result<(StatusCode, Json<BulkRegistered>)> {
    let product = product_id(product)?;
    let ids = match (req.devices, req.count) {
        (Some(devices), None) => devices
            .into_iter()
            .enumerate()
            .map(|(i, d)| parse_device_id(d.device_id, &format!("devices[{i}].device_id")))
            .collect::<Result<Vec<_>>>()?,
        (None, Some(count)) if (1..=MAX_BULK).contains(&count) => vec![None; count],
        (None, Some(_)) => return Err(Error::validation("count", format!("must be between 1 and {MAX_BULK}"))),
        _ => return Err(Error::validation("devices", "give exactly one of `devices` or `count`")),
    };
    let issued = state.registry.register(&product, ids).await?;
    Ok((StatusCode::CREATED, Json(BulkRegistered { items: issued.into_iter().map(DeviceCredentials::from).collect() })))
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}/devices", tag = "devices",
    params(("product_id" = String, Path), ListQuery),
    responses((status = 200, body = DevicePage), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["read"])))]
pub async fn list(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path(product): Path<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<DevicePage>> {
    let product = product_id(product)?;
    let limit = page_limit(q.limit)?;
    let status = q
        .status
        .map(|s| DeviceStatus::parse(&s).ok_or_else(|| Error::validation("status", "must be `active` or `suspended`")))
        .transpose()?;
    let after = q
        .cursor
        .map(|c| DeviceId::parse(c).map_err(|_| Error::validation("cursor", "not a cursor from a previous page")))
        .transpose()?;
    let mut items = state
        .registry
        .list_devices(&product, &DeviceFilter { status, online: q.online, tag: q.tag, after, limit: limit + 1 })
        .await?;
    let next_cursor = next_page(&mut items, limit, |d| d.device.to_string());
    Ok(Json(DevicePage { items: items.into_iter().map(|d| Device::from_record(d, None)).collect(), next_cursor }))
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}/devices/{device_id}", tag = "devices",
    params(("product_id" = String, Path), ("device_id" = String, Path)),
    responses((status = 200, body = Device), (status = 404, body = Problem)), security(("api_key" = ["read"])))]
pub async fn get(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
) -> Result<Json<Device>> {
    let device = device_ref(p, d)?;
    let (record, credentials) = state.registry.get_device(&device).await?;
    let connections = state.history.connections(&device).await?;
    let mut view = Device::from_record(record, Some(credentials));
    view.connections = Some(session_list(connections));
    let tags = state.tags.get(&device).await?;
    (view.tags, view.tags_version) = (Some(tags.tags), Some(tags.version));
    Ok(Json(view))
}

#[utoipa::path(delete, path = "/api/v1/products/{product_id}/devices/{device_id}", tag = "devices",
    params(("product_id" = String, Path), ("device_id" = String, Path)),
    responses((status = 200, body = Deleted), (status = 404, body = Problem), (status = 503, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn delete(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
) -> Result<Json<Deleted>> {
    let (connections_kicked, kick_pending) = kick_fields(state.registry.delete_device(&device_ref(p, d)?).await?);
    Ok(Json(Deleted { connections_kicked, kick_pending }))
}

async fn set_status(state: SharedState, p: String, d: String, status: DeviceStatus) -> Result<Json<StatusChanged>> {
    let (record, kicked) = state.registry.set_status(&device_ref(p, d)?, status).await?;
    let (connections_kicked, kick_pending) = kick_fields(kicked);
    Ok(Json(StatusChanged { device: Device::from_record(record, None), connections_kicked, kick_pending }))
}

#[utoipa::path(post, path = "/api/v1/products/{product_id}/devices/{device_id}/suspend", tag = "devices",
    params(("product_id" = String, Path), ("device_id" = String, Path)),
    responses((status = 200, body = StatusChanged), (status = 404, body = Problem), (status = 503, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn suspend(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
) -> Result<Json<StatusChanged>> {
    set_status(state, p, d, DeviceStatus::Suspended).await
}

#[utoipa::path(post, path = "/api/v1/products/{product_id}/devices/{device_id}/resume", tag = "devices",
    params(("product_id" = String, Path), ("device_id" = String, Path)),
    responses((status = 200, body = StatusChanged), (status = 404, body = Problem)), security(("api_key" = ["write"])))]
pub async fn resume(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
) -> Result<Json<StatusChanged>> {
    set_status(state, p, d, DeviceStatus::Active).await
}

#[utoipa::path(post, path = "/api/v1/products/{product_id}/devices/{device_id}/rotate-secret", tag = "devices",
    params(("product_id" = String, Path), ("device_id" = String, Path)), request_body = Option<RotateSecret>,
    responses((status = 200, body = RotatedSecret), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn rotate_secret(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
    OptionalJson(req): OptionalJson<RotateSecret>,
) -> Result<Json<RotatedSecret>> {
    let device = device_ref(p, d)?;
    let (secret, previous_secrets_expire_at, kicked) =
        state.registry.rotate_secret(&device, req.overlap_seconds).await?;
    let ((connections_kicked, kick_pending), kick_error) = match kicked {
        Ok(outcome) => (kick_fields(outcome), None),
        Err(e) => ((0, true), Some(e)),
    };
    Ok(Json(RotatedSecret {
        product_id: device.product.to_string(),
        device_id: device.device.to_string(),
        secret: secret.expose().to_string(),
        previous_secrets_expire_at,
        connections_kicked,
        kick_pending,
        kick_error,
    }))
}

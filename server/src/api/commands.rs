//! `/api/v1/products/{p}/devices/{d}/commands`, `/rpc` and `/tags`, and tag-wide commands: business systems
//! controlling devices.
//!
//! Payloads come in three formats: `plain` (a UTF-8 string sent as-is), `base64` (binary; validated here,
//! sent as base64 text with the topic's encoding level `base64`, as devices of the reference IotHub
//! expect) and `json` (any JSON value, sent as its text). Without `encoding`, a string payload is `plain`
//! and anything else `json`.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{device_ref, product_id, ApiJson, ApiQuery, ReadAccess, WriteAccess};
use super::products::{next_page, page_limit};
use super::telemetry::{decode_cursor, time_cursor};
use super::SharedState;
use crate::domain::commands::{CommandRequest, DEFAULT_RPC_TIMEOUT};
use crate::domain::ota::{OtaPackage, OtaTarget};
use crate::domain::shadows::Shadow;
use crate::error::{Error, Problem, Result};
use crate::ports::commands::{CommandFilter, CommandMode, CommandRecord, CommandState, PayloadFormat, RetryPolicy};
use crate::ports::ota::{RolloutRecord, TargetRecord};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendCommand {
    /// Command name: 1-64 of `[A-Za-z0-9_.-]`; names starting with `$` are reserved.
    pub name: String,
    /// The payload: a string for `plain` and `base64`, any JSON value for `json`. Default: empty.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// `plain`, `base64` or `json` (default: `plain` for a string payload, `json` otherwise).
    pub encoding: Option<PayloadFormat>,
    /// MQTT QoS, 0-2 (default 1).
    pub qos: Option<u8>,
    /// Drop the command if it could not be delivered within this many seconds (1 - 2592000). Devices
    /// see the deadline as the topic's `expiresAt` level (Unix seconds).
    pub ttl_secs: Option<i64>,
    /// Resend an unreplied command; the device sees the same request id every time.
    pub retry: Option<RetryBody>,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBody {
    /// Seconds between sends (1-3600).
    pub interval_secs: i64,
    /// Total sends including the first (1-100).
    pub max_attempts: i32,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendRpc {
    pub name: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub encoding: Option<PayloadFormat>,
    pub qos: Option<u8>,
    /// How long to wait for the device's reply, in ms (default 5000). At most 30000, and at most
    /// `http.request_timeout_secs` minus 2 s (28000 by default), so the answer is always a 504, never a
    /// cut-off request.
    pub timeout_ms: Option<u64>,
}

/// A device's reply to a command.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandReply {
    /// The reply byte-exact, base64.
    pub payload: String,
    /// Always `base64`.
    pub encoding: String,
    /// The reply parsed, when it is JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
    /// The message id of the device's reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// When the broker received the reply (Unix ms).
    pub replied_at: i64,
}

impl CommandReply {
    fn new(payload: &[u8], message_id: Option<String>, replied_at: i64) -> Self {
        Self {
            json: serde_json::from_slice(payload).ok(),
            payload: B64.encode(payload),
            encoding: "base64".into(),
            message_id,
            replied_at,
        }
    }
}

/// A command and where it stands. Times are Unix ms.
#[derive(Debug, Serialize, ToSchema)]
pub struct Command {
    pub request_id: String,
    pub product_id: String,
    pub device_id: String,
    pub name: String,
    pub mode: CommandMode,
    pub state: CommandState,
    /// The payload as given, in `encoding`'s form (`json`: the JSON value).
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub encoding: PayloadFormat,
    pub qos: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// How many times it was published.
    pub attempts: i32,
    pub max_attempts: i32,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub sent_at: Option<i64>,
    pub delivered_at: Option<i64>,
    pub replied_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub failed_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<CommandReply>,
}

impl From<CommandRecord> for Command {
    fn from(c: CommandRecord) -> Self {
        let payload = match c.format {
            PayloadFormat::Base64 => serde_json::Value::String(B64.encode(&c.payload)),
            PayloadFormat::Json => serde_json::from_slice(&c.payload).unwrap_or(serde_json::Value::Null),
            PayloadFormat::Plain => serde_json::Value::String(String::from_utf8_lossy(&c.payload).into_owned()),
        };
        let reply = match (&c.reply, c.replied_at) {
            (Some(bytes), Some(at)) => Some(CommandReply::new(bytes, c.reply_message_id.clone(), at)),
            _ => None,
        };
        Self {
            request_id: c.request_id,
            product_id: c.device.product.to_string(),
            device_id: c.device.device.to_string(),
            name: c.name,
            mode: c.mode,
            state: c.state,
            payload,
            encoding: c.format,
            qos: c.qos,
            idempotency_key: c.idempotency_key,
            attempts: c.attempts,
            max_attempts: c.max_attempts,
            created_at: c.created_at,
            expires_at: c.expires_at,
            sent_at: c.sent_at,
            delivered_at: c.delivered_at,
            replied_at: c.replied_at,
            expired_at: c.expired_at,
            failed_at: c.failed_at,
            failure: c.failure,
            reply,
        }
    }
}

/// The bytes a payload stands for, in the format it was given in.
fn payload_bytes(payload: serde_json::Value, encoding: Option<PayloadFormat>) -> Result<(PayloadFormat, Vec<u8>)> {
    let format = encoding.unwrap_or(match payload {
        serde_json::Value::String(_) | serde_json::Value::Null => PayloadFormat::Plain,
        _ => PayloadFormat::Json,
    });
    let bytes = match (format, payload) {
        (PayloadFormat::Json, value) => serde_json::to_vec(&value).expect("JSON values serialize"),
        (_, serde_json::Value::Null) => Vec::new(),
        (PayloadFormat::Plain, serde_json::Value::String(s)) => s.into_bytes(),
        (PayloadFormat::Base64, serde_json::Value::String(s)) => {
            B64.decode(s.trim()).map_err(|e| Error::validation("payload", format!("not base64: {e}")))?
        }
        (_, _) => return Err(Error::validation("payload", "must be a string for `plain` and `base64`")),
    };
    Ok((format, bytes))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>> {
    headers
        .get("idempotency-key")
        .map(|v| v.to_str().map(str::to_string).map_err(|_| Error::validation("Idempotency-Key", "not ASCII")))
        .transpose()
}

#[utoipa::path(post, path = "/api/v1/products/{product_id}/devices/{device_id}/commands", tag = "commands",
    params(("product_id" = String, Path), ("device_id" = String, Path),
        ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely: the same key for the same device returns the command it created")),
    request_body = SendCommand,
    responses(
        (status = 201, body = Command, description = "Logged; sent at once if the device is online, else queued until it connects"),
        (status = 200, body = Command, description = "The command an earlier request with this Idempotency-Key created"),
        (status = 404, body = Problem), (status = 409, body = Problem, description = "Device suspended, or the key was used for another command"),
        (status = 422, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn send(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SendCommand>,
) -> Result<Response> {
    let device = device_ref(p, d)?;
    let (format, payload) = payload_bytes(body.payload, body.encoding)?;
    let request = CommandRequest {
        name: body.name,
        format,
        payload,
        qos: body.qos.unwrap_or(1),
        ttl_ms: body.ttl_secs.map(|s| s.saturating_mul(1000)),
        idempotency_key: idempotency_key(&headers)?,
        retry: body
            .retry
            .map(|r| RetryPolicy { interval_ms: r.interval_secs.saturating_mul(1000), max_attempts: r.max_attempts }),
    };
    let (record, created) = state.commands.submit(&device, request).await?;
    let location =
        format!("/api/v1/products/{}/devices/{}/commands/{}", device.product, device.device, record.request_id);
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, [(header::LOCATION, location)], Json(Command::from(record))).into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RpcResponse {
    pub request_id: String,
    pub reply: CommandReply,
}

#[utoipa::path(post, path = "/api/v1/products/{product_id}/devices/{device_id}/rpc", tag = "commands",
    params(("product_id" = String, Path), ("device_id" = String, Path)),
    request_body = SendRpc,
    responses(
        (status = 200, body = RpcResponse, description = "The device's `rpc_resp`"),
        (status = 404, body = Problem, description = "Unknown device"),
        (status = 409, body = Problem, description = "Device offline or suspended"),
        (status = 422, body = Problem),
        (status = 504, body = Problem, description = "No reply within the timeout; the detail names the request id")),
    security(("api_key" = ["write"])))]
pub async fn rpc(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
    ApiJson(body): ApiJson<SendRpc>,
) -> Result<Json<RpcResponse>> {
    let device = device_ref(p, d)?;
    let (format, payload) = payload_bytes(body.payload, body.encoding)?;
    let timeout = body.timeout_ms.map(Duration::from_millis).unwrap_or(DEFAULT_RPC_TIMEOUT);
    let request = CommandRequest {
        name: body.name,
        format,
        payload,
        qos: body.qos.unwrap_or(1),
        ttl_ms: None,
        idempotency_key: None,
        retry: None,
    };
    let reply = state.commands.rpc(&device, request, timeout).await?;
    Ok(Json(RpcResponse {
        request_id: reply.request_id,
        reply: CommandReply::new(&reply.payload, None, reply.replied_at),
    }))
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}/devices/{device_id}/commands/{request_id}", tag = "commands",
    params(("product_id" = String, Path), ("device_id" = String, Path), ("request_id" = String, Path)),
    responses((status = 200, body = Command), (status = 404, body = Problem)),
    security(("api_key" = ["read"])))]
pub async fn get(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path((p, d, request_id)): Path<(String, String, String)>,
) -> Result<Json<Command>> {
    let device = device_ref(p, d)?;
    Ok(Json(state.commands.get(&device, &request_id).await?.into()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CommandQuery {
    /// Only commands in this state.
    pub state: Option<CommandState>,
    pub cursor: Option<String>,
    /// Page size, 1-1000 (default 100).
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CommandPage {
    pub items: Vec<Command>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

fn encode_cursor(c: &Command) -> String {
    time_cursor(c.created_at, &c.request_id)
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}/devices/{device_id}/commands", tag = "commands",
    params(("product_id" = String, Path), ("device_id" = String, Path), CommandQuery),
    responses((status = 200, body = CommandPage), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["read"])))]
pub async fn list(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<CommandQuery>,
) -> Result<Json<CommandPage>> {
    let device = device_ref(p, d)?;
    let limit = page_limit(q.limit)?;
    let after = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let filter = CommandFilter { state: q.state, after, limit: limit + 1 };
    let mut items: Vec<Command> = state.commands.list(&device, &filter).await?.into_iter().map(Command::from).collect();
    let next_cursor = next_page(&mut items, limit, encode_cursor);
    Ok(Json(CommandPage { items, next_cursor }))
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tags {
    /// Tag names (id rules: `[A-Za-z0-9_-]{1,64}`), at most 32; order and duplicates do not matter.
    pub tags: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceTagsView {
    pub tags: Vec<String>,
    /// Increments with every change; devices compare it with their own.
    pub tags_version: i64,
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}/devices/{device_id}/tags", tag = "commands",
    params(("product_id" = String, Path), ("device_id" = String, Path)),
    responses((status = 200, body = DeviceTagsView), (status = 404, body = Problem)),
    security(("api_key" = ["read"])))]
pub async fn get_tags(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
) -> Result<Json<DeviceTagsView>> {
    let tags = state.tags.get(&device_ref(p, d)?).await?;
    Ok(Json(DeviceTagsView { tags: tags.tags, tags_version: tags.version }))
}

#[utoipa::path(put, path = "/api/v1/products/{product_id}/devices/{device_id}/tags", tag = "commands",
    params(("product_id" = String, Path), ("device_id" = String, Path)), request_body = Tags,
    responses((status = 200, body = DeviceTagsView, description = "Stored with a new version; pushed to the device (`$set_tags`) if online"),
        (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn set_tags(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
    ApiJson(body): ApiJson<Tags>,
) -> Result<Json<DeviceTagsView>> {
    let tags = state.tags.set(&device_ref(p, d)?, body.tags).await?;
    Ok(Json(DeviceTagsView { tags: tags.tags, tags_version: tags.version }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendTagCommand {
    pub name: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub encoding: Option<PayloadFormat>,
    pub qos: Option<u8>,
    /// Offline devices of the tag get the command when they connect within this many seconds.
    pub ttl_secs: Option<i64>,
}

/// Which page of a tag command's or rollout's per-device list to return (counts always cover every device).
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TargetPageQuery {
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Devices per page, 1-1000 (default 100).
    pub limit: Option<u32>,
}

/// One page of per-device items ordered by device id, and the cursor of the next one.
fn target_page<T>(
    mut items: Vec<T>,
    query: &TargetPageQuery,
    device_of: impl Fn(&T) -> &str,
) -> Result<(Vec<T>, Option<String>)> {
    let limit = page_limit(query.limit)?;
    if let Some(cursor) = &query.cursor {
        crate::ids::validate_id(cursor)
            .map_err(|_| Error::validation("cursor", "not a cursor from a previous page"))?;
    }
    items.sort_by(|a, b| device_of(a).cmp(device_of(b)));
    let mut page: Vec<T> = items
        .into_iter()
        .filter(|item| query.cursor.as_deref().is_none_or(|c| device_of(item) > c))
        .take(limit as usize + 1)
        .collect();
    let next = next_page(&mut page, limit, |item| device_of(item).to_string());
    Ok((page, next))
}

/// A command to every device of a tag, per device.
#[derive(Debug, Serialize, ToSchema)]
pub struct TagCommand {
    pub request_id: String,
    pub tag: String,
    pub name: String,
    /// Devices of the tag when the command was sent.
    pub total: usize,
    pub replied: usize,
    /// Devices whose command is neither replied, expired nor failed.
    pub pending: usize,
    /// One page of the devices' commands, by device id (`limit`, default 100).
    pub devices: Vec<Command>,
    /// Pass as `cursor` to `GET …/tag-commands/{request_id}` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

fn tag_command_view(
    tag: &str,
    rows: Vec<CommandRecord>,
    request_id: String,
    name: String,
    page: &TargetPageQuery,
) -> Result<TagCommand> {
    let replied = rows.iter().filter(|r| r.state == CommandState::Replied).count();
    let pending = rows.iter().filter(|r| !r.state.is_terminal()).count();
    let total = rows.len();
    let (rows, next_cursor) = target_page(rows, page, |r| r.device.device.as_str())?;
    Ok(TagCommand {
        request_id,
        tag: tag.to_string(),
        name,
        total,
        replied,
        pending,
        devices: rows.into_iter().map(Command::from).collect(),
        next_cursor,
    })
}

#[utoipa::path(post, path = "/api/v1/products/{product_id}/tags/{tag}/commands", tag = "commands",
    params(("product_id" = String, Path), ("tag" = String, Path)), request_body = SendTagCommand,
    responses((status = 201, body = TagCommand, description = "One request id; one command per device of the tag"),
        (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn send_to_tag(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path((p, tag)): Path<(String, String)>,
    ApiJson(body): ApiJson<SendTagCommand>,
) -> Result<(StatusCode, Json<TagCommand>)> {
    let product = product_id(p)?;
    let (format, payload) = payload_bytes(body.payload, body.encoding)?;
    let name = body.name.clone();
    let request = CommandRequest {
        name: body.name,
        format,
        payload,
        qos: body.qos.unwrap_or(1),
        ttl_ms: body.ttl_secs.map(|s| s.saturating_mul(1000)),
        idempotency_key: None,
        retry: None,
    };
    let rows = state.commands.submit_to_tag(&product, &tag, request).await?;
    let request_id = rows.first().map(|r| r.request_id.clone()).unwrap_or_default();
    let first_page = TargetPageQuery { cursor: None, limit: None };
    Ok((StatusCode::CREATED, Json(tag_command_view(&tag, rows, request_id, name, &first_page)?)))
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}/tag-commands/{request_id}", tag = "commands",
    params(("product_id" = String, Path), ("request_id" = String, Path), TargetPageQuery),
    responses((status = 200, body = TagCommand), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["read"])))]
pub async fn get_tag_command(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path((p, request_id)): Path<(String, String)>,
    ApiQuery(page): ApiQuery<TargetPageQuery>,
) -> Result<Json<TagCommand>> {
    let product = product_id(p)?;
    let rows = state.commands.tag_command(&product, &request_id).await?;
    let (tag, name) = (rows[0].tag.clone().unwrap_or_default(), rows[0].name.clone());
    Ok(Json(tag_command_view(&tag, rows, request_id, name, &page)?))
}

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

fn rollout_view((r, targets): (RolloutRecord, Vec<TargetRecord>), page: &TargetPageQuery) -> Result<Rollout> {
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
        created_at: r.created_at,
        targets: targets.into_iter().map(target_view).collect(),
        next_cursor,
    })
}

const FIRST_PAGE: TargetPageQuery = TargetPageQuery { cursor: None, limit: None };

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads_are_read_in_their_format() {
        assert_eq!(payload_bytes(json!("hi"), None).unwrap(), (PayloadFormat::Plain, b"hi".to_vec()));
        assert_eq!(payload_bytes(json!({"a": 1}), None).unwrap(), (PayloadFormat::Json, br#"{"a":1}"#.to_vec()));
        assert_eq!(
            payload_bytes(json!("AP8="), Some(PayloadFormat::Base64)).unwrap(),
            (PayloadFormat::Base64, vec![0, 255])
        );
        assert_eq!(payload_bytes(json!("x"), Some(PayloadFormat::Json)).unwrap().1, br#""x""#.to_vec());
        assert_eq!(payload_bytes(serde_json::Value::Null, None).unwrap(), (PayloadFormat::Plain, vec![]));
        for (payload, encoding) in [(json!("%%"), PayloadFormat::Base64), (json!(1), PayloadFormat::Plain)] {
            match payload_bytes(payload, Some(encoding)) {
                Err(Error::Validation { field, .. }) => assert_eq!(field, "payload"),
                other => panic!("{other:?}"),
            }
        }
    }
}

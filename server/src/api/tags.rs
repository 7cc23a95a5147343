//! `/api/v1/products/{p}/devices/{d}/tags` and tag-wide commands (`/products/{p}/tags/{tag}/commands`,
//! `/products/{p}/tag-commands/{id}`): grouping devices and commanding a whole group at once.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::commands::{payload_bytes, Command};
use super::extract::{device_ref, product_id, ApiJson, ApiQuery, ReadAccess, WriteAccess};
use super::page::{target_page, TargetPageQuery};
use super::SharedState;
use crate::domain::commands::CommandRequest;
use crate::error::{Problem, Result};
use crate::model::commands::{CommandRecord, CommandState, PayloadFormat};

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

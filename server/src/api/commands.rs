//! `/api/v1/products/{p}/devices/{d}/commands` and `/rpc`: business systems sending one device commands and
//! RPCs, and reading its command log. Tags, tag-wide commands, shadows and OTA have their own modules.
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

use super::extract::{device_ref, ApiJson, ApiQuery, ReadAccess, WriteAccess};
use super::page::{decode_cursor, next_page, page_limit, time_cursor};
use super::SharedState;
use crate::domain::commands::{CommandRequest, DEFAULT_RPC_TIMEOUT};
use crate::error::{Error, Problem, Result};
use crate::model::commands::{CommandFilter, CommandKind, CommandRecord, CommandState, PayloadFormat, RetryPolicy};

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
    pub mode: CommandKind,
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
pub(super) fn payload_bytes(
    payload: serde_json::Value,
    encoding: Option<PayloadFormat>,
) -> Result<(PayloadFormat, Vec<u8>)> {
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

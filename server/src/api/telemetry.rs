//! `/api/v1/products/{p}/devices/{d}/messages` and `/status`: what a device reported, and the live
//! event stream `/api/v1/events` (Server-Sent Events).

use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use base64::Engine;
use futures::stream::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{device_ref, product_id, ApiQuery, ReadAccess};
use super::page::{decode_cursor, next_page, page_limit, time_cursor};
use super::SharedState;
use crate::error::{Error, Problem, Result};
use crate::model::event_bus::EventKind;
use crate::model::store::{MessageFilter, MessageRecord, ReportKind};
use crate::topics::{is_message_id, is_name};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One `upload_data` message.
#[derive(Debug, Serialize, ToSchema)]
pub struct Message {
    pub message_id: String,
    pub data_type: String,
    /// The payload byte-exact, encoded as `encoding` says.
    pub payload: String,
    /// Always `base64`.
    pub encoding: String,
    /// The payload parsed, when it is JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
    /// When the broker received it (Unix ms).
    pub sent_at: i64,
    /// When iothub stored it.
    pub stored_at: i64,
}

impl From<MessageRecord> for Message {
    fn from(m: MessageRecord) -> Self {
        Self {
            json: serde_json::from_slice(&m.payload).ok(),
            payload: B64.encode(&m.payload),
            encoding: "base64".into(),
            message_id: m.message_id,
            data_type: m.data_type,
            sent_at: m.sent_at,
            stored_at: m.stored_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    pub items: Vec<Message>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct MessageQuery {
    /// Only this data type.
    pub data_type: Option<String>,
    /// Inclusive lower bound of `sent_at` (Unix ms).
    pub from: Option<i64>,
    /// Exclusive upper bound of `sent_at` (Unix ms).
    pub to: Option<i64>,
    pub cursor: Option<String>,
    /// Page size, 1-1000 (default 100).
    pub limit: Option<u32>,
}

fn encode_cursor(m: &Message) -> String {
    time_cursor(m.sent_at, &m.message_id)
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}/devices/{device_id}/messages", tag = "telemetry",
    params(("product_id" = String, Path), ("device_id" = String, Path), MessageQuery),
    responses((status = 200, body = MessagePage), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["read"])))]
pub async fn list_messages(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<MessageQuery>,
) -> Result<Json<MessagePage>> {
    let device = device_ref(p, d)?;
    let limit = page_limit(q.limit)?;
    if let Some(t) = &q.data_type {
        if !is_name(t) {
            return Err(Error::validation("data_type", "not a data type"));
        }
    }
    if let (Some(from), Some(to)) = (q.from, q.to) {
        if from >= to {
            return Err(Error::validation("to", "must be greater than `from`"));
        }
    }
    let after = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let filter = MessageFilter { data_type: q.data_type, from: q.from, to: q.to, after, limit: limit + 1 };
    let mut items: Vec<Message> =
        state.history.messages(&device, &filter).await?.into_iter().map(Message::from).collect();
    let next_cursor = next_page(&mut items, limit, encode_cursor);
    Ok(Json(MessagePage { items, next_cursor }))
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}/devices/{device_id}/messages/{message_id}",
    tag = "telemetry",
    params(("product_id" = String, Path), ("device_id" = String, Path), ("message_id" = String, Path)),
    responses((status = 200, body = Message), (status = 404, body = Problem)), security(("api_key" = ["read"])))]
pub async fn get_message(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path((p, d, m)): Path<(String, String, String)>,
) -> Result<Json<Message>> {
    let device = device_ref(p, d)?;
    if !is_message_id(&m) {
        return Err(Error::validation("message_id", "not a message id"));
    }
    Ok(Json(state.history.message(&device, &m).await?.into()))
}

/// The device's latest `update_status` document.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceStatusReport {
    pub status: serde_json::Value,
    pub message_id: String,
    /// Broker receive time of the report (Unix ms); reports apply in this order.
    pub reported_at: i64,
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}/devices/{device_id}/status", tag = "telemetry",
    params(("product_id" = String, Path), ("device_id" = String, Path)),
    responses((status = 200, body = DeviceStatusReport), (status = 404, body = Problem)),
    security(("api_key" = ["read"])))]
pub async fn get_status(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path((p, d)): Path<(String, String)>,
) -> Result<Json<DeviceStatusReport>> {
    let report = state.history.report(&device_ref(p, d)?, ReportKind::Status).await?;
    Ok(Json(DeviceStatusReport {
        status: serde_json::from_str(&report.payload_json)
            .map_err(|e| Error::Internal(anyhow::anyhow!("stored status is not JSON: {e}")))?,
        message_id: report.message_id,
        reported_at: report.reported_at,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Product whose events to stream.
    pub product: String,
    /// Comma-separated event kinds (`upload_data,update_status,device_connection,ota_progress`); default all.
    pub kinds: Option<String>,
}

/// Live events of one product as Server-Sent Events: `event:` = kind, `id:` = event id, `data:` = the
/// same JSON document RabbitMQ consumers get (docs/events.md). A live view: no replay of missed events.
#[utoipa::path(get, path = "/api/v1/events", tag = "telemetry", params(StreamQuery),
    responses((status = 200, content_type = "text/event-stream", body = String), (status = 422, body = Problem),
        (status = 429, body = Problem, description = "The key already holds `http.sse_streams_per_key` streams on this instance")),
    security(("api_key" = ["read"])))]
pub async fn stream(
    ReadAccess(caller): ReadAccess,
    State(state): State<SharedState>,
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    let product = product_id(q.product).map_err(|_| Error::validation("product", "not a product id"))?;
    // Held for as long as the response streams; dropping the stream (client gone, shutdown) frees it.
    let slot = state.event_streams.acquire(&caller.key_id)?;
    let kinds = match q.kinds.as_deref() {
        None | Some("") => EventKind::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(|k| {
                EventKind::parse(k.trim()).ok_or_else(|| Error::validation("kinds", format!("unknown kind {k:?}")))
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let events = state.bus.subscribe(Some(product.to_string())).await?;
    let mut closing = state.closing.subscribe();
    let stream = events.take_until(async move {
        let _ = closing.wait_for(|closing| *closing).await;
    });
    let stream = stream.filter_map(move |e| {
        let _held = &slot;
        let keep = kinds
            .contains(&e.kind)
            .then(|| Ok(Event::default().event(e.kind.as_str()).id(e.event_id).data(String::from_utf8_lossy(&e.body))));
        std::future::ready(keep)
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

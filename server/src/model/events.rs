//! The northbound event contract: what business systems receive on RabbitMQ (or the SSE stream).
//!
//! Every event is a JSON document with a stable `event_id`, derived from what the event is about (a
//! device's message id, a broker session), so a replayed webhook or a republished outbox row yields the
//! same id and consumers can drop duplicates. Payloads travel base64-encoded with an explicit `encoding`;
//! timestamps are Unix milliseconds. docs/events.md documents each shape and a test keeps it in sync.

use base64::Engine;
use serde::Serialize;
use uuid::Uuid;

use crate::ids::DeviceRef;
use crate::model::commands::CommandRecord;
use crate::model::event_bus::{BusEvent, EventKind};
use crate::model::store::ConnectionRecord;

/// Namespace of the name-based (v5) event ids.
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2b0e_5d4a_4c1e_9a7b_3e8d_1f20_c4a5);

fn event_id(parts: &[&str]) -> String {
    Uuid::new_v5(&EVENT_ID_NAMESPACE, parts.join("\u{1f}").as_bytes()).to_string()
}

fn bus_event(kind: EventKind, device: &DeviceRef, event_id: String, body: &impl Serialize) -> BusEvent {
    BusEvent {
        kind,
        routing_key: device.product.to_string(),
        event_id,
        body: serde_json::to_vec(body).expect("event bodies serialize"),
    }
}

/// `iothub.events.upload_data`
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct UploadDataEvent {
    pub event_id: String,
    pub product_id: String,
    pub device_id: String,
    pub message_id: String,
    pub data_type: String,
    /// The payload exactly as published, encoded as `encoding` says.
    pub payload: String,
    pub encoding: String,
    /// When the broker received the publish.
    pub sent_at: i64,
    /// When iothub stored it.
    pub received_at: i64,
}

pub fn upload_data(
    device: &DeviceRef,
    message_id: &str,
    data_type: &str,
    payload: &[u8],
    sent_at: i64,
    received_at: i64,
) -> BusEvent {
    let id = event_id(&["upload_data", device.product.as_str(), device.device.as_str(), message_id]);
    let body = UploadDataEvent {
        event_id: id.clone(),
        product_id: device.product.to_string(),
        device_id: device.device.to_string(),
        message_id: message_id.to_string(),
        data_type: data_type.to_string(),
        payload: base64::engine::general_purpose::STANDARD.encode(payload),
        encoding: "base64".into(),
        sent_at,
        received_at,
    };
    bus_event(EventKind::UploadData, device, id, &body)
}

/// `iothub.events.update_status` and `iothub.events.ota_progress`: a JSON report from the device.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ReportEvent {
    pub event_id: String,
    pub product_id: String,
    pub device_id: String,
    pub message_id: String,
    /// The device's JSON document, as JSON.
    pub report: serde_json::Value,
    pub sent_at: i64,
    pub received_at: i64,
}

pub fn report(
    kind: EventKind,
    device: &DeviceRef,
    message_id: &str,
    report: &serde_json::Value,
    sent_at: i64,
    received_at: i64,
) -> BusEvent {
    let id = event_id(&[kind.as_str(), device.product.as_str(), device.device.as_str(), message_id]);
    let body = ReportEvent {
        event_id: id.clone(),
        product_id: device.product.to_string(),
        device_id: device.device.to_string(),
        message_id: message_id.to_string(),
        report: report.clone(),
        sent_at,
        received_at,
    };
    bus_event(kind, device, id, &body)
}

/// `iothub.events.device_connection`: one broker session opened or closed.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ConnectionEvent {
    pub event_id: String,
    /// `connected` or `disconnected`.
    pub event: String,
    pub product_id: String,
    pub device_id: String,
    /// Whether the device has any open session after this change.
    pub online: bool,
    /// The session after the change.
    #[serde(flatten)]
    pub session: ConnectionRecord,
}

impl ConnectionEvent {
    /// The broker time of the change is part of the id: RMQTT session keys (peer addresses) can repeat
    /// across sessions, and two sessions' events must never share an id.
    pub fn id_for(device: &DeviceRef, client_id: &str, session_key: &str, event: &str, at: i64) -> String {
        let at = at.to_string();
        event_id(&[
            "device_connection",
            device.product.as_str(),
            device.device.as_str(),
            client_id,
            session_key,
            event,
            &at,
        ])
    }

    pub fn into_bus_event(self, device: &DeviceRef) -> BusEvent {
        let id = self.event_id.clone();
        bus_event(EventKind::DeviceConnection, device, id, &self)
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `iothub.events.command_state`: a command moved to a new state (or was sent again).
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct CommandStateEvent {
    pub event_id: String,
    pub product_id: String,
    pub device_id: String,
    pub request_id: String,
    pub command: String,
    /// `cmd` or `rpc`.
    pub mode: String,
    /// `queued`, `sent`, `delivered`, `replied`, `expired` or `failed`.
    pub state: String,
    /// How many times it was published so far.
    pub attempts: i32,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub sent_at: Option<i64>,
    pub delivered_at: Option<i64>,
    pub replied_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub failure: Option<String>,
}

pub fn command_state(c: &CommandRecord) -> BusEvent {
    let attempts = c.attempts.to_string();
    let id = event_id(&[
        "command_state",
        c.device.product.as_str(),
        c.device.device.as_str(),
        &c.request_id,
        c.state.as_str(),
        &attempts,
    ]);
    let body = CommandStateEvent {
        event_id: id.clone(),
        product_id: c.device.product.to_string(),
        device_id: c.device.device.to_string(),
        request_id: c.request_id.clone(),
        command: c.name.clone(),
        mode: c.mode.as_str().into(),
        state: c.state.as_str().into(),
        attempts: c.attempts,
        created_at: c.created_at,
        expires_at: c.expires_at,
        sent_at: c.sent_at,
        delivered_at: c.delivered_at,
        replied_at: c.replied_at,
        expired_at: c.expired_at,
        failed_at: c.failed_at,
        failure: c.failure.clone(),
    };
    bus_event(EventKind::CommandState, &c.device, id, &body)
}

/// `iothub.events.cmd_resp`: the device's reply to a command (both modes), attached to it in the log.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct CmdRespEvent {
    pub event_id: String,
    pub product_id: String,
    pub device_id: String,
    pub request_id: String,
    pub command: String,
    pub mode: String,
    pub message_id: String,
    pub payload: String,
    pub encoding: String,
    /// When the broker received the reply.
    pub replied_at: i64,
}

pub fn cmd_resp(c: &CommandRecord, message_id: &str, payload: &[u8], replied_at: i64) -> BusEvent {
    let id = event_id(&["cmd_resp", c.device.product.as_str(), c.device.device.as_str(), &c.request_id]);
    let body = CmdRespEvent {
        event_id: id.clone(),
        product_id: c.device.product.to_string(),
        device_id: c.device.device.to_string(),
        request_id: c.request_id.clone(),
        command: c.name.clone(),
        mode: c.mode.as_str().into(),
        message_id: message_id.into(),
        payload: b64(payload),
        encoding: "base64".into(),
        replied_at,
    };
    bus_event(EventKind::CmdResp, &c.device, id, &body)
}

/// `iothub.events.data_request`: a device asks business systems for a resource (`get/...`); they answer
/// with a normal command.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct DataRequestEvent {
    pub event_id: String,
    pub product_id: String,
    pub device_id: String,
    pub resource: String,
    pub message_id: String,
    pub payload: String,
    pub encoding: String,
    pub sent_at: i64,
    pub received_at: i64,
}

pub fn data_request(
    device: &DeviceRef,
    resource: &str,
    message_id: &str,
    payload: &[u8],
    sent_at: i64,
    received_at: i64,
) -> BusEvent {
    let id = event_id(&["data_request", device.product.as_str(), device.device.as_str(), message_id]);
    let body = DataRequestEvent {
        event_id: id.clone(),
        product_id: device.product.to_string(),
        device_id: device.device.to_string(),
        resource: resource.into(),
        message_id: message_id.into(),
        payload: b64(payload),
        encoding: "base64".into(),
        sent_at,
        received_at,
    };
    bus_event(EventKind::DataRequest, device, id, &body)
}

/// `iothub.events.shadow`: a device's shadow changed (by the API or the device).
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ShadowEvent {
    pub event_id: String,
    pub product_id: String,
    pub device_id: String,
    /// `api`, `device_reported` or `device_updated`.
    pub source: String,
    pub version: i64,
    /// The whole document after the change, with its `delta`.
    pub shadow: serde_json::Value,
}

pub fn shadow(device: &DeviceRef, source: &str, shadow: &serde_json::Value, version: i64) -> BusEvent {
    // The change time keeps ids apart when a deleted device comes back under its old id at version 1.
    let (v, at) = (version.to_string(), shadow.get("timestamp").map(|t| t.to_string()).unwrap_or_default());
    let id = event_id(&["shadow", device.product.as_str(), device.device.as_str(), &v, &at]);
    let body = ShadowEvent {
        event_id: id.clone(),
        product_id: device.product.to_string(),
        device_id: device.device.to_string(),
        source: source.into(),
        version,
        shadow: shadow.clone(),
    };
    bus_event(EventKind::Shadow, device, id, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DeviceId, ProductId};

    fn dev() -> DeviceRef {
        DeviceRef::new(ProductId::parse("p").unwrap(), DeviceId::parse("d").unwrap())
    }

    #[test]
    fn event_ids_are_stable_and_distinct() {
        let a = upload_data(&dev(), "m1", "temp", b"x", 1, 2);
        let b = upload_data(&dev(), "m1", "other", b"y", 3, 4);
        assert_eq!(a.event_id, b.event_id, "same device message, same event id");
        let c = upload_data(&dev(), "m2", "temp", b"x", 1, 2);
        assert_ne!(a.event_id, c.event_id);
        let s = report(EventKind::UpdateStatus, &dev(), "m1", &serde_json::json!({}), 1, 2);
        assert_ne!(a.event_id, s.event_id, "kinds do not collide");
        // RMQTT keys sessions by peer address, which can repeat: the time keeps the ids apart.
        assert_ne!(
            ConnectionEvent::id_for(&dev(), "c", "a10.0.0.1:5000", "connected", 1),
            ConnectionEvent::id_for(&dev(), "c", "a10.0.0.1:5000", "connected", 2)
        );
    }

    fn sample_command() -> CommandRecord {
        use crate::model::commands::*;
        CommandRecord {
            device: dev(),
            request_id: "r".into(),
            mode: CommandKind::Cmd,
            name: "reboot".into(),
            format: PayloadFormat::Plain,
            payload: vec![],
            qos: 1,
            idempotency_key: None,
            state: CommandState::Sent,
            created_at: 1,
            expires_at: None,
            sent_at: Some(2),
            delivered_at: None,
            replied_at: None,
            expired_at: None,
            failed_at: None,
            failure: None,
            attempts: 1,
            max_attempts: 1,
            retry_interval_ms: None,
            next_attempt_at: None,
            reply: None,
            reply_message_id: None,
            tag: None,
        }
    }

    /// The documented examples in docs/events.md carry exactly the fields the code emits.
    #[test]
    fn documented_event_shapes_match_the_code() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/events.md")).unwrap();
        let examples: Vec<serde_json::Value> = doc
            .split("```json")
            .skip(1)
            .map(|block| serde_json::from_str(block.split("```").next().unwrap()).expect("example is JSON"))
            .collect();
        let emitted = [
            serde_json::from_slice::<serde_json::Value>(&upload_data(&dev(), "m", "t", b"{}", 1, 2).body).unwrap(),
            serde_json::from_slice(&report(EventKind::UpdateStatus, &dev(), "m", &serde_json::json!({}), 1, 2).body)
                .unwrap(),
            serde_json::to_value(ConnectionEvent {
                event_id: String::new(),
                event: "connected".into(),
                product_id: String::new(),
                device_id: String::new(),
                online: true,
                session: ConnectionRecord {
                    client_id: String::new(),
                    connected_at: None,
                    disconnected_at: None,
                    reason: None,
                    ip_address: None,
                    proto_ver: None,
                    keepalive: None,
                    clean_start: None,
                    node: None,
                },
            })
            .unwrap(),
            serde_json::from_slice(&command_state(&sample_command()).body).unwrap(),
            serde_json::from_slice(&cmd_resp(&sample_command(), "m", b"ok", 1).body).unwrap(),
            serde_json::from_slice(&data_request(&dev(), "weather", "m", b"{}", 1, 2).body).unwrap(),
            serde_json::from_slice(&shadow(&dev(), "api", &serde_json::json!({}), 1).body).unwrap(),
        ];
        let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        for shape in &emitted {
            assert!(
                examples.iter().any(|ex| keys(ex) == keys(shape)),
                "docs/events.md has no example with fields {:?}",
                keys(shape)
            );
        }
    }
}

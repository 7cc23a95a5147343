//! Broker event webhooks: EMQX 5 rule-engine HTTP action, EMQX 4 `emqx_web_hook`, RMQTT `rmqtt-web-hook`.
//!
//! Each dialect is parsed into [`BrokerEvent`]s here and nowhere else. A body is one event or a JSON array
//! of events. The answer is 204 only after every event is durably stored; a storage failure answers 503,
//! which EMQX 5 retries (429/503 only) and RMQTT retries (any failure, up to `retry_max_elapsed_time`).
//! EMQX 4.4's web hook retries only transport errors and drops an event answered with an error status,
//! so on EMQX 4 an iothub storage outage loses the events of that window (docs: emqx-config/README.md).
//! A malformed event answers 422 naming the field — retrying it cannot help. Events iothub has no use for
//! are acknowledged and counted.
//! Authentication (the hook token) is the router's `require_hook_token` layer.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine;
use serde_json::{Map, Value};

use super::SharedState;
use crate::domain::ingest::{BrokerEvent, DeliveryStage};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Emqx5,
    Emqx4,
    Rmqtt,
}

/// Field access that names the offending field (with the event's index in a batch) on error.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    at: String,
}

impl<'a> Fields<'a> {
    fn err(&self, name: &str, message: &str) -> Error {
        Error::validation(format!("{}{name}", self.at), message)
    }

    fn opt_str(&self, name: &str) -> Option<String> {
        match self.map.get(name)? {
            Value::String(s) if s != "undefined" => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    fn str(&self, name: &str) -> Result<String> {
        self.opt_str(name).ok_or_else(|| self.err(name, "required string"))
    }

    fn opt_i64(&self, name: &str) -> Result<Option<i64>> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| self.err(name, "must be an integer")),
            Some(Value::String(s)) => s.parse().map(Some).map_err(|_| self.err(name, "must be an integer")),
            Some(_) => Err(self.err(name, "must be an integer")),
        }
    }

    fn i64(&self, name: &str) -> Result<i64> {
        self.opt_i64(name)?.ok_or_else(|| self.err(name, "required integer (Unix ms)"))
    }

    fn opt_i32(&self, name: &str) -> Result<Option<i32>> {
        self.opt_i64(name)?.map(|v| i32::try_from(v).map_err(|_| self.err(name, "out of range"))).transpose()
    }

    fn opt_bool(&self, name: &str) -> Option<bool> {
        match self.map.get(name)? {
            Value::Bool(b) => Some(*b),
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_i64().map(|v| v != 0),
            _ => None,
        }
    }

    fn base64(&self, name: &str) -> Result<Vec<u8>> {
        let raw = self.opt_str(name).unwrap_or_default();
        base64::engine::general_purpose::STANDARD.decode(raw.as_bytes()).map_err(|_| self.err(name, "must be base64"))
    }

    fn qos(&self, name: &str) -> Result<u8> {
        match self.opt_i64(name)?.unwrap_or(0) {
            q @ 0..=2 => Ok(q as u8),
            _ => Err(self.err(name, "must be 0, 1 or 2")),
        }
    }
}

/// Host part of `ip:port` / `[v6]:port` (EMQX's `peername`).
fn host_of(peer: &str) -> String {
    match peer.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
            host.trim_start_matches('[').trim_end_matches(']').to_string()
        }
        _ => peer.to_string(),
    }
}

/// Parses a webhook body (one event or an array) in the given dialect.
pub fn parse_events(dialect: Dialect, body: &[u8]) -> Result<Vec<BrokerEvent>> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Error::validation("body", format!("not JSON: {e}")))?;
    let (items, batched) = match value {
        Value::Array(items) => (items, true),
        single => (vec![single], false),
    };
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = if batched { format!("[{i}].") } else { String::new() };
        let Value::Object(map) = item else {
            return Err(Error::validation(
                format!("{at}body").trim_end_matches('.'),
                "each event must be a JSON object",
            ));
        };
        let fields = Fields { map, at };
        let parsed = match dialect {
            Dialect::Emqx5 => parse_emqx5(&fields)?,
            Dialect::Emqx4 | Dialect::Rmqtt => parse_webhook(dialect, &fields)?,
        };
        match parsed {
            Some(event) => events.push(event),
            None => {
                metrics::counter!("iothub_broker_events_total", "kind" => "other", "outcome" => "ignored").increment(1)
            }
        }
    }
    Ok(events)
}

fn parse_emqx5(f: &Fields) -> Result<Option<BrokerEvent>> {
    let kind = f.str("event")?;
    Ok(Some(match kind.as_str() {
        "client.connected" => {
            let connected_at = f.i64("connected_at")?;
            BrokerEvent::Connected {
                client_id: f.str("clientid")?,
                username: f.opt_str("username"),
                session_key: format!("t{connected_at}"),
                connected_at,
                ip_address: f.opt_str("peername").map(|p| host_of(&p)),
                proto_ver: f.opt_i32("proto_ver")?,
                keepalive: f.opt_i32("keepalive")?,
                clean_start: f.opt_bool("clean_start"),
                node: f.opt_str("node"),
            }
        }
        "client.disconnected" => {
            let connected_at = f.i64("connected_at")?;
            BrokerEvent::Disconnected {
                client_id: f.str("clientid")?,
                username: f.opt_str("username"),
                session_key: format!("t{connected_at}"),
                connected_at: Some(connected_at),
                disconnected_at: f.i64("disconnected_at")?,
                reason: f.opt_str("reason").unwrap_or_else(|| "unknown".into()),
                ip_address: f.opt_str("peername").map(|p| host_of(&p)),
                node: f.opt_str("node"),
            }
        }
        "message.publish" => BrokerEvent::Publish {
            client_id: f.str("clientid")?,
            username: f.opt_str("username"),
            topic: f.str("topic")?,
            // emqx-config's rule selects `base64_encode(payload) AS payload`: binary survives JSON.
            payload: f.base64("payload")?,
            qos: f.qos("qos")?,
            retain: f.map.get("flags").and_then(|v| v.get("retain")).and_then(Value::as_bool).unwrap_or(false),
            received_at: match f.opt_i64("publish_received_at")? {
                Some(t) => t,
                None => f.i64("timestamp")?,
            },
        },
        "message.delivered" | "message.acked" | "message.dropped" => BrokerEvent::Delivery {
            stage: match kind.as_str() {
                "message.delivered" => DeliveryStage::Delivered,
                "message.acked" => DeliveryStage::Acked,
                _ => DeliveryStage::Dropped,
            },
            client_id: f.opt_str("clientid"),
            username: f.opt_str("username"),
            topic: f.str("topic")?,
            at: f.i64("timestamp")?,
            reason: f.opt_str("reason"),
        },
        _ => return Ok(None),
    }))
}

/// EMQX 4 `emqx_web_hook` and RMQTT `rmqtt-web-hook` share the `action` shape; they differ in how a
/// session is identified: EMQX 4 sends `connected_at` in both events, RMQTT only in the connect, so RMQTT
/// sessions are keyed by the peer address (`ip:port`, unique per TCP connection).
fn parse_webhook(dialect: Dialect, f: &Fields) -> Result<Option<BrokerEvent>> {
    let action = f.str("action")?;
    let session_key = |connected_at: Option<i64>| -> Result<String> {
        match (dialect, connected_at) {
            (Dialect::Emqx4, Some(t)) => Ok(format!("t{t}")),
            _ => Ok(format!("a{}", f.str("ipaddress")?)),
        }
    };
    Ok(Some(match action.as_str() {
        "client_connected" => {
            let connected_at = f.i64("connected_at")?;
            BrokerEvent::Connected {
                client_id: f.str("clientid")?,
                username: f.opt_str("username"),
                session_key: session_key(Some(connected_at))?,
                connected_at,
                ip_address: f.opt_str("ipaddress").map(|p| host_of(&p)),
                proto_ver: f.opt_i32("proto_ver")?,
                keepalive: f.opt_i32("keepalive")?,
                clean_start: f.opt_bool("clean_start").or_else(|| f.opt_bool("clean_session")),
                node: f.opt_str("node"),
            }
        }
        "client_disconnected" => {
            let connected_at = f.opt_i64("connected_at")?;
            BrokerEvent::Disconnected {
                client_id: f.str("clientid")?,
                username: f.opt_str("username"),
                session_key: session_key(connected_at)?,
                connected_at,
                disconnected_at: match f.opt_i64("disconnected_at")? {
                    Some(t) => t,
                    None => f.i64("ts")?,
                },
                reason: f.opt_str("reason").unwrap_or_else(|| "unknown".into()),
                ip_address: f.opt_str("ipaddress").map(|p| host_of(&p)),
                node: f.opt_str("node"),
            }
        }
        "message_publish" => BrokerEvent::Publish {
            client_id: f.opt_str("from_clientid").map_or_else(|| f.str("from_client_id"), Ok)?,
            username: f.opt_str("from_username"),
            topic: f.str("topic")?,
            payload: f.base64("payload")?,
            qos: f.qos("qos")?,
            retain: f.opt_bool("retain").unwrap_or(false),
            received_at: f.i64("ts")?,
        },
        "message_delivered" | "message_acked" | "message_dropped" => BrokerEvent::Delivery {
            stage: match action.as_str() {
                "message_delivered" => DeliveryStage::Delivered,
                "message_acked" => DeliveryStage::Acked,
                _ => DeliveryStage::Dropped,
            },
            client_id: f.opt_str("clientid").or_else(|| f.opt_str("client_id")),
            username: f.opt_str("username"),
            topic: f.str("topic")?,
            at: f.i64("ts")?,
            reason: f.opt_str("reason"),
        },
        _ => return Ok(None),
    }))
}

async fn ingest(state: SharedState, dialect: Dialect, body: Bytes) -> Result<StatusCode> {
    let events = parse_events(dialect, &body)?;
    state.ingest.submit(events).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn emqx5_events(State(state): State<SharedState>, body: Bytes) -> Result<StatusCode> {
    ingest(state, Dialect::Emqx5, body).await
}

pub async fn emqx4_webhook(State(state): State<SharedState>, body: Bytes) -> Result<StatusCode> {
    ingest(state, Dialect::Emqx4, body).await
}

pub async fn rmqtt_webhook(State(state): State<SharedState>, body: Bytes) -> Result<StatusCode> {
    ingest(state, Dialect::Rmqtt, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(dialect: &str, name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{dialect}/{name}.json", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn emqx5_fixtures() {
        let connected = parse_events(Dialect::Emqx5, &fixture("emqx5", "client.connected")).unwrap();
        assert_eq!(
            connected,
            vec![BrokerEvent::Connected {
                client_id: "dev1-a".into(),
                username: Some("fixture/dev1".into()),
                session_key: "t1700000000000".into(),
                connected_at: 1_700_000_000_000,
                ip_address: Some("192.0.2.10".into()),
                proto_ver: Some(5),
                keepalive: Some(60),
                clean_start: Some(true),
                node: Some("emqx@10.0.0.1".into()),
            }]
        );
        let disconnected = parse_events(Dialect::Emqx5, &fixture("emqx5", "client.disconnected")).unwrap();
        assert!(
            matches!(&disconnected[..], [BrokerEvent::Disconnected { session_key, connected_at: Some(1_700_000_000_000),
            disconnected_at: 1_700_000_004_000, reason, .. }] if session_key == "t1700000000000" && reason == "normal")
        );
        let publish = parse_events(Dialect::Emqx5, &fixture("emqx5", "message.publish")).unwrap();
        assert!(matches!(&publish[..], [BrokerEvent::Publish { payload, received_at: 1_700_000_001_000, qos: 1, .. }]
            if payload == &[0x00, 0x9f, 0x92, 0x96]));
        let batch = parse_events(Dialect::Emqx5, &fixture("emqx5", "batch")).unwrap();
        assert_eq!(batch.len(), 2);
        for (name, stage) in [
            ("message.delivered", DeliveryStage::Delivered),
            ("message.acked", DeliveryStage::Acked),
            ("message.dropped", DeliveryStage::Dropped),
        ] {
            let events = parse_events(Dialect::Emqx5, &fixture("emqx5", name)).unwrap();
            assert!(matches!(&events[..], [BrokerEvent::Delivery { stage: s, .. }] if *s == stage), "{name}");
        }
    }

    #[test]
    fn emqx4_and_rmqtt_fixtures() {
        let c = parse_events(Dialect::Emqx4, &fixture("emqx4", "client_connected")).unwrap();
        let d = parse_events(Dialect::Emqx4, &fixture("emqx4", "client_disconnected")).unwrap();
        match (&c[..], &d[..]) {
            ([BrokerEvent::Connected { session_key: a, .. }], [BrokerEvent::Disconnected { session_key: b, .. }]) => {
                assert_eq!(a, b, "EMQX 4 connect and disconnect name the same session")
            }
            other => panic!("{other:?}"),
        }
        let p = parse_events(Dialect::Emqx4, &fixture("emqx4", "message_publish")).unwrap();
        assert!(
            matches!(&p[..], [BrokerEvent::Publish { client_id, received_at: 1_700_000_011_000, .. }] if client_id == "dev1-b")
        );
        for name in ["message_delivered", "message_acked"] {
            let e = parse_events(Dialect::Emqx4, &fixture("emqx4", name)).unwrap();
            assert!(matches!(&e[..], [BrokerEvent::Delivery { .. }]), "{name}");
        }

        let c = parse_events(Dialect::Rmqtt, &fixture("rmqtt", "client_connected")).unwrap();
        let d = parse_events(Dialect::Rmqtt, &fixture("rmqtt", "client_disconnected")).unwrap();
        match (&c[..], &d[..]) {
            (
                [BrokerEvent::Connected { session_key: a, node, clean_start: Some(true), .. }],
                [BrokerEvent::Disconnected { session_key: b, connected_at: None, .. }],
            ) => {
                assert_eq!(a, b, "RMQTT sessions are keyed by peer address");
                assert_eq!(node.as_deref(), Some("1"));
            }
            other => panic!("{other:?}"),
        }
        let p = parse_events(Dialect::Rmqtt, &fixture("rmqtt", "message_publish")).unwrap();
        assert!(matches!(&p[..], [BrokerEvent::Publish { payload, .. }] if payload == b"{\"fw\":\"1.0\"}"));
        let e = parse_events(Dialect::Rmqtt, &fixture("rmqtt", "message_delivered")).unwrap();
        assert!(matches!(&e[..], [BrokerEvent::Delivery { stage: DeliveryStage::Delivered, .. }]));
    }

    proptest::proptest! {
        /// Arbitrary JSON-ish bodies never panic the parser; failures are validation errors.
        #[test]
        fn parser_never_panics(body in r#"[\[\]{}",:0-9a-z._ -]{0,120}"#, raw in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            for dialect in [Dialect::Emqx5, Dialect::Emqx4, Dialect::Rmqtt] {
                for input in [body.as_bytes(), raw.as_slice()] {
                    if let Err(e) = parse_events(dialect, input) {
                        proptest::prop_assert!(matches!(e, Error::Validation { .. }), "{:?}", e);
                    }
                }
            }
        }

        /// Well-formed events with arbitrary field values parse or name a field; never panic.
        #[test]
        fn event_fields_never_panic(clientid in ".{0,20}", topic in "[a-z_/$+#]{0,30}", ts in proptest::num::i64::ANY,
                                    payload in "[A-Za-z0-9+/=]{0,16}") {
            let body = serde_json::json!([
                {"event": "message.publish", "clientid": clientid, "username": "p/d", "topic": topic,
                 "payload": payload, "qos": 1, "publish_received_at": ts},
                {"event": "client.connected", "clientid": clientid, "connected_at": ts, "peername": topic},
                {"action": "client_disconnected", "clientid": clientid, "ipaddress": topic, "disconnected_at": ts},
            ]);
            for dialect in [Dialect::Emqx5, Dialect::Emqx4, Dialect::Rmqtt] {
                if let Err(e) = parse_events(dialect, body.to_string().as_bytes()) {
                    proptest::prop_assert!(matches!(e, Error::Validation { .. }), "{:?}", e);
                }
            }
        }
    }

    #[test]
    fn malformed_events_name_the_field() {
        let err = |body: &str| match parse_events(Dialect::Emqx5, body.as_bytes()) {
            Err(Error::Validation { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(err("{"), "body");
        assert_eq!(err(r#"{"event":"client.connected","clientid":"c"}"#), "connected_at");
        assert_eq!(
            err(
                r#"[{"event":"session.subscribed"},{"event":"message.publish","clientid":"c","topic":"t","payload":"%%"}]"#
            ),
            "[1].payload"
        );
        assert_eq!(err(r#"[1]"#), "[0].body");
        // Events iothub does not use are acknowledged, not refused (refusal would make the broker retry).
        assert_eq!(parse_events(Dialect::Emqx5, br#"{"event":"session.subscribed"}"#).unwrap(), vec![]);
        assert_eq!(parse_events(Dialect::Rmqtt, br#"{"action":"session_created"}"#).unwrap(), vec![]);
    }
}

//! What travels on the event bus (ports/event_bus.rs): an event's kind and its stored, serialised form.
//! The documents themselves are built in `model::events`.

use serde::Serialize;

/// One event as stored in the outbox and handed to the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusEvent {
    pub kind: EventKind,
    /// The product id: RabbitMQ routing key and SSE filter.
    pub routing_key: String,
    /// Stable id: a replayed or republished event carries the same one.
    pub event_id: String,
    /// JSON document (schema in docs/events.md).
    pub body: Vec<u8>,
}

/// One exchange per kind: `{prefix}.{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    UploadData,
    UpdateStatus,
    DeviceConnection,
    OtaProgress,
    CommandState,
    CmdResp,
    DataRequest,
    Shadow,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::UploadData,
        EventKind::UpdateStatus,
        EventKind::DeviceConnection,
        EventKind::OtaProgress,
        EventKind::CommandState,
        EventKind::CmdResp,
        EventKind::DataRequest,
        EventKind::Shadow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::UploadData => "upload_data",
            EventKind::UpdateStatus => "update_status",
            EventKind::DeviceConnection => "device_connection",
            EventKind::OtaProgress => "ota_progress",
            EventKind::CommandState => "command_state",
            EventKind::CmdResp => "cmd_resp",
            EventKind::DataRequest => "data_request",
            EventKind::Shadow => "shadow",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

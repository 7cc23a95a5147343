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
#[derive(strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "snake_case")]
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
        self.into()
    }

    pub fn parse(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use crate::model::commands::{CommandState, PayloadFormat};
    use crate::model::event_bus::EventKind;
    use crate::model::store::DeviceStatus;

    /// The text stored and published for an enum is its JSON name: one spelling.
    #[test]
    fn stored_names_are_the_json_names() {
        fn same<T: serde::Serialize>(value: T, text: &str) {
            assert_eq!(serde_json::to_value(value).unwrap(), serde_json::json!(text));
        }
        for kind in EventKind::ALL {
            same(kind, kind.as_str());
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        for state in CommandState::ALL {
            same(state, state.as_str());
            assert_eq!(CommandState::parse(state.as_str()), Some(state));
        }
        for format in [PayloadFormat::Plain, PayloadFormat::Base64, PayloadFormat::Json] {
            same(format, format.as_str());
            assert_eq!(PayloadFormat::parse(format.as_str()), Some(format));
        }
        for status in [DeviceStatus::Active, DeviceStatus::Suspended] {
            same(status.clone(), status.as_str());
            assert_eq!(DeviceStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(EventKind::parse("UploadData"), None);
    }
}

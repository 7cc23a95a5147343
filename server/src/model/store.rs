//! Data of the `store` port (ports/store.rs): plain types, no storage or transport.

use crate::ids::{DeviceId, DeviceRef, ProductId};
use crate::model::event_bus::BusEvent;
use crate::secrets::SecretHash;

#[derive(strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "lowercase")]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    Active,
    Suspended,
}

impl DeviceStatus {
    pub fn as_str(&self) -> &'static str {
        self.into()
    }

    pub fn parse(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

#[derive(Debug, Clone)]
pub struct ProductRecord {
    pub id: ProductId,
    pub name: String,
    pub description: String,
    pub created_at: i64,
    pub device_count: i64,
}

#[derive(Debug, Clone)]
pub struct NewDevice {
    pub device: DeviceId,
    pub secret: SecretHash,
}

#[derive(Debug, Clone)]
pub struct DeviceRecord {
    pub product: ProductId,
    pub device: DeviceId,
    pub status: DeviceStatus,
    pub created_at: i64,
    pub updated_at: i64,
    /// Whether any broker session of the device is open.
    pub online: bool,
    /// Broker time of the latest connect or disconnect.
    pub last_seen_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct CredentialRecord {
    pub id: i64,
    pub secret: SecretHash,
    pub created_at: i64,
    /// After this instant the credential no longer authenticates; `None` = until rotated.
    pub expires_at: Option<i64>,
}

/// Everything an authentication decision needs about one device.
#[derive(Debug, Clone)]
pub struct DeviceAuthRecord {
    pub status: DeviceStatus,
    pub credentials: Vec<CredentialRecord>,
}

#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub status: Option<DeviceStatus>,
    pub online: Option<bool>,
    /// Only devices with this tag.
    pub tag: Option<String>,
    /// Return devices whose id sorts after this one (cursor pagination).
    pub after: Option<DeviceId>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub key_hash: String,
    pub scopes: Vec<String>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProductDelete {
    /// Deleted, with the broker usernames of the devices that went with it.
    Deleted(Vec<String>),
    NotFound,
    HasDevices(i64),
}

/// An `upload_data` message to keep, with the event announcing it (emitted only if the message is new).
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub device: DeviceRef,
    pub message_id: String,
    pub data_type: String,
    pub payload: Vec<u8>,
    /// The payload as JSON text, when it is JSON the database can index.
    pub payload_json: Option<String>,
    /// Broker receive time.
    pub sent_at: i64,
    pub event: BusEvent,
}

#[derive(strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "lowercase")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    Status,
    Ota,
}

impl ReportKind {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A JSON report (`update_status`, `update_ota_status`); the newest by `reported_at` is kept.
#[derive(Debug, Clone)]
pub struct NewReport {
    pub device: DeviceRef,
    pub kind: ReportKind,
    pub message_id: String,
    pub payload_json: String,
    pub reported_at: i64,
}

/// One side of a broker session. `session_key` is the same in a session's connect and disconnect events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceChange {
    Connected {
        device: DeviceRef,
        client_id: String,
        session_key: String,
        connected_at: i64,
        ip_address: Option<String>,
        proto_ver: Option<i32>,
        keepalive: i32,
        clean_start: Option<bool>,
        node: Option<String>,
    },
    Disconnected {
        device: DeviceRef,
        client_id: String,
        session_key: String,
        connected_at: Option<i64>,
        disconnected_at: i64,
        reason: String,
        ip_address: Option<String>,
        node: Option<String>,
    },
}

impl PresenceChange {
    pub fn device(&self) -> &DeviceRef {
        match self {
            PresenceChange::Connected { device, .. } | PresenceChange::Disconnected { device, .. } => device,
        }
    }

    /// Broker time of the change.
    pub fn at(&self) -> i64 {
        match self {
            PresenceChange::Connected { connected_at, .. } => *connected_at,
            PresenceChange::Disconnected { disconnected_at, .. } => *disconnected_at,
        }
    }
}

/// What one webhook batch (or several, grouped) asks the store to apply atomically.
#[derive(Debug, Clone, Default)]
pub struct IngestBatch {
    pub messages: Vec<NewMessage>,
    /// At most one per (device, kind): the caller keeps the newest.
    pub reports: Vec<NewReport>,
    /// Sorted by device, so concurrent batches lock devices in the same order.
    pub presence: Vec<PresenceChange>,
    /// Events emitted whatever the store finds (reports: every accepted report is announced).
    pub events: Vec<BusEvent>,
}

impl IngestBatch {
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.reports.is_empty() && self.presence.is_empty() && self.events.is_empty()
    }
}

/// An event committed to the outbox, not yet confirmed by the bus.
#[derive(Debug, Clone)]
pub struct OutboxRecord {
    pub id: i64,
    pub event: BusEvent,
}

#[derive(Debug, Clone, Default)]
pub struct IngestOutcome {
    pub messages_stored: usize,
    pub messages_duplicate: usize,
    pub reports_applied: usize,
    pub presence_applied: usize,
}

/// One broker session of a device, as stored (and as the API and the connection events show it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ConnectionRecord {
    pub client_id: String,
    pub connected_at: Option<i64>,
    pub disconnected_at: Option<i64>,
    /// Broker's disconnect reason (e.g. `normal`, `kicked`, `takenover`, `keepalive_timeout`).
    pub reason: Option<String>,
    pub ip_address: Option<String>,
    pub proto_ver: Option<i32>,
    pub keepalive: Option<i32>,
    pub clean_start: Option<bool>,
    pub node: Option<String>,
}

#[derive(Debug, Clone)]
pub struct MessageRecord {
    pub message_id: String,
    pub data_type: String,
    pub payload: Vec<u8>,
    pub sent_at: i64,
    pub stored_at: i64,
}

#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    pub data_type: Option<String>,
    /// Inclusive lower bound on `sent_at`.
    pub from: Option<i64>,
    /// Exclusive upper bound on `sent_at`.
    pub to: Option<i64>,
    /// Continue after this `(sent_at, message_id)` (cursor pagination, ascending).
    pub after: Option<(i64, String)>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct ReportRecord {
    pub message_id: String,
    pub payload_json: String,
    pub reported_at: i64,
}

/// What a token client was granted at CONNECT, kept for the authz questions that follow on any instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTokenSession {
    /// The token's `acl` claim as JSON (EMQX 5 rule list).
    pub acl_json: String,
    /// Unix seconds: the token's `exp`; the session grants nothing after it.
    pub expires_at: i64,
}

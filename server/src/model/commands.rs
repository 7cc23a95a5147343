//! Data of the `commands` port (ports/commands.rs): plain types, no storage or transport.

use crate::ids::{DeviceRef, ProductId};
use crate::model::event_bus::BusEvent;

/// A command is a `cmd` or an `rpc`: the protocol's own word for it.
pub use iothub_protocol::topics::{CommandKind, Encoding};

/// How the caller gave the payload. `base64` travels as base64 text with the topic's encoding level
/// `base64` (devices decode it, as with the reference IotHub); `plain` and `json` travel as-is.
#[derive(strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "lowercase")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    #[default]
    Plain,
    Base64,
    Json,
}

impl PayloadFormat {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
    pub fn parse(s: &str) -> Option<Self> {
        s.parse().ok()
    }
    /// How the payload travels: the topic's `{encoding}` level.
    pub fn encoding(self) -> Encoding {
        match self {
            PayloadFormat::Base64 => Encoding::Base64,
            PayloadFormat::Plain | PayloadFormat::Json => Encoding::Plain,
        }
    }
}

#[derive(strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "lowercase")]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum CommandState {
    Queued,
    Sent,
    Delivered,
    Replied,
    Expired,
    Failed,
}

impl CommandState {
    pub const ALL: [CommandState; 6] = [
        CommandState::Queued,
        CommandState::Sent,
        CommandState::Delivered,
        CommandState::Replied,
        CommandState::Expired,
        CommandState::Failed,
    ];
    pub fn as_str(self) -> &'static str {
        self.into()
    }
    pub fn parse(s: &str) -> Option<Self> {
        s.parse().ok()
    }
    pub fn is_terminal(self) -> bool {
        matches!(self, CommandState::Replied | CommandState::Expired | CommandState::Failed)
    }
}

/// Resend an unreplied command every `interval_ms` until it was sent `max_attempts` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub interval_ms: i64,
    pub max_attempts: i32,
}

#[derive(Debug, Clone)]
pub struct NewCommand {
    pub device: DeviceRef,
    pub request_id: String,
    pub mode: CommandKind,
    pub name: String,
    pub format: PayloadFormat,
    /// The bytes the device gets (for `base64`, the decoded bytes; they travel re-encoded).
    pub payload: Vec<u8>,
    pub qos: u8,
    pub expires_at: Option<i64>,
    pub idempotency_key: Option<String>,
    pub retry: Option<RetryPolicy>,
    /// Claimed for immediate sending: the row is leased until this time. [`CommandStore::insert_commands`]
    /// applies it only if the device is online when the row is written.
    pub leased_until: Option<i64>,
    /// Refuse the command (instead of queueing it) if the device is offline: RPC.
    pub require_online: bool,
}

impl NewCommand {
    /// The record this command becomes when it is logged at `now` (for its `queued` event, which is
    /// built before the insert so it commits with the row).
    pub fn queued_record(&self, now: i64) -> CommandRecord {
        CommandRecord {
            device: self.device.clone(),
            request_id: self.request_id.clone(),
            mode: self.mode,
            name: self.name.clone(),
            format: self.format,
            payload: Vec::new(),
            qos: self.qos,
            idempotency_key: self.idempotency_key.clone(),
            state: CommandState::Queued,
            created_at: now,
            expires_at: self.expires_at,
            sent_at: None,
            delivered_at: None,
            replied_at: None,
            expired_at: None,
            failed_at: None,
            failure: None,
            attempts: 0,
            max_attempts: self.retry.map_or(1, |r| r.max_attempts),
            retry_interval_ms: self.retry.map(|r| r.interval_ms),
            next_attempt_at: self.leased_until,
            reply: None,
            reply_message_id: None,
            tag: None,
        }
    }
}

/// What became of one command of a [`CommandStore::insert_commands`] batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// Logged; `next_attempt_at` is set when the device was online (claimed for sending at once).
    Created(CommandRecord),
    /// The idempotency key was already used for this device: that command, unchanged.
    Existing(CommandRecord),
    /// Not logged.
    Refused(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownDevice,
    Suspended,
    /// Only for `require_online` commands.
    Offline,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRecord {
    pub device: DeviceRef,
    pub request_id: String,
    pub mode: CommandKind,
    pub name: String,
    pub format: PayloadFormat,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub idempotency_key: Option<String>,
    pub state: CommandState,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub sent_at: Option<i64>,
    pub delivered_at: Option<i64>,
    pub replied_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub failure: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub retry_interval_ms: Option<i64>,
    pub next_attempt_at: Option<i64>,
    pub reply: Option<Vec<u8>>,
    pub reply_message_id: Option<String>,
    /// Set when the command went to every device of a tag (one request id, one row per device).
    pub tag: Option<String>,
}

/// One command to every active device with a tag in a product.
#[derive(Debug, Clone)]
pub struct NewTagCommand {
    pub product: ProductId,
    pub tag: String,
    pub request_id: String,
    pub name: String,
    pub format: PayloadFormat,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub expires_at: Option<i64>,
    /// Rows of online devices are claimed until this time (the tag topic reaches them at once); rows of
    /// offline devices wait `queued` for their device to connect.
    pub leased_until: i64,
}

/// A change to one command. Each applies only if it moves the command forward, so replays and
/// out-of-order reports (a delivery report after the reply) change nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Published (again): queued → sent, attempts + 1, the next retry (or none) scheduled. Applies only
    /// while the dispatcher's claim (`lease`, the row's `next_attempt_at` when claimed) still holds.
    Sent { at: i64, next_attempt_at: Option<i64>, lease: i64 },
    /// Could not be published now: stays as it is, tried again at `next_attempt_at` (`None`: on connect).
    /// Fenced by the claim like `Sent`.
    Postponed { next_attempt_at: Option<i64>, lease: i64 },
    /// The broker reported handing it to the device's session (`message.delivered`; an `acked`, if an
    /// operator forwards it, counts the same).
    Delivered { at: i64 },
    /// The device answered on `cmd_resp` / `rpc_resp` (must match the command's mode).
    Replied { at: i64, mode: CommandKind, payload: Vec<u8>, message_id: String },
    /// Its TTL passed without a reply.
    Expired { at: i64 },
    /// The broker refused it for good (e.g. packet too large).
    Failed { at: i64, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandChange {
    pub device: DeviceRef,
    pub request_id: String,
    pub transition: Transition,
}

/// Builds the events announcing one changed command (its new state, and the reply if there is one).
pub type EventsFor<'a> = &'a (dyn Fn(&CommandRecord, &Transition) -> Vec<BusEvent> + Send + Sync);

/// Whether a write must be on disk before it returns. `Relaxed` (PostgreSQL `synchronous_commit = off`:
/// on disk within ~200 ms, lost only if the database server itself crashes in that window) is for writes
/// whose loss costs a resend, never a command: dispatch bookkeeping (a lost `sent` means the command goes
/// out again with the same request id, which devices drop) and RPC rows (the caller is waiting and gets an
/// error either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Required,
    Relaxed,
}

/// Builds the `queued` event of a freshly logged command.
pub type QueuedEvent<'a> = &'a (dyn Fn(&CommandRecord) -> BusEvent + Send + Sync);

#[derive(Debug, Default)]
pub struct ChangeOutcome {
    /// The commands after every change that took effect (in lock order: by device, then request id).
    pub changed: Vec<(CommandRecord, Transition)>,
}

#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    pub state: Option<CommandState>,
    /// Continue after this `(created_at, request_id)` (ascending).
    pub after: Option<(i64, String)>,
    pub limit: u32,
}

/// Which commands a dispatcher wants to claim.
#[derive(Debug, Clone)]
pub enum ClaimScope {
    /// Queued commands of these (just connected) devices.
    Devices(Vec<DeviceRef>),
    /// Any command whose `next_attempt_at` is due.
    Due,
}

//! What the device receives, as typed events, each with the handle that answers it: a command's
//! `respond`, a desired shadow change's `applied`, an OTA upgrade's progress reporter.

use serde_json::{Map, Value};

pub use iothub_protocol::topics::CommandKind;

use crate::device::Link;
use crate::error::Result;

/// Everything the device hears, in arrival order.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Connected (again). Tag subscriptions, `$tags` and `$shadow` requests have been sent.
    Connected { session_present: bool },
    /// The connection dropped; the SDK reconnects by itself (with backoff).
    Disconnected { reason: String },
    /// A business command or RPC (never `$` commands: those the SDK handles).
    Command(Command),
    /// A message from another device of the product (M2M).
    Message(DeviceMessage),
    /// iothub pushed newer tags; tag subscriptions already follow them.
    TagsChanged { tags: Vec<String>, version: i64 },
    /// The shadow's desired state differs from its reported state: apply it, then call
    /// [`ShadowDesired::applied`] (or report what you did apply with [`crate::Device::report_shadow`]).
    ShadowDesired(ShadowDesired),
    /// A shadow report was refused [`crate::shadow::MAX_CONFLICTS`] times in a row and given up.
    ShadowReportDropped { reported: Map<String, Value> },
    /// An OTA upgrade to run; report progress through [`OtaUpgrade::reporter`].
    OtaUpgrade(OtaUpgrade),
    /// `sync_time` (or a reconnect) measured the clock offset to iothub.
    TimeSynced { offset_ms: i64 },
}

/// A command or RPC from a business system.
#[derive(Debug)]
pub struct Command {
    pub kind: CommandKind,
    pub name: String,
    /// Unique per command; a redelivered command (same id) is not delivered twice.
    pub request_id: String,
    /// Decoded payload (base64 on the wire is decoded here).
    pub payload: Vec<u8>,
    /// Unix seconds (iothub's clock) after which the command must not run.
    pub expires_at: Option<u64>,
    /// Set when the command went to every device of a tag.
    pub tag: Option<String>,
    pub(crate) link: Link,
}

impl Command {
    /// The payload as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_slice(&self.payload)?)
    }

    /// Answers the command (`cmd_resp`) or RPC (`rpc_resp`; the business caller's HTTP request returns this
    /// payload). Returns the reply's message id.
    pub async fn respond(&self, payload: impl Into<Vec<u8>>) -> Result<String> {
        self.link.respond(self.kind, &self.name, &self.request_id, payload.into()).await
    }
}

/// A message from another device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMessage {
    pub sender: String,
    pub message_id: String,
    pub payload: Vec<u8>,
}

/// A change of the shadow's desired state.
#[derive(Debug)]
pub struct ShadowDesired {
    pub version: i64,
    /// The whole desired state.
    pub desired: Map<String, Value>,
    /// Desired keys whose value differs from reported: what to do.
    pub delta: Map<String, Value>,
    /// The shadow document as iothub sent it.
    pub document: Value,
    pub(crate) link: Link,
}

impl ShadowDesired {
    pub(crate) fn from_document(document: Value, link: Link) -> Self {
        let object = |v: Option<&Value>| v.and_then(Value::as_object).cloned().unwrap_or_default();
        Self {
            version: document.get("version").and_then(Value::as_i64).unwrap_or_default(),
            desired: object(document.get("state").and_then(|s| s.get("desired"))),
            delta: object(document.get("delta")),
            document,
            link,
        }
    }

    /// Tells iothub the desired state of this version was applied as a whole: it becomes the reported
    /// state and desired is cleared (`$shadow_updated`). If desired changed meanwhile, a new
    /// [`Event::ShadowDesired`] follows.
    pub async fn applied(&self) -> Result<()> {
        self.link.shadow_applied(self.version).await
    }
}

/// An OTA upgrade pushed by iothub (`$ota_upgrade`).
#[derive(Debug)]
pub struct OtaUpgrade {
    pub url: String,
    pub version: String,
    pub size: u64,
    pub md5: String,
    /// The package type (e.g. `firmware`); the device reports `{type}_version` in its status when done.
    pub kind: String,
    pub rollout_id: Option<String>,
    pub(crate) link: Link,
}

impl OtaUpgrade {
    /// Reports progress on `update_ota_status`.
    pub fn reporter(&self) -> OtaReporter {
        OtaReporter { kind: self.kind.clone(), version: self.version.clone(), link: self.link.clone() }
    }

    /// The status fields that make iothub count the upgrade as succeeded (`{"{type}_version": version}`):
    /// merge them into the status you send with [`crate::Device::update_status`] after installing.
    pub fn success_status(&self) -> Value {
        let mut status = Map::new();
        status.insert(format!("{}_version", self.kind), Value::String(self.version.clone()));
        Value::Object(status)
    }
}

/// Why an upgrade failed (the progress codes of the reference protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtaFailure {
    Download,
    Checksum,
    Install,
    Other,
}

impl OtaFailure {
    pub fn code(self) -> i32 {
        match self {
            OtaFailure::Download => -1,
            OtaFailure::Checksum => -2,
            OtaFailure::Install => -3,
            OtaFailure::Other => -4,
        }
    }
}

/// Publishes an upgrade's progress.
#[derive(Debug, Clone)]
pub struct OtaReporter {
    kind: String,
    version: String,
    link: Link,
}

impl OtaReporter {
    /// Progress in percent (clamped to 0..=100); 100 means installed.
    pub async fn progress(&self, percent: u8) -> Result<String> {
        self.report(i32::from(percent.min(100)), "").await
    }

    /// The upgrade failed.
    pub async fn failed(&self, failure: OtaFailure, desc: &str) -> Result<String> {
        self.report(failure.code(), desc).await
    }

    async fn report(&self, progress: i32, desc: &str) -> Result<String> {
        let body =
            serde_json::json!({ "type": self.kind, "version": self.version, "progress": progress, "desc": desc });
        self.link.ota_status(body).await
    }
}

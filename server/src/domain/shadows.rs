//! Device shadows: the desired state business systems set and the reported state devices confirm.
//!
//! The document is `{state: {desired, reported}, metadata: {desired, reported}, version, timestamp}`;
//! `metadata` holds the last-update time of each top-level key; `delta` (desired keys whose value differs
//! from reported) is computed, never stored. Every change is a compare-and-set on `version`:
//! - business update: the caller names the version it read; a stale one is a 409, never a lost update;
//! - device `$shadow_reported {state: {reported}, version}`: merged if `version` is current;
//! - device `$shadow_updated {state: {desired: null}, version}`: the device applied the desired state of
//!   that version, so it becomes reported and desired is cleared.
//!
//! Merges are deep; `null` deletes a key. After a change iothub pushes `$update_shadow` (the document with
//! its delta) to the device; every device message gets a `$shadow_reply` (`success`, or `version_conflict`
//! with the current document so the device can retry — the reference IotHub's SDK dropped such reports).

use crate::topics::Internal;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::now_ms;
use crate::domain::commands::CommandService;
use crate::error::{Error, Result};
use crate::ids::DeviceRef;
use crate::model::events;
use crate::ports::shadows::ShadowStore;
use crate::ports::store::Store;

/// Largest shadow document accepted (serialised).
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShadowState {
    #[schema(value_type = Object)]
    pub desired: Map<String, Value>,
    #[schema(value_type = Object)]
    pub reported: Map<String, Value>,
}

/// When each top-level key was last set, `{key: {"timestamp": ms}}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShadowMetadata {
    #[schema(value_type = Object)]
    pub desired: Map<String, Value>,
    #[schema(value_type = Object)]
    pub reported: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Shadow {
    pub state: ShadowState,
    pub metadata: ShadowMetadata,
    pub version: i64,
    /// Last change (Unix ms); 0 for a device that never had one.
    pub timestamp: i64,
}

/// Which side changed, for events and replies.
#[derive(strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "snake_case")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowSource {
    Api,
    DeviceReported,
    DeviceUpdated,
}

impl ShadowSource {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Deep merge where `null` deletes; returns the top-level keys touched.
fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) -> Vec<String> {
    fn merge_value(target: &mut Value, patch: &Value) {
        if patch.is_object() && !target.is_object() {
            // A new object is built by the same merge, so the nulls in it delete rather than get stored.
            *target = Value::Object(Map::new());
        }
        match (target, patch) {
            (Value::Object(t), Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_value(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            (t, p) => *t = p.clone(),
        }
    }
    let mut touched = Vec::new();
    for (k, v) in patch {
        touched.push(k.clone());
        if v.is_null() {
            target.remove(k);
        } else {
            merge_value(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
    touched
}

fn stamp(metadata: &mut Map<String, Value>, state: &Map<String, Value>, keys: &[String], now: i64) {
    for k in keys {
        if state.contains_key(k) {
            metadata.insert(k.clone(), serde_json::json!({ "timestamp": now }));
        } else {
            metadata.remove(k);
        }
    }
}

impl Shadow {
    /// Desired keys whose value differs from the reported one.
    pub fn delta(&self) -> Map<String, Value> {
        self.state
            .desired
            .iter()
            .filter(|(k, v)| self.state.reported.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn apply_desired(&mut self, patch: &Map<String, Value>, now: i64) {
        let keys = merge(&mut self.state.desired, patch);
        stamp(&mut self.metadata.desired, &self.state.desired, &keys, now);
        self.bump(now);
    }

    pub fn apply_reported(&mut self, patch: &Map<String, Value>, now: i64) {
        let keys = merge(&mut self.state.reported, patch);
        stamp(&mut self.metadata.reported, &self.state.reported, &keys, now);
        self.bump(now);
    }

    /// The device applied the desired state: it is now reported, and nothing is desired any more.
    pub fn acknowledge_desired(&mut self, now: i64) {
        let desired = std::mem::take(&mut self.state.desired);
        let keys = merge(&mut self.state.reported, &desired);
        stamp(&mut self.metadata.reported, &self.state.reported, &keys, now);
        self.metadata.desired.clear();
        self.bump(now);
    }

    fn bump(&mut self, now: i64) {
        self.version += 1;
        self.timestamp = now;
    }

    /// The document with its delta, as devices and the API see it.
    pub fn view(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("shadows serialise");
        v["delta"] = Value::Object(self.delta());
        v
    }
}

/// A device's shadow message (`upload_data/{p}/{d}/$shadow_reported|$shadow_updated/{id}`).
#[derive(Debug, Deserialize)]
struct DeviceShadowMessage {
    version: i64,
    #[serde(default)]
    state: Option<DeviceShadowState>,
}

#[derive(Debug, Deserialize)]
struct DeviceShadowState {
    #[serde(default)]
    reported: Option<Map<String, Value>>,
}

#[derive(Clone)]
pub struct ShadowService {
    shadows: Arc<dyn ShadowStore>,
    store: Arc<dyn Store>,
    commands: CommandService,
}

impl ShadowService {
    pub fn new(shadows: Arc<dyn ShadowStore>, store: Arc<dyn Store>, commands: CommandService) -> Self {
        Self { shadows, store, commands }
    }

    pub async fn get(&self, device: &DeviceRef) -> Result<Shadow> {
        match self.shadows.get_shadow(device).await? {
            Some((_, text)) => {
                serde_json::from_str(&text).map_err(|e| Error::Internal(anyhow::anyhow!("stored shadow: {e}")))
            }
            None if self.store.get_device(device).await?.is_some() => Ok(Shadow::default()),
            None => Err(Error::not_found("device", device)),
        }
    }

    /// Compare-and-set of a changed document; `Ok(false)` when `expected` is no longer current.
    async fn write(&self, device: &DeviceRef, expected: i64, shadow: &Shadow, source: ShadowSource) -> Result<bool> {
        let text = serde_json::to_string(shadow).expect("shadows serialise");
        // What PostgreSQL's JSONB cannot hold (`\u0000`, numbers beyond its range) is refused, not a 500.
        if crate::model::json::storable_json(text.as_bytes()).is_none() {
            return Err(Error::validation("state", "contains a value the shadow store cannot hold (e.g. \\u0000)"));
        }
        if text.len() > MAX_DOCUMENT_BYTES {
            return Err(Error::validation("state", format!("the shadow would exceed {MAX_DOCUMENT_BYTES} bytes")));
        }
        let event = events::shadow(device, source.as_str(), &shadow.view(), shadow.version);
        self.shadows.put_shadow(device, expected, &text, &event).await
    }

    /// Business update of the desired state, against the version the caller read.
    #[tracing::instrument(skip(self, desired), fields(%device, expected_version), name = "shadows.update_desired")]
    pub async fn update_desired(
        &self,
        device: &DeviceRef,
        expected_version: i64,
        desired: &Map<String, Value>,
    ) -> Result<Shadow> {
        let mut shadow = self.get(device).await?;
        if shadow.version != expected_version {
            return Err(Error::Conflict(format!(
                "shadow version is {}, not {expected_version}: read it again and retry",
                shadow.version
            )));
        }
        shadow.apply_desired(desired, now_ms());
        if !self.write(device, expected_version, &shadow, ShadowSource::Api).await? {
            return Err(Error::Conflict("the shadow changed meanwhile: read it again and retry".into()));
        }
        self.push(device, Internal::UpdateShadow, shadow.view()).await;
        Ok(shadow)
    }

    async fn push(&self, device: &DeviceRef, name: Internal, body: Value) {
        // QoS 0 as in the reference IotHub: the device asks (`$shadow`) whenever it (re)connects.
        if let Err(e) = self.commands.send_internal(device, name, body.to_string().into_bytes(), 0).await {
            tracing::warn!(%device, name = name.as_str(), error = %e, "shadow message not pushed; the device gets it when it asks");
        }
    }

    /// A device's `get/.../$shadow` request.
    pub async fn answer_request(&self, device: &DeviceRef) -> Result<()> {
        let shadow = self.get(device).await?;
        self.commands.send_internal(device, Internal::UpdateShadow, shadow.view().to_string().into_bytes(), 0).await
    }

    /// A device's `$shadow_reported` / `$shadow_updated` message. Answers `$shadow_reply`.
    #[tracing::instrument(skip(self, payload), fields(%device, ?source), name = "shadows.from_device")]
    pub async fn from_device(&self, device: &DeviceRef, source: ShadowSource, payload: &[u8]) -> Result<()> {
        let message: DeviceShadowMessage = serde_json::from_slice(payload)
            .map_err(|e| Error::validation("payload", format!("not a shadow message: {e}")))?;
        let mut shadow = self.get(device).await?;
        let applied = if message.version == shadow.version {
            let expected = shadow.version;
            match source {
                ShadowSource::DeviceReported => {
                    let reported = message.state.and_then(|s| s.reported).unwrap_or_default();
                    shadow.apply_reported(&reported, now_ms());
                }
                _ => shadow.acknowledge_desired(now_ms()),
            }
            self.write(device, expected, &shadow, source).await?
        } else {
            false
        };
        let reply = if applied {
            serde_json::json!({ "status": "success", "version": shadow.version, "timestamp": shadow.timestamp })
        } else {
            // Stale: the device gets the current document and retries against its version.
            let current = self.get(device).await?;
            serde_json::json!({ "status": "version_conflict", "version": current.version, "shadow": current.view() })
        };
        metrics::counter!("iothub_shadow_device_messages_total", "outcome" => if applied { "applied" } else { "conflict" })
            .increment(1);
        self.push(device, Internal::ShadowReply, reply).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn desired_reported_and_delta() {
        let mut s = Shadow::default();
        s.apply_desired(&map(json!({"led": "on", "cfg": {"rate": 5, "mode": "eco"}})), 10);
        assert_eq!((s.version, s.timestamp), (1, 10));
        assert_eq!(s.delta(), map(json!({"led": "on", "cfg": {"rate": 5, "mode": "eco"}})));
        s.apply_reported(&map(json!({"led": "on", "temp": 20})), 11);
        assert_eq!(s.delta(), map(json!({"cfg": {"rate": 5, "mode": "eco"}})));
        assert_eq!(s.metadata.reported["led"], json!({"timestamp": 11}));
        // Deep merge; null deletes (nested and top level).
        let mut fresh = Shadow::default();
        fresh.apply_desired(&map(json!({"cfg": {"mode": null, "rate": 5}})), 1);
        assert_eq!(fresh.state.desired, map(json!({"cfg": {"rate": 5}})), "nulls in a new object delete");
        s.apply_desired(&map(json!({"cfg": {"mode": null, "rate": 6}, "led": null})), 12);
        assert_eq!(s.state.desired, map(json!({"cfg": {"rate": 6}})));
        assert!(!s.metadata.desired.contains_key("led"));
        s.acknowledge_desired(13);
        assert!(s.state.desired.is_empty() && s.delta().is_empty());
        assert_eq!(s.state.reported, map(json!({"led": "on", "temp": 20, "cfg": {"rate": 6}})));
        assert_eq!(s.version, 4);
        let view = s.view();
        assert_eq!(view["delta"], json!({}));
        assert_eq!(serde_json::from_value::<Shadow>(view).unwrap(), s, "the view reads back as the document");
    }
}

//! Device tags: validation, versioned updates pushed to devices (`$set_tags`), and devices' `$tags` requests.
//!
//! A device keeps its tags and version locally (the SDK persists them) and subscribes to
//! `tags/{p}/{tag}/cmd/...` for each tag. When a business system changes a device's tags, iothub bumps the
//! version atomically and pushes `$set_tags {tags, tags_version}`; a device that was offline asks with
//! `get/{p}/{d}/$tags/{msgId} {tags_version}` when it connects and is answered only if it is stale.

use crate::topics::Internal;
use std::sync::Arc;

use crate::clock::now_ms;
use crate::domain::commands::CommandService;
use crate::error::{Error, Result};
use crate::ids::DeviceRef;
use crate::model::tags::DeviceTags;
use crate::ports::tags::TagStore;

/// Most tags one device may carry.
pub const MAX_TAGS: usize = 32;

#[derive(Clone)]
pub struct TagService {
    tags: Arc<dyn TagStore>,
    commands: CommandService,
}

/// Tags are topic levels (`tags/{p}/{tag}/cmd/...`), so they follow the id rules; order and duplicates do not
/// matter.
pub fn normalize_tags(raw: Vec<String>) -> Result<Vec<String>> {
    if raw.len() > MAX_TAGS {
        return Err(Error::validation("tags", format!("at most {MAX_TAGS} tags")));
    }
    for (i, tag) in raw.iter().enumerate() {
        crate::ids::validate_id(tag).map_err(|e| Error::validation(format!("tags[{i}]"), e))?;
    }
    let mut tags = raw;
    tags.sort();
    tags.dedup();
    Ok(tags)
}

fn set_tags_payload(tags: &DeviceTags) -> Vec<u8> {
    serde_json::json!({ "tags": tags.tags, "tags_version": tags.version }).to_string().into_bytes()
}

impl TagService {
    pub fn new(tags: Arc<dyn TagStore>, commands: CommandService) -> Self {
        Self { tags, commands }
    }

    pub async fn get(&self, device: &DeviceRef) -> Result<DeviceTags> {
        self.tags.get_tags(device).await?.ok_or_else(|| Error::not_found("device", device))
    }

    /// Replaces the device's tags (new version) and pushes them to the device if it is online. A device that
    /// misses the push asks on its next connect.
    #[tracing::instrument(skip(self, tags), fields(%device), name = "tags.set")]
    pub async fn set(&self, device: &DeviceRef, tags: Vec<String>) -> Result<DeviceTags> {
        let tags = normalize_tags(tags)?;
        let updated =
            self.tags.set_tags(device, &tags, now_ms()).await?.ok_or_else(|| Error::not_found("device", device))?;
        if updated.online {
            self.push(device, &updated).await;
        }
        Ok(updated)
    }

    async fn push(&self, device: &DeviceRef, tags: &DeviceTags) {
        if let Err(e) = self.commands.send_internal(device, Internal::SetTags, set_tags_payload(tags), 0).await {
            tracing::warn!(%device, error = %e, "$set_tags not pushed; the device gets it when it asks");
        }
    }

    /// A device's `$tags` request: answered only when the device's version differs from iothub's (newer on
    /// the device happens after a restore or a re-created device; iothub's word wins either way).
    pub async fn answer_request(&self, device: &DeviceRef, payload: &[u8]) -> Result<bool> {
        let device_version = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v.get("tags_version").and_then(serde_json::Value::as_i64))
            .unwrap_or(-1);
        let current = self.get(device).await?;
        if current.version != device_version {
            self.commands.send_internal(device, Internal::SetTags, set_tags_payload(&current), 0).await?;
            return Ok(true);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_validated_like_ids_and_normalised() {
        assert_eq!(normalize_tags(vec!["b".into(), "a".into(), "b".into()]).unwrap(), ["a", "b"]);
        match normalize_tags(vec!["ok".into(), "no/slash".into()]) {
            Err(Error::Validation { field, .. }) => assert_eq!(field, "tags[1]"),
            other => panic!("{other:?}"),
        }
        assert!(normalize_tags((0..=MAX_TAGS).map(|i| format!("t{i}")).collect()).is_err());
        assert!(normalize_tags(vec![]).unwrap().is_empty());
    }
}

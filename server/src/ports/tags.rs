//! The device-tag port: which tags a device has, and the version devices compare against.
//!
//! Tags group devices within a product for fan-out commands (`tags/{p}/{tag}/cmd/...`). Every change
//! bumps the device's `tags_version` in the same statement, so concurrent updates never lose an increment
//! and a device that reports its version learns whether it is stale (`$tags` → `$set_tags`).

use crate::error::Result;
use crate::ids::DeviceRef;
use crate::model::tags::*;
use async_trait::async_trait;

#[async_trait]
pub trait TagStore: Send + Sync + 'static {
    /// `None` when the device does not exist.
    async fn get_tags(&self, device: &DeviceRef) -> Result<Option<DeviceTags>>;
    /// Replaces the device's tags and increments its version, atomically. `None` when the device does not
    /// exist.
    async fn set_tags(&self, device: &DeviceRef, tags: &[String], now: i64) -> Result<Option<DeviceTags>>;
}

//! The OTA port: rollouts, their target devices, and what devices report about upgrading.
//!
//! A rollout is created together with one `$ota_upgrade` command per target in the command log (one
//! transaction: see [`CommandStore::create_rollout`](crate::ports::commands::CommandStore::create_rollout)).
//! Progress reports move a target between `pending`, `in_progress`, `installed` (100 %) and `failed` (a
//! negative code), in broker-time order; a status report carrying the new version makes it `succeeded`,
//! which is final.

use crate::error::Result;
use crate::ids::{DeviceRef, ProductId};
use crate::model::ota::*;
use async_trait::async_trait;

#[async_trait]
pub trait OtaStore: Send + Sync + 'static {
    async fn get_rollout(&self, product: &ProductId, id: &str) -> Result<Option<(RolloutRecord, Vec<TargetRecord>)>>;
    /// The device's targets, newest rollout first.
    async fn device_targets(&self, device: &DeviceRef, limit: u32) -> Result<Vec<(RolloutRecord, TargetRecord)>>;
    /// Applies progress reports (older than what a target already has: ignored). Returns how many applied.
    async fn apply_ota_progress(&self, reports: &[OtaProgress]) -> Result<usize>;
    /// Which of these devices have an unfinished target (one query for a whole ingest group, so status
    /// reports of devices without a rollout cost nothing more).
    async fn devices_with_open_targets(&self, devices: &[DeviceRef]) -> Result<Vec<DeviceRef>>;
    /// A status report (JSON text): open targets whose `{type}_version` it equals succeed. Returns how many.
    async fn apply_ota_status(&self, device: &DeviceRef, status_json: &str, at: i64) -> Result<usize>;
}

//! Data of the `ota` port (ports/ota.rs): plain types, no storage or transport.

use crate::ids::{DeviceRef, ProductId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRollout {
    pub id: String,
    pub product: ProductId,
    pub tag: Option<String>,
    pub kind: String,
    pub version: String,
    pub url: String,
    pub size: i64,
    pub md5: String,
}

/// A rollout as stored: what was pushed, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRecord {
    pub rollout: NewRollout,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetRecord {
    pub rollout_id: String,
    pub device: DeviceRef,
    /// `pending`, `in_progress`, `installed`, `failed` or `succeeded`.
    pub state: String,
    pub progress: Option<i32>,
    pub error: Option<String>,
    pub progress_at: Option<i64>,
    pub succeeded_at: Option<i64>,
    pub created_at: i64,
}

/// One `update_ota_status` report: `{"type", "version", "progress", "desc"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtaProgress {
    pub device: DeviceRef,
    pub kind: Option<String>,
    pub version: String,
    /// 0-100, or -1 download, -2 checksum, -3 install, -4 other failure.
    pub progress: i32,
    pub error: Option<String>,
    /// Broker time of the report.
    pub at: i64,
}

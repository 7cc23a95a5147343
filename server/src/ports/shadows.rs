//! The device-shadow port: one versioned JSON document per device, updated by compare-and-set.
//!
//! The domain computes the new document from the one it read; the store writes it only if the version is
//! still the one read (`WHERE version = $expected`), in the same transaction as the `shadow` event. A
//! writer that lost the race gets `None` and reports a conflict instead of overwriting.

use async_trait::async_trait;

use crate::error::Result;
use crate::ids::DeviceRef;
use crate::model::event_bus::BusEvent;

#[async_trait]
pub trait ShadowStore: Send + Sync + 'static {
    /// The stored document (JSON text) with its version; `None` when the device has none yet.
    async fn get_shadow(&self, device: &DeviceRef) -> Result<Option<(i64, String)>>;
    /// Stores `document` as version `expected + 1` if the stored version is `expected` (0: none stored
    /// yet), with its event. `Ok(false)`: the version moved on (conflict). The device must exist.
    async fn put_shadow(&self, device: &DeviceRef, expected: i64, document: &str, event: &BusEvent) -> Result<bool>;
}

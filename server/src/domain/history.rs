//! Read side of what devices reported: sessions, data history, current status, online counts.
//!
//! Every query first resolves the device (or product), so an unknown one is a 404 rather than an empty
//! answer that hides a typo.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ids::{DeviceRef, ProductId};
use crate::model::store::{ConnectionRecord, MessageFilter, MessageRecord, ReportKind, ReportRecord};
use crate::ports::store::Store;

/// Sessions listed with a device, newest first.
pub const CONNECTIONS_SHOWN: u32 = 20;

#[derive(Clone)]
pub struct HistoryService {
    store: Arc<dyn Store>,
}

impl HistoryService {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    async fn require_device(&self, device: &DeviceRef) -> Result<()> {
        self.store.get_device(device).await?.map(|_| ()).ok_or_else(|| Error::not_found("device", device))
    }

    pub async fn connections(&self, device: &DeviceRef) -> Result<Vec<ConnectionRecord>> {
        self.store.list_connections(device, CONNECTIONS_SHOWN).await
    }

    pub async fn online_count(&self, product: &ProductId) -> Result<i64> {
        self.store.count_online(product).await
    }

    pub async fn messages(&self, device: &DeviceRef, filter: &MessageFilter) -> Result<Vec<MessageRecord>> {
        self.require_device(device).await?;
        self.store.list_messages(device, filter).await
    }

    pub async fn message(&self, device: &DeviceRef, message_id: &str) -> Result<MessageRecord> {
        self.require_device(device).await?;
        self.store.get_message(device, message_id).await?.ok_or_else(|| Error::not_found("message", message_id))
    }

    pub async fn report(&self, device: &DeviceRef, kind: ReportKind) -> Result<ReportRecord> {
        self.require_device(device).await?;
        self.store.get_report(device, kind).await?.ok_or_else(|| Error::not_found("status of device", device))
    }
}

//! The persistence ports of the device registry and of what devices report: [`RegistryStore`] (products,
//! devices, device credentials, API keys, token grants) and [`TelemetryStore`] (ingest of messages, status
//! reports and presence, and their history). [`Store`] is both plus the [`OutboxStore`], as the services
//! that need several hold it.
//!
//! Implemented for PostgreSQL (production) and SQLite (embedded). Every multi-row change is one
//! transaction, so a failed bulk registration writes nothing and an ingested batch is stored with its
//! outbox events or not at all. Times are Unix milliseconds.

use crate::error::Result;
use crate::ids::{DeviceRef, ProductId};
use crate::model::store::*;
use crate::ports::outbox::OutboxStore;
use crate::secrets::SecretHash;
use async_trait::async_trait;

/// The registry, telemetry and outbox of one database.
pub trait Store: RegistryStore + TelemetryStore + OutboxStore {}

impl<T: RegistryStore + TelemetryStore + OutboxStore> Store for T {}

#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Cheap round trip for `/readyz`.
    async fn ping(&self) -> Result<()>;
    fn backend(&self) -> &'static str;

    /// `false` when the id is taken.
    async fn create_product(&self, id: &ProductId, name: &str, description: &str, now: i64) -> Result<bool>;
    async fn get_product(&self, id: &ProductId) -> Result<Option<ProductRecord>>;
    async fn list_products(&self, after: Option<&ProductId>, limit: u32) -> Result<Vec<ProductRecord>>;
    /// Deletes the product; with `force` its devices and their credentials go too, in one transaction.
    async fn delete_product(&self, id: &ProductId, force: bool) -> Result<ProductDelete>;

    /// Inserts all devices (each with its first credential) or none. `Err(Conflict)` names a taken id.
    async fn insert_devices(&self, product: &ProductId, devices: &[NewDevice], now: i64) -> Result<()>;
    async fn get_device(&self, device: &DeviceRef) -> Result<Option<DeviceRecord>>;
    async fn list_devices(&self, product: &ProductId, filter: &DeviceFilter) -> Result<Vec<DeviceRecord>>;
    /// `false` when the device does not exist.
    async fn set_device_status(&self, device: &DeviceRef, status: DeviceStatus, now: i64) -> Result<bool>;
    async fn delete_device(&self, device: &DeviceRef) -> Result<bool>;

    async fn device_auth(&self, device: &DeviceRef) -> Result<Option<DeviceAuthRecord>>;
    /// Which of `devices` exist and are active now (one round trip).
    async fn active_devices(&self, devices: &[DeviceRef]) -> Result<std::collections::HashSet<DeviceRef>>;
    /// Adds `secret` as the newest credential; existing unexpired ones expire at `old_expires_at`
    /// (at most), and credentials already expired are purged. `false` when the device does not exist.
    async fn rotate_credential(
        &self,
        device: &DeviceRef,
        secret: &SecretHash,
        old_expires_at: i64,
        now: i64,
    ) -> Result<bool>;
    async fn list_credentials(&self, device: &DeviceRef) -> Result<Vec<CredentialRecord>>;

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<()>;
    async fn get_api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>>;
    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>>;
    async fn revoke_api_key(&self, id: &str, now: i64) -> Result<bool>;
    async fn count_api_keys(&self) -> Result<i64>;

    /// Records (or replaces) the grant of the token client `(client_id, username)`, and forgets sessions that
    /// expired before `now` (Unix seconds).
    async fn put_token_session(
        &self,
        client_id: &str,
        username: &str,
        session: &StoredTokenSession,
        now: i64,
    ) -> Result<()>;
    async fn get_token_session(&self, client_id: &str, username: &str) -> Result<Option<StoredTokenSession>>;
}

#[async_trait]
pub trait TelemetryStore: Send + Sync + 'static {
    /// Applies a batch in one transaction, writing an outbox row for every effective change (handed to
    /// the relay once committed). Replays are harmless: a known message id stores nothing and emits
    /// nothing; a presence fact already known changes nothing.
    async fn ingest(&self, batch: &IngestBatch) -> Result<IngestOutcome>;

    /// Sessions of a device, newest first.
    async fn list_connections(&self, device: &DeviceRef, limit: u32) -> Result<Vec<ConnectionRecord>>;
    async fn count_online(&self, product: &ProductId) -> Result<i64>;
    async fn list_messages(&self, device: &DeviceRef, filter: &MessageFilter) -> Result<Vec<MessageRecord>>;
    async fn get_message(&self, device: &DeviceRef, message_id: &str) -> Result<Option<MessageRecord>>;
    async fn get_report(&self, device: &DeviceRef, kind: ReportKind) -> Result<Option<ReportRecord>>;
}

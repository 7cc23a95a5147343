//! The persistence port: products, devices, device credentials and API keys.
//!
//! Implemented for PostgreSQL (production) and SQLite (embedded). Every multi-row change is one
//! transaction, so a failed bulk registration writes nothing. Times are Unix milliseconds.

use async_trait::async_trait;

use crate::error::Result;
use crate::ids::{DeviceId, DeviceRef, ProductId};
use crate::secrets::SecretHash;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    Active,
    Suspended,
}

impl DeviceStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            DeviceStatus::Active => "active",
            DeviceStatus::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(DeviceStatus::Active),
            "suspended" => Some(DeviceStatus::Suspended),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProductRecord {
    pub id: ProductId,
    pub name: String,
    pub description: String,
    pub created_at: i64,
    pub device_count: i64,
}

#[derive(Debug, Clone)]
pub struct NewDevice {
    pub device: DeviceId,
    pub secret: SecretHash,
}

#[derive(Debug, Clone)]
pub struct DeviceRecord {
    pub product: ProductId,
    pub device: DeviceId,
    pub status: DeviceStatus,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone)]
pub struct CredentialRecord {
    pub id: i64,
    pub secret: SecretHash,
    pub created_at: i64,
    /// After this instant the credential no longer authenticates; `None` = until rotated.
    pub expires_at: Option<i64>,
}

/// Everything an authentication decision needs about one device.
#[derive(Debug, Clone)]
pub struct DeviceAuthRecord {
    pub status: DeviceStatus,
    pub credentials: Vec<CredentialRecord>,
}

#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub status: Option<DeviceStatus>,
    /// Return devices whose id sorts after this one (cursor pagination).
    pub after: Option<DeviceId>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub key_hash: String,
    pub scopes: Vec<String>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProductDelete {
    /// Deleted, with the broker usernames of the devices that went with it.
    Deleted(Vec<String>),
    NotFound,
    HasDevices(i64),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
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
}

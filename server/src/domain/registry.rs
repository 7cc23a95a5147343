//! The device registry: products, devices, their lifecycle and their secrets.
//!
//! Owns the invariants around credentials: a secret is generated here, hashed here, returned once to the
//! caller, and never stored or logged in clear. Suspending or deleting a device invalidates its cached auth
//! record at once and kicks its live connections through the broker ([`KickService`]: a durable intent,
//! retried until the broker confirms it), so the change bites immediately rather than at the device's next
//! reconnect.

use std::sync::Arc;

use crate::clock::now_ms;
use crate::domain::access::AccessService;
use crate::domain::kicks::{KickOutcome, KickService};
use crate::error::{Error, Result};
use crate::ids::{DeviceId, DeviceRef, ProductId};
use crate::model::store::*;
use crate::ports::store::*;
use crate::secrets::{new_device_secret, PlainSecret};

/// Largest bulk registration accepted in one request.
pub const MAX_BULK: usize = 10_000;

pub struct RegistryService {
    store: Arc<dyn Store>,
    kicks: KickService,
    access: Arc<AccessService>,
    default_overlap_secs: u64,
}

/// A device as just created: the only time its secret is visible.
#[derive(Debug)]
pub struct IssuedDevice {
    pub device: DeviceRef,
    pub secret: PlainSecret,
}

impl RegistryService {
    pub fn new(
        store: Arc<dyn Store>,
        kicks: KickService,
        access: Arc<AccessService>,
        default_overlap_secs: u64,
    ) -> Self {
        Self { store, kicks, access, default_overlap_secs }
    }

    pub async fn create_product(&self, id: ProductId, name: &str, description: &str) -> Result<ProductRecord> {
        if name.chars().count() > 200 {
            return Err(Error::validation("name", "must be at most 200 characters"));
        }
        if description.chars().count() > 2000 {
            return Err(Error::validation("description", "must be at most 2000 characters"));
        }
        if !self.store.create_product(&id, name, description, now_ms()).await? {
            return Err(Error::Conflict(format!("product `{id}` already exists")));
        }
        self.get_product(&id).await
    }

    pub async fn get_product(&self, id: &ProductId) -> Result<ProductRecord> {
        self.store.get_product(id).await?.ok_or_else(|| Error::not_found("product", id))
    }

    pub async fn list_products(&self, after: Option<&ProductId>, limit: u32) -> Result<Vec<ProductRecord>> {
        self.store.list_products(after, limit).await
    }

    /// Deletes a product. With `force`, its devices are deleted too, and their live connections are kicked in
    /// the background (a large product would outlast the request); each kick is a durable intent.
    pub async fn delete_product(&self, id: &ProductId, force: bool) -> Result<()> {
        match self.store.delete_product(id, force).await? {
            ProductDelete::NotFound => Err(Error::not_found("product", id)),
            ProductDelete::HasDevices(n) => {
                Err(Error::Conflict(format!("product `{id}` still has {n} devices; delete them or pass force=true")))
            }
            ProductDelete::Deleted(usernames) => {
                for username in &usernames {
                    if let Some(device) = DeviceRef::from_broker_username(username) {
                        self.access.forget_device(&device).await;
                    }
                }
                let kicks = self.kicks.clone();
                tokio::spawn(async move {
                    for username in usernames {
                        if let Err(e) = kicks.request(&username).await {
                            tracing::error!(%username, error = %e, "could not record the kick of a deleted product's device");
                        }
                    }
                });
                Ok(())
            }
        }
    }

    /// Registers devices (given ids, or generated ones) atomically: all or none.
    pub async fn register(&self, product: &ProductId, ids: Vec<Option<DeviceId>>) -> Result<Vec<IssuedDevice>> {
        if ids.is_empty() {
            return Err(Error::validation("devices", "at least one device is required"));
        }
        if ids.len() > MAX_BULK {
            return Err(Error::validation("devices", format!("at most {MAX_BULK} devices per request")));
        }
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            if let Some(id) = id {
                if !seen.insert(id.clone()) {
                    return Err(Error::validation(
                        format!("devices[{i}].device_id"),
                        format!("`{id}` appears twice in this request"),
                    ));
                }
            }
        }
        let mut new = Vec::with_capacity(ids.len());
        let mut issued = Vec::with_capacity(ids.len());
        for id in ids {
            let device = id.unwrap_or_else(|| {
                DeviceId::parse(uuid::Uuid::new_v4().simple().to_string()).expect("uuid is a valid id")
            });
            let (plain, hash) = new_device_secret();
            new.push(NewDevice { device: device.clone(), secret: hash });
            issued.push(IssuedDevice { device: DeviceRef::new(product.clone(), device), secret: plain });
        }
        self.store.insert_devices(product, &new, now_ms()).await?;
        for d in &issued {
            // A cached "unknown device" answer must not outlive the registration.
            self.access.forget_device(&d.device).await;
        }
        Ok(issued)
    }

    pub async fn get_device(&self, device: &DeviceRef) -> Result<(DeviceRecord, Vec<CredentialRecord>)> {
        let record = self.store.get_device(device).await?.ok_or_else(|| Error::not_found("device", device))?;
        let credentials = self.store.list_credentials(device).await?;
        Ok((record, credentials))
    }

    pub async fn list_devices(&self, product: &ProductId, filter: &DeviceFilter) -> Result<Vec<DeviceRecord>> {
        // Distinguish "no such product" from "no devices".
        self.get_product(product).await?;
        self.store.list_devices(product, filter).await
    }

    /// Sets the status; suspending kicks live connections (resuming cancels a kick still pending). Returns
    /// the device and what became of the kick.
    pub async fn set_status(&self, device: &DeviceRef, status: DeviceStatus) -> Result<(DeviceRecord, KickOutcome)> {
        if !self.store.set_device_status(device, status.clone(), now_ms()).await? {
            return Err(Error::not_found("device", device));
        }
        self.access.forget_device(device).await;
        let kicked = match status {
            DeviceStatus::Suspended => self.kicks.request(&device.broker_username()).await?,
            DeviceStatus::Active => {
                self.kicks.cancel(&device.broker_username()).await?;
                KickOutcome::Kicked(0)
            }
        };
        let record = self.store.get_device(device).await?.ok_or_else(|| Error::not_found("device", device))?;
        Ok((record, kicked))
    }

    /// Deletes a device and kicks its connections. Deleting an already-deleted device still kicks; it answers
    /// 404 unless it found something to kick (or the kick is pending).
    pub async fn delete_device(&self, device: &DeviceRef) -> Result<KickOutcome> {
        let existed = self.store.delete_device(device).await?;
        self.access.forget_device(device).await;
        let kicked = self.kicks.request(&device.broker_username()).await?;
        if !existed && kicked == KickOutcome::Kicked(0) {
            return Err(Error::not_found("device", device));
        }
        Ok(kicked)
    }

    /// Issues a new secret. The previous ones keep working for `overlap_secs` (default from config). With no
    /// overlap the rotation answers a leak: live connections (made with the old secret) are kicked too.
    /// Returns the secret, when the old ones expire, and how many connections were kicked.
    pub async fn rotate_secret(
        &self,
        device: &DeviceRef,
        overlap_secs: Option<u64>,
    ) -> Result<(PlainSecret, i64, std::result::Result<KickOutcome, String>)> {
        let overlap = overlap_secs.unwrap_or(self.default_overlap_secs);
        if overlap > 30 * 86_400 {
            return Err(Error::validation("overlap_seconds", "must be at most 2592000 (30 days)"));
        }
        let now = now_ms();
        let old_expires_at = now + (overlap as i64) * 1000;
        let (plain, hash) = new_device_secret();
        if !self.store.rotate_credential(device, &hash, old_expires_at, now).await? {
            return Err(Error::not_found("device", device));
        }
        self.access.forget_device(device).await;
        // The new secret is already the only valid one: it is returned whatever happens to the kick (which
        // stays pending and is retried when the broker does not confirm it; an error here means not even
        // the intent could be stored).
        let kicked = if overlap == 0 {
            self.kicks.request(&device.broker_username()).await.map_err(|e| e.to_string())
        } else {
            Ok(KickOutcome::Kicked(0))
        };
        Ok((plain, old_expires_at, kicked))
    }
}

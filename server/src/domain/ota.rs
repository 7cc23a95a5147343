//! OTA upgrades: pushing a package to a device or a tag, and following each device to success.
//!
//! A rollout is logged with one `$ota_upgrade` command per target device in the command log (one
//! transaction), so offline devices get it when they connect, within the TTL, exactly like any command.
//! Devices report progress on `update_ota_status/{p}/{d}/{msgId}` with
//! `{"type", "version", "progress", "desc"}` (0-100; -1 download, -2 checksum, -3 install, -4 other failure),
//! which also goes to `iothub.events.ota_progress`. Reaching 100 % only means *installed*: a target
//! *succeeds* when the device's own status report says it runs the new version (`{type}_version`).

use crate::topics::Internal;
use std::sync::Arc;

use crate::clock::now_ms;
use crate::domain::commands::CommandService;
use crate::error::{Error, Result};
use crate::ids::{DeviceId, DeviceRef, ProductId};
use crate::model::commands::{CommandKind, NewCommand, PayloadFormat};
use crate::model::events;
use crate::model::ota::{NewRollout, OtaProgress, RolloutRecord, TargetRecord};
use crate::model::store::{DeviceFilter, DeviceStatus};
use crate::ports::commands::CommandStore;
use crate::ports::ota::OtaStore;
use crate::ports::store::Store;

/// How long an upgrade waits for an offline device by default.
pub const DEFAULT_TTL_MS: i64 = 7 * 24 * 3600 * 1000;
/// Most devices one tag rollout may target.
pub const MAX_TARGETS: usize = 100_000;

#[derive(Debug, Clone)]
pub struct OtaPackage {
    pub kind: String,
    pub version: String,
    pub url: String,
    pub size: i64,
    pub md5: String,
}

pub enum OtaTarget {
    Device(DeviceId),
    Tag(String),
}

impl OtaPackage {
    fn validate(&self) -> Result<()> {
        crate::ids::validate_id(&self.kind).map_err(|e| Error::validation("type", e))?;
        if self.version.is_empty() || self.version.len() > 64 || !self.version.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::validation("version", "must be 1-64 printable ASCII characters"));
        }
        let url = url::Url::parse(&self.url).map_err(|e| Error::validation("url", e))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::validation("url", "must be an http or https URL"));
        }
        if self.size <= 0 {
            return Err(Error::validation("size", "must be positive"));
        }
        if self.md5.len() != 32 || !self.md5.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::validation("md5", "must be 32 hex digits"));
        }
        Ok(())
    }
}

/// Reads an `update_ota_status` report; `None` when it lacks a version or a numeric progress.
pub fn parse_progress(device: &DeviceRef, report: &serde_json::Value, at: i64) -> Option<OtaProgress> {
    let version = report.get("version").and_then(|v| v.as_str())?.to_string();
    let progress = i32::try_from(report.get("progress")?.as_i64()?).ok().filter(|p| (-4..=100).contains(p))?;
    let desc = report.get("desc").and_then(|d| d.as_str());
    let error = match progress {
        -1 => Some("download"),
        -2 => Some("checksum"),
        -3 => Some("install"),
        -4 => Some("other"),
        _ => None,
    }
    .map(|kind| match desc {
        Some(d) => format!("{kind}: {d}"),
        None => kind.to_string(),
    });
    Some(OtaProgress {
        device: device.clone(),
        kind: report.get("type").and_then(|t| t.as_str()).map(str::to_string),
        version,
        progress,
        error,
        at,
    })
}

#[derive(Clone)]
pub struct OtaService {
    ota: Arc<dyn OtaStore>,
    commands_log: Arc<dyn CommandStore>,
    store: Arc<dyn Store>,
    commands: CommandService,
}

impl OtaService {
    pub fn new(
        ota: Arc<dyn OtaStore>,
        commands_log: Arc<dyn CommandStore>,
        store: Arc<dyn Store>,
        commands: CommandService,
    ) -> Self {
        Self { ota, commands_log, store, commands }
    }

    async fn targets(&self, product: &ProductId, target: &OtaTarget) -> Result<Vec<DeviceId>> {
        match target {
            OtaTarget::Device(device) => {
                let d = DeviceRef::new(product.clone(), device.clone());
                match self.store.get_device(&d).await? {
                    Some(rec) if rec.status == DeviceStatus::Active => Ok(vec![device.clone()]),
                    Some(_) => Err(Error::Conflict(format!("device `{d}` is suspended"))),
                    None => Err(Error::not_found("device", d)),
                }
            }
            OtaTarget::Tag(tag) => {
                crate::ids::validate_id(tag).map_err(|e| Error::validation("tag", e))?;
                if self.store.get_product(product).await?.is_none() {
                    return Err(Error::not_found("product", product));
                }
                let mut devices = Vec::new();
                let mut after = None;
                loop {
                    let filter = DeviceFilter {
                        status: Some(DeviceStatus::Active),
                        tag: Some(tag.clone()),
                        after: after.clone(),
                        limit: 1000,
                        ..Default::default()
                    };
                    let page = self.store.list_devices(product, &filter).await?;
                    let full = page.len() == 1000;
                    after = page.last().map(|d| d.device.clone());
                    devices.extend(page.into_iter().map(|d| d.device));
                    if devices.len() > MAX_TARGETS {
                        return Err(Error::validation("tag", format!("targets more than {MAX_TARGETS} devices")));
                    }
                    if !full {
                        break;
                    }
                }
                Ok(devices)
            }
        }
    }

    /// Logs the rollout and an `$ota_upgrade` command per target; online devices get it at once.
    #[tracing::instrument(skip_all, fields(%product, version = %package.version), name = "ota.push")]
    pub async fn push(
        &self,
        product: &ProductId,
        target: OtaTarget,
        package: OtaPackage,
        ttl_ms: Option<i64>,
    ) -> Result<(RolloutRecord, Vec<TargetRecord>)> {
        package.validate()?;
        let ttl = ttl_ms.unwrap_or(DEFAULT_TTL_MS);
        if !(1_000..=crate::domain::commands::MAX_TTL_MS).contains(&ttl) {
            return Err(Error::validation("ttl_secs", "must be between 1 and 2592000"));
        }
        let devices = self.targets(product, &target).await?;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let now = now_ms();
        // The reference IotHub's `$ota_upgrade` body, plus the rollout id for the device's logs.
        let payload = serde_json::json!({
            "url": package.url, "version": package.version, "size": package.size, "md5": package.md5,
            "type": package.kind, "rollout_id": id,
        })
        .to_string()
        .into_bytes();
        let commands: Vec<NewCommand> = devices
            .iter()
            .map(|device| NewCommand {
                device: DeviceRef::new(product.clone(), device.clone()),
                request_id: id.clone(),
                mode: CommandKind::Cmd,
                name: Internal::OtaUpgrade.as_str().into(),
                format: PayloadFormat::Json,
                payload: payload.clone(),
                qos: 1,
                expires_at: Some(now + ttl),
                idempotency_key: None,
                retry: None,
                leased_until: None,
                require_online: false,
            })
            .collect();
        let rollout = NewRollout {
            id: id.clone(),
            product: product.clone(),
            tag: match &target {
                OtaTarget::Tag(t) => Some(t.clone()),
                OtaTarget::Device(_) => None,
            },
            kind: package.kind,
            version: package.version,
            url: package.url,
            size: package.size,
            md5: package.md5,
        };
        let logged = self.commands_log.create_rollout(&rollout, &commands, &events::command_state, now).await?;
        metrics::counter!("iothub_ota_targets_total").increment(logged.len() as u64);
        // Online targets get it now; the others when they connect (or from the scheduler).
        self.commands.devices_connected(logged.into_iter().map(|c| c.device).collect());
        self.rollout(product, &id).await
    }

    pub async fn rollout(&self, product: &ProductId, id: &str) -> Result<(RolloutRecord, Vec<TargetRecord>)> {
        self.ota.get_rollout(product, id).await?.ok_or_else(|| Error::not_found("rollout", id))
    }

    pub async fn device(&self, device: &DeviceRef) -> Result<Vec<(RolloutRecord, TargetRecord)>> {
        if self.store.get_device(device).await?.is_none() {
            return Err(Error::not_found("device", device));
        }
        self.ota.device_targets(device, 20).await
    }

    /// What committed reports mean for rollouts: progress moves targets, a status with the new version
    /// completes them. Idempotent, so a broker retry may apply it again.
    pub async fn after_reports(&self, progress: &[OtaProgress], statuses: &[(DeviceRef, String, i64)]) -> Result<()> {
        if !progress.is_empty() {
            let applied = self.ota.apply_ota_progress(progress).await?;
            metrics::counter!("iothub_ota_progress_applied_total").increment(applied as u64);
        }
        if statuses.is_empty() {
            return Ok(());
        }
        // Status reports are frequent and rollouts rare: one query finds the devices that have an
        // unfinished upgrade, and only their statuses are checked. Every one of them, not just the newest:
        // two reports of one millisecond have no order, and a device that reported the new version did run
        // it (success is final).
        let unique: std::collections::HashSet<&DeviceRef> = statuses.iter().map(|(d, _, _)| d).collect();
        let devices: Vec<DeviceRef> = unique.into_iter().cloned().collect();
        let open: std::collections::HashSet<DeviceRef> =
            self.ota.devices_with_open_targets(&devices).await?.into_iter().collect();
        for (device, json, at) in statuses.iter().filter(|(d, _, _)| open.contains(d)) {
            let succeeded = self.ota.apply_ota_status(device, json, *at).await?;
            metrics::counter!("iothub_ota_succeeded_total").increment(succeeded as u64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dev() -> DeviceRef {
        DeviceRef::new(ProductId::parse("p").unwrap(), DeviceId::parse("d").unwrap())
    }

    #[test]
    fn progress_reports_are_read_with_their_failure_kind() {
        let p = parse_progress(&dev(), &json!({"type": "firmware", "version": "1.2", "progress": 40}), 7).unwrap();
        assert_eq!(
            (p.kind.as_deref(), p.version.as_str(), p.progress, p.error, p.at),
            (Some("firmware"), "1.2", 40, None, 7)
        );
        let failed =
            parse_progress(&dev(), &json!({"version": "1.2", "progress": -2, "desc": "md5 mismatch"}), 8).unwrap();
        assert_eq!(failed.error.as_deref(), Some("checksum: md5 mismatch"));
        for bad in
            [json!({"progress": 5}), json!({"version": "1", "progress": 101}), json!({"version": "1", "progress": "x"})]
        {
            assert_eq!(parse_progress(&dev(), &bad, 1), None, "{bad}");
        }
    }

    #[test]
    fn packages_are_validated_naming_the_field() {
        let ok = OtaPackage {
            kind: "firmware".into(),
            version: "1.2.0".into(),
            url: "https://updates.example.com/fw-1.2.0.bin".into(),
            size: 1024,
            md5: "d41d8cd98f00b204e9800998ecf8427e".into(),
        };
        assert!(ok.validate().is_ok());
        let field = |p: OtaPackage| match p.validate() {
            Err(Error::Validation { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(OtaPackage { url: "ftp://x/y".into(), ..ok.clone() }), "url");
        assert_eq!(field(OtaPackage { md5: "xyz".into(), ..ok.clone() }), "md5");
        assert_eq!(field(OtaPackage { size: 0, ..ok.clone() }), "size");
        assert_eq!(field(OtaPackage { kind: "a/b".into(), ..ok.clone() }), "type");
        assert_eq!(field(OtaPackage { version: "".into(), ..ok.clone() }), "version");
    }
}

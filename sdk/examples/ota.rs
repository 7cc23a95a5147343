//! OTA: receives an upgrade, reports progress (or a failure) and the new version once installed.
//! Try: `curl -X POST .../devices/{d}/ota -d '{"url":"https://…","version":"1.1.0","size":1,"md5":"…","type":"firmware"}'`.
#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use iothub_device::{Device, Event, OtaFailure};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (device, mut events) = Device::connect(common::config_from_env()?).await?;
    while let Some(event) = events.next().await {
        let Event::OtaUpgrade(upgrade) = event else { continue };
        println!("upgrade to {} {} from {}", upgrade.kind, upgrade.version, upgrade.url);
        let reporter = upgrade.reporter();
        if upgrade.md5.len() != 32 {
            reporter.failed(OtaFailure::Checksum, "md5 is not 32 hex digits").await?;
            continue;
        }
        for percent in [0, 25, 50, 75, 100] {
            reporter.progress(percent).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // iothub counts the upgrade as succeeded when the status carries the new version.
        device.update_status(&upgrade.success_status()).await?;
    }
    Ok(())
}

//! Clock sync over `$ntp`: measures the offset to iothub and shows the corrected clock.
#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use iothub_device::Device;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (device, _events) = Device::connect(common::config_from_env()?).await?;
    let offset = device.sync_time(Duration::from_secs(5)).await?;
    let clock = device.clock();
    println!("offset to iothub: {offset} ms; local {} ms, corrected {} ms", clock.local_ms(), clock.now_ms());
    device.disconnect().await?;
    Ok(())
}

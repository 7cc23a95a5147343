//! Data and status: a reading every 2 s and a status document at start.
#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use iothub_device::Device;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (device, _events) = Device::connect(common::config_from_env()?).await?;
    device.update_status(&json!({"firmware_version": "1.0.0", "battery": 97})).await?;
    for n in 0..5 {
        let id = device.upload_data("temperature", json!({"celsius": 20.0 + n as f64}).to_string()).await?;
        println!("sent reading {n} as message {id}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    device.disconnect().await?;
    Ok(())
}

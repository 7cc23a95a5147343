//! Device to device: `IOTHUB_PEER=other-device` sends it a greeting; every message received is printed.
#[path = "common/mod.rs"]
mod common;

use iothub_device::{Device, Event};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (device, mut events) = Device::connect(common::config_from_env()?).await?;
    if let Ok(peer) = std::env::var("IOTHUB_PEER") {
        device.send_to_device(&peer, format!("hello from {}", device.device_id())).await?;
    }
    while let Some(event) = events.next().await {
        if let Event::Message(message) = event {
            println!("{} says {}", message.sender, String::from_utf8_lossy(&message.payload));
        }
    }
    Ok(())
}

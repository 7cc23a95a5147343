//! Data requests: asks business systems for `config`; they answer with a command (name of their choice).
#[path = "common/mod.rs"]
mod common;

use iothub_device::{Device, Event};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (device, mut events) = Device::connect(common::config_from_env()?).await?;
    let id = device.request_data("config", r#"{"have_version": 3}"#).await?;
    println!("asked for config (message {id}); consumers see it on iothub.events.data_request");
    while let Some(event) = events.next().await {
        if let Event::Command(command) = event {
            println!("answer: {} {}", command.name, String::from_utf8_lossy(&command.payload));
            command.respond("thanks").await?;
            break;
        }
    }
    device.disconnect().await?;
    Ok(())
}

//! Device shadow: reports state, applies desired changes and acknowledges them.
//! Try: `curl -X PUT .../devices/{d}/shadow -d '{"state":{"desired":{"led":"on"}},"version":N}'`.
#[path = "common/mod.rs"]
mod common;

use iothub_device::{Device, Event};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (device, mut events) = Device::connect(common::config_from_env()?).await?;
    device.report_shadow(json!({"led": "off", "temp": 21})).await?;
    while let Some(event) = events.next().await {
        match event {
            Event::ShadowDesired(desired) => {
                println!("version {}: apply {:?}", desired.version, desired.delta);
                // ...drive the hardware here, then:
                desired.applied().await?;
            }
            Event::ShadowReportDropped { reported } => eprintln!("report given up: {reported:?}"),
            _ => {}
        }
    }
    Ok(())
}

//! Shared by the examples: the device's identity comes from the environment, as it would from a
//! provisioning file on a real device.
//!
//! ```sh
//! IOTHUB_PRODUCT=demo IOTHUB_DEVICE=unit-1 IOTHUB_SECRET=... IOTHUB_MQTT=127.0.0.1:1883 \
//!   cargo run -p iothub-device --example telemetry
//! ```

use iothub_device::DeviceConfig;

pub fn config_from_env() -> Result<DeviceConfig, String> {
    let var = |name: &str| std::env::var(name).map_err(|_| format!("set {name} (see sdk/examples/common/mod.rs)"));
    let mqtt = std::env::var("IOTHUB_MQTT").unwrap_or_else(|_| "127.0.0.1:1883".into());
    let (host, port) = mqtt.rsplit_once(':').ok_or("IOTHUB_MQTT must be host:port")?;
    let port = port.parse().map_err(|_| "IOTHUB_MQTT port must be a number")?;
    let mut config =
        DeviceConfig::new(var("IOTHUB_PRODUCT")?, var("IOTHUB_DEVICE")?, var("IOTHUB_SECRET")?, host, port);
    // Dedup ids, tags and the shadow version survive restarts of the example.
    config.state_dir = Some(std::env::var("IOTHUB_STATE_DIR").unwrap_or_else(|_| "device-state".into()).into());
    Ok(config)
}

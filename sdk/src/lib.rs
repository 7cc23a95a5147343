//! # iothub-device — the device side of iothub
//!
//! Device code connects with the triple iothub issued (product id, device id, secret) and then sends data and
//! status, answers commands and RPCs, keeps its clock, tags and shadow in sync and runs OTA upgrades —
//! without knowing a single topic. The topic grammar comes from `iothub-protocol`, the crate the server
//! parses with, so the two cannot drift apart.
//!
//! ```no_run
//! use iothub_device::{Device, DeviceConfig, Event};
//!
//! # async fn run() -> Result<(), iothub_device::Error> {
//! let config = DeviceConfig::new("thermo", "unit-17", "the-secret", "127.0.0.1", 1883);
//! let (device, mut events) = Device::connect(config).await?;
//! device.upload_data("temperature", br#"{"celsius": 21.5}"#.to_vec()).await?;
//! device.update_status(&serde_json::json!({"firmware_version": "1.2.0"})).await?;
//! while let Some(event) = events.next().await {
//!     match event {
//!         Event::Command(command) => {
//!             command.respond(format!("done: {}", command.name)).await?;
//!         }
//!         Event::Disconnected { reason } => eprintln!("reconnecting: {reason}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! ## What the SDK does for you
//!
//! | feature | API | on the wire |
//! |---|---|---|
//! | connect, keepalive, reconnect with jittered backoff | [`Device::connect`], [`DeviceConfig`] | username `{p}/{d}`, client id `{p}.{d}[-suffix]`, optional TLS |
//! | data and status, QoS 1, unacknowledged messages resent after a reconnect | [`Device::upload_data`], [`Device::update_status`] | `upload_data/…`, `update_status/…` |
//! | commands and RPC, each delivered once (persistent dedup), expired ones dropped by the corrected clock | [`Event::Command`], [`Command::respond`] | `cmd/…`, `rpc/…` → `cmd_resp/…`, `rpc_resp/…` |
//! | data requests | [`Device::request_data`] | `get/…` |
//! | clock sync | [`Device::sync_time`], [`Device::clock`] | `$ntp` → `$set_ntp` |
//! | tags, persisted, re-subscribed on every connect, newer pushes only | [`Device::tags`], [`Event::TagsChanged`] | `$tags` → `$set_tags`, `tags/{p}/{tag}/cmd/…` |
//! | shadow with persisted version, reports retried after a version race | [`Device::report_shadow`], [`Event::ShadowDesired`] | `$shadow`, `$shadow_reported`, `$shadow_updated` → `$update_shadow`, `$shadow_reply` |
//! | OTA with a progress reporter | [`Event::OtaUpgrade`], [`OtaReporter`] | `$ota_upgrade` → `update_ota_status/…` |
//! | messages between devices | [`Device::send_to_device`], [`Event::Message`] | `m2m/…` |
//!
//! ## Examples
//!
//! One runnable example per feature in `sdk/examples/` — `telemetry`, `commands`, `data_request`,
//! `time_sync`, `tags`, `shadow`, `ota`, `m2m`. They read the device's identity from the environment:
//!
//! ```sh
//! IOTHUB_PRODUCT=demo IOTHUB_DEVICE=unit-1 IOTHUB_SECRET=<secret> IOTHUB_MQTT=127.0.0.1:1883 \
//!   cargo run -p iothub-device --example commands
//! ```
//!
//! Keep reading [`Events`]: the connection waits while the application does not (a command handler that
//! blocks for long delays keepalive pings).
//!
//! ## Guarantees and limits
//!
//! - A command is handed to the application **at most once per request id** (remembered in the state file
//!   until its expiry, or [`DeviceConfig::dedup_ttl`]); iothub's delivery is at least once, so together a
//!   command runs once. Without [`DeviceConfig::state_dir`] the memory is lost with the process.
//! - Nothing received from the network can make the SDK panic; malformed messages are logged and dropped.
//! - Brokers: EMQX and iothub's bundled broker route the `$` levels inside iothub's internal topics; a
//!   stand-alone RMQTT does not (NTP, tags, shadow and OTA pushes would not reach the device; see
//!   docs/commands.md in the iothub repository).

pub mod clock;
pub mod config;
mod device;
pub mod error;
pub mod events;
pub mod shadow;
pub mod store;
pub mod tags;

pub use clock::Clock;
pub use config::{DeviceConfig, Tls};
pub use device::{Device, Events};
pub use error::{Error, Result};
pub use events::{Command, CommandKind, DeviceMessage, Event, OtaFailure, OtaReporter, OtaUpgrade, ShadowDesired};

#[cfg(test)]
mod tests;

/// The receive path on one message, for the fuzz target in `sdk/fuzz` (not part of the API). Must run inside
/// a tokio runtime. Panics if a `$` command would reach the application.
#[doc(hidden)]
pub fn __fuzz_receive(topic: &str, payload: &[u8]) -> usize {
    let link = device::test_link(Clock::system(), store::StateStore::in_memory());
    let events = device::on_publish(&link, topic, payload);
    for event in &events {
        if let Event::Command(c) = event {
            assert!(!c.name.starts_with('$'), "internal command leaked: {}", c.name);
        }
    }
    events.len()
}

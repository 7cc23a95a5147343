//! Domain services: the rules of the hub, independent of HTTP and of which adapters are plugged in.

pub mod access;
pub mod api_keys;
pub mod commands;
pub mod history;
pub mod ingest;
pub mod kicks;
pub mod limits;
pub mod ota;
pub mod registry;
pub mod relay;
pub mod retention;
pub mod shadows;
pub mod tags;

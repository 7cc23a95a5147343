//! iothub: an IoT device hub that sits beside an MQTT broker.
//!
//! Layout: `api` is the HTTP edge; `domain` holds the services (registry, access decisions, API keys);
//! `model` the plain data every layer shares; `ports` are the interfaces to the outside world (traits only)
//! and `adapters` their implementations (PostgreSQL or
//! SQLite store; EMQX 5, EMQX 4 or RMQTT broker API; the embedded RMQTT broker). `topics` (the MQTT topic
//! grammar) and `ids` (the identifier rules) come from the `iothub-protocol` crate, shared with the device
//! SDK. `startup` wires it all from `config`.

pub mod adapters;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod model;
pub mod ports;
pub mod secrets;
pub mod startup;
pub mod telemetry;

pub use iothub_protocol::{identity, ids, topics};

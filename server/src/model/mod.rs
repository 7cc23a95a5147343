//! The model: plain data types every layer shares (records, state machines, the northbound event contract),
//! with their parsing and validation. Nothing here does I/O or knows a storage or transport: `ports/` holds
//! the traits that move these types, `adapters/` implement them, `domain/` decides, `api/` translates.

pub mod broker;
pub mod commands;
pub mod dedup;
pub mod event_bus;
pub mod events;
pub mod json;
pub mod kicks;
pub mod ota;
pub mod replies;
pub mod store;
pub mod tags;

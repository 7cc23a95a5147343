//! Ports: the interfaces domain services use to reach the outside world.
//!
//! Each port has a production adapter and an embedded one (see `adapters/`), chosen by configuration at start.
//! Domain code depends only on these traits, which is what lets one code base run as a single binary on
//! SQLite or as a stateless fleet on PostgreSQL, Redis, RabbitMQ and EMQX.

pub mod broker;
pub mod commands;
pub mod dedup;
pub mod event_bus;
pub mod kicks;
pub mod ota;
pub mod outbox;
pub mod replies;
pub mod retention;
pub mod shadows;
pub mod store;
pub mod tags;

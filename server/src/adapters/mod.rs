//! Adapters: concrete implementations of the ports, chosen by configuration in `startup`.
//!
//! - `postgres` / `sqlite`: the [`Store`](crate::ports::store::Store) for production and embedded profiles.
//! - `broker_http`: the [`BrokerApi`](crate::ports::broker::BrokerApi) over EMQX 5 or EMQX 4 / RMQTT REST.
//! - `embedded_broker`: RMQTT running inside this process, wired to this instance's hooks.

pub mod broker_http;
pub mod embedded_broker;
pub mod postgres;
pub mod sqlite;

use crate::error::Error;

/// Maps a unique-constraint violation to 409 with a message naming what was duplicated.
pub(crate) fn conflict_or(e: sqlx::Error, what: impl FnOnce() -> String) -> Error {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => Error::Conflict(what()),
        _ => e.into(),
    }
}

//! The SQL storage adapters: one PostgreSQL store (production) and one SQLite store (embedded), laid out
//! by aggregate — `registry`, `telemetry` (ingest, presence, history), `outbox`, `commands`, `tags`,
//! `shadows`, `ota`, `kicks`, `retention` — each file holding both backends.
//!
//! **How the two backends share code.** Every statement is written once, with `$n` placeholders, which
//! SQLite binds by number exactly as PostgreSQL does (sqlx maps `$3` to the third argument on both), in
//! portable SQL (`CAST(x AS TEXT)` rather than `x::TEXT`). The Rust around a statement is written once too,
//! inside [`for_each_backend!`], which compiles it for each store with `Store` and `Db` naming that backend.
//! Where the databases really differ — PostgreSQL's `UNNEST` batches, row locks and `SKIP LOCKED`, JSONB,
//! row addresses for batched deletes; SQLite's single writer and `json_extract` — the aggregate's file
//! holds a named helper per backend, side by side, and the shared code calls it by that name. No SQL text
//! is rewritten at run time.

mod commands;
mod kicks;
mod ota;
mod outbox;
mod pg;
mod registry;
mod retention;
mod shadows;
mod sqlite;
mod tags;
mod telemetry;

pub use outbox::OutboxHandOff;
pub use pg::PgStore;
pub use sqlite::SqliteStore;

use crate::error::Error;
use crate::ids::{DeviceId, DeviceRef, ProductId};

/// Compiles the items once per backend, each time in its own module where `Store` is that backend's store
/// type and `Db` its sqlx database. Both stores offer `read()` and `write()` pools (the same pool on
/// PostgreSQL; SQLite's single writer and its readers).
macro_rules! for_each_backend {
    ($($item:item)*) => {
        mod on_postgres {
            #![allow(unused_imports)]
            use super::*;
            type Store = $crate::adapters::sql::PgStore;
            #[allow(dead_code)]
            type Db = sqlx::Postgres;
            $($item)*
        }
        mod on_sqlite {
            #![allow(unused_imports)]
            use super::*;
            type Store = $crate::adapters::sql::SqliteStore;
            #[allow(dead_code)]
            type Db = sqlx::Sqlite;
            $($item)*
        }
    };
}
pub(crate) use for_each_backend;

/// Maps a unique-constraint violation to 409 with a message naming what was duplicated.
pub(crate) fn conflict_or(e: sqlx::Error, what: impl FnOnce() -> String) -> Error {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => Error::Conflict(what()),
        _ => e.into(),
    }
}

/// Maps a foreign-key violation on a device reference to 404.
pub(crate) fn missing_device(e: sqlx::Error, device: &DeviceRef) -> Error {
    match &e {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => Error::not_found("device", device),
        _ => e.into(),
    }
}

/// A device reference read back from the database (which only ever holds valid ids).
pub(crate) fn stored_device(product: String, device: String) -> crate::error::Result<DeviceRef> {
    let bad = |e: crate::ids::IdError| Error::Internal(anyhow::anyhow!("stored id: {e}"));
    Ok(DeviceRef::new(ProductId::parse(product).map_err(bad)?, DeviceId::parse(device).map_err(bad)?))
}

/// A stored enum value (`state`, `mode`, `status` …) parsed back, or an internal error naming it.
pub(crate) fn stored<T>(what: &str, text: String, parse: impl FnOnce(&str) -> Option<T>) -> crate::error::Result<T> {
    parse(&text).ok_or_else(|| Error::Internal(anyhow::anyhow!("stored {what} {text:?}")))
}

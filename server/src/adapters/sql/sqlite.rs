//! The SQLite store (embedded profile): its pools and migrations. What it stores is in the aggregate
//! modules beside this one.
//!
//! SQLite allows one writer at a time, so writes go through a single-connection pool (serialised in
//! process, never `SQLITE_BUSY`), while reads use a separate pool over WAL. Same semantics as PostgreSQL.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::OutboxHandOff;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

#[derive(Clone)]
pub struct SqliteStore {
    reader: SqlitePool,
    writer: SqlitePool,
    pub(super) outbox: OutboxHandOff,
}

impl SqliteStore {
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        if let Some(parent) = options.get_filename().parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)?;
            }
        }
        // A file connection cannot go stale: the ping sqlx sends before each acquire would only cost a
        // hop to the connection's thread and back.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .test_before_acquire(false)
            .connect_with(options.read_only(false))
            .await?;
        Ok(Self { reader, writer, outbox: OutboxHandOff::detached() })
    }

    /// Hands the outbox rows this store commits to `outbox` (the relay), leased to it.
    pub fn with_outbox(mut self, outbox: OutboxHandOff) -> Self {
        self.outbox = outbox;
        self
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    pub(super) fn read(&self) -> &SqlitePool {
        &self.reader
    }

    pub(super) fn write(&self) -> &SqlitePool {
        &self.writer
    }
}

impl SqliteStore {
    pub(super) const BACKEND: &'static str = "sqlite";
}

//! The PostgreSQL store (production profile): its pools and migrations. What it stores is in the
//! aggregate modules beside this one.

use sqlx::postgres::{PgPool, PgPoolOptions};

use super::OutboxHandOff;
use crate::model::commands::Durability;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Sessions with `synchronous_commit = off`, for writes whose loss in a database crash costs only a
    /// repetition (see [`Durability`]): no fsync wait, no extra round trip.
    relaxed: PgPool,
    pub(super) outbox: OutboxHandOff,
}

/// A connection that was just in use is handed out as it is; one idle for longer is pinged first, so a
/// database restart or a dropped idle connection costs no request an error. (sqlx's default pings before
/// every acquire: one extra round trip per statement, a quarter of an RPC's time in the database.)
fn pool_options(max_connections: u32) -> PgPoolOptions {
    const PING_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_AFTER_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        let pool = pool_options(max_connections).connect(url).await?;
        let options: sqlx::postgres::PgConnectOptions = url.parse()?;
        // The relaxed pool carries RPC inserts and command bookkeeping: statements that find rows by key
        // (set-based ones run with `enable_seqscan = off`). Left to choose, PostgreSQL re-plans the group
        // insert for every RPC (its one-row custom plan looks cheaper than the generic one), and planning
        // that statement costs twice its execution (~0.5 ms of every RPC); here the generic plan is kept.
        let relaxed = pool_options((max_connections / 4).max(2)).connect_lazy_with(
            options.options([("synchronous_commit", "off"), ("plan_cache_mode", "force_generic_plan")]),
        );
        Ok(Self { pool, relaxed, outbox: OutboxHandOff::detached() })
    }

    /// Hands the outbox rows this store commits to `outbox` (the relay), leased to it.
    pub fn with_outbox(mut self, outbox: OutboxHandOff) -> Self {
        self.outbox = outbox;
        self
    }

    /// The pool whose sessions commit with the given durability.
    pub(super) fn pool_for(&self, durability: Durability) -> &PgPool {
        match durability {
            Durability::Required => &self.pool,
            Durability::Relaxed => &self.relaxed,
        }
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(super) fn read(&self) -> &PgPool {
        &self.pool
    }

    pub(super) fn write(&self) -> &PgPool {
        &self.pool
    }
}

impl PgStore {
    pub(super) const BACKEND: &'static str = "postgres";
}

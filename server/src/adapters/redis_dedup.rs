//! Redis [`Deduplicator`] for the production profile: shared by every iothub instance.
//!
//! A claim is `SET key "p" NX GET PX in_flight_ms` (Redis ≥ 7.0): atomic, one command, and it tells us what
//! was there — nothing (new), `p` (in flight elsewhere) or `d` (done). Completion overwrites with `d` for
//! the dedup window. All keys of a batch go in one pipeline, so a batch costs one round trip.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use crate::error::{Error, Result};
use crate::model::dedup::Claim;
use crate::ports::dedup::Deduplicator;

pub struct RedisDedup {
    conn: ConnectionManager,
    prefix: String,
    window: Duration,
    in_flight_ttl: Duration,
}

/// The connection both Redis adapters use. A refused or timed-out connect is retried once, briefly, per
/// request: every ingest group asks Redis, and while Redis is away each should fall back to the degraded
/// path at once when it refuses, within about two seconds when it does not answer — not sit through the
/// crate's default six retries with exponential backoff.
pub(crate) fn connection_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200))
}

fn unavailable(e: redis::RedisError) -> Error {
    Error::Unavailable(format!("redis: {e}"))
}

impl RedisDedup {
    pub async fn connect(url: &str, prefix: &str, window: Duration, in_flight_ttl: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        // Lazy: Redis being down at start (or later) degrades dedup instead of stopping iothub.
        let conn = ConnectionManager::new_lazy_with_config(client, connection_config())?;
        Ok(Self { conn, prefix: format!("{prefix}dedup:"), window, in_flight_ttl })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

#[async_trait]
impl Deduplicator for RedisDedup {
    fn kind(&self) -> &'static str {
        "redis"
    }

    #[tracing::instrument(skip(self), name = "redis.ping")]
    async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(unavailable)?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(count = keys.len()), name = "redis.claim")]
    async fn claim(&self, keys: &[String]) -> Result<Vec<Claim>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET")
                .arg(self.key(key))
                .arg("p")
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(self.in_flight_ttl.as_millis() as u64);
        }
        let mut conn = self.conn.clone();
        let previous: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(previous
            .into_iter()
            .map(|p| match p.as_deref() {
                None => Claim::New,
                Some("d") => Claim::Done,
                Some(_) => Claim::InFlight,
            })
            .collect())
    }

    #[tracing::instrument(skip_all, fields(count = keys.len()), name = "redis.complete")]
    async fn complete(&self, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET").arg(self.key(key)).arg("d").arg("PX").arg(self.window.as_millis() as u64).ignore();
        }
        let mut conn = self.conn.clone();
        let () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(count = keys.len()), name = "redis.release")]
    async fn release(&self, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("DEL");
        for key in keys {
            cmd.arg(self.key(key));
        }
        let mut conn = self.conn.clone();
        let _: i64 = cmd.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(())
    }
}

//! Durable kick intents ([`KickStore`]): one row per username in `pending_kicks`.
//!
//! Claims move `next_attempt_at` forward in the same statement that reads the due rows, so two instances'
//! sweepers never kick one username at once (PostgreSQL skips rows another claim holds; SQLite has one writer).

use async_trait::async_trait;
use sqlx::Row;

use super::{for_each_backend, PgStore, SqliteStore};
use crate::error::Result;
use crate::model::kicks::PendingKick;
use crate::ports::kicks::KickStore;

const REQUEST: &str = "INSERT INTO pending_kicks (username, requested_at, next_attempt_at, attempts)
     VALUES ($1, $2, $3, 0)
     ON CONFLICT (username) DO UPDATE SET requested_at = excluded.requested_at,
         next_attempt_at = excluded.next_attempt_at, attempts = 0";
const RESCHEDULE: &str = "UPDATE pending_kicks SET next_attempt_at = $3 WHERE username = $1 AND requested_at = $2";
const FINISH: &str = "DELETE FROM pending_kicks WHERE username = $1 AND requested_at = $2";
const CANCEL: &str = "DELETE FROM pending_kicks WHERE username = $1";
const COUNT: &str = "SELECT COUNT(*) FROM pending_kicks";

/// Claims up to `$3` intents due at `$1`, due again at `$2`; `$lock` is the backend's row-lock clause.
macro_rules! claim_kicks {
    ($lock:literal) => {
        concat!(
            "UPDATE pending_kicks SET next_attempt_at = $2, attempts = attempts + 1
             WHERE username IN (SELECT username FROM pending_kicks WHERE next_attempt_at <= $1
                                ORDER BY next_attempt_at LIMIT $3",
            $lock,
            ") RETURNING username, requested_at, attempts"
        )
    };
}
impl PgStore {
    const CLAIM_KICKS: &'static str = claim_kicks!(" FOR UPDATE SKIP LOCKED");
}
impl SqliteStore {
    const CLAIM_KICKS: &'static str = claim_kicks!("");
}

for_each_backend! {
    #[async_trait]
    impl KickStore for Store {
        #[tracing::instrument(skip(self), name = "sql.request_kick")]
        async fn request_kick(&self, username: &str, requested_at: i64, due_at: i64) -> Result<()> {
            sqlx::query(REQUEST).bind(username).bind(requested_at).bind(due_at).execute(self.write()).await?;
            Ok(())
        }

        #[tracing::instrument(skip(self), name = "sql.claim_kicks")]
        async fn claim_kicks(&self, now: i64, lease_until: i64, limit: u32) -> Result<Vec<PendingKick>> {
            let rows = sqlx::query(Store::CLAIM_KICKS)
                .bind(now)
                .bind(lease_until)
                .bind(i64::from(limit))
                .fetch_all(self.write())
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(PendingKick {
                        username: r.try_get("username")?,
                        requested_at: r.try_get("requested_at")?,
                        attempts: r.try_get::<i64, _>("attempts")? as i32,
                    })
                })
                .collect()
        }

        #[tracing::instrument(skip(self), name = "sql.reschedule_kick")]
        async fn reschedule_kick(&self, username: &str, requested_at: i64, due_at: i64) -> Result<()> {
            sqlx::query(RESCHEDULE).bind(username).bind(requested_at).bind(due_at).execute(self.write()).await?;
            Ok(())
        }

        #[tracing::instrument(skip(self), name = "sql.finish_kick")]
        async fn finish_kick(&self, username: &str, requested_at: i64) -> Result<()> {
            sqlx::query(FINISH).bind(username).bind(requested_at).execute(self.write()).await?;
            Ok(())
        }

        #[tracing::instrument(skip(self), name = "sql.cancel_kick")]
        async fn cancel_kick(&self, username: &str) -> Result<()> {
            sqlx::query(CANCEL).bind(username).execute(self.write()).await?;
            Ok(())
        }

        async fn pending_kicks(&self) -> Result<i64> {
            Ok(sqlx::query_scalar::<Db, i64>(COUNT).fetch_one(self.read()).await?)
        }
    }
}

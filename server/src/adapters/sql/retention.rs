//! Retention ([`RetentionStore`]): bounded batched deletes of old messages, finished commands and old OTA
//! rollouts. Each batch is one short statement. PostgreSQL finds a batch by row address (`ctid`), SQLite by
//! `rowid`; the statements are unnamed on PostgreSQL, planned with the actual cutoff each time: a cached
//! generic plan guesses a third of the table matches and prefers a sequential scan, which reads the whole
//! table once nothing is old.

use async_trait::async_trait;

use super::{for_each_backend, PgStore, SqliteStore};
use crate::error::Result;
use crate::ports::retention::RetentionStore;

// Rollouts go in two steps so a rollout to a million devices goes in bounded batches: its targets first,
// then the rollout once it has none (every call, so emptied rollouts are not probed again by the next
// batch). The conditions are on the rollout, whose `created_at` never changes. Old rollouts are found by
// reading `ota_rollouts` (one row per push; no index on `created_at` alone).
const PRUNE_TARGETS: &str = "DELETE FROM ota_targets WHERE (rollout_id, device_id) IN (
         SELECT t.rollout_id, t.device_id FROM ota_targets t JOIN ota_rollouts r ON r.id = t.rollout_id
         WHERE r.created_at < $1 LIMIT $2)";
const PRUNE_ROLLOUTS: &str = "DELETE FROM ota_rollouts WHERE id IN (
         SELECT r.id FROM ota_rollouts r
         WHERE r.created_at < $1 AND NOT EXISTS (SELECT 1 FROM ota_targets t WHERE t.rollout_id = r.id) LIMIT $2)";

impl PgStore {
    /// Found through the BRIN index on `sent_at` and deleted without a join (which the planner likes to make
    /// a scan of the whole table). Messages are never updated, so an address cannot move under us.
    const PRUNE_MESSAGES: &'static str = "DELETE FROM device_messages
         WHERE ctid = ANY(ARRAY(SELECT ctid FROM device_messages WHERE sent_at < $1 LIMIT $2))";
    /// A command updated meanwhile may be met in its new version (the address is not rechecked then), so
    /// the conditions are repeated where they are.
    const PRUNE_COMMANDS: &'static str = "DELETE FROM device_commands
         WHERE ctid = ANY(ARRAY(SELECT ctid FROM device_commands
                                WHERE created_at < $1 AND state IN ('replied', 'expired', 'failed') LIMIT $2))
           AND created_at < $1 AND state IN ('replied', 'expired', 'failed')";
}
impl SqliteStore {
    const PRUNE_MESSAGES: &'static str = "DELETE FROM device_messages
         WHERE rowid IN (SELECT rowid FROM device_messages WHERE sent_at < $1 LIMIT $2)";
    const PRUNE_COMMANDS: &'static str = "DELETE FROM device_commands
         WHERE rowid IN (SELECT rowid FROM device_commands
                         WHERE created_at < $1 AND state IN ('replied', 'expired', 'failed') LIMIT $2)";
}

for_each_backend! {
    async fn delete_batch(store: &Store, statement: &'static str, before: i64, limit: u32) -> Result<u64> {
        Ok(sqlx::query(statement)
            .persistent(false)
            .bind(before)
            .bind(i64::from(limit))
            .execute(store.write())
            .await?
            .rows_affected())
    }

    #[async_trait]
    impl RetentionStore for Store {
        #[tracing::instrument(skip(self), name = "sql.prune_messages")]
        async fn prune_messages(&self, before: i64, limit: u32) -> Result<u64> {
            delete_batch(self, Store::PRUNE_MESSAGES, before, limit).await
        }

        #[tracing::instrument(skip(self), name = "sql.prune_commands")]
        async fn prune_commands(&self, before: i64, limit: u32) -> Result<u64> {
            delete_batch(self, Store::PRUNE_COMMANDS, before, limit).await
        }

        #[tracing::instrument(skip(self), name = "sql.prune_rollouts")]
        async fn prune_rollouts(&self, before: i64, limit: u32) -> Result<u64> {
            Ok(delete_batch(self, PRUNE_TARGETS, before, limit).await?
                + delete_batch(self, PRUNE_ROLLOUTS, before, limit).await?)
        }
    }
}

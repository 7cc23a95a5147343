//! The retention port: bounded deletes of what is older than its configured age, in batches (each its own
//! short statement, so pruning a backlog never holds locks for long). Open commands are never pruned.

use crate::error::Result;
use async_trait::async_trait;

#[async_trait]
pub trait RetentionStore: Send + Sync + 'static {
    /// Deletes up to `limit` stored messages the broker received before `before` (ms); returns how many.
    async fn prune_messages(&self, before: i64, limit: u32) -> Result<u64>;
    /// Deletes up to `limit` finished commands (replied, expired, failed) created before `before` (ms);
    /// returns how many.
    async fn prune_commands(&self, before: i64, limit: u32) -> Result<u64>;
    /// Deletes up to `limit` targets of OTA rollouts created before `before` (ms), then up to `limit` old
    /// rollouts left without targets; returns how many rows went (call again until it returns less than
    /// `limit`). Whatever the targets' state: an old rollout is history (a later progress report for it
    /// updates no target, as for any unknown rollout).
    async fn prune_rollouts(&self, before: i64, limit: u32) -> Result<u64>;
}

//! The outbox port: events committed with the changes they describe, on their way to the event bus.
//!
//! Every store writes a change's events into `event_outbox` in the change's own transaction and, once it
//! committed, hands the rows to an [`OutboxSink`] (the relay), which publishes them and deletes them
//! ([`OutboxStore::outbox_ack`]). Rows whose hand-off was lost (a crash, a failed publish) wait out their
//! lease and are swept by any instance, so an event is published at least once and never lost.

use crate::error::Result;
use crate::model::store::OutboxRecord;
use async_trait::async_trait;

/// Where a store hands the outbox rows it just committed (leased to this instance).
pub trait OutboxSink: Send + Sync + 'static {
    fn committed(&self, records: Vec<OutboxRecord>);
}

#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// Leases up to `limit` outbox rows whose lease expired (oldest first).
    async fn outbox_lease(&self, limit: u32, now: i64, lease_ms: i64) -> Result<Vec<OutboxRecord>>;
    /// Deletes published rows.
    async fn outbox_ack(&self, ids: &[i64]) -> Result<()>;
    /// Makes rows available to the next lease at once (publishing failed).
    async fn outbox_release(&self, ids: &[i64]) -> Result<()>;
    async fn outbox_len(&self) -> Result<i64>;
}

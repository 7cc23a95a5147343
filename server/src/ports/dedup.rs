//! The deduplication port: "have we already handled message X of device Y?", answered atomically.
//!
//! Brokers redeliver webhooks (retries, QoS 1 redelivery, several iothub instances behind one load balancer),
//! so every upstream message is claimed by its device-scoped message id before it is processed. A claim is
//! two-phase so that a failure never loses a message: `claim` marks the key *in flight* for a short time,
//! `complete` marks it *done* for the dedup window after the message was durably stored, and `release`
//! drops the claim when processing failed so the broker's retry is processed again. Production uses Redis
//! (`SET NX GET PX`), the embedded profile an in-process map; the database's own unique keys stay the last
//! line of defence either way.

use crate::error::Result;
use crate::model::dedup::*;
use async_trait::async_trait;

#[async_trait]
pub trait Deduplicator: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    async fn ping(&self) -> Result<()>;
    /// Claims every key in one round trip; the answer has one entry per key, in order.
    async fn claim(&self, keys: &[String]) -> Result<Vec<Claim>>;
    /// Marks keys done for the dedup window.
    async fn complete(&self, keys: &[String]) -> Result<()>;
    /// Forgets claims whose processing failed.
    async fn release(&self, keys: &[String]) -> Result<()>;
}

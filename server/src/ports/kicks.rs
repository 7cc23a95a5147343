//! The durable kick intents port: "disconnect every live connection of this username", kept in the database
//! until the broker confirms it, so a suspension, deletion or leaked-secret rotation whose kick failed is
//! retried by whichever instance runs next, also after a restart.

use crate::error::Result;
use crate::model::kicks::*;
use async_trait::async_trait;

#[async_trait]
pub trait KickStore: Send + Sync + 'static {
    /// Records (or renews) the intent to kick `username`, first due at `due_at`.
    async fn request_kick(&self, username: &str, requested_at: i64, due_at: i64) -> Result<()>;
    /// Claims up to `limit` due intents, making them due again only after `lease_until` (another instance
    /// must not kick the same username at the same time).
    async fn claim_kicks(&self, now: i64, lease_until: i64, limit: u32) -> Result<Vec<PendingKick>>;
    /// Makes an intent due at `due_at` (a retry, or the follow-up kick).
    async fn reschedule_kick(&self, username: &str, requested_at: i64, due_at: i64) -> Result<()>;
    /// Forgets the intent made at `requested_at` (not a newer one for the same username).
    async fn finish_kick(&self, username: &str, requested_at: i64) -> Result<()>;
    /// Forgets every intent of `username` (the device was resumed).
    async fn cancel_kick(&self, username: &str) -> Result<()>;
    async fn pending_kicks(&self) -> Result<i64>;
}

//! The command-log port: durable downstream commands and their state machine.
//!
//! A command row is the single truth about one request to one device, whatever the mode (`cmd`, `rpc`)
//! and whoever acts on it (the API that created it, the ingest path that sees the device's reply or the
//! broker's delivery report, the scheduler that retries and expires). States only move forward and every
//! change is written together with its `command_state` event (outbox), so consumers see each transition
//! once the transaction commits. Both SQL stores implement it; times are Unix milliseconds.

use crate::error::Result;
use crate::ids::{DeviceRef, ProductId};
use crate::model::commands::*;
use async_trait::async_trait;

#[async_trait]
pub trait CommandStore: Send + Sync + 'static {
    /// Logs a batch of commands (from concurrent callers) in one transaction, each with its `queued` event.
    /// The device check is part of the insert: a command for an unknown or suspended device (or, with
    /// `require_online`, an offline one) is refused, the others are unaffected. With an idempotency key
    /// already used for the device the existing command comes back and nothing is written. Batches made
    /// only of RPCs are written with [`Durability::Relaxed`].
    ///
    /// `Err` of the whole call means nothing was written. Once the batch is written, an outcome that
    /// cannot be told (a failed lookup of an existing command) is an `Err` of that command alone: the
    /// others are written and leased, and their callers must hear so.
    async fn insert_commands(
        &self,
        commands: &[NewCommand],
        queued_event: QueuedEvent<'_>,
        now: i64,
    ) -> Result<Vec<Result<Inserted>>>;
    async fn get_command(&self, device: &DeviceRef, request_id: &str) -> Result<Option<CommandRecord>>;
    async fn list_commands(&self, device: &DeviceRef, filter: &CommandFilter) -> Result<Vec<CommandRecord>>;
    /// Leases up to `limit` commands ready to go out: unexpired, not replied, their device online, and
    /// either queued (`Devices`) or due or queued without a schedule (`Due`). Each comes back with `next_attempt_at = now + lease_ms`.
    async fn claim_commands(
        &self,
        scope: &ClaimScope,
        now: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<CommandRecord>>;
    /// Unfinished commands whose TTL passed (for the expiry sweep).
    async fn expired_commands(&self, now: i64, limit: u32) -> Result<Vec<(DeviceRef, String)>>;
    /// Logs a tag command: one row per active device of the tag, with their `queued` events.
    async fn insert_tag_command(
        &self,
        command: &NewTagCommand,
        queued_event: QueuedEvent<'_>,
        now: i64,
    ) -> Result<Vec<CommandRecord>>;
    /// Creates an OTA rollout with a target and a logged command per device (request id = rollout id), with
    /// the commands' `queued` events, in one transaction. Returns the commands.
    async fn create_rollout(
        &self,
        rollout: &crate::model::ota::NewRollout,
        commands: &[NewCommand],
        queued_event: QueuedEvent<'_>,
        now: i64,
    ) -> Result<Vec<CommandRecord>>;
    /// Every device's row of a tag command.
    async fn tag_command(&self, product: &ProductId, request_id: &str) -> Result<Vec<CommandRecord>>;
    /// Applies the changes in one transaction with the events `events_for` builds for each one that
    /// took effect.
    async fn change_commands(
        &self,
        changes: &[CommandChange],
        events_for: EventsFor<'_>,
        durability: Durability,
    ) -> Result<ChangeOutcome>;
}

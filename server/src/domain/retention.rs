//! Built-in retention: every instance periodically deletes stored device messages, finished commands and
//! OTA rollouts older than their configured age (`retention.*`; off by default: nothing is deleted unless
//! asked).
//!
//! Deletes go in batches of [`BATCH`] rows, each its own short statement, so pruning a large backlog never
//! holds locks or a transaction for long, and ingest keeps its turn between batches. Several instances
//! pruning at once only share the work. Open commands (queued, sent, delivered) are never pruned.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::clock::now_ms;
use crate::config::RetentionConfig;
use crate::error::Result;
use crate::ports::retention::RetentionStore;

/// Rows per delete statement.
pub const BATCH: u32 = 5_000;
const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Clone)]
pub struct RetentionSettings {
    /// Keep messages this long (ms) after the broker received them; `None` keeps them forever.
    pub messages_ms: Option<i64>,
    /// Keep finished commands this long (ms) after they were created; `None` keeps them forever.
    pub commands_ms: Option<i64>,
    /// Keep OTA rollouts (with their targets' progress) this long (ms) after they were created.
    pub ota_ms: Option<i64>,
    pub every: Duration,
}

impl From<&RetentionConfig> for RetentionSettings {
    fn from(c: &RetentionConfig) -> Self {
        let age = |days: u32| (days > 0).then(|| i64::from(days) * DAY_MS);
        Self {
            messages_ms: age(c.messages_days),
            commands_ms: age(c.commands_days),
            ota_ms: age(c.ota_days),
            every: Duration::from_secs(c.sweep_secs),
        }
    }
}

/// Starts the pruning loop if anything is to be pruned; it ends when the stores are dropped.
pub fn start(store: &Arc<dyn RetentionStore>, settings: RetentionSettings) {
    if settings.messages_ms.is_none() && settings.commands_ms.is_none() && settings.ota_ms.is_none() {
        return;
    }
    tokio::spawn(run(Arc::downgrade(store), settings));
}

async fn run(store: Weak<dyn RetentionStore>, settings: RetentionSettings) {
    let mut interval = tokio::time::interval(settings.every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(store) = store.upgrade() else {
            return;
        };
        if let Err(e) = prune(store.as_ref(), &settings, now_ms()).await {
            tracing::warn!(error = %e, "retention round failed; retrying at the next one");
        }
    }
}

/// One round: everything past its age, batch after batch, until a batch comes back short.
#[tracing::instrument(skip_all, name = "retention.prune")]
async fn prune(store: &dyn RetentionStore, settings: &RetentionSettings, now: i64) -> Result<(u64, u64, u64)> {
    let messages = match settings.messages_ms {
        Some(age) => drain("messages", || store.prune_messages(now - age, BATCH)).await?,
        None => 0,
    };
    let finished = match settings.commands_ms {
        Some(age) => drain("commands", || store.prune_commands(now - age, BATCH)).await?,
        None => 0,
    };
    let rollouts = match settings.ota_ms {
        Some(age) => drain("ota", || store.prune_rollouts(now - age, BATCH)).await?,
        None => 0,
    };
    if messages + finished + rollouts > 0 {
        tracing::info!(messages, commands = finished, ota = rollouts, "retention pruned old rows");
    }
    Ok((messages, finished, rollouts))
}

/// Runs `batch` until it deletes fewer than [`BATCH`] rows; returns the total.
async fn drain<F, Fut>(kind: &'static str, mut batch: F) -> Result<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    let mut total = 0;
    loop {
        let n = batch().await?;
        total += n;
        metrics::counter!("iothub_retention_deleted_total", "kind" => kind).increment(n);
        if n < u64::from(BATCH) {
            return Ok(total);
        }
        // Other work (ingest groups) gets its turn between batches.
        tokio::task::yield_now().await;
    }
}

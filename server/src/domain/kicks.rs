//! Kicks that bite: disconnecting every live connection of a username after a suspension, deletion or
//! leaked-secret rotation, until the broker confirms it.
//!
//! The broker keeps a connection's rights for its whole life (its authn answer carries the grants), so a
//! kick that fails leaves a suspended device connected. Each kick is therefore first written down as an
//! intent (`pending_kicks`), tried at once, and retried by every instance's sweeper with backoff until the
//! broker confirms it — across broker outages, iothub restarts and instances. A confirmed kick is repeated
//! once [`FOLLOW_UP`] after the change, catching a CONNECT whose authn was answered just before it. Ingest
//! meanwhile drops whatever a suspended or deleted device still sends (`domain/ingest.rs`).

use std::sync::Arc;
use std::time::Duration;

use crate::clock::now_ms;
use crate::error::Result;
use crate::model::kicks::PendingKick;
use crate::ports::broker::BrokerApi;
use crate::ports::kicks::KickStore;

/// The follow-up kick's delay after the change.
pub const FOLLOW_UP: Duration = Duration::from_secs(2);
/// How long a claimed intent is protected from other sweepers while its kick runs.
const CLAIM_LEASE: Duration = Duration::from_secs(30);
/// Retry backoff: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What became of the kick asked for with a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickOutcome {
    /// The broker disconnected this many connections (a follow-up kick is still due).
    Kicked(usize),
    /// The broker did not confirm: the intent is stored and retried in the background.
    Pending,
}

#[derive(Clone)]
pub struct KickService {
    store: Arc<dyn KickStore>,
    broker: Arc<dyn BrokerApi>,
}

fn retry_delay(attempts: i32) -> Duration {
    let doublings = attempts.clamp(1, 16) as u32 - 1;
    RETRY_FIRST.saturating_mul(1 << doublings).min(RETRY_MAX)
}

impl KickService {
    pub fn new(store: Arc<dyn KickStore>, broker: Arc<dyn BrokerApi>) -> Self {
        Self { store, broker }
    }

    /// Records the intent, then tries the kick at once. Fails only when the intent cannot be stored.
    #[tracing::instrument(skip(self), name = "kicks.request")]
    pub async fn request(&self, username: &str) -> Result<KickOutcome> {
        let requested_at = now_ms();
        let follow_up = requested_at + FOLLOW_UP.as_millis() as i64;
        self.store.request_kick(username, requested_at, follow_up).await?;
        match self.broker.kick_username(username).await {
            Ok(kicked) => {
                metrics::counter!("iothub_kicks_total", "result" => "kicked").increment(1);
                Ok(KickOutcome::Kicked(kicked))
            }
            Err(e) => {
                metrics::counter!("iothub_kicks_total", "result" => "pending").increment(1);
                tracing::warn!(%username, error = %e, "kick failed; it stays pending and is retried");
                let retry_at = now_ms() + RETRY_FIRST.as_millis() as i64;
                self.store.reschedule_kick(username, requested_at, retry_at).await?;
                Ok(KickOutcome::Pending)
            }
        }
    }

    /// The device is active again: a kick still pending would only disconnect it for nothing.
    pub async fn cancel(&self, username: &str) -> Result<()> {
        self.store.cancel_kick(username).await
    }

    /// Runs every due intent once; returns how many were claimed.
    pub async fn sweep(&self) -> Result<usize> {
        let now = now_ms();
        let claimed = self.store.claim_kicks(now, now + CLAIM_LEASE.as_millis() as i64, 100).await?;
        for kick in &claimed {
            self.retry(kick).await?;
        }
        if let Ok(pending) = self.store.pending_kicks().await {
            metrics::gauge!("iothub_kicks_pending").set(pending as f64);
        }
        Ok(claimed.len())
    }

    async fn retry(&self, kick: &PendingKick) -> Result<()> {
        let PendingKick { username, requested_at, attempts } = kick;
        match self.broker.kick_username(username).await {
            Ok(kicked) => {
                metrics::counter!("iothub_kicks_total", "result" => "retried").increment(1);
                tracing::info!(%username, kicked, attempts, "pending kick done");
                let follow_up = requested_at + FOLLOW_UP.as_millis() as i64;
                if now_ms() >= follow_up {
                    self.store.finish_kick(username, *requested_at).await
                } else {
                    self.store.reschedule_kick(username, *requested_at, follow_up).await
                }
            }
            Err(e) => {
                metrics::counter!("iothub_kicks_total", "result" => "pending").increment(1);
                tracing::warn!(%username, attempts, error = %e, "pending kick failed again");
                let retry_at = now_ms() + retry_delay(*attempts).as_millis() as i64;
                self.store.reschedule_kick(username, *requested_at, retry_at).await
            }
        }
    }

    /// Sweeps every `every` until the process ends.
    pub fn start_sweeper(&self, every: Duration) {
        let service = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = service.sweep().await {
                    tracing::warn!(error = %e, "kick sweep failed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_ceiling() {
        assert_eq!(retry_delay(1), Duration::from_millis(500));
        assert_eq!(retry_delay(2), Duration::from_secs(1));
        assert_eq!(retry_delay(4), Duration::from_secs(4));
        assert_eq!(retry_delay(10), RETRY_MAX);
        assert_eq!(retry_delay(i32::MAX), RETRY_MAX);
    }
}

//! The outbox relay: moves committed events from the outbox to the event bus, at least once.
//!
//! The ingest path hands each committed batch's outbox rows straight to the relay, which publishes them
//! (RabbitMQ confirms) and deletes them. Rows whose publishing failed are released and picked up by the
//! periodic sweep once the bus is back; rows of an instance that died between commit and publish are
//! swept by any instance after their lease expires. A row is deleted only after the bus confirmed it, so
//! nothing is lost; a crash between confirm and delete republishes it with the same event id.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::clock::now_ms;
use crate::ports::event_bus::EventBus;
use crate::ports::store::{OutboxRecord, Store};

/// Most events published in one confirm round.
const PUBLISH_CHUNK: usize = 2_000;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct RelayHandle {
    tx: mpsc::UnboundedSender<Vec<OutboxRecord>>,
}

impl RelayHandle {
    /// Publishes these freshly committed rows as soon as possible.
    pub fn hand_off(&self, records: Vec<OutboxRecord>) {
        if !records.is_empty() {
            // A closed relay (shutdown) leaves the rows in the outbox for the next start.
            let _ = self.tx.send(records);
        }
    }
}

pub struct RelaySettings {
    pub lease_ms: i64,
    pub sweep_every: Duration,
}

/// Starts the relay task. It runs until every [`RelayHandle`] is dropped.
pub fn start(store: Arc<dyn Store>, bus: Arc<dyn EventBus>, settings: RelaySettings) -> RelayHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(Relay { store, bus, settings, backoff: None }.run(rx));
    RelayHandle { tx }
}

struct Relay {
    store: Arc<dyn Store>,
    bus: Arc<dyn EventBus>,
    settings: RelaySettings,
    /// Set while the bus is failing: (retry not before, current delay).
    backoff: Option<(tokio::time::Instant, Duration)>,
}

impl Relay {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Vec<OutboxRecord>>) {
        let mut sweep = tokio::time::interval(self.settings.sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = rx.recv() => {
                    let Some(mut records) = received else { break };
                    while records.len() < PUBLISH_CHUNK {
                        match rx.try_recv() {
                            Ok(more) => records.extend(more),
                            Err(_) => break,
                        }
                    }
                    if self.backing_off() {
                        // The sweep will retry them once the bus is back; until then they wait in the outbox.
                        self.release(&records).await;
                    } else {
                        self.publish(records).await;
                    }
                }
                _ = sweep.tick() => {
                    if !self.backing_off() {
                        self.sweep().await;
                    }
                }
            }
        }
        tracing::debug!("outbox relay stopped");
    }

    fn backing_off(&self) -> bool {
        self.backoff.is_some_and(|(until, _)| tokio::time::Instant::now() < until)
    }

    async fn sweep(&mut self) {
        loop {
            let leased = match self.store.outbox_lease(PUBLISH_CHUNK as u32, now_ms(), self.settings.lease_ms).await {
                Ok(leased) => leased,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox sweep failed");
                    return;
                }
            };
            if leased.is_empty() {
                return;
            }
            let full = leased.len() == PUBLISH_CHUNK;
            if !self.publish(leased).await || !full {
                return;
            }
        }
    }

    /// Publishes and deletes; `false` when the bus failed (rows released for a later sweep).
    #[tracing::instrument(skip_all, fields(count = records.len()), name = "relay.publish")]
    async fn publish(&mut self, records: Vec<OutboxRecord>) -> bool {
        let events: Vec<_> = records.iter().map(|r| r.event.clone()).collect();
        let started = std::time::Instant::now();
        match self.bus.publish(&events).await {
            Ok(()) => {
                metrics::histogram!("iothub_events_publish_seconds").record(started.elapsed().as_secs_f64());
                metrics::counter!("iothub_events_published_total").increment(records.len() as u64);
                if self.backoff.take().is_some() {
                    tracing::info!(bus = self.bus.kind(), "event bus is back; publishing resumed");
                }
                let ids: Vec<i64> = records.iter().map(|r| r.id).collect();
                if let Err(e) = self.store.outbox_ack(&ids).await {
                    // They will be published again after the lease: a duplicate, never a loss.
                    tracing::warn!(error = %e, count = ids.len(), "could not delete published outbox rows");
                }
                true
            }
            Err(e) => {
                metrics::counter!("iothub_events_publish_failures_total").increment(1);
                let delay = self.backoff.map_or(Duration::from_millis(200), |(_, d)| (d * 2).min(MAX_BACKOFF));
                tracing::warn!(error = %e, bus = self.bus.kind(), retry_in_ms = delay.as_millis() as u64,
                    pending = records.len(), "event bus publish failed; events stay in the outbox");
                self.backoff = Some((tokio::time::Instant::now() + delay, delay));
                self.release(&records).await;
                false
            }
        }
    }

    async fn release(&self, records: &[OutboxRecord]) {
        let ids: Vec<i64> = records.iter().map(|r| r.id).collect();
        if let Err(e) = self.store.outbox_release(&ids).await {
            tracing::warn!(error = %e, "could not release outbox rows; they return after their lease");
        }
    }
}

//! The outbox relay: moves committed events from the outbox to the event bus, at least once.
//!
//! Every store hands the outbox rows it commits straight to the relay (as its [`OutboxSink`]), which publishes them
//! (RabbitMQ confirms; up to four rounds in flight) and deletes them. Rows whose publishing failed are released and picked up by the
//! periodic sweep once the bus is back; rows of an instance that died between commit and publish are
//! swept by any instance after their lease expires. A row is deleted only after the bus confirmed it, so
//! nothing is lost; a crash between confirm and delete republishes it with the same event id.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::clock::now_ms;
use crate::model::store::OutboxRecord;
use crate::ports::event_bus::EventBus;
use crate::ports::outbox::{OutboxSink, OutboxStore};

/// Most events published in one confirm round.
const PUBLISH_CHUNK: usize = 2_000;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Freshly committed rows, with when they were handed over (their lease started then).
type HandOff = (tokio::time::Instant, Vec<OutboxRecord>);

#[derive(Clone)]
pub struct RelayHandle {
    tx: mpsc::UnboundedSender<HandOff>,
}

impl RelayHandle {
    /// Publishes these freshly committed rows as soon as possible.
    pub fn hand_off(&self, records: Vec<OutboxRecord>) {
        if !records.is_empty() {
            // Events committed but not yet taken up by a publish round: the relay's backlog.
            metrics::gauge!("iothub_relay_queued_events").increment(records.len() as f64);
            // A closed relay (shutdown) leaves the rows in the outbox for the next start.
            let _ = self.tx.send((tokio::time::Instant::now(), records));
        }
    }
}

pub struct RelaySettings {
    pub lease_ms: i64,
    pub sweep_every: Duration,
    /// How long a publish round waits for more events after its first one. Every round costs RabbitMQ a
    /// confirm and the database an outbox delete, whatever its size, and a command's events (queued, sent,
    /// delivered, replied) arrive within a few milliseconds of each other: gathered, they are one round
    /// instead of four, published after an RPC has answered rather than competing with it for the CPU.
    pub linger: Duration,
}

impl OutboxSink for RelayHandle {
    fn committed(&self, records: Vec<OutboxRecord>) {
        self.hand_off(records);
    }
}

/// The relay's intake, until [`start`] runs it. Made before the stores, which hand rows to its handle.
pub struct RelayIntake(mpsc::UnboundedReceiver<HandOff>);

pub fn channel() -> (RelayHandle, RelayIntake) {
    let (tx, rx) = mpsc::unbounded_channel();
    (RelayHandle { tx }, RelayIntake(rx))
}

/// Starts the relay task. It runs until every [`RelayHandle`] is dropped.
pub fn start(intake: RelayIntake, store: Arc<dyn OutboxStore>, bus: Arc<dyn EventBus>, settings: RelaySettings) {
    tokio::spawn(Relay { store, bus, settings, backoff: None }.run(intake.0));
}

struct Relay {
    store: Arc<dyn OutboxStore>,
    bus: Arc<dyn EventBus>,
    settings: RelaySettings,
    /// Set while the bus is failing: (retry not before, current delay).
    backoff: Option<(tokio::time::Instant, Duration)>,
}

/// Publish rounds in flight at once: while one waits for its confirms the next is sent, so RabbitMQ
/// confirms (and syncs) several rounds together.
const MAX_ROUNDS: usize = 4;

type Rounds = JoinSet<bool>;

impl Relay {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<HandOff>) {
        let mut sweep = tokio::time::interval(self.settings.sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rounds = Rounds::new();
        loop {
            tokio::select! {
                received = rx.recv(), if rounds.len() < MAX_ROUNDS => {
                    let Some(first) = received else { break };
                    let mut records = Vec::new();
                    let mut next = Some(first);
                    let gather_until = tokio::time::Instant::now() + self.settings.linger;
                    let mut taken = 0;
                    while let Some((handed_at, more)) = next.take() {
                        taken += more.len();
                        // When the bus is slower than ingest, hand-offs wait here; once half their lease
                        // is gone the sweep (of any instance) will publish them, so publishing them from
                        // here too would only duplicate them.
                        if handed_at.elapsed() < self.stale_after() {
                            records.extend(more);
                        }
                        if records.len() < PUBLISH_CHUNK {
                            next = match rx.try_recv() {
                                Ok(more) => Some(more),
                                Err(_) => tokio::time::timeout_at(gather_until, rx.recv()).await.ok().flatten(),
                            };
                        }
                    }
                    // Taken up once gathering ends: events waiting out the linger still count as queued.
                    metrics::gauge!("iothub_relay_queued_events").decrement(taken as f64);
                    if records.is_empty() {
                        continue;
                    }
                    if self.backing_off() {
                        // The sweep will retry them once the bus is back; until then they wait in the outbox.
                        release(&*self.store, &records).await;
                    } else {
                        self.spawn_round(&mut rounds, records);
                    }
                }
                Some(done) = rounds.join_next(), if !rounds.is_empty() => self.round_done(done),
                _ = sweep.tick() => {
                    if !self.backing_off() {
                        self.sweep(&mut rounds).await;
                    }
                }
            }
        }
        while let Some(done) = rounds.join_next().await {
            self.round_done(done);
        }
        tracing::debug!("outbox relay stopped");
    }

    fn stale_after(&self) -> Duration {
        Duration::from_millis((self.settings.lease_ms / 2).max(1) as u64)
    }

    fn backing_off(&self) -> bool {
        self.backoff.is_some_and(|(until, _)| tokio::time::Instant::now() < until)
    }

    fn round_done(&mut self, done: Result<bool, tokio::task::JoinError>) {
        match done {
            Ok(true) => {
                if self.backoff.take().is_some() {
                    tracing::info!(bus = self.bus.kind(), "event bus is back; publishing resumed");
                }
            }
            Ok(false) | Err(_) => {
                let delay = self.backoff.map_or(Duration::from_millis(200), |(_, d)| (d * 2).min(MAX_BACKOFF));
                self.backoff = Some((tokio::time::Instant::now() + delay, delay));
            }
        }
    }

    /// Leases what is waiting (published before, failed, or left by a dead instance) and publishes it.
    async fn sweep(&mut self, rounds: &mut Rounds) {
        loop {
            while rounds.len() >= MAX_ROUNDS {
                if let Some(done) = rounds.join_next().await {
                    self.round_done(done);
                }
            }
            if self.backing_off() {
                return;
            }
            let leased = match self.store.outbox_lease(PUBLISH_CHUNK as u32, now_ms(), self.settings.lease_ms).await {
                Ok(leased) => leased,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox sweep failed");
                    return;
                }
            };
            let full = leased.len() == PUBLISH_CHUNK;
            if !leased.is_empty() {
                self.spawn_round(rounds, leased);
            }
            if !full {
                return;
            }
        }
    }

    /// Publishes and deletes in the background; the round reports `false` when the bus failed (its rows
    /// are released for a later sweep).
    fn spawn_round(&self, rounds: &mut Rounds, records: Vec<OutboxRecord>) {
        let (store, bus) = (self.store.clone(), self.bus.clone());
        let span = tracing::info_span!("relay.publish", count = records.len());
        rounds.spawn(
            async move {
                let events: Vec<_> = records.iter().map(|r| r.event.clone()).collect();
                let started = std::time::Instant::now();
                match bus.publish(&events).await {
                    Ok(()) => {
                        metrics::histogram!("iothub_events_publish_seconds").record(started.elapsed().as_secs_f64());
                        metrics::counter!("iothub_events_published_total").increment(records.len() as u64);
                        let ids: Vec<i64> = records.iter().map(|r| r.id).collect();
                        if let Err(e) = store.outbox_ack(&ids).await {
                            // They will be published again after the lease: a duplicate, never a loss.
                            tracing::warn!(error = %e, count = ids.len(), "could not delete published outbox rows");
                        }
                        true
                    }
                    Err(e) => {
                        metrics::counter!("iothub_events_publish_failures_total").increment(1);
                        tracing::warn!(error = %e, bus = bus.kind(), pending = records.len(),
                            "event bus publish failed; events stay in the outbox");
                        release(&*store, &records).await;
                        false
                    }
                }
            }
            .instrument(span),
        );
    }
}

async fn release(store: &dyn OutboxStore, records: &[OutboxRecord]) {
    let ids: Vec<i64> = records.iter().map(|r| r.id).collect();
    if let Err(e) = store.outbox_release(&ids).await {
        tracing::warn!(error = %e, "could not release outbox rows; they return after their lease");
    }
}

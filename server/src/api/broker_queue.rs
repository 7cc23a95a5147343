//! The durable entry for broker events: a RabbitMQ queue that EMQX's RabbitMQ action fills.
//!
//! A webhook lives only as long as the broker retries it (EMQX: `request_ttl`), so an outage of every iothub
//! instance or of the database longer than that loses device data. With `rabbitmq.ingest_queue` set, the
//! broker publishes each rule event (the same JSON the EMQX 5 HTTP action posts) as a persistent message
//! with publisher confirms, and every iothub instance consumes the queue: a message is acknowledged only
//! after [`IngestService::submit`] stored it, so while iothub or its database is down the events wait in
//! RabbitMQ (on disk) for as long as it has room. A storage failure is retried in place with backoff (the
//! message stays unacknowledged, which also holds back further deliveries beyond the prefetch); a message
//! that can never be applied (not JSON, a missing field) is rejected to the dead-letter queue
//! `{queue}.dead` where an operator can read it. A message redelivered after a crash is applied again and
//! deduplicated like a retried webhook. iothub declares the topology on every (re)connect: a quorum queue
//! bound to a fanout exchange, both named `{queue}`, and the dead-letter pair `{queue}.dead`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::broker_events::{parse_events, Dialect};
use crate::domain::ingest::IngestService;
use crate::error::{Error, Result};

/// Deliveries of one message before RabbitMQ dead-letters it instead (a message that kills the consumer
/// must not do so forever).
pub const DELIVERY_LIMIT: i64 = 20;

/// Where broker events are consumed from, and how many may be in flight at once.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub url: String,
    pub queue: String,
    pub prefetch: u16,
    pub timeout: Duration,
}

/// The running consumer's state, for `/readyz`.
#[derive(Clone)]
pub struct BrokerQueue {
    consuming: Arc<AtomicBool>,
    queue: String,
}

impl BrokerQueue {
    pub fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Ok while a consumer is attached to the queue.
    pub fn ping(&self) -> Result<()> {
        if self.consuming.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(Error::Unavailable(format!("not consuming broker events from {}", self.queue)))
        }
    }

    /// Consumes until `closing` turns true; then stops taking deliveries, lets the ones in flight finish
    /// (each is acknowledged once stored) and closes the connection, which hands anything unacknowledged
    /// back to RabbitMQ for another instance.
    pub fn start(
        settings: QueueSettings,
        ingest: IngestService,
        closing: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let consuming = Arc::new(AtomicBool::new(false));
        let me = Self { consuming: consuming.clone(), queue: settings.queue.clone() };
        let task = tokio::spawn(consume_forever(settings, ingest, consuming, closing));
        (me, task)
    }
}

async fn consume_forever(
    settings: QueueSettings,
    ingest: IngestService,
    consuming: Arc<AtomicBool>,
    mut closing: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    while !*closing.borrow() {
        let outcome = consume_once(&settings, &ingest, &consuming, &mut closing).await;
        consuming.store(false, Ordering::Relaxed);
        match outcome {
            Ok(()) if *closing.borrow() => break,
            Ok(()) => tracing::warn!(queue = %settings.queue, "broker-event queue consumer ended; reconnecting"),
            Err(e) => {
                tracing::warn!(queue = %settings.queue, error = %e, retry_in = ?backoff, "broker-event queue unavailable")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = closing.wait_for(|c| *c) => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("rabbitmq {what}: {e}"))
}

/// One connection's life: declare, consume, hand each delivery to a task (at most `prefetch` at once).
async fn consume_once(
    settings: &QueueSettings,
    ingest: &IngestService,
    consuming: &AtomicBool,
    closing: &mut watch::Receiver<bool>,
) -> Result<()> {
    let connect = Connection::connect(&settings.url, ConnectionProperties::default());
    let conn = tokio::time::timeout(settings.timeout, connect)
        .await
        .map_err(|_| unavailable("connect", "timed out"))?
        .map_err(|e| unavailable("connect", e))?;
    let channel = conn.create_channel().await.map_err(|e| unavailable("channel", e))?;
    declare_topology(&channel, &settings.queue).await?;
    channel.basic_qos(settings.prefetch, BasicQosOptions::default()).await.map_err(|e| unavailable("qos", e))?;
    let mut consumer = channel
        .basic_consume(
            settings.queue.as_str().into(),
            "iothub-ingest".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| unavailable("consume", e))?;
    consuming.store(true, Ordering::Relaxed);
    tracing::info!(queue = %settings.queue, prefetch = settings.prefetch, "consuming broker events from RabbitMQ");

    let in_flight = Arc::new(Semaphore::new(usize::from(settings.prefetch.max(1))));
    let result = loop {
        let next = tokio::select! {
            next = consumer.next() => next,
            _ = closing.wait_for(|c| *c) => break Ok(()),
        };
        match next {
            Some(Ok(delivery)) => {
                let permit = in_flight.clone().acquire_owned().await.expect("semaphore never closed");
                let ingest = ingest.clone();
                let stop = closing.clone();
                tokio::spawn(async move {
                    handle(delivery, &ingest, stop).await;
                    drop(permit);
                });
            }
            Some(Err(e)) => break Err(unavailable("delivery", e)),
            None => break Ok(()),
        }
    };
    consuming.store(false, Ordering::Relaxed);
    // Deliveries in flight finish (and are acknowledged) before the connection goes: closing it earlier
    // would requeue events that are already stored, to be deduplicated on another instance.
    let all = u32::from(settings.prefetch.max(1));
    let _ = tokio::time::timeout(Duration::from_secs(10), in_flight.acquire_many(all)).await;
    let _ = conn.close(200, "iothub stopping".into()).await;
    result
}

async fn declare_topology(channel: &Channel, queue: &str) -> Result<()> {
    let dead = format!("{queue}.dead");
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    for exchange in [queue, dead.as_str()] {
        channel
            .exchange_declare(exchange.into(), ExchangeKind::Fanout, durable, FieldTable::default())
            .await
            .map_err(|e| unavailable("exchange declare", e))?;
    }
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let mut live = quorum.clone();
    live.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(dead.as_str().into()));
    live.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(DELIVERY_LIMIT));
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    for (name, arguments) in [(queue, live), (dead.as_str(), quorum)] {
        channel.queue_declare(name.into(), options, arguments).await.map_err(|e| {
            unavailable(
                "queue declare",
                format!("{name}: {e} (a queue of that name with other arguments must be deleted first)"),
            )
        })?;
        channel
            .queue_bind(name.into(), name.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .map_err(|e| unavailable("queue bind", e))?;
    }
    Ok(())
}

/// Applies one message; acknowledges it once stored, rejects it to the dead-letter queue when it can
/// never be applied, and otherwise keeps trying (until shutdown, which leaves it to RabbitMQ).
async fn handle(delivery: Delivery, ingest: &IngestService, mut closing: watch::Receiver<bool>) {
    let events = match parse_events(Dialect::Emqx5, &delivery.data) {
        Ok(events) => events,
        Err(e) => return reject(&delivery, &e).await,
    };
    let mut backoff = Duration::from_millis(250);
    loop {
        match ingest.submit(events.clone()).await {
            Ok(()) => {
                metrics::counter!("iothub_broker_queue_total", "outcome" => "ingested").increment(1);
                if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                    // Stored, but RabbitMQ will deliver it again: the replay is deduplicated.
                    tracing::debug!(error = %e, "ack of a stored broker event failed");
                }
                return;
            }
            Err(e @ Error::Validation { .. }) => return reject(&delivery, &e).await,
            Err(e) => {
                metrics::counter!("iothub_broker_queue_total", "outcome" => "retried").increment(1);
                tracing::warn!(error = %e, retry_in = ?backoff, "broker event from the queue not stored; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = closing.wait_for(|c| *c) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn reject(delivery: &Delivery, error: &Error) {
    metrics::counter!("iothub_broker_queue_total", "outcome" => "dead_lettered").increment(1);
    tracing::warn!(error = %error, "broker event from the queue can never be applied; dead-lettered");
    if let Err(e) = delivery.reject(BasicRejectOptions { requeue: false }).await {
        tracing::debug!(error = %e, "reject failed; RabbitMQ will deliver the message again");
    }
}

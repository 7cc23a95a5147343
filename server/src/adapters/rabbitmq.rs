//! RabbitMQ [`EventBus`] (production profile), over lapin.
//!
//! Events go to durable direct exchanges `{prefix}.{kind}` with the product id as routing key, as
//! persistent messages carrying `message_id` = event id, `type` = kind and `content_type` JSON. Publishing
//! waits for publisher confirms of the whole batch, so an `Ok` means RabbitMQ has taken responsibility.
//! The connection is opened lazily and reopened after any failure; exchanges are declared on every
//! (re)connect so a wiped broker is repopulated. Note that RabbitMQ drops messages routed to an exchange
//! with no bound queue: consumers declare and bind their queues first (docs/events.md).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind, PublisherConfirm};
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::model::event_bus::BusEvent;
use crate::model::event_bus::EventKind;
use crate::ports::event_bus::EventBus;

pub struct RabbitBus {
    url: String,
    prefix: String,
    timeout: Duration,
    /// Connection and confirm-mode publishing channel, `None` until first use or after a failure.
    link: Mutex<Option<Link>>,
    generation: std::sync::atomic::AtomicU64,
}

struct Link {
    conn: Connection,
    channel: Channel,
    /// Which (re)connection this is, so a late failure never tears down a newer link.
    generation: u64,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("rabbitmq {what}: {e}"))
}

impl RabbitBus {
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Self {
        Self {
            url: url.to_string(),
            prefix: prefix.to_string(),
            timeout,
            link: Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn exchange(&self, kind: EventKind) -> String {
        format!("{}.{}", self.prefix, kind.as_str())
    }

    async fn open_link(&self) -> Result<Link> {
        let (conn, channel) = self.open().await?;
        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        Ok(Link { conn, channel, generation })
    }

    async fn open(&self) -> Result<(Connection, Channel)> {
        let connect = Connection::connect(&self.url, ConnectionProperties::default());
        let conn = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| unavailable("connect", "timed out"))?
            .map_err(|e| unavailable("connect", e))?;
        let channel = conn.create_channel().await.map_err(|e| unavailable("channel", e))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| unavailable("confirm", e))?;
        for kind in EventKind::ALL {
            channel
                .exchange_declare(
                    self.exchange(kind).into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions { durable: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| unavailable("exchange declare", e))?;
        }
        tracing::info!(prefix = %self.prefix, "connected to RabbitMQ");
        Ok((conn, channel))
    }

    /// Sends every event (frames queued on the channel); the returned confirms resolve as RabbitMQ
    /// takes responsibility for each.
    async fn send_all(&self, channel: &Channel, events: &[BusEvent]) -> Result<Vec<PublisherConfirm>> {
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        let mut confirms = Vec::with_capacity(events.len());
        for event in events {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(event.event_id.clone().into())
                .with_type(event.kind.as_str().into())
                .with_timestamp(timestamp);
            let confirm = channel
                .basic_publish(
                    self.exchange(event.kind).into(),
                    event.routing_key.clone().into(),
                    BasicPublishOptions::default(),
                    &event.body,
                    properties,
                )
                .await
                .map_err(|e| unavailable("publish", e))?;
            confirms.push(confirm);
        }
        Ok(confirms)
    }

    async fn await_confirms(&self, confirms: Vec<PublisherConfirm>) -> Result<()> {
        for confirm in confirms {
            let confirmation = tokio::time::timeout(self.timeout, confirm)
                .await
                .map_err(|_| unavailable("confirm", "timed out"))?
                .map_err(|e| unavailable("confirm", e))?;
            if confirmation.is_nack() {
                return Err(unavailable("confirm", "broker refused (nack)"));
            }
        }
        Ok(())
    }

    /// Drops the link so the next publish reconnects (state unknown after a failure).
    async fn reset(&self, failed_generation: u64) {
        let mut link = self.link.lock().await;
        if link.as_ref().is_some_and(|l| l.generation == failed_generation) {
            if let Some(old) = link.take() {
                let _ = old.conn.close(320, "iothub reconnecting".into()).await;
            }
        }
    }
}

impl Link {
    fn is_up(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }
}

#[async_trait]
impl EventBus for RabbitBus {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    #[tracing::instrument(skip(self), name = "rabbitmq.ping")]
    async fn ping(&self) -> Result<()> {
        // Never queue behind a publish in progress (RabbitMQ flow control can hold one for long): a link
        // busy publishing is up; its failures surface through the relay.
        let Ok(mut link) = self.link.try_lock() else { return Ok(()) };
        if link.as_ref().is_some_and(Link::is_up) {
            return Ok(());
        }
        *link = Some(self.open_link().await?);
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(count = events.len()), name = "rabbitmq.publish")]
    async fn publish(&self, events: &[BusEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        // The lock covers sending only: the next batch may go out while this one waits for its confirms,
        // which lets RabbitMQ confirm (and sync to disk) several batches at once.
        let (generation, sent) = {
            let mut link = self.link.lock().await;
            if !link.as_ref().is_some_and(Link::is_up) {
                *link = Some(self.open_link().await?);
            }
            let link = link.as_ref().expect("link opened above");
            // Bounded: a blocked connection (RabbitMQ memory/disk alarm) must not hold the link forever.
            let sent = tokio::time::timeout(self.timeout * 2, self.send_all(&link.channel, events))
                .await
                .unwrap_or_else(|_| Err(unavailable("publish", "timed out (flow control?)")));
            (link.generation, sent)
        };
        let result = match sent {
            Ok(confirms) => self.await_confirms(confirms).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.reset(generation).await;
        }
        result
    }

    async fn subscribe(&self, product: Option<String>) -> Result<BoxStream<'static, BusEvent>> {
        let product = product.ok_or_else(|| Error::Validation {
            field: "product".into(),
            message: "required when events come from RabbitMQ".into(),
        })?;
        let (conn, _) = self.open().await?;
        let channel = conn.create_channel().await.map_err(|e| unavailable("channel", e))?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(|e| unavailable("queue declare", e))?;
        for kind in EventKind::ALL {
            channel
                .queue_bind(
                    queue.name().clone(),
                    self.exchange(kind).into(),
                    product.clone().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| unavailable("queue bind", e))?;
        }
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "iothub-sse".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(|e| unavailable("consume", e))?;
        // The connection lives as long as the stream; dropping it closes the exclusive queue.
        let stream = consumer.filter_map(move |delivery| {
            let _keep_alive = &conn;
            let event = delivery.ok().and_then(|d| {
                let kind = d.properties.kind().as_ref().and_then(|k| EventKind::parse(k.as_str()))?;
                let event_id = d.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default();
                Some(BusEvent { kind, routing_key: d.routing_key.to_string(), event_id, body: d.data })
            });
            std::future::ready(event)
        });
        Ok(stream.boxed())
    }
}

//! The northbound event port: where committed events go for business systems to consume.
//!
//! Production publishes to durable RabbitMQ direct exchanges (`{prefix}.{kind}`, routing key = product id)
//! with publisher confirms; the embedded profile keeps an in-process stream. Either way `publish` returns
//! `Ok` only when every event of the batch is safely handed over, which is when the outbox rows may go.
//! `subscribe` feeds the Server-Sent Events endpoint.

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::domain::events::EventKind;
use crate::error::Result;

/// One event as stored in the outbox and handed to the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusEvent {
    pub kind: EventKind,
    /// The product id: RabbitMQ routing key and SSE filter.
    pub routing_key: String,
    /// Stable id: a replayed or republished event carries the same one.
    pub event_id: String,
    /// JSON document (schema in docs/events.md).
    pub body: Vec<u8>,
}

#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    async fn ping(&self) -> Result<()>;
    /// Publishes all events, returning once every one is confirmed (or with the first failure).
    async fn publish(&self, events: &[BusEvent]) -> Result<()>;
    /// Live events of one product (all products when `None`), from now on.
    async fn subscribe(&self, product: Option<String>) -> Result<BoxStream<'static, BusEvent>>;
}

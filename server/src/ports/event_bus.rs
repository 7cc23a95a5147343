//! The northbound event port: where committed events go for business systems to consume.
//!
//! Production publishes to durable RabbitMQ direct exchanges (`{prefix}.{kind}`, routing key = product id)
//! with publisher confirms; the embedded profile keeps an in-process stream. Either way `publish` returns
//! `Ok` only when every event of the batch is safely handed over, which is when the outbox rows may go.
//! `subscribe` feeds the Server-Sent Events endpoint.

use crate::error::Result;
use crate::model::event_bus::*;
use async_trait::async_trait;
use futures::stream::BoxStream;

#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    async fn ping(&self) -> Result<()>;
    /// Publishes all events, returning once every one is confirmed (or with the first failure).
    async fn publish(&self, events: &[BusEvent]) -> Result<()>;
    /// Live events of one product (all products when `None`), from now on.
    async fn subscribe(&self, product: Option<String>) -> Result<BoxStream<'static, BusEvent>>;
}

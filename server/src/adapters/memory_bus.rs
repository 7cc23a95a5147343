//! In-process [`EventBus`] for the embedded profile: a broadcast stream that the SSE endpoint reads.
//!
//! Publishing never fails and never blocks; a subscriber that falls more than the buffer behind skips the
//! events it missed (SSE is a live view; the history API is the record).

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use crate::error::Result;
use crate::model::event_bus::BusEvent;
use crate::ports::event_bus::EventBus;

pub struct MemoryBus {
    tx: broadcast::Sender<BusEvent>,
}

impl MemoryBus {
    pub fn new(buffer: usize) -> Self {
        Self { tx: broadcast::channel(buffer.max(16)).0 }
    }
}

#[async_trait]
impl EventBus for MemoryBus {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn publish(&self, events: &[BusEvent]) -> Result<()> {
        for event in events {
            // No receiver is fine: nobody is watching.
            let _ = self.tx.send(event.clone());
        }
        Ok(())
    }

    async fn subscribe(&self, product: Option<String>) -> Result<BoxStream<'static, BusEvent>> {
        let stream = BroadcastStream::new(self.tx.subscribe()).filter_map(move |item| {
            let keep = match item {
                Ok(e) if product.as_deref().is_none_or(|p| p == e.routing_key) => Some(e),
                Ok(_) => None,
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "event stream subscriber fell behind");
                    None
                }
            };
            std::future::ready(keep)
        });
        Ok(stream.boxed())
    }
}

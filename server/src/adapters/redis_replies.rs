//! Redis pub/sub [`ReplyHub`] for the production profile: every instance subscribes to one channel
//! (`{redis.key_prefix}rpc_replies`) and hands announced replies to its own waiters.
//!
//! One shared channel keeps an RPC to a single `PUBLISH` (no per-request `SUBSCRIBE` round trip); each
//! instance sees every reply, which is cheap next to the webhook that carried it. The subscriber
//! reconnects with backoff; a reply announced while it was away is found by the caller's final read of
//! the command log.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::aio::ConnectionManager;

use crate::error::{Error, Result};
use crate::model::replies::{Reply, ReplyWaiter, Waiters};
use crate::ports::replies::ReplyHub;

pub struct RedisReplies {
    conn: ConnectionManager,
    channel: String,
    waiters: Arc<Waiters>,
    subscriber: tokio::task::JoinHandle<()>,
}

impl RedisReplies {
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), super::redis_dedup::connection_config())?;
        let channel = format!("{prefix}rpc_replies");
        let waiters = Arc::new(Waiters::default());
        // Subscribed before we return when Redis is up, so no reply announced after start-up is missed.
        // Without Redis the instance still starts: its own callers get their replies locally, and the
        // listener keeps trying to subscribe.
        let first = match subscribe(&client, &channel).await {
            Ok(pubsub) => Some(pubsub),
            Err(e) => {
                tracing::warn!(error = %e, "RPC reply channel unavailable at start; retrying in the background");
                None
            }
        };
        let subscriber = tokio::spawn(listen(client, channel.clone(), waiters.clone(), first));
        Ok(Self { conn, channel, waiters, subscriber })
    }
}

impl Drop for RedisReplies {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

/// Bounded in time: an unreachable (not refusing) Redis must not hold up start-up.
async fn subscribe(client: &redis::Client, channel: &str) -> anyhow::Result<redis::aio::PubSub> {
    tokio::time::timeout(Duration::from_secs(2), async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub)
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out subscribing"))?
    .map_err(Into::into)
}

#[tracing::instrument(skip_all, fields(channel = %channel), name = "redis.rpc_replies")]
async fn listen(client: redis::Client, channel: String, waiters: Arc<Waiters>, first: Option<redis::aio::PubSub>) {
    let mut next = first;
    let mut backoff = Duration::from_millis(100);
    loop {
        let pubsub = match next.take() {
            Some(p) => p,
            None => match subscribe(&client, &channel).await {
                Ok(p) => {
                    tracing::info!("RPC reply channel resubscribed");
                    p
                }
                Err(e) => {
                    tracing::warn!(error = %e, "RPC reply channel unavailable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(100);
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            match serde_json::from_slice::<Reply>(msg.get_payload_bytes()) {
                Ok(reply) => {
                    waiters.deliver(reply);
                }
                Err(e) => tracing::warn!(error = %e, "unreadable RPC reply announcement ignored"),
            }
        }
        tracing::warn!("RPC reply channel closed; resubscribing");
    }
}

#[async_trait]
impl ReplyHub for RedisReplies {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn wait(&self, key: String) -> ReplyWaiter {
        self.waiters.register(key)
    }

    #[tracing::instrument(skip_all, fields(key = %reply.key), name = "redis.announce_reply")]
    async fn announce(&self, reply: Reply) -> Result<()> {
        let body = serde_json::to_vec(&reply).map_err(|e| Error::Internal(e.into()))?;
        // A caller on this instance needs no round trip through Redis (request ids are unique: nobody
        // else waits for it).
        if self.waiters.deliver(reply) {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(body)
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::Unavailable(format!("redis: {e}")))?;
        Ok(())
    }
}

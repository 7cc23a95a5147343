//! Makes the bundled RMQTT carry iothub's internal topics, whose `$` names sit *inside* the topic
//! (`get/{p}/{d}/$ntp/{id}`, `cmd/{p}/{d}/$set_ntp/plain/{id}`, `upload_data/{p}/{d}/$shadow_reported/{id}`).
//!
//! MQTT (§4.7.2) reserves only topics that *start* with `$`; EMQX follows it. RMQTT 0.24 refuses to parse any
//! topic with a `$` level after the first (`Topic::from_str`), so such a publish is silently dropped: the
//! router finds no subscriber and the web-hook never reports it. Two pieces, both through RMQTT's public
//! extension points and without touching its code, restore the spec behaviour for the embedded profile:
//!
//! - [`DollarTolerantRouter`] wraps RMQTT's own router and escapes inner `$` levels (prefixing a NUL, which
//!   MQTT forbids in topics, so no real topic can collide) before the router parses a topic or filter. Only
//!   the router's lookup key changes; subscribers receive the original topic.
//! - [`DollarTopicForwarder`] reports publishes on such topics to iothub in the web-hook's own
//!   `message_publish` shape (the web-hook plugin cannot build its message for them), with retries.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::router::{DefaultRouter, Router};
use rmqtt::types::{
    AllRelationsMap, HashMap, Id, NodeId, Route, SubRelationsMap, SubsSearchParams, SubsSearchResult,
    SubscriptionOptions, TopicName,
};
use rmqtt::utils::Counter;

/// Marks an escaped level; U+0000 is not allowed in MQTT topic names or filters.
const ESCAPE: char = '\u{0}';

/// Whether a topic has a level starting with `$` after the first one.
pub fn has_inner_dollar_level(topic: &str) -> bool {
    topic.split('/').skip(1).any(|level| level.starts_with('$'))
}

/// `a/$b/c` → `a/\0$b/c`; the first level is left alone (`$SYS/...` keeps its meaning).
fn escape(topic: &str) -> std::borrow::Cow<'_, str> {
    if !has_inner_dollar_level(topic) {
        return topic.into();
    }
    let mut out = String::with_capacity(topic.len() + 4);
    for (i, level) in topic.split('/').enumerate() {
        if i > 0 {
            out.push('/');
            if level.starts_with('$') {
                out.push(ESCAPE);
            }
        }
        out.push_str(level);
    }
    out.into()
}

/// RMQTT's router, with inner `$` levels routable like any other level.
pub struct DollarTolerantRouter {
    inner: DefaultRouter,
}

impl DollarTolerantRouter {
    pub fn new(inner: DefaultRouter) -> Self {
        Self { inner }
    }
}

#[async_trait]
impl Router for DollarTolerantRouter {
    async fn add(&self, topic_filter: &str, id: Id, opts: SubscriptionOptions) -> rmqtt::Result<()> {
        self.inner.add(&escape(topic_filter), id, opts).await
    }

    async fn remove(&self, topic_filter: &str, id: Id) -> rmqtt::Result<bool> {
        self.inner.remove(&escape(topic_filter), id).await
    }

    async fn matches(&self, id: Id, topic: &TopicName) -> rmqtt::Result<SubRelationsMap> {
        match escape(topic) {
            std::borrow::Cow::Borrowed(_) => self.inner.matches(id, topic).await,
            std::borrow::Cow::Owned(escaped) => self.inner.matches(id, &TopicName::from(escaped)).await,
        }
    }

    async fn is_online(&self, node_id: NodeId, client_id: &str) -> bool {
        self.inner.is_online(node_id, client_id).await
    }

    async fn gets(&self, limit: usize) -> Vec<Route> {
        self.inner.gets(limit).await
    }

    async fn get(&self, topic: &str) -> rmqtt::Result<Vec<Route>> {
        self.inner.get(&escape(topic)).await
    }

    async fn query_subscriptions(&self, q: &SubsSearchParams) -> Vec<SubsSearchResult> {
        self.inner.query_subscriptions(q).await
    }

    async fn topics_tree(&self) -> usize {
        self.inner.topics_tree().await
    }

    fn topics(&self) -> Counter {
        self.inner.topics()
    }

    fn routes(&self) -> Counter {
        self.inner.routes()
    }

    fn merge_topics(&self, topics_map: &HashMap<NodeId, Counter>) -> Counter {
        self.inner.merge_topics(topics_map)
    }

    fn merge_routes(&self, routes_map: &HashMap<NodeId, Counter>) -> Counter {
        self.inner.merge_routes(routes_map)
    }

    async fn list_topics(&self, top: usize) -> Vec<String> {
        self.inner.list_topics(top).await
    }

    async fn list_relations(&self, top: usize) -> Vec<serde_json::Value> {
        self.inner.list_relations(top).await
    }

    fn relations(&self) -> &AllRelationsMap {
        self.inner.relations()
    }
}

/// Reports what the web-hook plugin cannot for topics with inner `$` levels: device publishes on upstream
/// topics (`$ntp`, `$tags`, `$shadow*` requests) and deliveries of command topics (`$ota_upgrade`, which the
/// command log tracks), in the web-hook's own JSON shape, to iothub's web-hook endpoint.
pub struct DollarTopicForwarder {
    queue: tokio::sync::mpsc::Sender<serde_json::Value>,
}

/// Reports in flight at once; more wait in the queue (like the web-hook's own concurrency limit).
const CONCURRENCY: usize = 64;
/// How long a report is retried while iothub is away (the web-hook's `retry_max_elapsed_time`).
const RETRY_FOR: Duration = Duration::from_secs(60);

impl DollarTopicForwarder {
    /// Posts to `url` (the web-hook URL, token in its userinfo) from a task on the current runtime.
    pub fn start(url: url::Url) -> Self {
        let (queue, mut rx) = tokio::sync::mpsc::channel::<serde_json::Value>(100_000);
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("HTTP client");
        let url = Arc::new(url);
        let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        tokio::spawn(async move {
            while let Some(body) = rx.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let (client, url) = (client.clone(), url.clone());
                // Concurrent like the web-hook's own workers; iothub orders by broker timestamps.
                tokio::spawn(async move {
                    post_with_retries(&client, &url, &body).await;
                    drop(slot);
                });
            }
        });
        Self { queue }
    }

    fn enqueue(&self, topic: &str, body: serde_json::Value) {
        if self.queue.try_send(body).is_err() {
            tracing::warn!(topic, "forward queue full; a `$` topic report was dropped");
        }
    }
}

async fn post_with_retries(client: &reqwest::Client, url: &url::Url, body: &serde_json::Value) {
    let mut bare = url.clone();
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    let user = percent_encoding::percent_decode_str(url.username()).decode_utf8_lossy().into_owned();
    let password = url.password().map(|p| percent_encoding::percent_decode_str(p).decode_utf8_lossy().into_owned());
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        let sent = client.post(bare.as_str()).basic_auth(&user, password.as_ref()).json(body).send().await;
        match sent {
            Ok(resp) if resp.status().is_success() => return,
            Ok(resp) if resp.status().is_client_error() && resp.status() != reqwest::StatusCode::TOO_MANY_REQUESTS => {
                tracing::warn!(status = %resp.status(), "iothub refused a forwarded `$` topic report");
                return;
            }
            outcome => tracing::debug!(?outcome, "forwarding a `$` topic report failed; retrying"),
        }
        if started.elapsed() + delay > RETRY_FOR {
            tracing::warn!("gave up forwarding a `$` topic report to iothub after {RETRY_FOR:?}");
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

fn matches_any(filters: &[&str], topic: &str) -> bool {
    filters.iter().any(|f| f.strip_suffix('#').is_some_and(|prefix| topic.starts_with(prefix)))
}

#[async_trait]
impl Handler for DollarTopicForwarder {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        match param {
            Parameter::MessagePublish(_, from, publish)
                if has_inner_dollar_level(&publish.topic)
                    && matches_any(crate::topics::UPSTREAM_FILTERS, &publish.topic) =>
            {
                let body = serde_json::json!({
                    "action": "message_publish",
                    "topic": &*publish.topic,
                    "qos": publish.qos.value(),
                    "retain": publish.retain,
                    "dup": publish.dup,
                    "payload": b64(&publish.payload),
                    "ts": publish.create_time.unwrap_or_else(crate::clock::now_ms),
                });
                self.enqueue(&publish.topic, from.to_from_json(body));
            }
            // Like the web-hook's rules: deliveries only (`message_acked` only comes after and changes nothing).
            Parameter::MessageDelivered(session, from, publish)
                if has_inner_dollar_level(&publish.topic)
                    && matches_any(crate::topics::DOWNSTREAM_FILTERS, &publish.topic) =>
            {
                let body = serde_json::json!({
                    "action": "message_delivered",
                    "topic": &*publish.topic,
                    "qos": publish.qos.value(),
                    "payload": b64(&publish.payload),
                    "pts": publish.create_time,
                    "ts": crate::clock::now_ms(),
                });
                self.enqueue(&publish.topic, from.to_from_json(session.id.to_to_json(body)));
            }
            _ => {}
        }
        (true, acc)
    }
}

/// One forwarder registered for several hook types.
pub struct Shared(pub Arc<DollarTopicForwarder>);

#[async_trait]
impl Handler for Shared {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        self.0.hook(param, acc).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn inner_dollar_levels_become_routable_and_nothing_else_changes() {
        assert_eq!(escape("cmd/p/d/$set_ntp/plain/r1"), "cmd/p/d/\u{0}$set_ntp/plain/r1");
        assert_eq!(escape("$SYS/brokers"), "$SYS/brokers");
        assert_eq!(escape("cmd/p/d/reboot/plain/r1"), "cmd/p/d/reboot/plain/r1");
        assert!(rmqtt::topic::Topic::from_str("cmd/p/d/$set_ntp/plain/r1").is_err(), "RMQTT refuses it as is");
        let escaped = rmqtt::topic::Topic::from_str(&escape("cmd/p/d/$set_ntp/plain/r1")).expect("escaped parses");
        let filter = rmqtt::topic::Topic::from_str("cmd/p/d/+/+/+/#").unwrap();
        assert!(filter.matches(&escaped), "the auto-subscription matches it");
    }
}

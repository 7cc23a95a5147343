//! The connection: a [`Device`] handle to send with, an [`Events`] stream to receive from, and the task in
//! between that drives rumqttc, reconnects with backoff, and speaks iothub's internal protocol (`$set_ntp`,
//! `$set_tags`, `$update_shadow`, `$shadow_reply`, `$ota_upgrade`) so the application never sees a topic.
//!
//! The task never waits on the MQTT client's request channel (which it drains itself): what it publishes it
//! hands over without blocking, or from a spawned task when the channel is full.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use rumqttc::{AsyncClient, ConnectionError, EventLoop, MqttOptions, Outgoing, Packet, QoS, Request};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use iothub_protocol::topics::{self, CommandKind, Encoding, Inbound, Internal};

use crate::clock::{Clock, NtpAnswer};
use crate::config::{Backoff, DeviceConfig};
use crate::error::{Error, Result};
use crate::events::{Command, DeviceMessage, Event, OtaUpgrade, ShadowDesired};
use crate::shadow::{Outgoing as ShadowOutgoing, Reaction, ShadowTracker};
use crate::store::StateStore;
use crate::tags::{self, SetTags};

/// Largest packet accepted or sent (iothub commands carry up to 256 KiB).
const MAX_PACKET: usize = 1 << 20;

/// A connected device. Cheap to clone; every clone sends on the same connection.
#[derive(Clone, Debug)]
pub struct Device {
    link: Link,
    /// The connection task ends once every `Device` clone and the `Events` stream are gone.
    _alive: Arc<()>,
}

/// What the device receives; `None` once the device disconnected for good.
///
/// The connection task never waits for the application (it must keep answering the broker and draining the
/// requests the application's `respond` calls make), so events queue here without bound; past
/// [`DeviceConfig::event_capacity`] waiting events a warning is logged.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
    waiting: Arc<AtomicUsize>,
}

impl Events {
    pub async fn next(&mut self) -> Option<Event> {
        let event = self.rx.recv().await;
        if event.is_some() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        event
    }
}

/// The connection task's side of [`Events`].
struct EventSender {
    tx: mpsc::UnboundedSender<Event>,
    waiting: Arc<AtomicUsize>,
    warn_at: usize,
    warned: bool,
}

impl EventSender {
    fn send(&mut self, device: &str, event: Event) {
        // A dropped Events stream just means nobody listens; the connection goes on.
        if self.tx.send(event).is_err() {
            return;
        }
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        if waiting > self.warn_at && !self.warned {
            tracing::warn!(device, waiting, "the application is not reading device events; they pile up in memory");
        }
        self.warned = waiting > self.warn_at;
    }
}

/// The shared innards the handles in events publish through.
#[derive(Clone)]
pub(crate) struct Link(Arc<Inner>);

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link({}/{})", self.0.product, self.0.device)
    }
}

struct Inner {
    client: AsyncClient,
    product: String,
    device: String,
    clock: Clock,
    dedup_ttl: Duration,
    state: Mutex<State>,
    /// `sync_time` callers: (device_time sent, caller token, answer).
    ntp_waiters: Mutex<Vec<(i64, u64, oneshot::Sender<i64>)>>,
    next_token: std::sync::atomic::AtomicU64,
}

struct State {
    store: StateStore,
    shadow: ShadowTracker,
}

fn new_message_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

fn check_name(field: &'static str, name: &str) -> Result<()> {
    if !topics::is_name(name) || topics::is_internal_name(name) {
        return Err(Error::InvalidArgument {
            field,
            reason: format!("{name:?} must match [A-Za-z0-9_.-]{{1,64}} (names starting with `$` are iothub's)"),
        });
    }
    Ok(())
}

impl Device {
    /// Connects and waits for the first CONNACK. From then on the connection is kept up by itself:
    /// dropped connections are re-established with backoff until [`Device::disconnect`].
    pub async fn connect(config: DeviceConfig) -> Result<(Device, Events)> {
        config.validate()?;
        let store = match &config.state_dir {
            Some(dir) => StateStore::open(dir, &config.product_id, &config.device_id)?,
            None => StateStore::in_memory(),
        };
        let mut options = MqttOptions::new(config.client_id(), config.host.clone(), config.port);
        options
            .set_credentials(config.username(), config.secret.clone())
            .set_keep_alive(config.keep_alive)
            // iothub keeps commands for offline devices in its command log; a broker session would queue them
            // a second time. What the device sent and was not acknowledged is kept by the task below.
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        #[cfg(feature = "tls")]
        if let Some(tls) = &config.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                crate::config::rustls_config(tls)?,
            )));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        // Replies go out at once instead of waiting for the broker's delayed ACK (Nagle).
        eventloop.network_options.set_tcp_nodelay(true);
        eventloop.network_options.set_connection_timeout(config.connect_timeout.as_secs().max(1));
        let inner = Arc::new(Inner {
            client,
            product: config.product_id.clone(),
            device: config.device_id.clone(),
            clock: config.clock.clone(),
            dedup_ttl: config.dedup_ttl,
            state: Mutex::new(State { store, shadow: ShadowTracker::default() }),
            ntp_waiters: Mutex::new(Vec::new()),
            next_token: Default::default(),
        });
        let link = Link(inner);
        let (tx, rx) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let events = EventSender { tx, waiting: waiting.clone(), warn_at: config.event_capacity.max(1), warned: false };
        let (first_tx, first_rx) = oneshot::channel();
        let backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
        let alive = Arc::new(());
        let task = tokio::spawn(run(link.clone(), eventloop, events, first_tx, backoff, Arc::downgrade(&alive)));
        match tokio::time::timeout(config.connect_timeout, first_rx).await {
            Ok(Ok(Ok(()))) => Ok((Device { link, _alive: alive }, Events { rx, waiting })),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => {
                // Stop retrying: a late connection under the same client id would kick the caller's next one.
                task.abort();
                Err(Error::Connect(format!(
                    "no CONNACK from {}:{} within {:?}",
                    config.host, config.port, config.connect_timeout
                )))
            }
        }
    }

    pub fn product_id(&self) -> &str {
        &self.link.0.product
    }

    pub fn device_id(&self) -> &str {
        &self.link.0.device
    }

    /// The device's clock, corrected by the last [`Device::sync_time`].
    pub fn clock(&self) -> &Clock {
        &self.link.0.clock
    }

    /// Sends data of `data_type` (QoS 1; a redelivery carries the same message id, which iothub
    /// deduplicates). Returns the message id.
    pub async fn upload_data(&self, data_type: &str, payload: impl Into<Vec<u8>>) -> Result<String> {
        check_name("data_type", data_type)?;
        self.send_new(|p, d, id| topics::upload_data_topic(p, d, data_type, id), payload.into()).await
    }

    /// Replaces the device's status document (QoS 1). Returns the message id.
    pub async fn update_status(&self, status: &Value) -> Result<String> {
        self.send_new(topics::update_status_topic, serde_json::to_vec(status)?).await
    }

    /// Asks business systems for `resource` (`get/...` → `iothub.events.data_request`); they answer with a
    /// command. Returns the message id.
    pub async fn request_data(&self, resource: &str, payload: impl Into<Vec<u8>>) -> Result<String> {
        check_name("resource", resource)?;
        self.send_new(|p, d, id| topics::data_request_topic(p, d, resource, id), payload.into()).await
    }

    /// Sends `payload` to another device of the same product (M2M). Returns the message id.
    pub async fn send_to_device(&self, device_id: &str, payload: impl Into<Vec<u8>>) -> Result<String> {
        iothub_protocol::ids::validate_id(device_id)
            .map_err(|e| Error::InvalidArgument { field: "device_id", reason: e.to_string() })?;
        self.send_new(|p, d, id| topics::m2m_topic(p, device_id, d, id), payload.into()).await
    }

    /// Publishes at QoS 1 on the topic `topic(product, device, message_id)` with a new message id, returned.
    async fn send_new(&self, topic: impl FnOnce(&str, &str, &str) -> String, payload: Vec<u8>) -> Result<String> {
        let id = new_message_id();
        self.link.publish(topic(self.product_id(), self.device_id(), &id), QoS::AtLeastOnce, payload).await?;
        Ok(id)
    }

    /// Measures the clock offset to iothub with `$ntp` and applies it to [`Device::clock`]. Returns the
    /// offset in ms (iothub − local).
    pub async fn sync_time(&self, timeout: Duration) -> Result<i64> {
        let inner = &self.link.0;
        let device_time = inner.clock.local_ms();
        let (tx, rx) = oneshot::channel();
        let token = inner.next_token.fetch_add(1, Ordering::Relaxed);
        inner.ntp_waiters.lock().unwrap().push((device_time, token, tx));
        let topic =
            topics::data_request_topic(&inner.product, &inner.device, Internal::Ntp.as_str(), &new_message_id());
        self.link
            .publish(topic, QoS::AtMostOnce, json!({ "device_time": device_time }).to_string().into_bytes())
            .await?;
        let answer = tokio::time::timeout(timeout, rx).await;
        inner.ntp_waiters.lock().unwrap().retain(|(_, t, _)| *t != token);
        match answer {
            Ok(Ok(offset)) => Ok(offset),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout(Internal::SetNtp.as_str())),
        }
    }

    /// The device's tags and their version, as last received from iothub (persisted).
    pub fn tags(&self) -> (Vec<String>, i64) {
        let state = self.link.0.state.lock().unwrap();
        (state.store.state().tags.clone(), state.store.state().tags_version)
    }

    /// The shadow version the device knows (persisted).
    pub fn shadow_version(&self) -> i64 {
        self.link.0.state.lock().unwrap().store.state().shadow_version
    }

    /// Reports state to the shadow (`$shadow_reported`). Keys merge into `state.reported`; `null` deletes
    /// a key. A report that races with another change is sent again against iothub's newer version.
    pub async fn report_shadow(&self, reported: Value) -> Result<()> {
        let Value::Object(reported) = reported else {
            return Err(Error::InvalidArgument { field: "reported", reason: "must be a JSON object".into() });
        };
        let out = {
            let mut state = self.link.0.state.lock().unwrap();
            let version = state.store.state().shadow_version;
            state.shadow.report(reported, version, Instant::now())
        };
        if let Some(out) = out {
            self.link.send_shadow(out).await?;
        }
        Ok(())
    }

    /// Disconnects cleanly; the event stream ends.
    pub async fn disconnect(&self) -> Result<()> {
        self.link.0.client.disconnect().await?;
        Ok(())
    }
}

impl Link {
    async fn publish(&self, topic: String, qos: QoS, payload: Vec<u8>) -> Result<()> {
        self.0.client.publish(topic, qos, false, payload).await?;
        Ok(())
    }

    /// From the connection task: never waits on the request channel it drains itself.
    fn publish_detached(&self, topic: String, qos: QoS, payload: Vec<u8>) {
        if let Err(rumqttc::ClientError::TryRequest(_)) =
            self.0.client.try_publish(topic.clone(), qos, false, payload.clone())
        {
            let client = self.0.client.clone();
            tokio::spawn(async move {
                let _ = client.publish(topic, qos, false, payload).await;
            });
        }
    }

    pub(crate) async fn respond(
        &self,
        kind: CommandKind,
        name: &str,
        request_id: &str,
        payload: Vec<u8>,
    ) -> Result<String> {
        let id = new_message_id();
        let topic = topics::reply_topic(kind, &self.0.product, &self.0.device, name, request_id, &id);
        self.publish(topic, QoS::AtLeastOnce, payload).await?;
        Ok(id)
    }

    pub(crate) async fn ota_status(&self, body: Value) -> Result<String> {
        let id = new_message_id();
        let topic = topics::update_ota_status_topic(&self.0.product, &self.0.device, &id);
        self.publish(topic, QoS::AtLeastOnce, body.to_string().into_bytes()).await?;
        Ok(id)
    }

    pub(crate) async fn shadow_applied(&self, applied_version: i64) -> Result<()> {
        let out = {
            let mut state = self.0.state.lock().unwrap();
            let version = state.store.state().shadow_version;
            state.shadow.applied(applied_version, version, Instant::now())
        };
        if let Some(out) = out {
            self.send_shadow(out).await?;
        }
        Ok(())
    }

    fn shadow_topic(&self, out: &ShadowOutgoing) -> String {
        topics::upload_data_topic(&self.0.product, &self.0.device, out.data_type, &new_message_id())
    }

    async fn send_shadow(&self, out: ShadowOutgoing) -> Result<()> {
        self.publish(self.shadow_topic(&out), QoS::AtLeastOnce, out.payload.to_string().into_bytes()).await
    }

    fn send_shadow_detached(&self, out: ShadowOutgoing) {
        self.publish_detached(self.shadow_topic(&out), QoS::AtLeastOnce, out.payload.to_string().into_bytes());
    }

    /// Applies a store change, logging (not failing on) a disk error: the device keeps working on what it
    /// has in memory.
    fn persist(&self, what: &str, result: Result<()>) {
        if let Err(e) = result {
            tracing::warn!(device = %self.0.device, error = %e, "could not persist {what}");
        }
    }
}

/// A connection must stay up this long before the reconnect backoff starts again from its minimum: a broker
/// that accepts and then drops the device (e.g. over a publish it refuses) must not get a tight loop.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Times one unacknowledged publish is sent again on a new connection before it is given up.
const MAX_RESENDS: u8 = 3;

/// Drives the connection until the application disconnects (or drops every handle).
async fn run(
    link: Link,
    mut eventloop: EventLoop,
    mut events: EventSender,
    first: oneshot::Sender<Result<()>>,
    mut backoff: Backoff,
    alive: std::sync::Weak<()>,
) {
    let device = link.0.device.clone();
    let mut first = Some(first);
    let mut connected_at: Option<Instant> = None;
    // Requests not done when the connection dropped: unacknowledged QoS 1 publishes (rumqttc discards them
    // when the broker starts a new session), and anything queued behind them (a disconnect, say). They are
    // issued again on the next connection so QoS 1 really is at least once across reconnects.
    let mut unfinished: Vec<Request> = Vec::new();
    // Topics carry unique message ids, so a topic identifies a publish across resends.
    let mut resends: std::collections::HashMap<String, u8> = std::collections::HashMap::new();
    loop {
        if alive.strong_count() == 0 && events.tx.is_closed() {
            let _ = link.0.client.try_disconnect();
            return;
        }
        match eventloop.poll().await {
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(ack))) => {
                connected_at = Some(Instant::now());
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                }
                on_connected(&link);
                reissue(&link, std::mem::take(&mut unfinished), &mut resends);
                events.send(&device, Event::Connected { session_present: ack.session_present });
            }
            Ok(rumqttc::Event::Incoming(Packet::Publish(publish))) => {
                for event in on_publish(&link, &publish.topic, &publish.payload) {
                    events.send(&device, event);
                }
            }
            Ok(rumqttc::Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                unfinished.extend(eventloop.pending.drain(..));
                if let ConnectionError::ConnectionRefused(code) = &e {
                    if let Some(first) = first.take() {
                        let _ = first.send(Err(Error::Refused(format!("{code:?}"))));
                        return;
                    }
                }
                if matches!(e, ConnectionError::RequestsDone) {
                    break;
                }
                if let Some(since) = connected_at.take() {
                    if since.elapsed() >= STABLE_AFTER {
                        backoff.reset();
                        resends.clear();
                    }
                    events.send(&device, Event::Disconnected { reason: e.to_string() });
                }
                let delay = backoff.next_delay();
                tracing::debug!(device = %device, error = %e, ?delay, "reconnecting");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Issues again, as new requests (fresh packet ids, normal in-flight limits), what the last connection left
/// unfinished. A publish resent [`MAX_RESENDS`] times is given up: the broker keeps refusing it.
fn reissue(link: &Link, unfinished: Vec<Request>, resends: &mut std::collections::HashMap<String, u8>) {
    let mut disconnect = false;
    for request in unfinished {
        match request {
            Request::Publish(p) => {
                let count = resends.entry(p.topic.clone()).or_insert(0);
                *count += 1;
                if *count > MAX_RESENDS {
                    tracing::warn!(device = %link.0.device, topic = %p.topic, "a publish was refused on every connection; given up");
                    continue;
                }
                link.publish_detached(p.topic, p.qos, p.payload.to_vec());
            }
            Request::Disconnect(_) => disconnect = true,
            // Tag subscriptions are made afresh from the stored tags on every connect; acknowledgements and
            // pings belong to the connection that is gone.
            _ => {}
        }
    }
    if disconnect {
        let client = link.0.client.clone();
        tokio::spawn(async move {
            let _ = client.disconnect().await;
        });
    }
}

/// On every (re)connect: subscribe to the tag topics (the broker may have lost them with the session), ask
/// for newer tags and for the shadow, and resend a shadow message whose reply never came.
fn on_connected(link: &Link) {
    let inner = &link.0;
    let (tags, tags_version, resend) = {
        let mut state = inner.state.lock().unwrap();
        let version = state.store.state().shadow_version;
        let resend = state.shadow.resend(version, Instant::now());
        (state.store.state().tags.clone(), state.store.state().tags_version, resend)
    };
    for tag in tags {
        subscribe_tag(link, &tag);
    }
    let request = |resource: Internal, body: Value| {
        let topic = topics::data_request_topic(&inner.product, &inner.device, resource.as_str(), &new_message_id());
        link.publish_detached(topic, QoS::AtLeastOnce, body.to_string().into_bytes());
    };
    request(Internal::Tags, json!({ "tags_version": tags_version }));
    request(Internal::Shadow, json!({}));
    if let Some(out) = resend {
        link.send_shadow_detached(out);
    }
}

fn subscribe_tag(link: &Link, tag: &str) {
    let filter = topics::tag_filter(&link.0.product, tag);
    if link.0.client.try_subscribe(filter.clone(), QoS::AtLeastOnce).is_err() {
        let client = link.0.client.clone();
        tokio::spawn(async move {
            let _ = client.subscribe(filter, QoS::AtLeastOnce).await;
        });
    }
}

fn unsubscribe_tag(link: &Link, tag: &str) {
    let filter = topics::tag_filter(&link.0.product, tag);
    if link.0.client.try_unsubscribe(filter.clone()).is_err() {
        let client = link.0.client.clone();
        tokio::spawn(async move {
            let _ = client.unsubscribe(filter).await;
        });
    }
}

/// Turns one received publish into what the application should see (often nothing). Anything malformed is
/// logged and dropped: bad input from the network never panics and never reaches the application.
pub(crate) fn on_publish(link: &Link, topic: &str, payload: &[u8]) -> Vec<Event> {
    let inner = &link.0;
    let Some(inbound) = topics::parse_inbound(topic) else {
        tracing::warn!(device = %inner.device, topic, "ignored a message on a topic outside iothub's grammar");
        return Vec::new();
    };
    match inbound {
        Inbound::Command { kind, product, device, tag, name, encoding, request_id, expires_at } => {
            if product != inner.product || (tag.is_none() && device != inner.device) {
                tracing::warn!(device = %inner.device, topic, "ignored a command addressed to another device");
                return Vec::new();
            }
            let payload = match encoding {
                Encoding::Plain => payload.to_vec(),
                Encoding::Base64 => match base64::engine::general_purpose::STANDARD.decode(payload) {
                    Ok(decoded) => decoded,
                    Err(_) => {
                        tracing::warn!(device = %inner.device, request_id, "ignored a command whose base64 payload does not decode");
                        return Vec::new();
                    }
                },
            };
            if topics::is_internal_name(name) {
                // iothub sends its protocol only to the device's own topic; on a tag topic (which other
                // principals may be allowed to publish to) a `$set_ntp` could shift a whole fleet's clocks.
                if tag.is_some() {
                    tracing::warn!(device = %inner.device, topic, "ignored an internal command on a tag topic");
                    return Vec::new();
                }
                return on_internal(link, name, request_id, expires_at, payload);
            }
            if !fresh(link, "c", request_id, expires_at) {
                return Vec::new();
            }
            vec![Event::Command(Command {
                kind,
                name: name.to_string(),
                request_id: request_id.to_string(),
                payload,
                expires_at,
                tag: tag.map(str::to_string),
                link: link.clone(),
            })]
        }
        Inbound::M2m { product, target, sender, message_id } => {
            if product != inner.product || target != inner.device {
                return Vec::new();
            }
            if !fresh(link, "m", &format!("{sender}/{message_id}"), None) {
                return Vec::new();
            }
            vec![Event::Message(DeviceMessage {
                sender: sender.to_string(),
                message_id: message_id.to_string(),
                payload: payload.to_vec(),
            })]
        }
    }
}

/// Not expired (by the corrected clock) and not seen before (persistent dedup for commands and OTA; M2M
/// messages are only remembered in memory: they are not worth a disk write each).
fn fresh(link: &Link, kind: &str, id: &str, expires_at: Option<u64>) -> bool {
    let inner = &link.0;
    let now = inner.clock.now_ms();
    if let Some(expires_at) = expires_at {
        if inner.clock.is_expired(expires_at) {
            tracing::info!(device = %inner.device, id, expires_at, "dropped an expired command");
            return false;
        }
    }
    // Saturating: `expiresAt` comes from the network and may be absurdly large.
    let forget_at = match expires_at {
        Some(s) => i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000).max(now).saturating_add(60_000),
        None => now.saturating_add(i64::try_from(inner.dedup_ttl.as_millis()).unwrap_or(i64::MAX)),
    };
    let first = inner.state.lock().unwrap().store.first_time(&format!("{kind}:{id}"), forget_at, now, kind != "m");
    match first {
        Ok(true) => true,
        Ok(false) => {
            tracing::debug!(device = %inner.device, id, "dropped a duplicate");
            false
        }
        // Better to run a command twice after a crash than never: deliver it, say why.
        Err(e) => {
            tracing::warn!(device = %inner.device, id, error = %e, "dedup store failed; delivering anyway");
            true
        }
    }
}

fn on_internal(link: &Link, name: &str, request_id: &str, expires_at: Option<u64>, payload: Vec<u8>) -> Vec<Event> {
    let inner = &link.0;
    let body: Value = match serde_json::from_slice(&payload) {
        Ok(body) => body,
        Err(_) => {
            tracing::warn!(device = %inner.device, name, "ignored an internal command whose body is not JSON");
            return Vec::new();
        }
    };
    match Internal::parse(name) {
        Some(Internal::SetNtp) => {
            let Ok(answer) = serde_json::from_value::<NtpAnswer>(body) else { return Vec::new() };
            let offset = answer.offset_ms(inner.clock.local_ms());
            inner.clock.set_offset_ms(offset);
            let mut waiters = inner.ntp_waiters.lock().unwrap();
            let (answered, waiting): (Vec<_>, Vec<_>) =
                std::mem::take(&mut *waiters).into_iter().partition(|(t, _, _)| *t == answer.device_time);
            *waiters = waiting;
            for (_, _, tx) in answered {
                let _ = tx.send(offset);
            }
            vec![Event::TimeSynced { offset_ms: offset }]
        }
        Some(Internal::SetTags) => {
            let Ok(push) = serde_json::from_value::<SetTags>(body) else { return Vec::new() };
            let mut state = inner.state.lock().unwrap();
            if !push.is_newer_than(state.store.state().tags_version) {
                return Vec::new();
            }
            let new_tags = push.valid_tags();
            let diff = tags::diff(&state.store.state().tags, &new_tags);
            let saved = state.store.set_tags(new_tags.clone(), push.tags_version);
            drop(state);
            link.persist("tags", saved);
            for tag in &diff.subscribe {
                subscribe_tag(link, tag);
            }
            for tag in &diff.unsubscribe {
                unsubscribe_tag(link, tag);
            }
            vec![Event::TagsChanged { tags: new_tags, version: push.tags_version }]
        }
        Some(which @ (Internal::UpdateShadow | Internal::ShadowReply)) => {
            let (reaction, saved) = {
                let mut state = inner.state.lock().unwrap();
                let mut version = state.store.state().shadow_version;
                let reaction = if which == Internal::UpdateShadow {
                    state.shadow.on_update(&body, &mut version)
                } else {
                    state.shadow.on_reply(&body, &mut version, Instant::now())
                };
                (reaction, state.store.set_shadow_version(version))
            };
            link.persist("shadow version", saved);
            let Reaction { send, desired, dropped_report } = reaction;
            if let Some(out) = send {
                link.send_shadow_detached(out);
            }
            let mut events = Vec::new();
            if let Some(document) = desired {
                events.push(Event::ShadowDesired(ShadowDesired::from_document(document, link.clone())));
            }
            if let Some(reported) = dropped_report {
                tracing::warn!(device = %inner.device, "a shadow report was refused repeatedly and given up");
                events.push(Event::ShadowReportDropped { reported });
            }
            events
        }
        Some(Internal::OtaUpgrade) => {
            if !fresh(link, "o", request_id, expires_at) {
                return Vec::new();
            }
            let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
            let (Some(url), Some(version)) = (text("url"), text("version")) else {
                tracing::warn!(device = %inner.device, request_id, "ignored an OTA upgrade without url or version");
                return Vec::new();
            };
            vec![Event::OtaUpgrade(OtaUpgrade {
                url,
                version,
                size: body.get("size").and_then(Value::as_u64).unwrap_or_default(),
                md5: text("md5").unwrap_or_default(),
                kind: text("type").unwrap_or_else(|| "firmware".into()),
                rollout_id: text("rollout_id"),
                link: link.clone(),
            })]
        }
        _ => {
            tracing::debug!(device = %inner.device, name, "ignored an internal command this SDK does not know");
            Vec::new()
        }
    }
}

/// A link whose client has no connection: for the receive-path tests and the fuzz target.
pub(crate) fn test_link(clock: Clock, store: StateStore) -> Link {
    // A client without its event loop: what the receive path publishes fails quietly (it never waits).
    let (client, _) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 1024);
    Link(Arc::new(Inner {
        client,
        product: "p".into(),
        device: "d".into(),
        clock,
        dedup_ttl: Duration::from_secs(3600),
        state: Mutex::new(State { store, shadow: ShadowTracker::default() }),
        ntp_waiters: Mutex::new(Vec::new()),
        next_token: Default::default(),
    }))
}

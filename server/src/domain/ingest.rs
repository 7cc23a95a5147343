//! Broker events in: what devices did (connect, disconnect, publish) applied to the hub's state.
//!
//! The webhook edge turns each broker's wire format into [`BrokerEvent`]s; this service classifies them
//! with the topic grammar, drops replays (two-phase dedup claims by device-scoped message id), and applies
//! whole groups of webhooks in one store transaction together with their outbox events. Webhooks that
//! arrive while a transaction is running queue up and form the next group, so the database sees a few
//! large transactions instead of one per event. A webhook is answered only after its group committed;
//! a failure answers 503 (brokers retry) and releases the claims so the retry is processed again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::clock::now_ms;
use crate::domain::commands::CommandService;
use crate::domain::ota::{parse_progress, OtaService};
use crate::domain::shadows::{ShadowService, ShadowSource};
use crate::domain::tags::TagService;
use crate::error::{Error, Result};
use crate::ids::DeviceRef;
use crate::model::commands::{CommandChange, CommandKind, Transition};
use crate::model::dedup::Claim;
use crate::model::event_bus::BusEvent;
use crate::model::event_bus::EventKind;
use crate::model::events;
use crate::model::json::storable_json;
use crate::model::store::{IngestBatch, NewMessage, NewReport, PresenceChange, ReportKind};
use crate::ports::dedup::Deduplicator;
use crate::ports::store::Store;
use crate::topics::{is_internal_name, parse_downstream, parse_upstream, Internal, Upstream};

/// A broker event, normalised across EMQX 5, EMQX 4 and RMQTT.
#[derive(Debug, Clone, PartialEq)]
pub enum BrokerEvent {
    Connected {
        client_id: String,
        username: Option<String>,
        /// Identifies the session in both its connect and disconnect events (see `presence_sql`).
        session_key: String,
        connected_at: i64,
        ip_address: Option<String>,
        proto_ver: Option<i32>,
        keepalive: Option<i32>,
        clean_start: Option<bool>,
        node: Option<String>,
    },
    Disconnected {
        client_id: String,
        username: Option<String>,
        session_key: String,
        connected_at: Option<i64>,
        disconnected_at: i64,
        reason: String,
        ip_address: Option<String>,
        node: Option<String>,
    },
    Publish {
        client_id: String,
        username: Option<String>,
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
        /// When the broker received it.
        received_at: i64,
    },
    /// `message.delivered`, `message.acked`, `message.dropped`: used by the command log (downstream).
    Delivery {
        stage: DeliveryStage,
        /// The receiving client.
        client_id: Option<String>,
        username: Option<String>,
        topic: String,
        at: i64,
        reason: Option<String>,
    },
}

impl BrokerEvent {
    /// The client the event is about: its username (the device's broker identity), else its client id.
    /// Ingest shards by it, so one device's events always meet in the same worker.
    fn owner(&self) -> &str {
        let (username, client_id) = match self {
            BrokerEvent::Connected { username, client_id, .. }
            | BrokerEvent::Disconnected { username, client_id, .. }
            | BrokerEvent::Publish { username, client_id, .. } => (username, Some(client_id)),
            BrokerEvent::Delivery { username, client_id, .. } => (username, client_id.as_ref()),
        };
        username.as_deref().or(client_id.map(String::as_str)).unwrap_or("")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStage {
    Delivered,
    Acked,
    Dropped,
}

/// What one event turned into.
#[derive(Debug)]
enum Work {
    Message {
        key: String,
        message: NewMessage,
    },
    Report {
        key: String,
        report: NewReport,
        event: crate::model::event_bus::BusEvent,
    },
    Presence(PresenceChange),
    /// A device's data request for business systems: only an event.
    Request {
        key: String,
        device: DeviceRef,
        event: BusEvent,
        /// When the broker received it.
        sent_at: i64,
    },
    /// A delivery report or reply for the command log.
    Feedback(CommandChange),
    /// A request iothub answers itself (`get/.../$ntp/...`).
    Internal(InternalRequest),
    /// A client connected under an identity iothub never accepts: kick it.
    Intruder {
        username: String,
    },
    /// Nothing to store; the label says why (metrics).
    Skip(&'static str),
}

impl Work {
    /// The device whose own upstream traffic this is (a delivery report is the broker's, a connect or
    /// disconnect is presence: neither is the device speaking).
    fn speaker(&self) -> Option<&DeviceRef> {
        match self {
            Work::Message { message, .. } => Some(&message.device),
            Work::Report { report, .. } => Some(&report.device),
            Work::Request { device, .. } => Some(device),
            Work::Internal(request) => Some(&request.device),
            Work::Feedback(change) if matches!(change.transition, Transition::Replied { .. }) => Some(&change.device),
            Work::Feedback(_) | Work::Presence(_) | Work::Intruder { .. } | Work::Skip(_) => None,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Work::Message { .. } => "message",
            Work::Report { .. } => "report",
            Work::Request { .. } => "request",
            Work::Internal(_) => "internal",
            Work::Feedback(_) => "reply",
            Work::Presence(_) => "presence",
            Work::Intruder { .. } => "intruder",
            Work::Skip(_) => "skip",
        }
    }
}

/// A `$` resource a device asked iothub for.
#[derive(Debug, Clone, PartialEq)]
pub struct InternalRequest {
    pub device: DeviceRef,
    pub resource: String,
    pub payload: Vec<u8>,
    /// When the broker received the request.
    pub received_at: i64,
}

/// Work that is claimed by its dedup key before it is stored.
enum Keyed {
    Message(NewMessage),
    Report(NewReport, BusEvent),
    Event(BusEvent),
}

/// The RPC reply an event carries, if it is a well-formed `rpc_resp` of the publishing device itself.
fn rpc_reply(event: &BrokerEvent) -> Option<(DeviceRef, &str, &[u8], i64)> {
    let BrokerEvent::Publish { username, topic, payload, received_at, .. } = event else { return None };
    let Ok(Upstream::RpcResp { product, device, request_id, .. }) = parse_upstream(topic) else { return None };
    let publisher = device_of(username.as_deref())?;
    (publisher.product.as_str() == product && publisher.device.as_str() == device).then_some((
        publisher,
        request_id,
        payload.as_slice(),
        *received_at,
    ))
}

fn device_of(username: Option<&str>) -> Option<DeviceRef> {
    username.and_then(DeviceRef::from_broker_username)
}

fn classify(event: BrokerEvent, now: i64) -> Work {
    match event {
        BrokerEvent::Connected {
            client_id,
            username,
            session_key,
            connected_at,
            ip_address,
            proto_ver,
            keepalive,
            clean_start,
            node,
        } => {
            // A broker let in a username iothub never accepts (an external RMQTT fills its auth request's
            // placeholders, so iothub saw another username at CONNECT): it is disconnected at once. (A client id
            // is not checked here: webhooks name sessions the broker authenticated, and a rewritten client id
            // alone reaches nothing, since authz checks it against the username it is given.)
            if let Some(raw) = username.as_deref().filter(|u| !u.is_empty()) {
                if crate::identity::parse_username(raw).is_err() {
                    return Work::Intruder { username: raw.to_string() };
                }
            }
            match device_of(username.as_deref()) {
                Some(device) => Work::Presence(PresenceChange::Connected {
                    device,
                    client_id,
                    session_key,
                    connected_at,
                    ip_address,
                    proto_ver,
                    keepalive: keepalive.unwrap_or(0),
                    clean_start,
                    node,
                }),
                None => Work::Skip("not_a_device"),
            }
        }
        BrokerEvent::Disconnected {
            client_id,
            username,
            session_key,
            connected_at,
            disconnected_at,
            reason,
            ip_address,
            node,
        } => match device_of(username.as_deref()) {
            Some(device) => Work::Presence(PresenceChange::Disconnected {
                device,
                client_id,
                session_key,
                connected_at,
                disconnected_at,
                reason,
                ip_address,
                node,
            }),
            None => Work::Skip("not_a_device"),
        },
        BrokerEvent::Publish { client_id, username, topic, payload, received_at, .. } => {
            classify_publish(&client_id, username.as_deref(), &topic, payload, received_at, now)
        }
        BrokerEvent::Delivery { stage: DeliveryStage::Dropped, .. } => Work::Skip("dropped"),
        BrokerEvent::Delivery { topic, at, username, .. } => classify_delivery(&topic, at, username.as_deref()),
    }
}

/// A delivery report of a command to its device becomes its `delivered` transition.
fn classify_delivery(topic: &str, at: i64, username: Option<&str>) -> Work {
    match parse_downstream(topic) {
        // Only a delivery to the device itself counts (not to a monitoring client subscribed to `cmd/#`).
        Some(down) if username == Some(format!("{}/{}", down.product, down.device).as_str()) => {
            match (crate::ids::ProductId::parse(down.product), crate::ids::DeviceId::parse(down.device)) {
                (Ok(product), Ok(device)) => Work::Feedback(CommandChange {
                    device: DeviceRef::new(product, device),
                    request_id: down.request_id.to_string(),
                    transition: Transition::Delivered { at },
                }),
                _ => Work::Skip("delivery"),
            }
        }
        Some(_) => Work::Skip("delivery_to_other"),
        // Deliveries of other topics (m2m, tags) are not tracked.
        None => Work::Skip("delivery"),
    }
}

fn classify_publish(
    client_id: &str,
    username: Option<&str>,
    topic: &str,
    payload: Vec<u8>,
    sent_at: i64,
    now: i64,
) -> Work {
    let upstream = match parse_upstream(topic) {
        Ok(u) => u,
        Err(e) => {
            metrics::counter!("iothub_upstream_rejected_total", "reason" => e.as_str()).increment(1);
            tracing::warn!(client_id, topic, error = %e, "publish on a topic outside the grammar ignored");
            return Work::Skip("rejected");
        }
    };
    let (product, device) = upstream.speaker();
    let Some(publisher) = device_of(username).filter(|d| d.product.as_str() == product && d.device.as_str() == device)
    else {
        // The broker's ACL should have refused it; never store data under another device's name.
        metrics::counter!("iothub_upstream_rejected_total", "reason" => "identity_mismatch").increment(1);
        tracing::warn!(client_id, username, topic, "publish naming another device ignored");
        return Work::Skip("rejected");
    };
    let key = |kind: &str, message_id: &str| format!("{kind}:{publisher}/{message_id}");
    match upstream {
        Upstream::UploadData { data_type, message_id, .. } => {
            let key = key("u", message_id);
            classify_upload(publisher, data_type, key, message_id, payload, sent_at, now)
        }
        Upstream::UpdateStatus { message_id, .. } | Upstream::UpdateOtaStatus { message_id, .. } => {
            let (kind, event_kind, prefix) = match upstream {
                Upstream::UpdateStatus { .. } => (ReportKind::Status, EventKind::UpdateStatus, "s"),
                _ => (ReportKind::Ota, EventKind::OtaProgress, "o"),
            };
            let Some((value, json)) = storable_json(&payload) else {
                metrics::counter!("iothub_upstream_rejected_total", "reason" => "invalid_json").increment(1);
                tracing::warn!(client_id, topic, "report payload is not storable JSON; ignored");
                return Work::Skip("rejected");
            };
            let event = events::report(event_kind, &publisher, message_id, &value, sent_at, now);
            let key = key(prefix, message_id);
            let report = NewReport {
                device: publisher,
                kind,
                message_id: message_id.to_string(),
                payload_json: json,
                reported_at: sent_at,
            };
            Work::Report { key, report, event }
        }
        Upstream::CmdResp { request_id, message_id, .. } | Upstream::RpcResp { request_id, message_id, .. } => {
            let mode = if matches!(upstream, Upstream::CmdResp { .. }) { CommandKind::Cmd } else { CommandKind::Rpc };
            Work::Feedback(CommandChange {
                device: publisher,
                request_id: request_id.to_string(),
                transition: Transition::Replied { at: sent_at, mode, payload, message_id: message_id.to_string() },
            })
        }
        Upstream::DataRequest { resource, message_id, .. } => {
            if is_internal_name(resource) {
                return Work::Internal(InternalRequest {
                    device: publisher,
                    resource: resource.to_string(),
                    payload,
                    received_at: sent_at,
                });
            }
            let event = events::data_request(&publisher, resource, message_id, &payload, sent_at, now);
            Work::Request { key: key("g", message_id), device: publisher, event, sent_at }
        }
        // Devices message each other directly through the broker; iothub only sees it if configured to.
        Upstream::M2m { .. } => Work::Skip("m2m"),
    }
}

/// `upload_data`: history with its event, or a shadow report answered as an internal request (each kind
/// dispatched by its own name; the reference IotHub's `else if ("$shadow_updated")` sent every shadow
/// message down one branch). Other `$` names are iothub's own and never stored.
fn classify_upload(
    publisher: DeviceRef,
    data_type: &str,
    key: String,
    message_id: &str,
    payload: Vec<u8>,
    sent_at: i64,
    now: i64,
) -> Work {
    if matches!(Internal::parse(data_type), Some(Internal::ShadowReported | Internal::ShadowUpdated)) {
        return Work::Internal(InternalRequest {
            device: publisher,
            resource: data_type.to_string(),
            payload,
            received_at: sent_at,
        });
    }
    if is_internal_name(data_type) {
        return Work::Skip("internal");
    }
    let event = events::upload_data(&publisher, message_id, data_type, &payload, sent_at, now);
    Work::Message {
        key,
        message: NewMessage {
            payload_json: storable_json(&payload).map(|(_, text)| text),
            device: publisher,
            message_id: message_id.to_string(),
            data_type: data_type.to_string(),
            payload,
            sent_at,
            event,
        },
    }
}

/// The downstream services device messages feed: replies and delivery reports (command log), `$` requests
/// (tags, shadow, NTP) and OTA reports.
#[derive(Clone)]
pub struct DeviceControl {
    pub kicks: crate::domain::kicks::KickService,
    pub commands: CommandService,
    pub tags: TagService,
    pub shadows: ShadowService,
    pub ota: OtaService,
}

pub struct IngestSettings {
    pub batch_max: usize,
    pub workers: usize,
    /// Per-device rates and the bound on internal requests answered at once.
    pub limits: crate::domain::limits::DeviceLimits,
}

struct Job {
    events: Vec<BrokerEvent>,
    /// Failures reach every webhook of the group as "unavailable" (503: the broker retries).
    done: oneshot::Sender<std::result::Result<(), String>>,
}

/// Entry point of the broker-event pipeline. Cheap to clone.
///
/// Each worker owns a share of the devices (by a hash of the event's username): a device's connects,
/// disconnects, reports and delivery reports always queue for the same worker. Groups of two workers
/// then never wait on each other's row locks for one device (a connect and its disconnect sent at
/// once used to land in two concurrent groups, and the second waited for the first's commit), and one
/// device's events are applied in arrival order.
#[derive(Clone)]
pub struct IngestService {
    shards: Arc<[mpsc::Sender<Job>]>,
    commands: CommandService,
    store: Arc<dyn Store>,
}

struct Worker {
    store: Arc<dyn Store>,
    dedup: Arc<dyn Deduplicator>,
    control: DeviceControl,
    settings: Arc<IngestSettings>,
    rx: mpsc::Receiver<Job>,
}

impl IngestService {
    pub fn start(
        store: Arc<dyn Store>,
        dedup: Arc<dyn Deduplicator>,
        control: DeviceControl,
        settings: IngestSettings,
    ) -> Self {
        let settings = Arc::new(settings);
        let idle = Arc::downgrade(&settings);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(settings) = idle.upgrade() else { break };
                settings.limits.forget_idle();
            }
        });
        let commands = control.commands.clone();
        let mut shards = Vec::with_capacity(settings.workers.max(1));
        for _ in 0..settings.workers.max(1) {
            let (tx, rx) = mpsc::channel(settings.batch_max * 4);
            let worker = Worker {
                store: store.clone(),
                dedup: dedup.clone(),
                control: control.clone(),
                settings: settings.clone(),
                rx,
            };
            tokio::spawn(worker.run());
            shards.push(tx);
        }
        Self { shards: shards.into(), commands, store }
    }

    /// The worker for a webhook's events: by its first event's owner (a webhook carries one event, or a
    /// broker's batch, which may span devices: those still lock in one global order, they may just wait).
    fn shard_for(&self, events: &[BrokerEvent]) -> &mpsc::Sender<Job> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let owner = events.first().map_or("", BrokerEvent::owner);
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(owner);
        &self.shards[(hash % self.shards.len() as u64) as usize]
    }

    /// Applies the events; returns once they are durably stored (or failed as a whole).
    pub async fn submit(&self, events: Vec<BrokerEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        // A waiting RPC caller gets its reply now, not after the group commit that records it (and the
        // groups queued before it): the webhook is still answered only after that commit, and a failed
        // commit is retried by the broker, so the log ends up with the reply the caller saw.
        for event in &events {
            if let Some((device, request_id, payload, at)) = rpc_reply(event) {
                // Only an active device's reply: a suspended one's is dropped by the worker too.
                if self.store.active_devices(std::slice::from_ref(&device)).await?.contains(&device) {
                    self.commands.announce_reply(&device, request_id, payload.to_vec(), at).await;
                }
            }
        }
        let (done, wait) = oneshot::channel();
        let shard = self.shard_for(&events);
        shard.send(Job { events, done }).await.map_err(|_| Error::Unavailable("shutting down".into()))?;
        wait.await.map_err(|_| Error::Unavailable("event worker stopped".into()))?.map_err(Error::Unavailable)
    }
}

impl Worker {
    async fn run(mut self) {
        loop {
            let jobs = {
                let Some(first) = self.rx.recv().await else { break };
                let mut count = first.events.len();
                let mut jobs = vec![first];
                while count < self.settings.batch_max {
                    match self.rx.try_recv() {
                        Ok(job) => {
                            count += job.events.len();
                            jobs.push(job);
                        }
                        Err(_) => break,
                    }
                }
                jobs
            };
            let mut events = Vec::new();
            let mut waiters = Vec::with_capacity(jobs.len());
            for job in jobs {
                events.extend(job.events);
                waiters.push(job.done);
            }
            let result = self.apply(events).await.map_err(|e| format!("events not stored: {e}"));
            for waiter in waiters {
                let _ = waiter.send(result.clone());
            }
        }
    }

    #[tracing::instrument(skip_all, fields(events = events.len()), name = "ingest.apply")]
    async fn apply(&self, events: Vec<BrokerEvent>) -> Result<()> {
        let started = Instant::now();
        let now = now_ms();
        metrics::histogram!("iothub_ingest_batch_events").record(events.len() as f64);
        let work: Vec<Work> = events.into_iter().map(|event| classify(event, now)).collect();
        let active = self.active_speakers(&work).await?;
        let sorted = self.sort_work(work, &active);
        let claims = self.claim(&sorted.keyed).await;
        let (mut batch, claimed) = batch_of(sorted.keyed, claims);
        let (presence, connected) = in_lock_order(sorted.presence);
        batch.presence = presence;
        if !batch.is_empty() {
            if let Err(e) = self.store_batch(batch, claimed).await {
                self.settings.limits.refund_messages(&sorted.charged);
                return Err(e);
            }
        }
        let Sorted { feedback, ota_progress, ota_status, internal, .. } = sorted;
        // Replies and delivery reports are idempotent by themselves (a state only moves forward), so they
        // need no dedup claims; a failure answers 503 and the broker's retry applies them again.
        if !feedback.is_empty() {
            self.control.commands.apply_feedback(&feedback).await?;
        }
        self.control.ota.after_reports(&ota_progress, &ota_status).await?;
        self.control.commands.devices_connected(connected);
        for request in internal {
            // Bounded: all slots busy sheds the request (counted) rather than queueing device-made work.
            let Some(slot) = self.settings.limits.internal_slot() else { continue };
            let control = self.control.clone();
            tokio::spawn(async move {
                answer_internal(&control, request).await;
                drop(slot);
            });
        }
        metrics::histogram!("iothub_ingest_batch_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Drops what inactive devices sent, applies the per-device limits, and sorts the rest by what it
    /// becomes: keyed rows (deduplicated by key within the group), presence, command feedback, internal
    /// requests, and OTA progress.
    fn sort_work(&self, work: Vec<Work>, active: &std::collections::HashSet<DeviceRef>) -> Sorted {
        let mut sorted = Sorted::default();
        let mut seen_keys = std::collections::HashSet::new();
        for work in work {
            if let Some(device) = work.speaker().filter(|d| !active.contains(*d)) {
                // Suspended or deleted now: whatever it still sends (its kick may be pending) is neither
                // stored, announced nor acted on.
                tracing::debug!(%device, kind = work.label(), "dropped traffic of an inactive device");
                metrics::counter!("iothub_ingest_inactive_dropped_total", "kind" => work.label()).increment(1);
                continue;
            }
            match work {
                Work::Presence(change) => {
                    count("presence", "accepted");
                    sorted.presence.push(change);
                }
                Work::Feedback(change) => {
                    count("command", "accepted");
                    sorted.feedback.push(change);
                }
                Work::Internal(request) => {
                    if !self.settings.limits.admit_request(&request.device) {
                        count("publish", "rate_limited");
                        continue;
                    }
                    count("publish", "internal");
                    sorted.internal.push(request);
                }
                Work::Skip(why) => count("publish", why),
                Work::Intruder { username } => {
                    count("presence", "intruder");
                    metrics::counter!("iothub_broker_identity_refused_total", "reason" => "connected_anyway")
                        .increment(1);
                    tracing::warn!("a client connected under a malformed identity; kicking it");
                    let kicks = self.control.kicks.clone();
                    tokio::spawn(async move {
                        if let Err(e) = kicks.request(&username).await {
                            tracing::error!(error = %e, "could not record the kick of a malformed identity");
                        }
                    });
                }
                Work::Request { key, event, device, sent_at } => {
                    if self.admit_data(&mut sorted, &device, sent_at) && first_in_group(&mut seen_keys, &key) {
                        sorted.keyed.push((key, Keyed::Event(event)));
                    }
                }
                Work::Message { key, message } => {
                    if self.admit_data(&mut sorted, &message.device, message.sent_at)
                        && first_in_group(&mut seen_keys, &key)
                    {
                        sorted.keyed.push((key, Keyed::Message(message)));
                    }
                }
                Work::Report { key, report, event } => {
                    if !self.admit_data(&mut sorted, &report.device, report.reported_at) {
                        continue;
                    }
                    // Rollouts follow every report, replays included (their updates are idempotent and
                    // time-ordered), so a retry after a failure below still applies them.
                    match report.kind {
                        ReportKind::Ota => {
                            let value = serde_json::from_str(&report.payload_json).unwrap_or_default();
                            sorted.ota_progress.extend(parse_progress(&report.device, &value, report.reported_at));
                        }
                        ReportKind::Status => sorted.ota_status.push((
                            report.device.clone(),
                            report.payload_json.clone(),
                            report.reported_at,
                        )),
                    }
                    if first_in_group(&mut seen_keys, &key) {
                        sorted.keyed.push((key, Keyed::Report(report, event)));
                    }
                }
            }
        }
        sorted
    }

    /// Whether the device's data limit admits one more item the broker received at `at` (counted either way).
    fn admit_data(&self, sorted: &mut Sorted, device: &DeviceRef, at: i64) -> bool {
        if !self.settings.limits.admit_message(device, at) {
            count("publish", "rate_limited");
            return false;
        }
        sorted.charged.push((device.clone(), at));
        true
    }

    /// Two-phase dedup claims for the group's keys (one round trip).
    async fn claim(&self, keyed: &[(String, Keyed)]) -> Vec<Claim> {
        let keys: Vec<String> = keyed.iter().map(|(k, _)| k.clone()).collect();
        match self.dedup.claim(&keys).await {
            Ok(claims) => claims,
            Err(e) => {
                // Degrade instead of refusing: the database's unique keys still keep data history free of
                // duplicates; a replayed status report may then be announced twice (same event id).
                metrics::counter!("iothub_dedup_unavailable_total").increment(1);
                tracing::warn!(error = %e, "dedup store unavailable; relying on the database's unique keys");
                vec![Claim::New; keys.len()]
            }
        }
    }

    /// Which of the devices speaking in this group are active right now (one query for the group).
    async fn active_speakers(&self, work: &[Work]) -> Result<std::collections::HashSet<DeviceRef>> {
        let mut speakers: Vec<DeviceRef> = work.iter().filter_map(Work::speaker).cloned().collect();
        speakers.sort_by(|a, b| (a.product.as_str(), a.device.as_str()).cmp(&(b.product.as_str(), b.device.as_str())));
        speakers.dedup();
        if speakers.is_empty() {
            return Ok(Default::default());
        }
        self.store.active_devices(&speakers).await
    }

    async fn store_batch(&self, batch: IngestBatch, claimed: Vec<String>) -> Result<()> {
        match self.store.ingest(&batch).await {
            Ok(outcome) => {
                if let Err(e) = self.dedup.complete(&claimed).await {
                    // The claims expire by themselves; the database's unique keys catch what slips through.
                    tracing::warn!(error = %e, "could not mark messages done in the dedup store");
                }
                counter("iothub_ingest_messages_stored_total", outcome.messages_stored);
                counter("iothub_ingest_messages_duplicate_total", outcome.messages_duplicate);
                counter("iothub_ingest_presence_applied_total", outcome.presence_applied);
                counter("iothub_ingest_reports_applied_total", outcome.reports_applied);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, events = claimed.len(), "ingest batch failed; broker will retry");
                metrics::counter!("iothub_ingest_batch_failures_total").increment(1);
                if let Err(release) = self.dedup.release(&claimed).await {
                    // A retry still gets through: it finds the claims in flight and processes them anyway.
                    tracing::warn!(error = %release, "could not release dedup claims");
                }
                Err(e)
            }
        }
    }
}

/// Answers a `$` request. `$tags`: `$set_tags` when the device's version is stale. `$ntp`: `$set_ntp` echoing the device's `device_time` with iothub's receive time
/// (the broker's timestamp) and send time, all in milliseconds, so the device computes its clock offset as
/// `((iothub_recv - device_time) + (iothub_send - device_recv)) / 2` to the millisecond.
async fn answer_internal(control: &DeviceControl, request: InternalRequest) {
    let DeviceControl { commands, tags, shadows, .. } = control;
    let InternalRequest { device, resource, payload, received_at } = request;
    let result = match Internal::parse(&resource) {
        Some(Internal::Ntp) => {
            let Some(reply) = ntp_reply(&payload, received_at, now_ms()) else {
                metrics::counter!("iothub_upstream_rejected_total", "reason" => "invalid_ntp").increment(1);
                tracing::warn!(%device, "$ntp request without a numeric device_time ignored");
                return;
            };
            commands.send_internal(&device, Internal::SetNtp, reply.to_string().into_bytes(), 0).await
        }
        Some(Internal::Tags) => tags.answer_request(&device, &payload).await.map(|_| ()),
        Some(Internal::Shadow) => shadows.answer_request(&device).await,
        Some(Internal::ShadowReported) => shadows.from_device(&device, ShadowSource::DeviceReported, &payload).await,
        Some(Internal::ShadowUpdated) => shadows.from_device(&device, ShadowSource::DeviceUpdated, &payload).await,
        _ => {
            metrics::counter!("iothub_upstream_rejected_total", "reason" => "unknown_internal").increment(1);
            tracing::debug!(%device, %resource, "internal resource not served");
            return;
        }
    };
    if let Err(e) = result {
        tracing::warn!(%device, %resource, error = %e, "internal request not answered");
    }
}

/// The `$set_ntp` answer to a `$ntp` request; `None` without a numeric `device_time`.
fn ntp_reply(request: &[u8], received_at: i64, now: i64) -> Option<serde_json::Value> {
    let device_time = serde_json::from_slice::<serde_json::Value>(request)
        .ok()?
        .get("device_time")
        .cloned()
        .filter(serde_json::Value::is_number)?;
    Some(serde_json::json!({ "device_time": device_time, "iothub_recv": received_at, "iothub_send": now }))
}

/// The rows to store for the keys not already done, and the keys claimed for them; reports in lock order.
fn batch_of(keyed: Vec<(String, Keyed)>, claims: Vec<Claim>) -> (IngestBatch, Vec<String>) {
    let mut claimed = Vec::new();
    let mut batch = IngestBatch::default();
    let mut newest_report: HashMap<(DeviceRef, &'static str), usize> = HashMap::new();
    for ((key, work), claim) in keyed.into_iter().zip(claims) {
        if claim == Claim::Done {
            count("publish", "duplicate");
            continue;
        }
        claimed.push(key);
        match work {
            Keyed::Message(message) => batch.messages.push(message),
            Keyed::Event(event) => batch.events.push(event),
            Keyed::Report(report, event) => {
                batch.events.push(event);
                // One row per (device, kind) per statement: keep the newest; equal times, the later one.
                let slot = (report.device.clone(), report.kind.as_str());
                match newest_report.get(&slot) {
                    Some(&i) if batch.reports[i].reported_at > report.reported_at => {}
                    Some(&i) => batch.reports[i] = report,
                    None => {
                        newest_report.insert(slot, batch.reports.len());
                        batch.reports.push(report);
                    }
                }
            }
        }
    }
    // Rows are locked in one global order (device), so concurrent batches never deadlock each other.
    batch.reports.sort_by(|a, b| {
        (a.device.product.as_str(), a.device.device.as_str(), a.kind.as_str()).cmp(&(
            b.device.product.as_str(),
            b.device.device.as_str(),
            b.kind.as_str(),
        ))
    });
    (batch, claimed)
}

/// Whether `key` is new in this group (a repeat is counted as a duplicate).
fn first_in_group(seen: &mut std::collections::HashSet<String>, key: &str) -> bool {
    let first = seen.insert(key.to_string());
    if !first {
        count("publish", "duplicate");
    }
    first
}

/// Presence changes in one global device order (a device's own changes keep theirs), and the devices that
/// connected.
fn in_lock_order(mut presence: Vec<PresenceChange>) -> (Vec<PresenceChange>, Vec<DeviceRef>) {
    // Stable sort: a device's changes keep their order, devices are locked in one global order.
    presence.sort_by(|a, b| {
        let (a, b) = (a.device(), b.device());
        (a.product.as_str(), a.device.as_str()).cmp(&(b.product.as_str(), b.device.as_str()))
    });
    let connected: Vec<DeviceRef> =
        presence.iter().filter(|c| matches!(c, PresenceChange::Connected { .. })).map(|c| c.device().clone()).collect();
    (presence, connected)
}

/// One group's work, sorted by what it becomes (`Worker::sort_work`).
#[derive(Default)]
struct Sorted {
    keyed: Vec<(String, Keyed)>,
    presence: Vec<PresenceChange>,
    feedback: Vec<CommandChange>,
    internal: Vec<InternalRequest>,
    ota_progress: Vec<crate::model::ota::OtaProgress>,
    ota_status: Vec<(DeviceRef, String, i64)>,
    /// Devices whose data limits this group drew from (refunded if it is not stored: its retry draws again).
    charged: Vec<(DeviceRef, i64)>,
}

fn count(kind: &'static str, outcome: &'static str) {
    metrics::counter!("iothub_broker_events_total", "kind" => kind, "outcome" => outcome).increment(1);
}

fn counter(name: &'static str, n: usize) {
    metrics::counter!(name).increment(n as u64);
}

/// Claims older than this are taken over by a retry (the worker that held them is presumed dead).
pub const IN_FLIGHT_TTL: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(username: &str, topic: &str, payload: &[u8]) -> BrokerEvent {
        BrokerEvent::Publish {
            client_id: "c".into(),
            username: Some(username.into()),
            topic: topic.into(),
            payload: payload.to_vec(),
            qos: 1,
            retain: false,
            received_at: 1_000,
        }
    }

    #[test]
    fn ntp_answers_carry_milliseconds() {
        let reply = ntp_reply(br#"{"device_time":1700000000123}"#, 1_700_000_000_456, 1_700_000_000_789).unwrap();
        assert_eq!(
            reply,
            serde_json::json!({"device_time": 1_700_000_000_123i64, "iothub_recv": 1_700_000_000_456i64, "iothub_send": 1_700_000_000_789i64})
        );
        assert_eq!(ntp_reply(br#"{"device_time":"soon"}"#, 1, 2), None);
        assert_eq!(ntp_reply(b"\xff", 1, 2), None);
    }

    #[test]
    fn publishes_are_classified_by_topic_and_identity() {
        assert!(matches!(classify(publish("p/d", "upload_data/p/d/temp/m1", b"\x00\xff"), 5), Work::Message { .. }));
        assert!(matches!(classify(publish("p/d", "update_status/p/d/m1", b"{\"a\":1}"), 5), Work::Report { .. }));
        assert!(matches!(classify(publish("p/d", "update_status/p/d/m1", b"not json"), 5), Work::Skip("rejected")));
        assert!(matches!(classify(publish("p/d", "update_status/p/d/m1", b"\"\\u0000\""), 5), Work::Skip("rejected")));
        // Valid for a lenient parser, refused by JSONB: must be skipped, never panic or fail a group.
        for bad in [&b"\"\\ud800\""[..], b"1e400", b"{\"t\":\"\\udc00\"}"] {
            assert!(matches!(classify(publish("p/d", "update_status/p/d/m1", bad), 5), Work::Skip("rejected")));
            match classify(publish("p/d", "upload_data/p/d/t/m1", bad), 5) {
                Work::Message { message, .. } => assert_eq!(message.payload_json, None, "kept as bytes only"),
                other => panic!("{other:?}"),
            }
        }
        // Extreme exponents are normalised into something numeric can hold.
        match classify(publish("p/d", "upload_data/p/d/t/m1", b"1e-20000"), 5) {
            Work::Message { message, .. } => assert_eq!(message.payload_json.as_deref(), Some("0.0")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(classify(publish("p/x", "upload_data/p/d/temp/m1", b"1"), 5), Work::Skip("rejected")));
        assert!(matches!(classify(publish("q/d", "upload_data/p/d/temp/m1", b"1"), 5), Work::Skip("rejected")));
        for kind in ["$shadow_updated", "$shadow_reported"] {
            match classify(publish("p/d", &format!("upload_data/p/d/{kind}/m1"), b"{}"), 5) {
                Work::Internal(r) => assert_eq!(r.resource, kind),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(classify(publish("p/d", "upload_data/p/d/$other/m1", b"{}"), 5), Work::Skip("internal")));
        assert!(matches!(classify(publish("p/d", "upload_data/p/d/temp", b"1"), 5), Work::Skip("rejected")));
        assert!(matches!(classify(publish("p/d", "get/p/d/$ntp/m1", b"{}"), 5), Work::Internal(_)));
        assert!(matches!(classify(publish("p/d", "get/p/d/weather/m1", b"{}"), 5), Work::Request { .. }));
        assert!(matches!(classify(publish("p/d", "m2m/p/e/d/m1", b"hi"), 5), Work::Skip("m2m")));
        match classify(publish("p/d", "rpc_resp/p/d/reboot/r1/m1", b"done"), 5) {
            Work::Feedback(CommandChange { request_id, transition: Transition::Replied { mode, at, .. }, .. }) => {
                assert_eq!((request_id.as_str(), mode, at), ("r1", CommandKind::Rpc, 1_000));
            }
            other => panic!("{other:?}"),
        }
        // Another device cannot answer for this one.
        assert!(matches!(classify(publish("p/e", "cmd_resp/p/d/reboot/r1/m1", b"x"), 5), Work::Skip("rejected")));
        let delivery = |stage, topic: &str| BrokerEvent::Delivery {
            stage,
            client_id: Some("p/d".into()),
            username: Some("p/d".into()),
            topic: topic.into(),
            at: 7,
            reason: None,
        };
        assert!(matches!(
            classify(delivery(DeliveryStage::Acked, "cmd/p/d/reboot/plain/r1/1700000000"), 5),
            Work::Feedback(CommandChange { transition: Transition::Delivered { at: 7 }, .. })
        ));
        assert!(matches!(classify(delivery(DeliveryStage::Dropped, "cmd/p/d/x/plain/r1"), 5), Work::Skip("dropped")));
        let mut monitor = delivery(DeliveryStage::Delivered, "cmd/p/d/reboot/plain/r1");
        if let BrokerEvent::Delivery { username, .. } = &mut monitor {
            *username = Some("ops-dashboard".into());
        }
        assert!(matches!(classify(monitor, 5), Work::Skip("delivery_to_other")));
        assert!(matches!(classify(delivery(DeliveryStage::Delivered, "m2m/p/d/e/m1"), 5), Work::Skip("delivery")));
        match classify(publish("p/d", "upload_data/p/d/temp/m1", b"{\"t\":1}"), 5) {
            Work::Message { key, message } => {
                assert_eq!(key, "u:p/d/m1");
                assert_eq!(message.payload_json.as_deref(), Some("{\"t\":1}"));
                assert_eq!(message.sent_at, 1_000);
            }
            other => panic!("{other:?}"),
        }
    }
}

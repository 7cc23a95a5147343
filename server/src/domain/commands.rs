//! Device control out: the durable command log, its dispatcher, RPC, and iothub's own `$` replies.
//!
//! Every business command (`cmd` or `rpc`) is written to the command log before anything is published,
//! so nothing is lost and nothing is sent twice by accident:
//! - a command for an online device is claimed at birth and published at once;
//! - one for an offline device waits `queued` until the device connects (the ingest path reports the
//!   connect) or its TTL passes;
//! - a scheduler (every instance, every `commands.sweep_ms`) expires commands past their TTL and sends
//!   what is due: retries of unreplied commands, publishes the broker could not take, claims whose
//!   instance died.
//!
//! Callers' commands are logged in group commits: commands that arrive while a transaction runs form the
//! next one (with the device check inside the insert), and each group is published concurrently (one
//! device's commands in order) and its sends recorded in one transaction. Claims are leases on the row
//! (`next_attempt_at`), so any number of instances dispatch side by side.
//! Delivery reports and replies come back through the ingest path as [`CommandChange`]s. An RPC caller
//! waits on the [`ReplyHub`], which hears about replies committed on any instance.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt as _;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::ids::{DeviceRef, ProductId};
use crate::model::broker::{OutboundMessage, Published};
use crate::model::commands::*;
use crate::model::event_bus::BusEvent;
use crate::model::events;
use crate::model::replies::{reply_key, Reply};
use crate::model::store::{DeviceFilter, DeviceStatus};
use crate::ports::broker::BrokerApi;
use crate::ports::commands::*;
use crate::ports::replies::ReplyHub;
use crate::ports::store::Store;
use crate::topics::{command_topic, is_internal_name, is_name, tag_command_topic, Internal};

/// Largest command payload accepted (brokers default to 1 MiB packets; topic and headers need room).
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// Longest TTL a command may have.
pub const MAX_TTL_MS: i64 = 30 * 24 * 3600 * 1000;
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// When EMQX says nobody subscribes although the device is online (its auto-subscription may not be in
/// place yet right after connecting), try again this soon.
const NO_SUBSCRIBER_RETRY_MS: i64 = 2_000;
/// After the broker API failed, try again this soon.
const BROKER_RETRY_MS: i64 = 5_000;
/// Most commands one scheduler round expires or sends.
const SWEEP_BATCH: u32 = 500;
/// How long queued commands wait, after a device connects, for the broker to list its command subscription.
const SUBSCRIBED_WAIT: Duration = Duration::from_secs(5);
/// A session younger than this may not be subscribed yet: an RPC checks with the broker first.
const FRESH_CONNECT_MS: i64 = 5_000;
/// Most commands one group commit logs; more callers wait for the next one.
const INTAKE_BATCH: usize = 512;
/// Group commits in flight at once: one writes while the next group gathers and the previous publishes.
const INTAKE_WORKERS: usize = 2;
/// Devices published to at once by one dispatch (each device's commands go out in order).
const PUBLISH_CONCURRENCY: usize = 64;

pub struct CommandSettings {
    /// How long a claim protects a command being published from other dispatchers.
    pub dispatch_lease_ms: i64,
    pub sweep_every: Duration,
    /// Longest RPC wait: at most [`MAX_RPC_TIMEOUT`], and short enough that the HTTP request timeout never
    /// cuts an RPC off before it can answer 504.
    pub max_rpc_timeout: Duration,
    /// Most devices one tag command may target.
    pub max_tag_targets: u32,
}

/// A business caller's command, before validation.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    pub name: String,
    pub format: PayloadFormat,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub ttl_ms: Option<i64>,
    pub idempotency_key: Option<String>,
    pub retry: Option<RetryPolicy>,
}

/// What an RPC came to.
#[derive(Debug, Clone)]
pub struct RpcReply {
    pub request_id: String,
    pub payload: Vec<u8>,
    pub replied_at: i64,
}

#[derive(Clone)]
pub struct CommandService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    commands: Arc<dyn CommandStore>,
    broker: Arc<dyn BrokerApi>,
    replies: Arc<dyn ReplyHub>,
    settings: CommandSettings,
    intake: mpsc::Sender<Pending>,
}

/// A caller's command waiting for the next group commit.
struct Pending {
    command: NewCommand,
    logged: oneshot::Sender<Result<Inserted>>,
    /// The command after its first publish was recorded (only for commands claimed at birth).
    sent: oneshot::Sender<CommandRecord>,
}

/// The events announcing a change that took effect: the new state, and the reply when there is one.
/// A late delivery report (after the reply) and a postponement change no state, so they announce nothing.
fn events_for(record: &CommandRecord, transition: &Transition) -> Vec<BusEvent> {
    match transition {
        Transition::Postponed { .. } => Vec::new(),
        // The reply was committed before the send was recorded: announce the send only.
        Transition::Sent { .. } if record.state.is_terminal() => {
            vec![events::command_state(&CommandRecord { state: CommandState::Sent, ..record.clone() })]
        }
        // A delivery report that overtook the first send left the state alone; both steps are announced now.
        Transition::Sent { .. } if record.state == CommandState::Delivered && record.attempts == 1 => {
            vec![
                events::command_state(&CommandRecord { state: CommandState::Sent, ..record.clone() }),
                events::command_state(record),
            ]
        }
        Transition::Delivered { .. } if record.state != CommandState::Delivered => Vec::new(),
        Transition::Replied { at, payload, message_id, .. } => {
            vec![events::command_state(record), events::cmd_resp(record, message_id, payload, *at)]
        }
        _ => vec![events::command_state(record)],
    }
}

/// When an unreplied command that was just sent goes out again, if its retry policy says so.
fn next_retry(record: &CommandRecord, sent_at: i64) -> Option<i64> {
    match record.retry_interval_ms {
        Some(interval) if record.attempts + 1 < record.max_attempts => Some(sent_at + interval),
        _ => None,
    }
}

fn new_request_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

impl CommandService {
    pub fn start(
        store: Arc<dyn Store>,
        commands: Arc<dyn CommandStore>,
        broker: Arc<dyn BrokerApi>,
        replies: Arc<dyn ReplyHub>,
        settings: CommandSettings,
    ) -> Self {
        let (intake, rx) = mpsc::channel(INTAKE_BATCH * 2);
        let inner = Arc::new(Inner { store, commands, broker, replies, settings, intake });
        tokio::spawn(scheduler(Arc::downgrade(&inner)));
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..INTAKE_WORKERS {
            tokio::spawn(intake_worker(Arc::downgrade(&inner), rx.clone()));
        }
        Self { inner }
    }

    /// A caller's command as it is logged: claimed for sending at once if its device is online when it is
    /// written. An RPC is refused instead of queued for an offline device, and has no key or retry policy.
    fn new_command(&self, device: &DeviceRef, request: CommandRequest, mode: CommandKind) -> NewCommand {
        let now = now_ms();
        let rpc = mode == CommandKind::Rpc;
        NewCommand {
            device: device.clone(),
            request_id: new_request_id(),
            mode,
            name: request.name,
            format: request.format,
            payload: request.payload,
            qos: request.qos,
            expires_at: request.ttl_ms.map(|ttl| now + ttl),
            idempotency_key: if rpc { None } else { request.idempotency_key },
            retry: if rpc { None } else { request.retry },
            leased_until: Some(now + self.inner.settings.dispatch_lease_ms),
            require_online: rpc,
        }
    }

    /// Hands a command to the next group commit; returns once it is logged (or refused).
    async fn log(&self, command: NewCommand) -> Result<(Inserted, oneshot::Receiver<CommandRecord>)> {
        let (logged, logged_rx) = oneshot::channel();
        let (sent, sent_rx) = oneshot::channel();
        self.inner
            .intake
            .send(Pending { command, logged, sent })
            .await
            .map_err(|_| Error::Unavailable("shutting down".into()))?;
        let inserted = logged_rx.await.map_err(|_| Error::Unavailable("command intake stopped".into()))??;
        Ok((inserted, sent_rx))
    }

    /// Logs one group of callers' commands, then publishes the ones claimed at birth in the background
    /// (the next group is already being written) and tells each caller.
    async fn log_group(&self, group: Vec<Pending>) {
        let inner = &self.inner;
        let mut commands = Vec::with_capacity(group.len());
        let mut callers = Vec::with_capacity(group.len());
        for Pending { command, logged, sent } in group {
            commands.push(command);
            callers.push((logged, sent));
        }
        metrics::histogram!("iothub_command_group_size").record(commands.len() as f64);
        let now = now_ms();
        // The lease runs from the write, not from the request: time spent waiting for the group does
        // not shorten it.
        for command in &mut commands {
            if command.leased_until.is_some() {
                command.leased_until = Some(now + inner.settings.dispatch_lease_ms);
            }
        }
        let result = inner.commands.insert_commands(&commands, &events::command_state, now).await;
        let outcomes = match result {
            Ok(outcomes) => outcomes,
            Err(e) => {
                tracing::warn!(error = %e, commands = commands.len(), "command group not logged");
                for (logged, _) in callers {
                    let _ = logged.send(Err(e.share()));
                }
                return;
            }
        };
        let mut claimed = Vec::new();
        let mut waiting = HashMap::new();
        for (outcome, (logged, sent)) in outcomes.into_iter().zip(callers) {
            if let Ok(Inserted::Created(record)) = &outcome {
                if record.next_attempt_at.is_some() {
                    waiting.insert(record.request_id.clone(), sent);
                    claimed.push(record.clone());
                }
            }
            let _ = logged.send(outcome);
        }
        if claimed.is_empty() {
            return;
        }
        let this = self.clone();
        // Its own task: the next group's insert must not wait for this group's publishes.
        tokio::spawn(async move {
            for record in this.dispatch(claimed).await {
                if let Some(sent) = waiting.remove(&record.request_id) {
                    let _ = sent.send(record);
                }
            }
        });
    }

    fn validate(request: &CommandRequest) -> Result<()> {
        if !is_name(&request.name) {
            return Err(Error::validation("name", "must be 1-64 of [A-Za-z0-9_.-]"));
        }
        if is_internal_name(&request.name) {
            return Err(Error::validation("name", "names starting with `$` are reserved for iothub"));
        }
        if request.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::validation("payload", format!("must be at most {MAX_PAYLOAD_BYTES} bytes")));
        }
        if request.qos > 2 {
            return Err(Error::validation("qos", "must be 0, 1 or 2"));
        }
        if let Some(ttl) = request.ttl_ms {
            if !(1_000..=MAX_TTL_MS).contains(&ttl) {
                return Err(Error::validation("ttl_secs", format!("must be between 1 and {}", MAX_TTL_MS / 1000)));
            }
        }
        if let Some(key) = &request.idempotency_key {
            if !crate::topics::is_message_id(key) {
                return Err(Error::validation("Idempotency-Key", "must be 1-128 of [A-Za-z0-9_.:-]"));
            }
        }
        if let Some(retry) = request.retry {
            if !(1_000..=3_600_000).contains(&retry.interval_ms) {
                return Err(Error::validation("retry.interval_secs", "must be between 1 and 3600"));
            }
            if !(1..=100).contains(&retry.max_attempts) {
                return Err(Error::validation("retry.max_attempts", "must be between 1 and 100"));
            }
        }
        Ok(())
    }

    /// Logs a command and sends it if the device is online; otherwise it waits for the device to connect.
    /// With an idempotency key already used for this device, the existing command comes back
    /// (`created = false`).
    #[tracing::instrument(skip_all, fields(%device, name = %request.name), name = "commands.submit")]
    pub async fn submit(&self, device: &DeviceRef, request: CommandRequest) -> Result<(CommandRecord, bool)> {
        Self::validate(&request)?;
        self.create(device, request).await
    }

    /// Whether the device is online; it must exist and be active.
    async fn active_device(&self, device: &DeviceRef) -> Result<bool> {
        let record = self.inner.store.get_device(device).await?.ok_or_else(|| Error::not_found("device", device))?;
        if record.status == DeviceStatus::Suspended {
            return Err(Error::Conflict(format!("device `{device}` is suspended")));
        }
        Ok(record.online)
    }

    async fn create(&self, device: &DeviceRef, request: CommandRequest) -> Result<(CommandRecord, bool)> {
        let inner = &self.inner;
        let command = self.new_command(device, request, CommandKind::Cmd);
        let (name, payload, format, qos) = (command.name.clone(), command.payload.clone(), command.format, command.qos);
        let (inserted, sent) = self.log(command).await?;
        let record = match inserted {
            Inserted::Created(record) => record,
            Inserted::Existing(record) => {
                let same = (record.name.as_str(), record.payload.as_slice(), record.mode, record.format, record.qos)
                    == (name.as_str(), payload.as_slice(), CommandKind::Cmd, format, qos);
                if !same {
                    return Err(Error::Conflict(
                        "Idempotency-Key was already used for a different command to this device".into(),
                    ));
                }
                return Ok((record, false));
            }
            Inserted::Refused(why) => return Err(refused(device, why)),
        };
        metrics::counter!("iothub_commands_created_total", "mode" => "cmd").increment(1);
        let record = if record.next_attempt_at.is_some() {
            // The dispatch answers unless its task died; the lease then brings the command back.
            sent.await.unwrap_or(record)
        } else if self.active_device(device).await.unwrap_or(false) {
            // The device connected while we wrote: its connect may have looked for queued commands
            // before ours committed, so look again (the claim makes sure only one of us sends it).
            let claimed = inner
                .commands
                .claim_commands(
                    &ClaimScope::Devices(vec![device.clone()]),
                    now_ms(),
                    inner.settings.dispatch_lease_ms,
                    100,
                )
                .await?;
            let sent = self.dispatch_detached(claimed).await?;
            sent.into_iter().find(|c| c.request_id == record.request_id).unwrap_or(record)
        } else {
            record
        };
        Ok((record, true))
    }

    /// Sends a command and waits for the device's `rpc_resp`. Offline → 409 at once; no reply within
    /// `timeout` → 504 naming the request id (the command expires with that TTL, so a late device does
    /// not act on it).
    #[tracing::instrument(skip_all, fields(%device, name = %request.name), name = "commands.rpc")]
    pub async fn rpc(&self, device: &DeviceRef, request: CommandRequest, timeout: Duration) -> Result<RpcReply> {
        if timeout.is_zero() || timeout > MAX_RPC_TIMEOUT {
            return Err(Error::validation(
                "timeout_ms",
                format!("must be between 1 and {}", MAX_RPC_TIMEOUT.as_millis()),
            ));
        }
        let request = CommandRequest { ttl_ms: Some(timeout.as_millis().max(1_000) as i64), ..request };
        Self::validate(&request)?;
        let started = tokio::time::Instant::now();
        let inner = &self.inner;
        // A device that connected moments ago may not be subscribed yet (the broker reports the connect
        // before its auto-subscription): then the RPC waits for the subscription, within its own timeout.
        if let Some(record) = inner.store.get_device(device).await? {
            let connected_ago = now_ms() - record.last_seen_at.unwrap_or(i64::MIN / 2);
            if record.online && connected_ago < FRESH_CONNECT_MS {
                self.wait_subscribed_to(device, 1, timeout / 2).await;
            }
        }
        let command = self.new_command(device, request, CommandKind::Rpc);
        // The waiter is registered before the command is logged, so no reply can slip past it.
        let waiter =
            inner.replies.wait(reply_key(device.product.as_str(), device.device.as_str(), &command.request_id));
        let (inserted, mut sent) = self.log(command).await?;
        let record = match inserted {
            Inserted::Created(record) => record,
            Inserted::Refused(Refusal::Offline) => {
                return Err(Error::Conflict(format!("device `{device}` is offline")));
            }
            Inserted::Refused(why) => return Err(refused(device, why)),
            Inserted::Existing(_) => {
                return Err(Error::Internal(anyhow::anyhow!("an RPC without idempotency key matched another")))
            }
        };
        metrics::counter!("iothub_commands_created_total", "mode" => "rpc").increment(1);
        // The reply does not wait for the send's bookkeeping; a publish the broker refused for good ends
        // the wait at once.
        let wait = waiter.recv(timeout.saturating_sub(started.elapsed()));
        tokio::pin!(wait);
        let mut dispatched = false;
        let reply = loop {
            tokio::select! {
                reply = &mut wait => break reply,
                after = &mut sent, if !dispatched => {
                    dispatched = true;
                    if matches!(after, Ok(CommandRecord { state: CommandState::Failed, .. })) {
                        break None;
                    }
                }
            }
        };
        if let Some(reply) = reply {
            metrics::histogram!("iothub_rpc_seconds").record(started.elapsed().as_secs_f64());
            return Ok(RpcReply {
                request_id: record.request_id,
                payload: reply.payload,
                replied_at: reply.replied_at,
            });
        }
        // The announcement may have been lost (Redis away): the command log has the last word.
        match self.inner.commands.get_command(device, &record.request_id).await? {
            Some(CommandRecord { reply: Some(payload), replied_at: Some(at), .. }) => {
                tracing::debug!(request_id = %record.request_id, "RPC reply found in the command log");
                Ok(RpcReply { request_id: record.request_id, payload, replied_at: at })
            }
            Some(CommandRecord { state: CommandState::Failed, failure, .. }) => Err(Error::Unavailable(format!(
                "command `{}` could not be published: {}",
                record.request_id,
                failure.unwrap_or_default()
            ))),
            _ => {
                metrics::counter!("iothub_rpc_timeouts_total").increment(1);
                Err(Error::Timeout(format!(
                    "device `{device}` did not reply to request `{}` within {} ms",
                    record.request_id,
                    timeout.as_millis()
                )))
            }
        }
    }

    /// One command to every active device with `tag`: one request id, one row per device (replies are
    /// tracked per device). Online devices get it at once on `tags/{p}/{tag}/cmd/...`, the topic they
    /// subscribe to for their tags; offline ones wait `queued` and get it on their own command topic
    /// when they connect, within the TTL. Returns every device's row.
    #[tracing::instrument(skip_all, fields(%product, tag, name = %request.name), name = "commands.submit_to_tag")]
    pub async fn submit_to_tag(
        &self,
        product: &ProductId,
        tag: &str,
        request: CommandRequest,
    ) -> Result<Vec<CommandRecord>> {
        self.check_tag_request(product, tag, &request).await?;
        let inner = &self.inner;
        let now = now_ms();
        let command = NewTagCommand {
            product: product.clone(),
            tag: tag.to_string(),
            request_id: new_request_id(),
            name: request.name,
            format: request.format,
            payload: request.payload,
            qos: request.qos,
            expires_at: request.ttl_ms.map(|ttl| now + ttl),
            leased_until: now + inner.settings.dispatch_lease_ms,
        };
        let records = inner.commands.insert_tag_command(&command, &events::command_state, now).await?;
        if records.is_empty() {
            return Err(Error::not_found("active device with tag", tag));
        }
        metrics::counter!("iothub_commands_created_total", "mode" => "tag").increment(records.len() as u64);
        let claimed: Vec<&CommandRecord> = records.iter().filter(|r| r.next_attempt_at.is_some()).collect();
        if claimed.is_empty() {
            return Ok(records);
        }
        let mut changed = self.publish_to_tag(&command, &claimed).await?;
        Ok(records.into_iter().map(|r| changed.remove(&r.device).unwrap_or(r)).collect())
    }

    /// A tag command's request is valid, its product exists, and its tag reaches at most
    /// `commands.max_tag_targets` active devices: a cap checked before anything is written, as one call
    /// must not write (and later page through) an unbounded number of rows. Racy against tags changing
    /// meanwhile, which only moves the cap by those.
    async fn check_tag_request(&self, product: &ProductId, tag: &str, request: &CommandRequest) -> Result<()> {
        Self::validate(request)?;
        crate::ids::validate_id(tag).map_err(|e| Error::validation("tag", e))?;
        if request.idempotency_key.is_some() || request.retry.is_some() {
            return Err(Error::validation("retry", "tag commands take no retry policy or Idempotency-Key"));
        }
        let inner = &self.inner;
        if inner.store.get_product(product).await?.is_none() {
            return Err(Error::not_found("product", product));
        }
        let cap = inner.settings.max_tag_targets;
        let probe = DeviceFilter {
            status: Some(DeviceStatus::Active),
            tag: Some(tag.to_string()),
            limit: cap + 1,
            ..Default::default()
        };
        if inner.store.list_devices(product, &probe).await?.len() > cap as usize {
            return Err(Error::validation(
                "tag",
                format!("targets more than {cap} devices (commands.max_tag_targets); split the tag"),
            ));
        }
        Ok(())
    }

    /// Publishes a tag command once on its tag topic for the devices online now (`claimed`) and records
    /// the outcome on each of their rows; returns the rows that changed, by device.
    async fn publish_to_tag(
        &self,
        command: &NewTagCommand,
        claimed: &[&CommandRecord],
    ) -> Result<std::collections::HashMap<DeviceRef, CommandRecord>> {
        let inner = &self.inner;
        let sent_at = now_ms();
        let message = OutboundMessage {
            topic: tag_command_topic(
                command.product.as_str(),
                &command.tag,
                &command.name,
                command.format.encoding(),
                &command.request_id,
                command.expires_at,
            ),
            payload: wire_payload(command.format, &command.payload),
            qos: command.qos,
            expiry_secs: command.expires_at.map(|at| expiry_secs(at, sent_at)),
        };
        let lease = command.leased_until;
        let transition = match inner.broker.publish(&message).await {
            Ok(Published::Delivered | Published::Accepted) => {
                Transition::Sent { at: sent_at, next_attempt_at: None, lease }
            }
            // Nobody subscribes right now: the scheduler sends to each device on its own topic.
            Ok(Published::NoSubscribers) => {
                Transition::Postponed { next_attempt_at: Some(sent_at + NO_SUBSCRIBER_RETRY_MS), lease }
            }
            Err(Error::Validation { message, .. }) => Transition::Failed { at: sent_at, reason: message },
            Err(e) => {
                tracing::warn!(error = %e, "tag command not published; devices get it one by one");
                Transition::Postponed { next_attempt_at: Some(sent_at + BROKER_RETRY_MS), lease }
            }
        };
        let changes: Vec<CommandChange> = claimed
            .iter()
            .map(|r| CommandChange {
                device: r.device.clone(),
                request_id: r.request_id.clone(),
                transition: transition.clone(),
            })
            .collect();
        let outcome = inner.commands.change_commands(&changes, &events_for, Durability::Relaxed).await?;
        Ok(outcome.changed.into_iter().map(|(r, _)| (r.device.clone(), r)).collect())
    }

    /// Every device's row of a tag command.
    pub async fn tag_command(&self, product: &ProductId, request_id: &str) -> Result<Vec<CommandRecord>> {
        let rows = self.inner.commands.tag_command(product, request_id).await?;
        if rows.is_empty() {
            return Err(Error::not_found("tag command", request_id));
        }
        Ok(rows)
    }

    pub async fn get(&self, device: &DeviceRef, request_id: &str) -> Result<CommandRecord> {
        self.inner
            .commands
            .get_command(device, request_id)
            .await?
            .ok_or_else(|| Error::not_found("command", request_id))
    }

    pub async fn list(&self, device: &DeviceRef, filter: &CommandFilter) -> Result<Vec<CommandRecord>> {
        if self.inner.store.get_device(device).await?.is_none() {
            return Err(Error::not_found("device", device));
        }
        self.inner.commands.list_commands(device, filter).await
    }

    /// Wakes the caller waiting for this RPC reply, on whichever instance it waits. Only the caller of this
    /// device's request id can receive it; a lost announcement costs the caller a read of the log.
    pub async fn announce_reply(&self, device: &DeviceRef, request_id: &str, payload: Vec<u8>, at: i64) {
        let key = reply_key(device.product.as_str(), device.device.as_str(), request_id);
        if let Err(e) = self.inner.replies.announce(Reply { key, payload, replied_at: at }).await {
            // The caller's final read of the command log still finds the reply.
            tracing::warn!(error = %e, request_id, "RPC reply not announced");
        }
    }

    /// Applies what the broker and devices reported about commands (deliveries, replies). Returns only once
    /// committed, so the webhook that carried them can be answered.
    pub async fn apply_feedback(&self, changes: &[CommandChange]) -> Result<()> {
        let inner = &self.inner;
        let outcome = inner.commands.change_commands(changes, &events_for, Durability::Required).await;
        let outcome = outcome?;
        let applied = outcome.changed.len();
        metrics::counter!("iothub_command_feedback_total", "outcome" => "applied").increment(applied as u64);
        metrics::counter!("iothub_command_feedback_total", "outcome" => "ignored")
            .increment((changes.len() - applied) as u64);
        Ok(())
    }

    /// Devices just connected: send what waited for them. Runs in the background (the webhook that
    /// reported the connect does not wait for it); anything it misses, the scheduler sends.
    pub fn devices_connected(&self, devices: Vec<DeviceRef>) {
        if devices.is_empty() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let inner = &this.inner;
            let claimed = match inner
                .commands
                .claim_commands(&ClaimScope::Devices(devices), now_ms(), inner.settings.dispatch_lease_ms, SWEEP_BATCH)
                .await
            {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::warn!(error = %e, "queued commands not claimed on connect; the scheduler will retry");
                    return;
                }
            };
            // The connect webhook can come before the broker has subscribed the device (RMQTT and EMQX run
            // their auto-subscription after the connected hook): a publish then reaches nobody. So each
            // device's queued commands go out once the broker lists its command subscription.
            let mut by_device: HashMap<DeviceRef, Vec<CommandRecord>> = HashMap::new();
            for command in claimed {
                by_device.entry(command.device.clone()).or_default().push(command);
            }
            for (device, commands) in by_device {
                let this = this.clone();
                tokio::spawn(async move {
                    this.wait_subscribed(&device).await;
                    this.dispatch(commands).await;
                });
            }
        });
    }

    /// Waits until a live connection of `device` is subscribed to its command topic, at most
    /// [`SUBSCRIBED_WAIT`] (then sends anyway: a broker API that cannot tell must not hold commands back
    /// longer than that).
    async fn wait_subscribed(&self, device: &DeviceRef) {
        self.wait_subscribed_to(device, 0, SUBSCRIBED_WAIT).await
    }

    /// [`Self::wait_subscribed`] for the device's `AUTO_SUBSCRIPTIONS[which]` filter, at most `limit`.
    async fn wait_subscribed_to(&self, device: &DeviceRef, which: usize, limit: Duration) {
        let filter = crate::topics::AUTO_SUBSCRIPTIONS[which].replace("${username}", &device.broker_username());
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.inner.broker.is_subscribed(&device.broker_username(), &filter).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::debug!(%device, error = %e, "subscription not readable; retrying"),
            }
            if tokio::time::Instant::now() >= deadline {
                metrics::counter!("iothub_commands_subscription_wait_timeouts_total").increment(1);
                tracing::warn!(%device, "no command subscription seen in time; sending anyway");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`Self::dispatch`] in its own task: an HTTP caller that goes away (or times out) must not cancel it
    /// between a publish and its bookkeeping.
    async fn dispatch_detached(&self, claimed: Vec<CommandRecord>) -> Result<Vec<CommandRecord>> {
        let this = self.clone();
        tokio::spawn(async move { this.dispatch(claimed).await })
            .await
            .map_err(|e| Error::Internal(anyhow::anyhow!("command dispatch task failed: {e}")))
    }

    /// Publishes claimed commands (in order, per device) and records the outcome of each. Returns the
    /// commands as they are afterwards.
    async fn dispatch(&self, claimed: Vec<CommandRecord>) -> Vec<CommandRecord> {
        let inner = &self.inner;
        let mut per_device: Vec<Vec<CommandRecord>> = Vec::new();
        let mut slot: HashMap<DeviceRef, usize> = HashMap::new();
        for command in &claimed {
            let i = *slot.entry(command.device.clone()).or_insert_with(|| {
                per_device.push(Vec::new());
                per_device.len() - 1
            });
            per_device[i].push(command.clone());
        }
        let changes: Vec<CommandChange> = futures::stream::iter(per_device.into_iter().map(|c| self.send_in_order(c)))
            .buffer_unordered(PUBLISH_CONCURRENCY)
            .flat_map(futures::stream::iter)
            .collect()
            .await;
        match inner.commands.change_commands(&changes, &events_for, Durability::Relaxed).await {
            Ok(outcome) => {
                let mut after: Vec<CommandRecord> = outcome.changed.into_iter().map(|(r, _)| r).collect();
                // A command a delivery report or reply overtook keeps its newer state.
                for command in &claimed {
                    if !after.iter().any(|r| r.request_id == command.request_id) {
                        after.push(command.clone());
                    }
                }
                after.sort_by_key(|r| claimed.iter().position(|c| c.request_id == r.request_id));
                after
            }
            Err(e) => {
                // The claims run out and the scheduler sends again: at least once, never lost.
                tracing::warn!(error = %e, "command dispatch not recorded; the lease will expire and it is retried");
                claimed
            }
        }
    }

    /// Publishes one device's claimed commands, one after the other.
    async fn send_in_order(&self, commands: Vec<CommandRecord>) -> Vec<CommandChange> {
        let mut changes = Vec::with_capacity(commands.len());
        for command in &commands {
            changes.extend(self.send_claimed(command).await);
        }
        changes
    }

    /// Publishes one claimed command; `None` when its lease is too short to start.
    async fn send_claimed(&self, command: &CommandRecord) -> Option<CommandChange> {
        let now = now_ms();
        // The claim (`next_attempt_at`) is this dispatcher's lease. Past half of it, what is left goes
        // back to the scheduler when the lease runs out: a publish must never start on a lease that
        // could expire before its outcome is recorded (another instance would send it too).
        let lease = command.next_attempt_at.unwrap_or_default();
        if lease - now < self.inner.settings.dispatch_lease_ms / 2 {
            metrics::counter!("iothub_command_dispatch_deferred_total").increment(1);
            return None;
        }
        let transition = match self.publish(command, now).await {
            Ok(Published::Delivered | Published::Accepted) => {
                Transition::Sent { at: now, next_attempt_at: next_retry(command, now), lease }
            }
            Ok(Published::NoSubscribers) => {
                Transition::Postponed { next_attempt_at: Some(now + NO_SUBSCRIBER_RETRY_MS), lease }
            }
            Err(Error::Validation { message, .. }) => Transition::Failed { at: now, reason: message },
            Err(e) => {
                tracing::warn!(error = %e, request_id = %command.request_id, "command not published; will retry");
                Transition::Postponed { next_attempt_at: Some(now + BROKER_RETRY_MS), lease }
            }
        };
        Some(CommandChange { device: command.device.clone(), request_id: command.request_id.clone(), transition })
    }

    async fn publish(&self, command: &CommandRecord, now: i64) -> Result<Published> {
        let payload = wire_payload(command.format, &command.payload);
        let message = OutboundMessage {
            topic: command_topic(
                command.mode,
                command.device.product.as_str(),
                command.device.device.as_str(),
                &command.name,
                command.format.encoding(),
                &command.request_id,
                command.expires_at,
            ),
            payload,
            qos: command.qos,
            expiry_secs: command.expires_at.map(|at| expiry_secs(at, now)),
        };
        self.inner.broker.publish(&message).await
    }

    /// Sends one of iothub's own commands (`$set_ntp`, ...): not logged, because it answers a request
    /// the device repeats if it gets no answer.
    #[tracing::instrument(skip_all, fields(%device, name = name.as_str()), name = "commands.send_internal")]
    pub async fn send_internal(&self, device: &DeviceRef, name: Internal, payload: Vec<u8>, qos: u8) -> Result<()> {
        let topic = command_topic(
            CommandKind::Cmd,
            device.product.as_str(),
            device.device.as_str(),
            name.as_str(),
            Encoding::Plain,
            &new_request_id(),
            None,
        );
        self.inner.broker.publish(&OutboundMessage { topic, payload, qos, expiry_secs: None }).await?;
        metrics::counter!("iothub_internal_commands_total", "name" => name.as_str()).increment(1);
        Ok(())
    }

    /// One scheduler round: expire what is past its TTL, send what is due. Public for tests and tools.
    pub async fn sweep(&self) -> Result<usize> {
        let inner = &self.inner;
        let now = now_ms();
        let expired = inner.commands.expired_commands(now, SWEEP_BATCH).await?;
        let changes: Vec<CommandChange> = expired
            .into_iter()
            .map(|(device, request_id)| CommandChange {
                device,
                request_id,
                transition: Transition::Expired { at: now },
            })
            .collect();
        let outcome = inner.commands.change_commands(&changes, &events_for, Durability::Relaxed).await?;
        metrics::counter!("iothub_commands_expired_total").increment(outcome.changed.len() as u64);
        let due =
            inner.commands.claim_commands(&ClaimScope::Due, now, inner.settings.dispatch_lease_ms, SWEEP_BATCH).await?;
        let sent = due.len();
        self.dispatch(due).await;
        Ok(outcome.changed.len() + sent)
    }
}

/// What travels on the wire: `base64` commands as base64 text (devices decode it), the others as-is.
fn wire_payload(format: PayloadFormat, payload: &[u8]) -> Vec<u8> {
    match format {
        PayloadFormat::Base64 => base64::engine::general_purpose::STANDARD.encode(payload).into_bytes(),
        PayloadFormat::Plain | PayloadFormat::Json => payload.to_vec(),
    }
}

/// MQTT message expiry for a deadline, rounded up to whole seconds (at least one).
fn expiry_secs(expires_at: i64, now: i64) -> u32 {
    (((expires_at - now).max(1_000) + 999) / 1000).min(u32::MAX as i64) as u32
}

/// Why the log refused a command, as the caller's error.
fn refused(device: &DeviceRef, why: Refusal) -> Error {
    match why {
        Refusal::UnknownDevice => Error::not_found("device", device),
        Refusal::Suspended => Error::Conflict(format!("device `{device}` is suspended")),
        Refusal::Offline => Error::Conflict(format!("device `{device}` is offline")),
    }
}

/// Takes whatever callers queued (up to [`INTAKE_BATCH`]) and logs it as one group, until the service is
/// gone.
async fn intake_worker(inner: Weak<Inner>, rx: Arc<Mutex<mpsc::Receiver<Pending>>>) {
    loop {
        let group = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut group = vec![first];
            while group.len() < INTAKE_BATCH {
                match rx.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
                }
            }
            group
        };
        let Some(inner) = inner.upgrade() else { return };
        CommandService { inner }.log_group(group).await;
    }
}

/// Runs rounds until the service is gone. A round that finds work is followed by another at once.
async fn scheduler(inner: Weak<Inner>) {
    let mut interval = match inner.upgrade() {
        Some(i) => tokio::time::interval(i.settings.sweep_every),
        None => return,
    };
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let service = CommandService { inner };
        if let Err(e) = service.sweep().await {
            tracing::warn!(error = %e, "command scheduler round failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DeviceId, ProductId};

    fn record(attempts: i32, max_attempts: i32, interval: Option<i64>) -> CommandRecord {
        let mut r = NewCommand {
            device: DeviceRef::new(ProductId::parse("p").unwrap(), DeviceId::parse("d").unwrap()),
            request_id: "r".into(),
            mode: CommandKind::Cmd,
            name: "n".into(),
            format: PayloadFormat::Plain,
            payload: vec![],
            qos: 1,
            expires_at: None,
            idempotency_key: None,
            retry: None,
            leased_until: None,
            require_online: false,
        }
        .queued_record(0);
        r.attempts = attempts;
        r.max_attempts = max_attempts;
        r.retry_interval_ms = interval;
        r
    }

    #[test]
    fn retries_stop_after_max_attempts() {
        assert_eq!(next_retry(&record(0, 3, Some(10_000)), 5), Some(10_005));
        assert_eq!(next_retry(&record(1, 3, Some(10_000)), 5), Some(10_005));
        assert_eq!(next_retry(&record(2, 3, Some(10_000)), 5), None, "third send is the last");
        assert_eq!(next_retry(&record(0, 1, None), 5), None);
    }

    #[test]
    fn only_state_changes_are_announced() {
        let mut r = record(1, 1, None);
        assert!(events_for(&r, &Transition::Postponed { next_attempt_at: None, lease: 1 }).is_empty());
        r.state = CommandState::Delivered;
        let overtaken: Vec<_> = events_for(&r, &Transition::Sent { at: 1, next_attempt_at: None, lease: 1 })
            .iter()
            .map(|e| serde_json::from_slice::<serde_json::Value>(&e.body).unwrap()["state"].clone())
            .collect();
        assert_eq!(overtaken, ["sent", "delivered"], "a delivery report that overtook the send");
        r.state = CommandState::Replied;
        assert!(events_for(&r, &Transition::Delivered { at: 1 }).is_empty(), "late delivery report");
        let replied =
            Transition::Replied { at: 1, mode: CommandKind::Cmd, payload: b"ok".to_vec(), message_id: "m".into() };
        let kinds: Vec<_> = events_for(&r, &replied).iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [crate::model::event_bus::EventKind::CommandState, crate::model::event_bus::EventKind::CmdResp]
        );
    }

    #[test]
    fn reserved_and_malformed_commands_are_refused_naming_the_field() {
        let ok = CommandRequest {
            name: "reboot".into(),
            format: PayloadFormat::Plain,
            payload: vec![],
            qos: 1,
            ttl_ms: None,
            idempotency_key: None,
            retry: None,
        };
        assert!(CommandService::validate(&ok).is_ok());
        let field = |r: CommandRequest| match CommandService::validate(&r) {
            Err(Error::Validation { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(CommandRequest { name: "$set_ntp".into(), ..ok.clone() }), "name");
        assert_eq!(field(CommandRequest { name: "a/b".into(), ..ok.clone() }), "name");
        assert_eq!(field(CommandRequest { qos: 3, ..ok.clone() }), "qos");
        assert_eq!(field(CommandRequest { ttl_ms: Some(10), ..ok.clone() }), "ttl_secs");
        assert_eq!(field(CommandRequest { payload: vec![0; MAX_PAYLOAD_BYTES + 1], ..ok.clone() }), "payload");
        assert_eq!(field(CommandRequest { idempotency_key: Some("a b".into()), ..ok.clone() }), "Idempotency-Key");
        let retry = Some(RetryPolicy { interval_ms: 10, max_attempts: 3 });
        assert_eq!(field(CommandRequest { retry, ..ok.clone() }), "retry.interval_secs");
    }
}

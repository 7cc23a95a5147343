//! The command log ([`CommandStore`]) on both backends.
//!
//! Both run the same transition statements, each an `UPDATE ... WHERE <the transition is a step forward>
//! RETURNING`, so a replayed or late report simply matches no row and emits nothing; every change commits
//! with its events. They differ in how rows are batched and claimed: PostgreSQL writes a group of commands
//! (with their `queued` events) in one `UNNEST` statement, applies a dispatch's sends and a webhook group's
//! delivery reports set-based, and claims with `FOR UPDATE SKIP LOCKED` so several instances dispatch side
//! by side; SQLite has one writer and runs them one by one.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use sqlx::Row;

use super::{for_each_backend, missing_device, stored, stored_device, PgStore, SqliteStore};
use crate::error::{Error, Result};
use crate::ids::{DeviceRef, ProductId};
use crate::model::commands::*;
use crate::model::event_bus::BusEvent;
use crate::model::store::OutboxRecord;
use crate::ports::commands::*;

/// The command columns, each prefixed with `$prefix` (a table alias and a dot, or nothing); `nulls`: a
/// `NULL` for each.
macro_rules! command_columns {
    ($($how:tt)*) => {
        each_column!($($how)*; product_id, device_id, request_id, mode, name, payload_format, payload, qos,
            idempotency_key, state, created_at, expires_at, sent_at, delivered_at, replied_at, expired_at, failed_at,
            failure, attempts, max_attempts, retry_interval_ms, next_attempt_at, reply, reply_message_id, tag)
    };
}
macro_rules! each_column {
    ($prefix:literal; $first:ident $(, $rest:ident)*) => {
        concat!($prefix, stringify!($first) $(, ", ", $prefix, stringify!($rest))*)
    };
    (nulls; $first:ident $(, $rest:ident)*) => {
        concat!(null!($first) $(, ", ", null!($rest))*)
    };
}
macro_rules! null {
    ($column:ident) => {
        "NULL"
    };
}
/// The primary key is `$1..$3`.
macro_rules! pk {
    () => {
        "product_id = $1 AND device_id = $2 AND request_id = $3"
    };
}
macro_rules! open {
    () => {
        "state IN ('queued', 'sent', 'delivered')"
    };
}
/// Due: its time came (retry, postponed publish, a dead dispatcher's lease), or it is queued for a device
/// that is online now (its connect's own claim failed or came before the command was committed).
macro_rules! due {
    () => {
        "((c.next_attempt_at <= $1 AND c.state IN ('queued', 'sent', 'delivered'))
          OR (c.state = 'queued' AND c.next_attempt_at IS NULL))"
    };
}

const INSERT: &str = concat!(
    "INSERT INTO device_commands (product_id, device_id, request_id, mode, name, payload_format, payload,
         qos, idempotency_key, state, created_at, expires_at, max_attempts, retry_interval_ms, next_attempt_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued', $10, $11, $12, $13, $14)
     ON CONFLICT DO NOTHING RETURNING ",
    command_columns!("")
);
/// One command, written only if its device exists, is active and (`$15`) online if required; the lease
/// (`$14`) only applies if the device is online. SQLite's batch insert runs it per command.
const INSERT_CHECKED: &str = concat!(
    "INSERT INTO device_commands (product_id, device_id, request_id, mode, name, payload_format, payload,
         qos, idempotency_key, state, created_at, expires_at, max_attempts, retry_interval_ms, next_attempt_at)
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued', $10, $11, $12, $13,
            CASE WHEN d.online THEN $14 ELSE NULL END
     FROM devices d WHERE d.product_id = $1 AND d.device_id = $2 AND d.status = 'active'
       AND (d.online OR NOT $15)
     ON CONFLICT DO NOTHING RETURNING ",
    command_columns!("")
);
const DEVICE_STATE: &str = "SELECT status, online FROM devices WHERE product_id = $1 AND device_id = $2";
const BY_KEY: &str = concat!(
    "SELECT ",
    command_columns!(""),
    " FROM device_commands WHERE product_id = $1 AND device_id = $2 AND idempotency_key = $3"
);
const GET: &str = concat!("SELECT ", command_columns!(""), " FROM device_commands WHERE ", pk!());
/// Optional filters are `NULL`-guarded so one statement (and one cached plan) serves every query.
const LIST: &str = concat!(
    "SELECT ",
    command_columns!(""),
    " FROM device_commands WHERE product_id = $1 AND device_id = $2
       AND (CAST($3 AS TEXT) IS NULL OR state = $3)
       AND (CAST($4 AS BIGINT) IS NULL OR created_at > $4 OR (created_at = $4 AND request_id > $5))
     ORDER BY created_at, request_id LIMIT $6"
);
/// Fenced by the claim: only the dispatcher whose lease is still on the row records the send. A fast
/// device's reply may be committed first (replies keep the lease value): the send is still recorded, the
/// state stays `replied`, and no retry is scheduled.
const SENT: &str = concat!(
    "UPDATE device_commands SET
         state = CASE WHEN state <> 'queued' THEN state
                      WHEN delivered_at IS NOT NULL THEN 'delivered' ELSE 'sent' END,
         sent_at = $4, attempts = attempts + 1,
         next_attempt_at = CASE WHEN ",
    open!(),
    " THEN $5 ELSE NULL END
     WHERE ",
    pk!(),
    " AND next_attempt_at = $6 RETURNING ",
    command_columns!("")
);
const POSTPONED: &str = concat!(
    "UPDATE device_commands SET next_attempt_at = $4 WHERE ",
    pk!(),
    " AND ",
    open!(),
    " AND next_attempt_at = $5 RETURNING ",
    command_columns!("")
);
/// A delivery report may overtake the `sent` bookkeeping (fast devices), or the reply (webhooks race): the
/// timestamp is kept, the state only moves forward (a queued command becomes `delivered` when its `sent`
/// is recorded, so consumers see both steps in order).
const DELIVERED: &str = concat!(
    "UPDATE device_commands SET state = CASE WHEN state = 'sent' THEN 'delivered' ELSE state END,
         delivered_at = $4
     WHERE ",
    pk!(),
    " AND delivered_at IS NULL RETURNING ",
    command_columns!("")
);
/// A reply after expiry is still the truth about what the device did: it is recorded. The lease value
/// stays (claims skip replied rows) so the dispatcher that sent it can still record the send.
const REPLIED: &str = concat!(
    "UPDATE device_commands SET state = 'replied', replied_at = $4, reply = $5, reply_message_id = $6
     WHERE ",
    pk!(),
    " AND mode = $7 AND replied_at IS NULL AND state <> 'failed' RETURNING ",
    command_columns!("")
);
const EXPIRED: &str = concat!(
    "UPDATE device_commands SET state = 'expired', expired_at = $4, next_attempt_at = NULL
     WHERE ",
    pk!(),
    " AND ",
    open!(),
    " AND expires_at IS NOT NULL AND expires_at <= $4 RETURNING ",
    command_columns!("")
);
const FAILED: &str = concat!(
    "UPDATE device_commands SET state = 'failed', failed_at = $4, failure = $5, next_attempt_at = NULL
     WHERE ",
    pk!(),
    " AND ",
    open!(),
    " RETURNING ",
    command_columns!("")
);
const EXPIRED_LIST: &str = concat!(
    "SELECT product_id, device_id, request_id FROM device_commands
     WHERE expires_at IS NOT NULL AND expires_at <= $1 AND ",
    open!(),
    " ORDER BY expires_at LIMIT $2"
);
const INSERT_TAG: &str = concat!(
    "INSERT INTO device_commands (product_id, device_id, request_id, mode, name, payload_format, payload,
         qos, state, created_at, expires_at, max_attempts, next_attempt_at, tag)
     SELECT t.product_id, t.device_id, $2, 'cmd', $3, $4, $5, $6, 'queued', $7, $8, 1,
            CASE WHEN d.online THEN $9 ELSE NULL END, t.tag
     FROM device_tags t JOIN devices d ON d.product_id = t.product_id AND d.device_id = t.device_id
     WHERE t.product_id = $1 AND t.tag = $10 AND d.status = 'active'
     RETURNING ",
    command_columns!("")
);
const TAG_COMMAND: &str = concat!(
    "SELECT ",
    command_columns!(""),
    " FROM device_commands WHERE product_id = $1 AND request_id = $2 AND tag IS NOT NULL ORDER BY device_id"
);
const INSERT_ROLLOUT: &str = "INSERT INTO ota_rollouts (id, product_id, tag, type, version, url, size, md5, created_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
const INSERT_TARGET: &str = "INSERT INTO ota_targets (rollout_id, product_id, device_id, state, created_at)
     VALUES ($1, $2, $3, 'pending', $4)";

/// Why a device refuses a command, from its `(status, online)` (`None`: no such device); `None` if it takes it.
fn refusal(device: Option<(&str, bool)>, require_online: bool) -> Option<Refusal> {
    match device {
        None => Some(Refusal::UnknownDevice),
        Some((status, _)) if status != "active" => Some(Refusal::Suspended),
        Some((_, false)) if require_online => Some(Refusal::Offline),
        Some(_) => None,
    }
}

/// A command whose key was taken, though its device accepts it: the command holding the key.
fn existing_or_conflict(c: &NewCommand, existing: Option<CommandRecord>) -> Result<Inserted> {
    match (existing, &c.idempotency_key) {
        (Some(record), _) => Ok(Inserted::Existing(record)),
        (None, Some(key)) => {
            Err(Error::Conflict(format!("the command holding Idempotency-Key `{key}` was deleted meanwhile; retry")))
        }
        // Without a key the only possible conflict is the request id, which iothub generates.
        (None, None) => Err(Error::Conflict(format!("request id `{}` already exists", c.request_id))),
    }
}

/// Rows are locked in one global order (primary key), so concurrent transactions never deadlock.
fn in_lock_order(changes: &[CommandChange]) -> Vec<&CommandChange> {
    let mut ordered: Vec<&CommandChange> = changes.iter().collect();
    ordered.sort_by(|a, b| key_of(a).cmp(&key_of(b)));
    ordered
}

fn key_of(c: &CommandChange) -> (&str, &str, &str) {
    (c.device.product.as_str(), c.device.device.as_str(), c.request_id.as_str())
}

/// A group of commands to log, with the `queued` event each gets and when they are logged.
#[derive(Clone, Copy)]
struct Batch<'a> {
    commands: &'a [NewCommand],
    queued_event: QueuedEvent<'a>,
    now: i64,
}

/// What set-based statements already did, by position in lock order: `Some(None)` for a change that was
/// handled there (or skipped) without effect.
type AppliedEarly = HashMap<usize, Option<CommandRecord>>;

for_each_backend! {
    type DbRow = <Db as sqlx::Database>::Row;
    type Tx<'c> = sqlx::Transaction<'c, Db>;
    type Query<'q> = sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments<'q>>;

    pub(super) fn command_row(r: &DbRow) -> Result<CommandRecord> {
        let qos: i16 = r.try_get("qos")?;
        Ok(CommandRecord {
            device: stored_device(r.try_get("product_id")?, r.try_get("device_id")?)?,
            request_id: r.try_get("request_id")?,
            mode: stored("command mode", r.try_get("mode")?, CommandKind::parse)?,
            name: r.try_get("name")?,
            format: stored("payload format", r.try_get("payload_format")?, PayloadFormat::parse)?,
            payload: r.try_get("payload")?,
            qos: qos as u8,
            idempotency_key: r.try_get("idempotency_key")?,
            state: stored("command state", r.try_get("state")?, CommandState::parse)?,
            created_at: r.try_get("created_at")?,
            expires_at: r.try_get("expires_at")?,
            sent_at: r.try_get("sent_at")?,
            delivered_at: r.try_get("delivered_at")?,
            replied_at: r.try_get("replied_at")?,
            expired_at: r.try_get("expired_at")?,
            failed_at: r.try_get("failed_at")?,
            failure: r.try_get("failure")?,
            attempts: r.try_get("attempts")?,
            max_attempts: r.try_get("max_attempts")?,
            retry_interval_ms: r.try_get("retry_interval_ms")?,
            next_attempt_at: r.try_get("next_attempt_at")?,
            reply: r.try_get("reply")?,
            reply_message_id: r.try_get("reply_message_id")?,
            tag: r.try_get("tag")?,
        })
    }

    /// What the device gets, as every insert takes it: name, payload format, payload, QoS.
    fn bind_body<'q>(q: Query<'q>, name: &'q str, format: PayloadFormat, payload: &'q [u8], qos: u8) -> Query<'q> {
        q.bind(name).bind(format.as_str()).bind(payload).bind(qos as i16)
    }

    /// `statement` ([`INSERT`] or [`INSERT_CHECKED`]) with one command's first fourteen parameters.
    pub(super) fn insert_query<'q>(statement: &'q str, c: &'q NewCommand, now: i64) -> Query<'q> {
        let key = sqlx::query(statement)
            .bind(c.device.product.as_str())
            .bind(c.device.device.as_str())
            .bind(c.request_id.as_str())
            .bind(c.mode.as_str());
        bind_body(key, &c.name, c.format, &c.payload, c.qos)
            .bind(c.idempotency_key.as_deref())
            .bind(now)
            .bind(c.expires_at)
            .bind(c.retry.map_or(1, |r| r.max_attempts))
            .bind(c.retry.map(|r| r.interval_ms))
            .bind(c.leased_until)
    }

    /// The statement (with its bound parameters) that applies one change.
    fn transition_query(c: &CommandChange) -> Query<'_> {
        let q = |text: &'static str| {
            sqlx::query(text).bind(c.device.product.as_str()).bind(c.device.device.as_str()).bind(c.request_id.as_str())
        };
        match &c.transition {
            Transition::Sent { at, next_attempt_at, lease } => q(SENT).bind(*at).bind(*next_attempt_at).bind(*lease),
            Transition::Postponed { next_attempt_at, lease } => q(POSTPONED).bind(*next_attempt_at).bind(*lease),
            Transition::Delivered { at } => q(DELIVERED).bind(*at),
            Transition::Replied { at, mode, payload, message_id } => {
                q(REPLIED).bind(*at).bind(payload.as_slice()).bind(message_id.as_str()).bind(mode.as_str())
            }
            Transition::Expired { at } => q(EXPIRED).bind(*at),
            Transition::Failed { at, reason } => q(FAILED).bind(*at).bind(reason.as_str()),
        }
    }

    /// Applies, in lock order, each change the set-based statements did not, and collects the effective
    /// changes with their events.
    async fn apply_in_order(
        tx: &mut Tx<'_>,
        ordered: &[&CommandChange],
        mut early: AppliedEarly,
        events_for: EventsFor<'_>,
    ) -> Result<(ChangeOutcome, Vec<BusEvent>)> {
        let mut out = ChangeOutcome::default();
        let mut events = Vec::new();
        for (i, change) in ordered.iter().enumerate() {
            let record = match early.remove(&i) {
                Some(record) => record,
                None => transition_query(change).fetch_optional(&mut **tx).await?.as_ref().map(command_row).transpose()?,
            };
            if let Some(record) = record {
                events.extend(events_for(&record, &change.transition));
                out.changed.push((record, change.transition.clone()));
            }
        }
        Ok((out, events))
    }

    #[async_trait]
    impl CommandStore for Store {
        #[tracing::instrument(skip_all, fields(commands = commands.len()), name = "sql.insert_commands")]
        async fn insert_commands(
            &self,
            commands: &[NewCommand],
            queued_event: QueuedEvent<'_>,
            now: i64,
        ) -> Result<Vec<Result<Inserted>>> {
            if commands.is_empty() {
                return Ok(Vec::new());
            }
            self.insert_batch(Batch { commands, queued_event, now }).await
        }

        #[tracing::instrument(skip(self), name = "sql.get_command")]
        async fn get_command(&self, device: &DeviceRef, request_id: &str) -> Result<Option<CommandRecord>> {
            let row = sqlx::query(GET)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .bind(request_id)
                .fetch_optional(self.read())
                .await?;
            row.as_ref().map(command_row).transpose()
        }

        #[tracing::instrument(skip(self), name = "sql.list_commands")]
        async fn list_commands(&self, device: &DeviceRef, filter: &CommandFilter) -> Result<Vec<CommandRecord>> {
            let (after_at, after_id) = filter.after.clone().unzip();
            let rows = sqlx::query(LIST)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .bind(filter.state.map(CommandState::as_str))
                .bind(after_at)
                .bind(after_id)
                .bind(filter.limit as i64)
                .fetch_all(self.read())
                .await?;
            rows.iter().map(command_row).collect()
        }

        #[tracing::instrument(skip(self), name = "sql.claim_commands")]
        async fn claim_commands(
            &self,
            scope: &ClaimScope,
            now: i64,
            lease_ms: i64,
            limit: u32,
        ) -> Result<Vec<CommandRecord>> {
            let mut claimed = self.claim(scope, now, lease_ms, limit).await?;
            claimed.sort_by(|a, b| (a.created_at, &a.request_id).cmp(&(b.created_at, &b.request_id)));
            Ok(claimed)
        }

        #[tracing::instrument(skip(self), name = "sql.expired_commands")]
        async fn expired_commands(&self, now: i64, limit: u32) -> Result<Vec<(DeviceRef, String)>> {
            let rows = sqlx::query(EXPIRED_LIST).bind(now).bind(limit as i64).fetch_all(self.read()).await?;
            rows.iter()
                .map(|r| Ok((stored_device(r.try_get("product_id")?, r.try_get("device_id")?)?, r.try_get("request_id")?)))
                .collect()
        }

        #[tracing::instrument(skip_all, fields(product = %command.product, tag = %command.tag), name = "sql.insert_tag_command")]
        async fn insert_tag_command(
            &self,
            command: &NewTagCommand,
            queued_event: QueuedEvent<'_>,
            now: i64,
        ) -> Result<Vec<CommandRecord>> {
            let c = command;
            let mut tx = self.write().begin().await?;
            let key = sqlx::query(INSERT_TAG).bind(c.product.as_str()).bind(c.request_id.as_str());
            let rows = bind_body(key, &c.name, c.format, &c.payload, c.qos)
                .bind(now)
                .bind(c.expires_at)
                .bind(c.leased_until)
                .bind(c.tag.as_str())
                .fetch_all(&mut *tx)
                .await?;
            let records = rows.iter().map(command_row).collect::<Result<Vec<_>>>()?;
            self.commit_with_events(tx, records.iter().map(queued_event).collect()).await?;
            Ok(records)
        }

        #[tracing::instrument(skip_all, fields(rollout = %rollout.id, targets = commands.len()), name = "sql.create_rollout")]
        async fn create_rollout(
            &self,
            rollout: &crate::model::ota::NewRollout,
            commands: &[NewCommand],
            queued_event: QueuedEvent<'_>,
            now: i64,
        ) -> Result<Vec<CommandRecord>> {
            let r = rollout;
            let mut tx = self.write().begin().await?;
            sqlx::query(INSERT_ROLLOUT)
                .bind(r.id.as_str())
                .bind(r.product.as_str())
                .bind(r.tag.as_deref())
                .bind(r.kind.as_str())
                .bind(r.version.as_str())
                .bind(r.url.as_str())
                .bind(r.size)
                .bind(r.md5.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            let mut records = Vec::with_capacity(commands.len());
            for command in commands {
                sqlx::query(INSERT_TARGET)
                    .bind(r.id.as_str())
                    .bind(command.device.product.as_str())
                    .bind(command.device.device.as_str())
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| missing_device(e, &command.device))?;
                let row = insert_query(INSERT, command, now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| missing_device(e, &command.device))?;
                records.push(command_row(&row)?);
            }
            self.commit_with_events(tx, records.iter().map(queued_event).collect()).await?;
            Ok(records)
        }

        #[tracing::instrument(skip(self), name = "sql.tag_command")]
        async fn tag_command(&self, product: &ProductId, request_id: &str) -> Result<Vec<CommandRecord>> {
            let rows = sqlx::query(TAG_COMMAND).bind(product.as_str()).bind(request_id).fetch_all(self.read()).await?;
            rows.iter().map(command_row).collect()
        }

        #[tracing::instrument(skip_all, fields(changes = changes.len()), name = "sql.change_commands")]
        async fn change_commands(
            &self,
            changes: &[CommandChange],
            events_for: EventsFor<'_>,
            durability: Durability,
        ) -> Result<ChangeOutcome> {
            if changes.is_empty() {
                return Ok(ChangeOutcome::default());
            }
            let ordered = in_lock_order(changes);
            let mut tx = self.begin_with(durability).await?;
            let early = self.apply_set_based(&mut tx, &ordered).await?;
            let (out, events) = apply_in_order(&mut tx, &ordered, early, events_for).await?;
            self.commit_with_events(tx, events).await?;
            Ok(out)
        }
    }
}

/// A claim: lease up to `$3` commands ready to go out for `$2` ms from `$1`, oldest first, their device
/// online and unexpired; `$which` picks the rows.
macro_rules! pg_claim {
    ($which:expr) => {
        concat!(
            "UPDATE device_commands u SET next_attempt_at = $1 + $2
             FROM (SELECT c.product_id, c.device_id, c.request_id FROM device_commands c
                   JOIN devices d ON d.product_id = c.product_id AND d.device_id = c.device_id AND d.online
                   WHERE ",
            $which,
            " AND (c.expires_at IS NULL OR c.expires_at > $1)
                   ORDER BY c.created_at LIMIT $3 FOR UPDATE OF c SKIP LOCKED) picked
             WHERE u.product_id = picked.product_id AND u.device_id = picked.device_id
               AND u.request_id = picked.request_id
             RETURNING ",
            command_columns!("u.")
        )
    };
}

/// [`SENT`] for many commands: `$1..$3` key, `$4` at, `$5` next attempt, `$6` lease, as arrays.
const PG_SENT_MANY: &str = concat!(
    "UPDATE device_commands c SET
         state = CASE WHEN c.state <> 'queued' THEN c.state
                      WHEN c.delivered_at IS NOT NULL THEN 'delivered' ELSE 'sent' END,
         sent_at = i.at, attempts = c.attempts + 1,
         next_attempt_at = CASE WHEN c.state IN ('queued', 'sent', 'delivered') THEN i.next_attempt_at END
     FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::INT8[], $5::INT8[], $6::INT8[])
         AS i(product_id, device_id, request_id, at, next_attempt_at, lease)
     WHERE c.product_id = i.product_id AND c.device_id = i.device_id AND c.request_id = i.request_id
       AND c.next_attempt_at = i.lease
     RETURNING ",
    command_columns!("c.")
);

/// [`DELIVERED`] for many commands (`$5`, `$6` unused).
const PG_DELIVERED_MANY: &str = concat!(
    "UPDATE device_commands c SET state = CASE WHEN c.state = 'sent' THEN 'delivered' ELSE c.state END,
         delivered_at = i.at
     FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::INT8[], $5::INT8[], $6::INT8[])
         AS i(product_id, device_id, request_id, at, next_attempt_at, lease)
     WHERE c.product_id = i.product_id AND c.device_id = i.device_id AND c.request_id = i.request_id
       AND c.delivered_at IS NULL
     RETURNING ",
    command_columns!("c.")
);

/// [`INSERT_CHECKED`] for a whole batch, with the `queued` events of the rows it wrote, in one statement
/// (so one round trip, committed on its own): the commands arrive as arrays (`$1..$14`), their prepared
/// events as `$16..$20` (request id, kind, routing key, event id, body), `$21` the outbox lease. Rows are
/// written in (device, idempotency key, arrival) order so concurrent batches lock rows, and wait on each
/// other's keys, in one order. Each written row comes back with its outbox id; each command its device
/// refused comes back as `refused_ord` (1-based) with the device's `status` and `online` as this statement
/// saw them, so the reason is decided from the same snapshot as the refusal (a later look could find the
/// device changed and no reason at all) — unless its key already names a command: a retry gets that
/// command back whatever the device's state now, as on SQLite. A command in neither set hit an existing
/// key. The key check runs only for refused commands (usually none) and, fenced by `OFFSET 0`, only as a
/// probe of the key index per command: as a plain `NOT EXISTS` it became a hash anti-join, and a plan
/// cached while the table was young read all of `device_commands` for every group (3.4 ms per group at
/// 30,000 commands, growing with the table).
const PG_INSERT_MANY: &str = concat!(
    "WITH i AS MATERIALIZED (
         SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[],
                     $7::BYTEA[], $8::INT2[], $9::TEXT[], $10::INT8[], $11::INT4[], $12::INT8[], $13::INT8[],
                     $14::BOOL[])
                 WITH ORDINALITY AS i(product_id, device_id, request_id, mode, name, payload_format, payload,
                     qos, idempotency_key, expires_at, max_attempts, retry_interval_ms, leased_until,
                     require_online, ord)
     ), ins AS (
         INSERT INTO device_commands (product_id, device_id, request_id, mode, name, payload_format, payload,
             qos, idempotency_key, state, created_at, expires_at, max_attempts, retry_interval_ms,
             next_attempt_at)
         SELECT i.product_id, i.device_id, i.request_id, i.mode, i.name, i.payload_format, i.payload, i.qos,
                i.idempotency_key, 'queued', $15, i.expires_at, i.max_attempts, i.retry_interval_ms,
                CASE WHEN d.online THEN i.leased_until ELSE NULL END
         FROM i JOIN devices d ON d.product_id = i.product_id AND d.device_id = i.device_id
         WHERE d.status = 'active' AND (d.online OR NOT i.require_online)
         ORDER BY i.product_id, i.device_id, i.idempotency_key NULLS LAST, i.ord
         ON CONFLICT DO NOTHING RETURNING ",
    command_columns!(""),
    "
     ), events AS (
         SELECT * FROM UNNEST($16::TEXT[], $17::TEXT[], $18::TEXT[], $19::TEXT[], $20::BYTEA[])
             AS e(request_id, kind, routing_key, event_id, body)
     ), outbox AS (
         INSERT INTO event_outbox (kind, routing_key, event_id, body, created_at, leased_until)
         SELECT e.kind, e.routing_key, e.event_id, e.body, $15, $21
         FROM events e JOIN ins ON ins.request_id = e.request_id
         RETURNING id, event_id
     )
     SELECT ",
    command_columns!("ins."),
    ", outbox.id AS outbox_id, NULL::INT8 AS refused_ord, NULL::TEXT AS refused_status,
            NULL::BOOL AS refused_online
     FROM ins JOIN events e ON e.request_id = ins.request_id JOIN outbox ON outbox.event_id = e.event_id
     UNION ALL
     SELECT ",
    command_columns!(nulls),
    ", NULL, r.ord, r.status, r.online
     FROM (SELECT i.ord, i.product_id, i.device_id, i.idempotency_key, d.status, d.online
           FROM i LEFT JOIN devices d ON d.product_id = i.product_id AND d.device_id = i.device_id
           WHERE (d.status IS DISTINCT FROM 'active' OR (i.require_online AND NOT d.online))
           OFFSET 0) r
     LEFT JOIN LATERAL (SELECT 1 AS hit FROM device_commands c
                        WHERE c.product_id = r.product_id AND c.device_id = r.device_id
                          AND c.idempotency_key = r.idempotency_key
                        OFFSET 0) k ON TRUE
     WHERE k.hit IS NULL"
);

/// Which of the (lock-ordered) changes go to the set-based statements: a `Sent` or `Delivered` that is the
/// first change of its command in the batch. Any later change of the same command (a reply) runs on its own
/// afterwards and sees its effect, as it would in order — except a second `Delivered` (a redelivery's report, or an
/// `acked` an operator forwards), which can never apply after the first (`delivered_at` is set) and is skipped.
fn set_based(ordered: &[&CommandChange]) -> (Vec<usize>, Vec<usize>, HashSet<usize>) {
    let (mut sent, mut delivered) = (Vec::new(), Vec::new());
    let mut skipped = HashSet::new();
    let mut seen = HashSet::new();
    let mut reported = HashSet::new();
    for (i, c) in ordered.iter().enumerate() {
        let key = key_of(c);
        let first = seen.insert(key);
        if let Transition::Delivered { .. } = c.transition {
            if !reported.insert(key) {
                skipped.insert(i);
                continue;
            }
        }
        if !first {
            continue;
        }
        match c.transition {
            Transition::Sent { .. } => sent.push(i),
            Transition::Delivered { .. } => delivered.push(i),
            _ => {}
        }
    }
    // One command alone gains nothing from the extra locking statement.
    if sent.len() + delivered.len() < 2 {
        return (Vec::new(), Vec::new(), skipped);
    }
    (sent, delivered, skipped)
}

impl PgStore {
    /// A device deleted between the batch statement's read of it and its foreign-key check fails the whole
    /// statement; the second attempt no longer sees that device.
    async fn insert_batch(&self, batch: Batch<'_>) -> Result<Vec<Result<Inserted>>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.insert_batch_once(batch).await {
                Err(Error::Internal(e))
                    if attempt == 1
                        && e.downcast_ref::<sqlx::Error>()
                            .and_then(|e| e.as_database_error())
                            .is_some_and(|d| d.is_foreign_key_violation()) =>
                {
                    continue
                }
                other => return other,
            }
        }
    }

    async fn insert_batch_once(&self, batch: Batch<'_>) -> Result<Vec<Result<Inserted>>> {
        let Batch { commands, queued_event, now } = batch;
        let all_rpc = commands.iter().all(|c| c.mode == CommandKind::Rpc);
        let pool = self.pool_for(if all_rpc { Durability::Relaxed } else { Durability::Required });
        let events: Vec<BusEvent> = commands.iter().map(|c| queued_event(&c.queued_record(now))).collect();
        let column = |f: &dyn Fn(&NewCommand) -> &str| commands.iter().map(f).collect::<Vec<&str>>();
        let rows = sqlx::query(PG_INSERT_MANY)
            .bind(column(&|c| c.device.product.as_str()))
            .bind(column(&|c| c.device.device.as_str()))
            .bind(column(&|c| c.request_id.as_str()))
            .bind(column(&|c| c.mode.as_str()))
            .bind(column(&|c| c.name.as_str()))
            .bind(column(&|c| c.format.as_str()))
            .bind(commands.iter().map(|c| c.payload.as_slice()).collect::<Vec<_>>())
            .bind(commands.iter().map(|c| c.qos as i16).collect::<Vec<_>>())
            .bind(commands.iter().map(|c| c.idempotency_key.as_deref()).collect::<Vec<_>>())
            .bind(commands.iter().map(|c| c.expires_at).collect::<Vec<_>>())
            .bind(commands.iter().map(|c| c.retry.map_or(1, |r| r.max_attempts)).collect::<Vec<_>>())
            .bind(commands.iter().map(|c| c.retry.map(|r| r.interval_ms)).collect::<Vec<_>>())
            .bind(commands.iter().map(|c| c.leased_until).collect::<Vec<_>>())
            .bind(commands.iter().map(|c| c.require_online).collect::<Vec<_>>())
            .bind(now)
            .bind(column(&|c| c.request_id.as_str()))
            .bind(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.routing_key.as_str()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.body.as_slice()).collect::<Vec<_>>())
            .bind(self.outbox_leased_until(now))
            .fetch_all(pool)
            .await?;
        // From here on the batch is committed: nothing may fail it as a whole (its callers would retry
        // commands that are written and leased).
        let (mut out, outbox, taken) = Self::sort_inserted(commands, events, &rows)?;
        self.outbox.committed(outbox);
        // The statement committed: a key's existing command (even one this batch wrote) is visible.
        for index in taken {
            let command = &commands[index];
            out[index] = match &command.idempotency_key {
                Some(key) => sqlx::query(BY_KEY)
                    .bind(command.device.product.as_str())
                    .bind(command.device.device.as_str())
                    .bind(key)
                    .fetch_optional(self.read())
                    .await
                    .map_err(Error::from)
                    .and_then(|row| row.as_ref().map(on_postgres::command_row).transpose())
                    .and_then(|existing| existing_or_conflict(command, existing)),
                None => existing_or_conflict(command, None),
            };
        }
        Ok(out)
    }

    /// Each command's outcome from the batch statement's rows: created (with its outbox row), refused (with
    /// the reason), or neither — its key is taken (returned as the third list, to be looked up).
    #[allow(clippy::type_complexity)]
    fn sort_inserted(
        commands: &[NewCommand],
        events: Vec<BusEvent>,
        rows: &[sqlx::postgres::PgRow],
    ) -> Result<(Vec<Result<Inserted>>, Vec<OutboxRecord>, Vec<usize>)> {
        let mut created = HashMap::with_capacity(rows.len());
        let mut refused = HashMap::new();
        for row in rows {
            match row.try_get::<Option<i64>, _>("refused_ord")? {
                Some(ord) => {
                    let status: Option<String> = row.try_get("refused_status")?;
                    let online: Option<bool> = row.try_get("refused_online")?;
                    let index = usize::try_from(ord - 1).map_err(|_| anyhow::anyhow!("ordinal {ord}"))?;
                    let require_online = commands.get(index).is_some_and(|c| c.require_online);
                    // The statement returns exactly the rows it refused; `Offline` is the only reason left.
                    let why = refusal(status.as_deref().map(|s| (s, online.unwrap_or(false))), require_online)
                        .unwrap_or(Refusal::Offline);
                    refused.insert(index, why);
                }
                None => {
                    let record = on_postgres::command_row(row)?;
                    let outbox_id: i64 = row.try_get("outbox_id")?;
                    created.insert(record.request_id.clone(), (record, outbox_id));
                }
            }
        }
        let mut out = Vec::with_capacity(commands.len());
        let mut outbox = Vec::with_capacity(created.len());
        let mut taken = Vec::new();
        for (index, (command, event)) in commands.iter().zip(events).enumerate() {
            out.push(match (created.remove(&command.request_id), refused.remove(&index)) {
                (Some((record, id)), _) => {
                    outbox.push(OutboxRecord { id, event });
                    Ok(Inserted::Created(record))
                }
                (None, Some(why)) => Ok(Inserted::Refused(why)),
                (None, None) => {
                    taken.push(index);
                    Err(Error::Conflict(String::new()))
                }
            });
        }
        outbox.sort_by_key(|r| r.id);
        Ok((out, outbox, taken))
    }

    async fn claim(&self, scope: &ClaimScope, now: i64, lease_ms: i64, limit: u32) -> Result<Vec<CommandRecord>> {
        const DEVICES: &str = pg_claim!(
            "c.state = 'queued' AND (c.next_attempt_at IS NULL OR c.next_attempt_at <= $1)
             AND (c.product_id, c.device_id) IN (SELECT * FROM UNNEST($4::TEXT[], $5::TEXT[]))"
        );
        const DUE: &str = pg_claim!(due!());
        let rows = match scope {
            ClaimScope::Devices(list) => {
                sqlx::query(DEVICES)
                    .bind(now)
                    .bind(lease_ms)
                    .bind(limit as i64)
                    .bind(list.iter().map(|d| d.product.as_str()).collect::<Vec<_>>())
                    .bind(list.iter().map(|d| d.device.as_str()).collect::<Vec<_>>())
                    .fetch_all(self.write())
                    .await?
            }
            ClaimScope::Due => {
                sqlx::query(DUE).bind(now).bind(lease_ms).bind(limit as i64).fetch_all(self.write()).await?
            }
        };
        rows.iter().map(on_postgres::command_row).collect()
    }

    async fn begin_with(&self, durability: Durability) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self.pool_for(durability).begin().await?)
    }

    /// The common transitions (a dispatch's sends, a webhook group's delivery reports) with one statement per
    /// kind, after locking every row of the batch in key order (the lateral join visits them in the input's
    /// order), so concurrent transactions never deadlock whatever order the set-based statements take.
    /// Their join must look each command up by its key: right after start (or in a young table) the
    /// planner's statistics call the table tiny and it would scan it instead.
    async fn apply_set_based(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        ordered: &[&CommandChange],
    ) -> Result<AppliedEarly> {
        let (sent, delivered, skipped) = set_based(ordered);
        let mut early: AppliedEarly = skipped.into_iter().map(|i| (i, None)).collect();
        if sent.is_empty() && delivered.is_empty() {
            return Ok(early);
        }
        sqlx::query("SET LOCAL enable_seqscan = off").execute(&mut **tx).await?;
        let key = |f: fn(&CommandChange) -> &str| ordered.iter().map(|c| f(c)).collect::<Vec<&str>>();
        sqlx::query(
            "SELECT 1 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[]) AS i(p, d, r)
             CROSS JOIN LATERAL (SELECT 1 FROM device_commands c
                 WHERE c.product_id = i.p AND c.device_id = i.d AND c.request_id = i.r FOR UPDATE OF c) l",
        )
        .bind(key(|c| c.device.product.as_str()))
        .bind(key(|c| c.device.device.as_str()))
        .bind(key(|c| c.request_id.as_str()))
        .fetch_all(&mut **tx)
        .await?;
        for (statement, picked) in [(PG_SENT_MANY, &sent), (PG_DELIVERED_MANY, &delivered)] {
            if picked.is_empty() {
                continue;
            }
            let column = |f: fn(&CommandChange) -> &str| picked.iter().map(|&i| f(ordered[i])).collect::<Vec<_>>();
            let number = |f: fn(&Transition) -> Option<i64>| {
                picked.iter().map(|&i| f(&ordered[i].transition)).collect::<Vec<Option<i64>>>()
            };
            let rows = sqlx::query(statement)
                .bind(column(|c| c.device.product.as_str()))
                .bind(column(|c| c.device.device.as_str()))
                .bind(column(|c| c.request_id.as_str()))
                .bind(number(|t| match t {
                    Transition::Sent { at, .. } | Transition::Delivered { at } => Some(*at),
                    _ => None,
                }))
                .bind(number(|t| match t {
                    Transition::Sent { next_attempt_at, .. } => *next_attempt_at,
                    _ => None,
                }))
                .bind(number(|t| match t {
                    Transition::Sent { lease, .. } => Some(*lease),
                    _ => None,
                }))
                .fetch_all(&mut **tx)
                .await?;
            let position: HashMap<(&str, &str, &str), usize> =
                picked.iter().map(|&i| (key_of(ordered[i]), i)).collect();
            // A picked change without a row took no effect; it must not run again on its own.
            early.extend(picked.iter().map(|&i| (i, None)));
            for row in &rows {
                let record = on_postgres::command_row(row)?;
                let at = (record.device.product.as_str(), record.device.device.as_str(), record.request_id.as_str());
                if let Some(i) = position.get(&at).copied() {
                    early.insert(i, Some(record));
                }
            }
        }
        Ok(early)
    }
}

impl SqliteStore {
    /// One writer: each command is inserted with the device check, and a command not written is explained
    /// by a look at its key and device that nothing can change in between.
    async fn insert_batch(&self, batch: Batch<'_>) -> Result<Vec<Result<Inserted>>> {
        let Batch { commands, queued_event, now } = batch;
        let mut tx = self.write().begin().await?;
        let mut out = Vec::with_capacity(commands.len());
        let mut events = Vec::new();
        for c in commands {
            let inserted =
                on_sqlite::insert_query(INSERT_CHECKED, c, now).bind(c.require_online).fetch_optional(&mut *tx).await?;
            out.push(match inserted {
                Some(row) => {
                    let record = on_sqlite::command_row(&row)?;
                    events.push(queued_event(&record));
                    Ok(Inserted::Created(record))
                }
                None => Self::not_inserted(&mut tx, c).await?,
            });
        }
        self.commit_with_events(tx, events).await?;
        Ok(out)
    }

    /// Why a command was not written inside a batch (whose transaction sees its own rows).
    async fn not_inserted(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, c: &NewCommand) -> Result<Result<Inserted>> {
        if let Some(key) = &c.idempotency_key {
            let row = sqlx::query(BY_KEY)
                .bind(c.device.product.as_str())
                .bind(c.device.device.as_str())
                .bind(key)
                .fetch_optional(&mut **tx)
                .await?;
            if let Some(row) = row {
                return Ok(Ok(Inserted::Existing(on_sqlite::command_row(&row)?)));
            }
        }
        let device: Option<(String, bool)> = sqlx::query_as(DEVICE_STATE)
            .bind(c.device.product.as_str())
            .bind(c.device.device.as_str())
            .fetch_optional(&mut **tx)
            .await?;
        Ok(match refusal(device.as_ref().map(|(s, o)| (s.as_str(), *o)), c.require_online) {
            Some(why) => Ok(Inserted::Refused(why)),
            None => existing_or_conflict(c, None),
        })
    }

    async fn claim(&self, scope: &ClaimScope, now: i64, lease_ms: i64, limit: u32) -> Result<Vec<CommandRecord>> {
        /// [`pg_claim!`] on the single writer, by `rowid`.
        macro_rules! sqlite_claim {
            ($which:expr) => {
                concat!(
                    "UPDATE device_commands SET next_attempt_at = $1 + $2 WHERE rowid IN (
                         SELECT c.rowid FROM device_commands c
                         JOIN devices d ON d.product_id = c.product_id AND d.device_id = c.device_id AND d.online
                         WHERE ",
                    $which,
                    " AND (c.expires_at IS NULL OR c.expires_at > $1)
                         ORDER BY c.created_at LIMIT $3)
                     RETURNING ",
                    command_columns!("")
                )
            };
        }
        const DEVICE: &str = sqlite_claim!(
            "c.state = 'queued' AND (c.next_attempt_at IS NULL OR c.next_attempt_at <= $1)
             AND c.product_id = $4 AND c.device_id = $5"
        );
        const DUE: &str = sqlite_claim!(due!());
        let mut tx = self.write().begin().await?;
        let mut rows = Vec::new();
        match scope {
            ClaimScope::Devices(list) => {
                for device in list {
                    rows.extend(
                        sqlx::query(DEVICE)
                            .bind(now)
                            .bind(lease_ms)
                            .bind(limit as i64)
                            .bind(device.product.as_str())
                            .bind(device.device.as_str())
                            .fetch_all(&mut *tx)
                            .await?,
                    );
                }
            }
            ClaimScope::Due => {
                rows = sqlx::query(DUE).bind(now).bind(lease_ms).bind(limit as i64).fetch_all(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        rows.iter().map(on_sqlite::command_row).collect()
    }

    async fn begin_with(&self, _durability: Durability) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        // One durability: the single writer's.
        Ok(self.write().begin().await?)
    }

    /// No arrays and one writer: every change runs on its own (`apply_in_order`).
    async fn apply_set_based(
        &self,
        _tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        _ordered: &[&CommandChange],
    ) -> Result<AppliedEarly> {
        Ok(AppliedEarly::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::DeviceId;

    fn change(device: &str, transition: Transition) -> CommandChange {
        CommandChange {
            device: DeviceRef::new(ProductId::parse("p").unwrap(), DeviceId::parse(device).unwrap()),
            request_id: "r".into(),
            transition,
        }
    }

    #[test]
    fn only_first_changes_are_set_based_and_repeated_delivery_reports_are_skipped() {
        let replied = Transition::Replied { at: 3, mode: CommandKind::Cmd, payload: vec![], message_id: "m".into() };
        let changes = [
            change("a", Transition::Delivered { at: 1 }),
            change("a", Transition::Delivered { at: 2 }),
            change("a", replied.clone()),
            change("b", Transition::Sent { at: 1, next_attempt_at: None, lease: 9 }),
            change("c", replied),
            change("c", Transition::Delivered { at: 4 }),
        ];
        let ordered = in_lock_order(&changes);
        let (sent, delivered, skipped) = set_based(&ordered);
        assert_eq!(sent, [3]);
        assert_eq!(delivered, [0], "c's report follows its reply, so it runs on its own, in order");
        assert_eq!(skipped, [1].into_iter().collect());
        // A lone change goes the per-row way.
        let (sent, delivered, _) = set_based(&ordered[..1]);
        assert!(sent.is_empty() && delivered.is_empty());
    }
}

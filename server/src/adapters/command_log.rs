//! The command log in SQL: [`CommandStore`] for PostgreSQL and SQLite.
//!
//! Both stores run the same transition statements (written with `$n`; SQLite gets `?n`), each one an
//! `UPDATE ... WHERE <the transition is a step forward> RETURNING`, so a replayed or late report simply
//! matches no row and emits nothing. They differ only in how rows are claimed: PostgreSQL uses
//! `FOR UPDATE SKIP LOCKED` so several instances can dispatch side by side; SQLite has one writer.

use std::collections::HashMap;
use std::sync::LazyLock;

use async_trait::async_trait;
use sqlx::Row;

use super::postgres::{pair_outbox_ids, PgStore};
use super::sqlite::SqliteStore;
use crate::error::{Error, Result};
use crate::ids::{DeviceId, DeviceRef, ProductId};
use crate::model::commands::*;
use crate::model::event_bus::BusEvent;
use crate::model::store::OutboxRecord;
use crate::ports::commands::*;

const COLUMNS: &str = "product_id, device_id, request_id, mode, name, payload_format, payload, qos, idempotency_key, \
     state, created_at, expires_at, sent_at, delivered_at, replied_at, expired_at, failed_at, failure, attempts, \
     max_attempts, retry_interval_ms, next_attempt_at, reply, reply_message_id, tag";

/// Statements shared by both stores, with `$n` placeholders.
struct Sql {
    insert: String,
    /// One command, written only if its device exists, is active and (`$15`) online if required; the
    /// lease (`$14`) only applies if the device is online. SQLite's batch insert runs it per command.
    insert_checked: String,
    device_state: String,
    by_key: String,
    get: String,
    sent: String,
    postponed: String,
    delivered: String,
    replied: String,
    expired: String,
    failed: String,
    expired_list: String,
    insert_tag: String,
    tag_command: String,
    insert_rollout: String,
    insert_target: String,
}

const PK: &str = "product_id = $1 AND device_id = $2 AND request_id = $3";
const OPEN: &str = "state IN ('queued', 'sent', 'delivered')";

impl Sql {
    fn new(placeholder: char) -> Self {
        let q = |s: String| s.replace('$', &placeholder.to_string());
        Sql {
            insert: q(format!(
                "INSERT INTO device_commands (product_id, device_id, request_id, mode, name, payload_format, payload, \
                 qos, idempotency_key, state, created_at, expires_at, max_attempts, retry_interval_ms, next_attempt_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued', $10, $11, $12, $13, $14)
                 ON CONFLICT DO NOTHING RETURNING {COLUMNS}"
            )),
            insert_checked: q(format!(
                "INSERT INTO device_commands (product_id, device_id, request_id, mode, name, payload_format, payload, \
                 qos, idempotency_key, state, created_at, expires_at, max_attempts, retry_interval_ms, next_attempt_at)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued', $10, $11, $12, $13,
                        CASE WHEN d.online THEN $14 ELSE NULL END
                 FROM devices d WHERE d.product_id = $1 AND d.device_id = $2 AND d.status = 'active'
                   AND (d.online OR NOT $15)
                 ON CONFLICT DO NOTHING RETURNING {COLUMNS}"
            )),
            device_state: q("SELECT status, online FROM devices WHERE product_id = $1 AND device_id = $2".to_string()),
            by_key: q(format!(
                "SELECT {COLUMNS} FROM device_commands WHERE product_id = $1 AND device_id = $2 AND idempotency_key = $3"
            )),
            get: q(format!("SELECT {COLUMNS} FROM device_commands WHERE {PK}")),
            // Fenced by the claim: only the dispatcher whose lease is still on the row records the send. A fast
            // device's reply may be committed first (replies keep the lease value): the send is still
            // recorded, the state stays `replied`, and no retry is scheduled.
            sent: q(format!(
                "UPDATE device_commands SET
                     state = CASE WHEN state <> 'queued' THEN state
                                  WHEN delivered_at IS NOT NULL THEN 'delivered' ELSE 'sent' END,
                     sent_at = $4, attempts = attempts + 1,
                     next_attempt_at = CASE WHEN {OPEN} THEN $5 ELSE NULL END
                 WHERE {PK} AND next_attempt_at = $6 RETURNING {COLUMNS}"
            )),
            postponed: q(format!(
                "UPDATE device_commands SET next_attempt_at = $4 WHERE {PK} AND {OPEN} AND next_attempt_at = $5
                 RETURNING {COLUMNS}"
            )),
            // A delivery report may overtake the `sent` bookkeeping (fast devices), or the reply (webhooks
            // race): the timestamp is kept, the state only moves forward (a queued command becomes
            // `delivered` when its `sent` is recorded, so consumers see both steps in order).
            delivered: q(format!(
                "UPDATE device_commands SET state = CASE WHEN state = 'sent' THEN 'delivered' ELSE state END,
                     delivered_at = $4
                 WHERE {PK} AND delivered_at IS NULL RETURNING {COLUMNS}"
            )),
            // A reply after expiry is still the truth about what the device did: it is recorded. The lease
            // value stays (claims skip replied rows) so the dispatcher that sent it can still record the send.
            replied: q(format!(
                "UPDATE device_commands SET state = 'replied', replied_at = $4, reply = $5, reply_message_id = $6
                 WHERE {PK} AND mode = $7 AND replied_at IS NULL AND state <> 'failed' RETURNING {COLUMNS}"
            )),
            expired: q(format!(
                "UPDATE device_commands SET state = 'expired', expired_at = $4, next_attempt_at = NULL
                 WHERE {PK} AND {OPEN} AND expires_at IS NOT NULL AND expires_at <= $4 RETURNING {COLUMNS}"
            )),
            failed: q(format!(
                "UPDATE device_commands SET state = 'failed', failed_at = $4, failure = $5, next_attempt_at = NULL
                 WHERE {PK} AND {OPEN} RETURNING {COLUMNS}"
            )),
            insert_tag: q(format!(
                "INSERT INTO device_commands (product_id, device_id, request_id, mode, name, payload_format, payload,
                     qos, state, created_at, expires_at, max_attempts, next_attempt_at, tag)
                 SELECT t.product_id, t.device_id, $2, 'cmd', $3, $4, $5, $6, 'queued', $7, $8, 1,
                        CASE WHEN d.online THEN $9 ELSE NULL END, t.tag
                 FROM device_tags t JOIN devices d ON d.product_id = t.product_id AND d.device_id = t.device_id
                 WHERE t.product_id = $1 AND t.tag = $10 AND d.status = 'active'
                 RETURNING {COLUMNS}"
            )),
            insert_rollout: q("INSERT INTO ota_rollouts (id, product_id, tag, type, version, url, size, md5, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                .to_string()),
            insert_target: q("INSERT INTO ota_targets (rollout_id, product_id, device_id, state, created_at)
                 VALUES ($1, $2, $3, 'pending', $4)"
                .to_string()),
            tag_command: q(format!(
                "SELECT {COLUMNS} FROM device_commands WHERE product_id = $1 AND request_id = $2 AND tag IS NOT NULL
                 ORDER BY device_id"
            )),
            expired_list: q(format!(
                "SELECT product_id, device_id, request_id FROM device_commands
                 WHERE expires_at IS NOT NULL AND expires_at <= $1 AND {OPEN} ORDER BY expires_at LIMIT $2"
            )),
        }
    }
}

/// Due: its time came (retry, postponed publish, a dead dispatcher's lease), or it is queued for a device
/// that is online now (its connect's own claim failed or came before the command was committed).
const DUE_PG: &str = "((c.next_attempt_at <= $1 AND c.state IN ('queued', 'sent', 'delivered'))
     OR (c.state = 'queued' AND c.next_attempt_at IS NULL))";

static PG_SQL: LazyLock<Sql> = LazyLock::new(|| Sql::new('$'));

/// [`Sql::sent`] for many commands: `$1..$3` key, `$4` at, `$5` next attempt, `$6` lease, as arrays.
static PG_SENT_MANY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE device_commands c SET
             state = CASE WHEN c.state <> 'queued' THEN c.state
                          WHEN c.delivered_at IS NOT NULL THEN 'delivered' ELSE 'sent' END,
             sent_at = i.at, attempts = c.attempts + 1,
             next_attempt_at = CASE WHEN c.state IN ('queued', 'sent', 'delivered') THEN i.next_attempt_at END
         FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::INT8[], $5::INT8[], $6::INT8[])
             AS i(product_id, device_id, request_id, at, next_attempt_at, lease)
         WHERE c.product_id = i.product_id AND c.device_id = i.device_id AND c.request_id = i.request_id
           AND c.next_attempt_at = i.lease
         RETURNING {}",
        qualified("c")
    )
});

/// [`Sql::delivered`] for many commands (`$5`, `$6` unused).
static PG_DELIVERED_MANY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE device_commands c SET state = CASE WHEN c.state = 'sent' THEN 'delivered' ELSE c.state END,
             delivered_at = i.at
         FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::INT8[], $5::INT8[], $6::INT8[])
             AS i(product_id, device_id, request_id, at, next_attempt_at, lease)
         WHERE c.product_id = i.product_id AND c.device_id = i.device_id AND c.request_id = i.request_id
           AND c.delivered_at IS NULL
         RETURNING {}",
        qualified("c")
    )
});

fn qualified(table: &str) -> String {
    COLUMNS.split(", ").map(|c| format!("{table}.{c}")).collect::<Vec<_>>().join(", ")
}

/// Which of the (lock-ordered) changes go to the set-based statements: a `Sent` or `Delivered` that is the
/// first change of its command in the batch. Any later change of the same command (a reply) runs on its own
/// afterwards and sees its effect, as it would in order — except a second `Delivered` (a redelivery's report, or an
/// `acked` an operator forwards), which can never apply after the first (`delivered_at` is set) and is skipped.
fn set_based(ordered: &[&CommandChange]) -> (Vec<usize>, Vec<usize>, std::collections::HashSet<usize>) {
    let (mut sent, mut delivered) = (Vec::new(), Vec::new());
    let mut skipped = std::collections::HashSet::new();
    let mut seen = std::collections::HashSet::new();
    let mut reported = std::collections::HashSet::new();
    for (i, c) in ordered.iter().enumerate() {
        let key = (c.device.product.as_str(), c.device.device.as_str(), c.request_id.as_str());
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

/// [`Sql::insert_checked`] for a whole batch, with the `queued` events of the rows it wrote, in one
/// statement (so one round trip, committed on its own): the commands arrive as arrays (`$1..$14`), their
/// prepared events as `$16..$20` (request id, kind, routing key, event id, body). Rows are written in
/// (device, idempotency key, arrival) order so concurrent batches lock rows, and wait on each other's
/// keys, in one order. Each written row comes back with its outbox id; each command its device refused
/// comes back as `refused_ord` (1-based) with the device's `status` and `online` as this statement saw
/// them, so the reason is decided from the same snapshot as the refusal (a later look could find the
/// device changed and no reason at all) — unless its key already names a command: a retry gets that
/// command back whatever the device's state now, as on SQLite. A command in neither set hit an existing key.
/// The key check runs only for refused commands (usually none) and, fenced by `OFFSET 0`, only as a probe
/// of the key index per command: as a plain `NOT EXISTS` it became a hash anti-join, and a plan cached
/// while the table was young read all of `device_commands` for every group (3.4 ms per group at 30,000
/// commands, growing with the table).
static PG_INSERT_MANY: LazyLock<String> = LazyLock::new(|| {
    let nulls = COLUMNS.split(", ").map(|_| "NULL").collect::<Vec<_>>().join(", ");
    format!(
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
             ON CONFLICT DO NOTHING RETURNING {COLUMNS}
         ), events AS (
             SELECT * FROM UNNEST($16::TEXT[], $17::TEXT[], $18::TEXT[], $19::TEXT[], $20::BYTEA[])
                 AS e(request_id, kind, routing_key, event_id, body)
         ), outbox AS (
             INSERT INTO event_outbox (kind, routing_key, event_id, body, created_at, leased_until)
             SELECT e.kind, e.routing_key, e.event_id, e.body, $15, $21
             FROM events e JOIN ins ON ins.request_id = e.request_id
             RETURNING id, event_id
         )
         SELECT {}, outbox.id AS outbox_id, NULL::INT8 AS refused_ord, NULL::TEXT AS refused_status,
                NULL::BOOL AS refused_online
         FROM ins JOIN events e ON e.request_id = ins.request_id JOIN outbox ON outbox.event_id = e.event_id
         UNION ALL
         SELECT {nulls}, NULL, r.ord, r.status, r.online
         FROM (SELECT i.ord, i.product_id, i.device_id, i.idempotency_key, d.status, d.online
               FROM i LEFT JOIN devices d ON d.product_id = i.product_id AND d.device_id = i.device_id
               WHERE (d.status IS DISTINCT FROM 'active' OR (i.require_online AND NOT d.online))
               OFFSET 0) r
         LEFT JOIN LATERAL (SELECT 1 AS hit FROM device_commands c
                            WHERE c.product_id = r.product_id AND c.device_id = r.device_id
                              AND c.idempotency_key = r.idempotency_key
                            OFFSET 0) k ON TRUE
         WHERE k.hit IS NULL",
        qualified("ins")
    )
});

static SQLITE_SQL: LazyLock<Sql> = LazyLock::new(|| Sql::new('?'));

/// The statement (with its bound parameters) that applies one change.
macro_rules! transition_query {
    ($sql:expr, $change:expr) => {{
        let sql: &'static Sql = $sql;
        let c: &CommandChange = $change;
        let q = |text: &'static str| {
            sqlx::query(text).bind(c.device.product.as_str()).bind(c.device.device.as_str()).bind(c.request_id.as_str())
        };
        match &c.transition {
            Transition::Sent { at, next_attempt_at, lease } => {
                q(&sql.sent).bind(*at).bind(*next_attempt_at).bind(*lease)
            }
            Transition::Postponed { next_attempt_at, lease } => q(&sql.postponed).bind(*next_attempt_at).bind(*lease),
            Transition::Delivered { at } => q(&sql.delivered).bind(*at),
            Transition::Replied { at, mode, payload, message_id } => {
                q(&sql.replied).bind(*at).bind(payload.as_slice()).bind(message_id.as_str()).bind(mode.as_str())
            }
            Transition::Expired { at } => q(&sql.expired).bind(*at),
            Transition::Failed { at, reason } => q(&sql.failed).bind(*at).bind(reason.as_str()),
        }
    }};
}

macro_rules! command_row {
    ($r:expr) => {{
        let r = $r;
        let text = |col: &str| -> Result<String> { Ok(r.try_get::<String, _>(col)?) };
        let bad = |what: &str, v: &str| Error::Internal(anyhow::anyhow!("stored command {what} {v:?}"));
        let (mode, format, state) = (text("mode")?, text("payload_format")?, text("state")?);
        let qos: i16 = r.try_get("qos")?;
        Ok::<_, Error>(CommandRecord {
            device: DeviceRef {
                product: ProductId::parse(text("product_id")?).map_err(|e| anyhow::anyhow!("stored id: {e}"))?,
                device: DeviceId::parse(text("device_id")?).map_err(|e| anyhow::anyhow!("stored id: {e}"))?,
            },
            request_id: text("request_id")?,
            mode: CommandMode::parse(&mode).ok_or_else(|| bad("mode", &mode))?,
            name: text("name")?,
            format: PayloadFormat::parse(&format).ok_or_else(|| bad("payload format", &format))?,
            payload: r.try_get("payload")?,
            qos: qos as u8,
            idempotency_key: r.try_get("idempotency_key")?,
            state: CommandState::parse(&state).ok_or_else(|| bad("state", &state))?,
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
    }};
}

macro_rules! create_rollout_body {
    ($self:expr, $sql:expr, $begin:expr, $outbox:ident, $rollout:expr, $commands:expr, $queued_event:expr, $now:expr, $lease_ms:expr) => {{
        let r: &crate::model::ota::NewRollout = $rollout;
        let mut tx = $begin.begin().await?;
        sqlx::query(&$sql.insert_rollout)
            .bind(r.id.as_str())
            .bind(r.product.as_str())
            .bind(r.tag.as_deref())
            .bind(r.kind.as_str())
            .bind(r.version.as_str())
            .bind(r.url.as_str())
            .bind(r.size)
            .bind(r.md5.as_str())
            .bind($now)
            .execute(&mut *tx)
            .await?;
        let mut records = Vec::with_capacity($commands.len());
        for command in $commands {
            sqlx::query(&$sql.insert_target)
                .bind(r.id.as_str())
                .bind(command.device.product.as_str())
                .bind(command.device.device.as_str())
                .bind($now)
                .execute(&mut *tx)
                .await
                .map_err(|e| device_gone(e, &command.device))?;
            let row = insert_query!(&$sql.insert, command, $now)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| device_gone(e, &command.device))?;
            records.push(command_row!(&row)?);
        }
        let events = records.iter().map($queued_event).collect();
        let outbox = $outbox(&mut tx, events, $now, $lease_ms).await?;
        tx.commit().await?;
        Ok((records, outbox))
    }};
}

macro_rules! insert_tag_query {
    ($sql:expr, $c:expr, $now:expr) => {{
        let c: &NewTagCommand = $c;
        sqlx::query(&$sql.insert_tag)
            .bind(c.product.as_str())
            .bind(c.request_id.as_str())
            .bind(c.name.as_str())
            .bind(c.format.as_str())
            .bind(c.payload.as_slice())
            .bind(c.qos as i16)
            .bind($now)
            .bind(c.expires_at)
            .bind(c.leased_until)
            .bind(c.tag.as_str())
    }};
}

/// `statement` ([`Sql::insert`] or [`Sql::insert_checked`]) with one command's first fourteen parameters.
macro_rules! insert_query {
    ($statement:expr, $c:expr, $now:expr) => {{
        let c: &NewCommand = $c;
        sqlx::query($statement)
            .bind(c.device.product.as_str())
            .bind(c.device.device.as_str())
            .bind(c.request_id.as_str())
            .bind(c.mode.as_str())
            .bind(c.name.as_str())
            .bind(c.format.as_str())
            .bind(c.payload.as_slice())
            .bind(c.qos as i16)
            .bind(c.idempotency_key.as_deref())
            .bind($now)
            .bind(c.expires_at)
            .bind(c.retry.map_or(1, |r| r.max_attempts))
            .bind(c.retry.map(|r| r.interval_ms))
            .bind(c.leased_until)
    }};
}

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
    ordered.sort_by(|a, b| {
        (a.device.product.as_str(), a.device.device.as_str(), a.request_id.as_str()).cmp(&(
            b.device.product.as_str(),
            b.device.device.as_str(),
            b.request_id.as_str(),
        ))
    });
    ordered
}

fn device_gone(e: sqlx::Error, device: &DeviceRef) -> Error {
    match &e {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => Error::not_found("device", device),
        _ => e.into(),
    }
}

/// Optional filters are `NULL`-guarded so one statement (and one cached plan) serves every query.
fn list_sql(placeholder: char) -> String {
    format!(
        "SELECT {COLUMNS} FROM device_commands WHERE product_id = $1 AND device_id = $2
           AND ($3 IS NULL OR state = $3)
           AND ($4 IS NULL OR created_at > $4 OR (created_at = $4 AND request_id > $5))
         ORDER BY created_at, request_id LIMIT $6"
    )
    .replace('$', &placeholder.to_string())
}

static PG_LIST: LazyLock<String> = LazyLock::new(|| {
    list_sql('$').replace("$3 IS NULL", "$3::TEXT IS NULL").replace("$4 IS NULL", "$4::BIGINT IS NULL")
});
static SQLITE_LIST: LazyLock<String> = LazyLock::new(|| list_sql('?'));

macro_rules! key_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, Error>((
            DeviceRef {
                product: ProductId::parse(r.try_get::<String, _>("product_id")?)
                    .map_err(|e| anyhow::anyhow!("stored id: {e}"))?,
                device: DeviceId::parse(r.try_get::<String, _>("device_id")?)
                    .map_err(|e| anyhow::anyhow!("stored id: {e}"))?,
            },
            r.try_get::<String, _>("request_id")?,
        ))
    }};
}

#[async_trait]
impl CommandStore for PgStore {
    #[tracing::instrument(skip_all, fields(commands = commands.len()), name = "pg.insert_commands")]
    async fn insert_commands(
        &self,
        commands: &[NewCommand],
        queued_event: QueuedEvent<'_>,
        now: i64,
        lease_ms: i64,
    ) -> Result<(Vec<Result<Inserted>>, Vec<OutboxRecord>)> {
        if commands.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        // A device deleted between the statement's read of it and its foreign-key check fails the whole
        // statement; the second attempt no longer sees that device.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.insert_commands_once(commands, queued_event, now, lease_ms).await {
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

    #[tracing::instrument(skip(self), name = "pg.get_command")]
    async fn get_command(&self, device: &DeviceRef, request_id: &str) -> Result<Option<CommandRecord>> {
        let row = sqlx::query(&PG_SQL.get)
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .bind(request_id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(|r| command_row!(r)).transpose()
    }

    #[tracing::instrument(skip(self), name = "pg.list_commands")]
    async fn list_commands(&self, device: &DeviceRef, filter: &CommandFilter) -> Result<Vec<CommandRecord>> {
        let (after_at, after_id) = filter.after.clone().unzip();
        let rows = sqlx::query(&PG_LIST)
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .bind(filter.state.map(CommandState::as_str))
            .bind(after_at)
            .bind(after_id)
            .bind(filter.limit as i64)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(|r| command_row!(r)).collect()
    }

    #[tracing::instrument(skip(self), name = "pg.claim_commands")]
    async fn claim_commands(
        &self,
        scope: &ClaimScope,
        now: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<CommandRecord>> {
        let claim = |which: &str| {
            format!(
                "UPDATE device_commands u SET next_attempt_at = $1 + $2
                 FROM (SELECT c.product_id, c.device_id, c.request_id FROM device_commands c
                       JOIN devices d ON d.product_id = c.product_id AND d.device_id = c.device_id AND d.online
                       WHERE {which} AND (c.expires_at IS NULL OR c.expires_at > $1)
                       ORDER BY c.created_at LIMIT $3 FOR UPDATE OF c SKIP LOCKED) picked
                 WHERE u.product_id = picked.product_id AND u.device_id = picked.device_id
                   AND u.request_id = picked.request_id
                 RETURNING {}",
                COLUMNS.split(", ").map(|c| format!("u.{c}")).collect::<Vec<_>>().join(", ")
            )
        };
        let rows = match scope {
            ClaimScope::Devices(list) => {
                let sql = claim(
                    "c.state = 'queued' AND (c.next_attempt_at IS NULL OR c.next_attempt_at <= $1)
                     AND (c.product_id, c.device_id) IN (SELECT * FROM UNNEST($4::TEXT[], $5::TEXT[]))",
                );
                sqlx::query(&sql)
                    .bind(now)
                    .bind(lease_ms)
                    .bind(limit as i64)
                    .bind(list.iter().map(|d| d.product.as_str()).collect::<Vec<_>>())
                    .bind(list.iter().map(|d| d.device.as_str()).collect::<Vec<_>>())
                    .fetch_all(self.pool())
                    .await?
            }
            ClaimScope::Due => {
                let sql = claim(DUE_PG);
                sqlx::query(&sql).bind(now).bind(lease_ms).bind(limit as i64).fetch_all(self.pool()).await?
            }
        };
        let mut claimed = rows.iter().map(|r| command_row!(r)).collect::<Result<Vec<_>>>()?;
        claimed.sort_by(|a, b| (a.created_at, &a.request_id).cmp(&(b.created_at, &b.request_id)));
        Ok(claimed)
    }

    #[tracing::instrument(skip(self), name = "pg.prune_commands")]
    async fn prune_commands(&self, before: i64, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            // By row address, as for messages. A row updated meanwhile may be met in its new version (the
            // address is not rechecked then), so the conditions are repeated where they are.
            "DELETE FROM device_commands
             WHERE ctid = ANY(ARRAY(SELECT ctid FROM device_commands
                                    WHERE created_at < $1 AND state IN ('replied', 'expired', 'failed') LIMIT $2))
               AND created_at < $1 AND state IN ('replied', 'expired', 'failed')",
        )
        // Planned with the actual cutoff every time: a cached generic plan guesses a third of the table
        // matches and prefers a sequential scan, which reads the whole table once nothing is old.
        .persistent(false)
        .bind(before)
        .bind(limit as i64)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    #[tracing::instrument(skip(self), name = "pg.expired_commands")]
    async fn expired_commands(&self, now: i64, limit: u32) -> Result<Vec<(DeviceRef, String)>> {
        let rows = sqlx::query(&PG_SQL.expired_list).bind(now).bind(limit as i64).fetch_all(self.pool()).await?;
        rows.iter().map(|r| key_row!(r)).collect()
    }

    #[tracing::instrument(skip_all, fields(product = %command.product, tag = %command.tag), name = "pg.insert_tag_command")]
    async fn insert_tag_command(
        &self,
        command: &NewTagCommand,
        queued_event: QueuedEvent<'_>,
        now: i64,
        lease_ms: i64,
    ) -> Result<(Vec<CommandRecord>, Vec<OutboxRecord>)> {
        let mut tx = self.pool().begin().await?;
        let rows = insert_tag_query!(PG_SQL, command, now).fetch_all(&mut *tx).await?;
        let records = rows.iter().map(|r| command_row!(r)).collect::<Result<Vec<_>>>()?;
        let events = records.iter().map(queued_event).collect();
        let outbox = pg_outbox(&mut tx, events, now, lease_ms).await?;
        tx.commit().await?;
        Ok((records, outbox))
    }

    #[tracing::instrument(skip_all, fields(rollout = %rollout.id, targets = commands.len()), name = "pg.create_rollout")]
    async fn create_rollout(
        &self,
        rollout: &crate::model::ota::NewRollout,
        commands: &[NewCommand],
        queued_event: QueuedEvent<'_>,
        now: i64,
        lease_ms: i64,
    ) -> Result<(Vec<CommandRecord>, Vec<OutboxRecord>)> {
        create_rollout_body!(self, PG_SQL, self.pool(), pg_outbox, rollout, commands, queued_event, now, lease_ms)
    }

    #[tracing::instrument(skip(self), name = "pg.tag_command")]
    async fn tag_command(&self, product: &ProductId, request_id: &str) -> Result<Vec<CommandRecord>> {
        let rows =
            sqlx::query(&PG_SQL.tag_command).bind(product.as_str()).bind(request_id).fetch_all(self.pool()).await?;
        rows.iter().map(|r| command_row!(r)).collect()
    }

    #[tracing::instrument(skip_all, fields(changes = changes.len()), name = "pg.change_commands")]
    async fn change_commands(
        &self,
        changes: &[CommandChange],
        events_for: EventsFor<'_>,
        durability: Durability,
        now: i64,
        lease_ms: i64,
    ) -> Result<ChangeOutcome> {
        let mut out = ChangeOutcome::default();
        if changes.is_empty() {
            return Ok(out);
        }
        let ordered = in_lock_order(changes);
        // The common transitions (a dispatch's sends, a webhook group's delivery reports) are applied with
        // one statement per kind, whose join must look each command up by its key: right after start (or
        // in a young table) the planner's statistics call the table tiny and it would scan it instead.
        let (sent, delivered, skipped) = set_based(&ordered);
        let mut tx = self.pool_for(durability).begin().await?;
        if !sent.is_empty() || !delivered.is_empty() {
            sqlx::query("SET LOCAL enable_seqscan = off").execute(&mut *tx).await?;
        }
        let mut applied: HashMap<usize, CommandRecord> = HashMap::new();
        if !sent.is_empty() || !delivered.is_empty() {
            // Rows are locked in key order first (the lateral join visits them in the input's order), so
            // concurrent transactions never deadlock whatever order the set-based statements take.
            let key = |f: fn(&CommandChange) -> &str| ordered.iter().map(|c| f(c)).collect::<Vec<&str>>();
            sqlx::query(
                "SELECT 1 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[]) AS i(p, d, r)
                 CROSS JOIN LATERAL (SELECT 1 FROM device_commands c
                     WHERE c.product_id = i.p AND c.device_id = i.d AND c.request_id = i.r FOR UPDATE OF c) l",
            )
            .bind(key(|c| c.device.product.as_str()))
            .bind(key(|c| c.device.device.as_str()))
            .bind(key(|c| c.request_id.as_str()))
            .fetch_all(&mut *tx)
            .await?;
            for (statement, picked) in [(&*PG_SENT_MANY, &sent), (&*PG_DELIVERED_MANY, &delivered)] {
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
                    .fetch_all(&mut *tx)
                    .await?;
                let position: HashMap<(&str, &str, &str), usize> = picked
                    .iter()
                    .map(|&i| {
                        let c = ordered[i];
                        ((c.device.product.as_str(), c.device.device.as_str(), c.request_id.as_str()), i)
                    })
                    .collect();
                for row in &rows {
                    let record = command_row!(row)?;
                    let at =
                        (record.device.product.as_str(), record.device.device.as_str(), record.request_id.as_str());
                    if let Some(&i) = position.get(&at) {
                        applied.insert(i, record);
                    }
                }
            }
        }
        let batched: std::collections::HashSet<usize> = sent.iter().chain(&delivered).copied().collect();
        let mut events = Vec::new();
        for (i, change) in ordered.iter().enumerate() {
            let record = if batched.contains(&i) {
                applied.remove(&i)
            } else if skipped.contains(&i) {
                None
            } else {
                match transition_query!(&PG_SQL, change).fetch_optional(&mut *tx).await? {
                    Some(row) => Some(command_row!(&row)?),
                    None => None,
                }
            };
            if let Some(record) = record {
                events.extend(events_for(&record, &change.transition));
                out.changed.push((record, change.transition.clone()));
            }
        }
        out.outbox = pg_outbox(&mut tx, events, now, lease_ms).await?;
        tx.commit().await?;
        Ok(out)
    }
}

impl PgStore {
    async fn insert_commands_once(
        &self,
        commands: &[NewCommand],
        queued_event: QueuedEvent<'_>,
        now: i64,
        lease_ms: i64,
    ) -> Result<(Vec<Result<Inserted>>, Vec<OutboxRecord>)> {
        let all_rpc = commands.iter().all(|c| c.mode == CommandMode::Rpc);
        let pool = self.pool_for(if all_rpc { Durability::Relaxed } else { Durability::Required });
        let events: Vec<BusEvent> = commands.iter().map(|c| queued_event(&c.queued_record(now))).collect();
        let column = |f: &dyn Fn(&NewCommand) -> &str| commands.iter().map(f).collect::<Vec<&str>>();
        let rows = sqlx::query(&PG_INSERT_MANY)
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
            .bind(now + lease_ms)
            .fetch_all(pool)
            .await?;
        // From here on the batch is committed: nothing may fail it as a whole (its callers would retry
        // commands that are written and leased).
        let mut created = HashMap::with_capacity(rows.len());
        let mut refused = HashMap::new();
        for row in &rows {
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
                    let record = command_row!(row)?;
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
        // The statement committed: a key's existing command (even one this batch wrote) is visible.
        for index in taken {
            let command = &commands[index];
            out[index] = match &command.idempotency_key {
                Some(key) => sqlx::query(&PG_SQL.by_key)
                    .bind(command.device.product.as_str())
                    .bind(command.device.device.as_str())
                    .bind(key)
                    .fetch_optional(self.pool())
                    .await
                    .map_err(Error::from)
                    .and_then(|row| row.as_ref().map(|r| command_row!(r)).transpose())
                    .and_then(|existing| existing_or_conflict(command, existing)),
                None => existing_or_conflict(command, None),
            };
        }
        Ok((out, outbox))
    }
}

/// Why a command was not written inside a SQLite batch (whose transaction sees its own rows).
async fn sqlite_not_inserted(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, c: &NewCommand) -> Result<Result<Inserted>> {
    if let Some(key) = &c.idempotency_key {
        let row = sqlx::query(&SQLITE_SQL.by_key)
            .bind(c.device.product.as_str())
            .bind(c.device.device.as_str())
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?;
        if let Some(row) = row {
            return Ok(Ok(Inserted::Existing(command_row!(&row)?)));
        }
    }
    let device: Option<(String, bool)> = sqlx::query_as(&SQLITE_SQL.device_state)
        .bind(c.device.product.as_str())
        .bind(c.device.device.as_str())
        .fetch_optional(&mut **tx)
        .await?;
    Ok(match refusal(device.as_ref().map(|(s, o)| (s.as_str(), *o)), c.require_online) {
        Some(why) => Ok(Inserted::Refused(why)),
        None => existing_or_conflict(c, None),
    })
}

async fn pg_outbox(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: Vec<BusEvent>,
    now: i64,
    lease_ms: i64,
) -> Result<Vec<OutboxRecord>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<(i64, String)> = sqlx::query_as(
        "INSERT INTO event_outbox (kind, routing_key, event_id, body, created_at, leased_until)
         SELECT k, r, e, b, $5, $6 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BYTEA[]) AS u(k, r, e, b)
         RETURNING id, event_id",
    )
    .bind(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.routing_key.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.body.as_slice()).collect::<Vec<_>>())
    .bind(now)
    .bind(now + lease_ms)
    .fetch_all(&mut **tx)
    .await?;
    Ok(pair_outbox_ids(events, ids))
}

#[async_trait]
impl CommandStore for SqliteStore {
    #[tracing::instrument(skip_all, fields(commands = commands.len()), name = "sqlite.insert_commands")]
    async fn insert_commands(
        &self,
        commands: &[NewCommand],
        queued_event: QueuedEvent<'_>,
        now: i64,
        lease_ms: i64,
    ) -> Result<(Vec<Result<Inserted>>, Vec<OutboxRecord>)> {
        if commands.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut tx = self.writer().begin().await?;
        let mut out = Vec::with_capacity(commands.len());
        let mut events = Vec::new();
        for c in commands {
            let inserted = insert_query!(&SQLITE_SQL.insert_checked, c, now)
                .bind(c.require_online)
                .fetch_optional(&mut *tx)
                .await?;
            out.push(match inserted {
                Some(row) => {
                    let record = command_row!(&row)?;
                    events.push(queued_event(&record));
                    Ok(Inserted::Created(record))
                }
                // One writer: the device cannot change between the insert and this look.
                None => sqlite_not_inserted(&mut tx, c).await?,
            });
        }
        let outbox = sqlite_outbox(&mut tx, events, now, lease_ms).await?;
        tx.commit().await?;
        Ok((out, outbox))
    }

    #[tracing::instrument(skip(self), name = "sqlite.get_command")]
    async fn get_command(&self, device: &DeviceRef, request_id: &str) -> Result<Option<CommandRecord>> {
        let row = sqlx::query(&SQLITE_SQL.get)
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .bind(request_id)
            .fetch_optional(self.reader())
            .await?;
        row.as_ref().map(|r| command_row!(r)).transpose()
    }

    #[tracing::instrument(skip(self), name = "sqlite.list_commands")]
    async fn list_commands(&self, device: &DeviceRef, filter: &CommandFilter) -> Result<Vec<CommandRecord>> {
        let (after_at, after_id) = filter.after.clone().unzip();
        let rows = sqlx::query(&SQLITE_LIST)
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .bind(filter.state.map(CommandState::as_str))
            .bind(after_at)
            .bind(after_id)
            .bind(filter.limit as i64)
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(|r| command_row!(r)).collect()
    }

    #[tracing::instrument(skip(self), name = "sqlite.claim_commands")]
    async fn claim_commands(
        &self,
        scope: &ClaimScope,
        now: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<CommandRecord>> {
        let returning = COLUMNS;
        let pick = |which: &str| {
            format!(
                "UPDATE device_commands SET next_attempt_at = ?1 + ?2 WHERE rowid IN (
                     SELECT c.rowid FROM device_commands c
                     JOIN devices d ON d.product_id = c.product_id AND d.device_id = c.device_id AND d.online
                     WHERE {which} AND (c.expires_at IS NULL OR c.expires_at > ?1)
                     ORDER BY c.created_at LIMIT ?3)
                 RETURNING {returning}"
            )
        };
        let mut tx = self.writer().begin().await?;
        let mut claimed = Vec::new();
        match scope {
            ClaimScope::Devices(list) => {
                let sql = pick(
                    "c.state = 'queued' AND (c.next_attempt_at IS NULL OR c.next_attempt_at <= ?1)
                     AND c.product_id = ?4 AND c.device_id = ?5",
                );
                for device in list {
                    let rows = sqlx::query(&sql)
                        .bind(now)
                        .bind(lease_ms)
                        .bind(limit as i64)
                        .bind(device.product.as_str())
                        .bind(device.device.as_str())
                        .fetch_all(&mut *tx)
                        .await?;
                    for row in &rows {
                        claimed.push(command_row!(row)?);
                    }
                }
            }
            ClaimScope::Due => {
                let sql = pick(&DUE_PG.replace('$', "?"));
                let rows = sqlx::query(&sql).bind(now).bind(lease_ms).bind(limit as i64).fetch_all(&mut *tx).await?;
                for row in &rows {
                    claimed.push(command_row!(row)?);
                }
            }
        }
        tx.commit().await?;
        claimed.sort_by(|a, b| (a.created_at, &a.request_id).cmp(&(b.created_at, &b.request_id)));
        Ok(claimed)
    }

    #[tracing::instrument(skip(self), name = "sqlite.prune_commands")]
    async fn prune_commands(&self, before: i64, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM device_commands
             WHERE rowid IN (SELECT rowid FROM device_commands
                             WHERE created_at < ?1 AND state IN ('replied', 'expired', 'failed') LIMIT ?2)",
        )
        .bind(before)
        .bind(limit as i64)
        .execute(self.writer())
        .await?;
        Ok(done.rows_affected())
    }

    #[tracing::instrument(skip(self), name = "sqlite.expired_commands")]
    async fn expired_commands(&self, now: i64, limit: u32) -> Result<Vec<(DeviceRef, String)>> {
        let rows = sqlx::query(&SQLITE_SQL.expired_list).bind(now).bind(limit as i64).fetch_all(self.reader()).await?;
        rows.iter().map(|r| key_row!(r)).collect()
    }

    #[tracing::instrument(skip_all, fields(product = %command.product, tag = %command.tag), name = "sqlite.insert_tag_command")]
    async fn insert_tag_command(
        &self,
        command: &NewTagCommand,
        queued_event: QueuedEvent<'_>,
        now: i64,
        lease_ms: i64,
    ) -> Result<(Vec<CommandRecord>, Vec<OutboxRecord>)> {
        let mut tx = self.writer().begin().await?;
        let rows = insert_tag_query!(SQLITE_SQL, command, now).fetch_all(&mut *tx).await?;
        let records = rows.iter().map(|r| command_row!(r)).collect::<Result<Vec<_>>>()?;
        let events = records.iter().map(queued_event).collect();
        let outbox = sqlite_outbox(&mut tx, events, now, lease_ms).await?;
        tx.commit().await?;
        Ok((records, outbox))
    }

    #[tracing::instrument(skip_all, fields(rollout = %rollout.id, targets = commands.len()), name = "sqlite.create_rollout")]
    async fn create_rollout(
        &self,
        rollout: &crate::model::ota::NewRollout,
        commands: &[NewCommand],
        queued_event: QueuedEvent<'_>,
        now: i64,
        lease_ms: i64,
    ) -> Result<(Vec<CommandRecord>, Vec<OutboxRecord>)> {
        create_rollout_body!(
            self,
            SQLITE_SQL,
            self.writer(),
            sqlite_outbox,
            rollout,
            commands,
            queued_event,
            now,
            lease_ms
        )
    }

    #[tracing::instrument(skip(self), name = "sqlite.tag_command")]
    async fn tag_command(&self, product: &ProductId, request_id: &str) -> Result<Vec<CommandRecord>> {
        let rows = sqlx::query(&SQLITE_SQL.tag_command)
            .bind(product.as_str())
            .bind(request_id)
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(|r| command_row!(r)).collect()
    }

    #[tracing::instrument(skip_all, fields(changes = changes.len()), name = "sqlite.change_commands")]
    async fn change_commands(
        &self,
        changes: &[CommandChange],
        events_for: EventsFor<'_>,
        durability: Durability,
        now: i64,
        lease_ms: i64,
    ) -> Result<ChangeOutcome> {
        let mut out = ChangeOutcome::default();
        if changes.is_empty() {
            return Ok(out);
        }
        let _ = durability;
        let mut tx = self.writer().begin().await?;
        let mut events = Vec::new();
        for change in in_lock_order(changes) {
            if let Some(row) = transition_query!(&SQLITE_SQL, change).fetch_optional(&mut *tx).await? {
                let record = command_row!(&row)?;
                events.extend(events_for(&record, &change.transition));
                out.changed.push((record, change.transition.clone()));
            }
        }
        out.outbox = sqlite_outbox(&mut tx, events, now, lease_ms).await?;
        tx.commit().await?;
        Ok(out)
    }
}

async fn sqlite_outbox(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    events: Vec<BusEvent>,
    now: i64,
    lease_ms: i64,
) -> Result<Vec<OutboxRecord>> {
    let mut out = Vec::with_capacity(events.len());
    for event in events {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO event_outbox (kind, routing_key, event_id, body, created_at, leased_until)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
        )
        .bind(event.kind.as_str())
        .bind(&event.routing_key)
        .bind(&event.event_id)
        .bind(&event.body)
        .bind(now)
        .bind(now + lease_ms)
        .fetch_one(&mut **tx)
        .await?;
        out.push(OutboxRecord { id, event });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(device: &str, transition: Transition) -> CommandChange {
        CommandChange {
            device: DeviceRef::new(ProductId::parse("p").unwrap(), DeviceId::parse(device).unwrap()),
            request_id: "r".into(),
            transition,
        }
    }

    #[test]
    fn only_first_changes_are_set_based_and_repeated_delivery_reports_are_skipped() {
        let replied = Transition::Replied { at: 3, mode: CommandMode::Cmd, payload: vec![], message_id: "m".into() };
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

//! What devices report: data messages, status reports and presence, written by ingest in one transaction
//! per group with their events ([`TelemetryStore`]), and read back as history.
//!
//! **Presence.** A session's connect and disconnect merge into one `device_connections` row keyed by
//! `session_key`, so the two events commute and replays change nothing (`RETURNING` yields a row only when
//! something changed). A row always converges to the newest session with its key, which matters where the
//! key can repeat (RMQTT keys by peer address, and a device may reconnect from the same address): a connect
//! newer than the row starts a new session (keeping a disconnect that is newer still), a disconnect applies
//! only if it is not older than the row's connect and newer than its disconnect. A device is online when,
//! for some client id, its newest session (by connect time, or disconnect time while the connect is still
//! unknown) is open: a stale disconnect or a taken-over session never hides a newer connection. SQLite
//! runs these rules statement by statement; PostgreSQL runs the same rules for a whole group in one call of
//! `iothub_apply_presence` (migrations/postgres/0009_presence_per_device.sql). The presence property tests
//! hold both to one truth.

use async_trait::async_trait;
use sqlx::Row;

use super::{for_each_backend, PgStore, SqliteStore};
use crate::clock::now_ms;
use crate::error::Result;
use crate::ids::{DeviceRef, ProductId};
use crate::model::event_bus::BusEvent;
use crate::model::events::ConnectionEvent;
use crate::model::store::*;
use crate::ports::store::TelemetryStore;

const CONNECTED: &str = "INSERT INTO device_connections
        (product_id, device_id, client_id, session_key, connected_at, ip_address, proto_ver, keepalive, clean_start, node)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
    ON CONFLICT (product_id, device_id, client_id, session_key) DO UPDATE SET
        connected_at = excluded.connected_at, ip_address = excluded.ip_address, proto_ver = excluded.proto_ver,
        keepalive = excluded.keepalive, clean_start = excluded.clean_start, node = excluded.node,
        disconnected_at = CASE WHEN device_connections.disconnected_at >= excluded.connected_at
                               THEN device_connections.disconnected_at END,
        reason = CASE WHEN device_connections.disconnected_at >= excluded.connected_at
                      THEN device_connections.reason END
    WHERE device_connections.keepalive IS NULL
       OR device_connections.connected_at IS NULL
       OR device_connections.connected_at < excluded.connected_at
    RETURNING connected_at, disconnected_at, reason, ip_address, proto_ver, keepalive, clean_start, node";

const DISCONNECTED: &str = "INSERT INTO device_connections
        (product_id, device_id, client_id, session_key, connected_at, disconnected_at, reason, ip_address, node)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
    ON CONFLICT (product_id, device_id, client_id, session_key) DO UPDATE SET
        disconnected_at = excluded.disconnected_at, reason = excluded.reason,
        connected_at = COALESCE(device_connections.connected_at, excluded.connected_at),
        ip_address = COALESCE(device_connections.ip_address, excluded.ip_address),
        node = COALESCE(device_connections.node, excluded.node)
    WHERE (device_connections.disconnected_at IS NULL OR device_connections.disconnected_at < excluded.disconnected_at)
      AND (device_connections.connected_at IS NULL OR excluded.disconnected_at >= device_connections.connected_at)
    RETURNING connected_at, disconnected_at, reason, ip_address, proto_ver, keepalive, clean_start, node";

/// A `DELETE` of the sessions that ended (or, open, were superseded by a newer session of their client id,
/// whose disconnect webhook was lost) before `$before`: the statement's head, then the bound's expression.
/// The bound is the broker's time of a new connect less the retention, not the wall clock: a replayed old
/// connect prunes nothing, finds its session still recorded and changes nothing. A superseded open session
/// goes with the session that superseded it, so it can never become its client's newest again.
macro_rules! prune_sessions {
    ($head:literal, $before:literal) => {
        concat!(
            $head,
            " COALESCE(c.disconnected_at, c.connected_at) < ",
            $before,
            " AND (c.disconnected_at IS NOT NULL OR EXISTS (
                SELECT 1 FROM device_connections n
                WHERE n.product_id = c.product_id AND n.device_id = c.device_id AND n.client_id = c.client_id
                  AND (COALESCE(n.connected_at, n.disconnected_at), n.session_key)
                    > (COALESCE(c.connected_at, c.disconnected_at), c.session_key)))"
        )
    };
}

const RECOMPUTE: &str = "UPDATE devices SET
        online = EXISTS (
            SELECT 1 FROM device_connections c
            WHERE c.product_id = $1 AND c.device_id = $2 AND c.disconnected_at IS NULL
              AND NOT EXISTS (
                  SELECT 1 FROM device_connections n
                  WHERE n.product_id = c.product_id AND n.device_id = c.device_id AND n.client_id = c.client_id
                    AND (COALESCE(n.connected_at, n.disconnected_at), n.session_key)
                      > (COALESCE(c.connected_at, c.disconnected_at), c.session_key))),
        last_seen_at = CASE WHEN COALESCE(last_seen_at, 0) > $3 THEN last_seen_at ELSE $3 END
    WHERE product_id = $1 AND device_id = $2
    RETURNING online";

const LIST_CONNECTIONS: &str = "SELECT client_id, connected_at, disconnected_at, reason, ip_address, proto_ver,
        keepalive, clean_start, node
    FROM device_connections WHERE product_id = $1 AND device_id = $2
    ORDER BY COALESCE(connected_at, disconnected_at) DESC, session_key DESC LIMIT $3";

/// Closed sessions are kept this long (ms) for the connection list.
pub const SESSION_RETENTION_MS: i64 = 24 * 60 * 60 * 1000;

const MESSAGE_COLUMNS: &str = "message_id, data_type, payload, sent_at, stored_at";

type PgTx<'c> = sqlx::Transaction<'c, sqlx::Postgres>;

impl PgStore {
    /// Runs the group again when another instance touching the same devices in another order deadlocked it.
    async fn ingest_batch(&self, batch: &IngestBatch) -> Result<IngestOutcome> {
        let mut attempt = 0;
        loop {
            match self.ingest_once(batch).await {
                Err(sqlx::Error::Database(db))
                    if matches!(db.code().as_deref(), Some("40P01" | "40001")) && attempt < 3 =>
                {
                    attempt += 1;
                    tracing::debug!(attempt, "ingest transaction retried after a deadlock");
                }
                other => return other.map_err(Into::into),
            }
        }
    }

    async fn ingest_once(&self, batch: &IngestBatch) -> std::result::Result<IngestOutcome, sqlx::Error> {
        let now = now_ms();
        let mut out = IngestOutcome::default();
        let mut tx = self.write().begin().await?;
        let mut events = Self::insert_messages(&mut tx, &batch.messages, now, &mut out).await?;
        let locked = Self::lock_devices(&mut tx, batch).await?;
        let present: std::collections::HashSet<(&str, &str)> =
            locked.iter().map(|(p, d)| (p.as_str(), d.as_str())).collect();
        let is_present = |d: &DeviceRef| present.contains(&(d.product.as_str(), d.device.as_str()));
        let reports: Vec<&NewReport> = batch.reports.iter().filter(|r| is_present(&r.device)).collect();
        out.reports_applied = Self::upsert_reports(&mut tx, &reports).await?;
        events.extend(batch.events.iter().cloned());
        Self::prune_sessions(&mut tx, &batch.presence).await?;
        let changes: Vec<&PresenceChange> = batch.presence.iter().filter(|c| is_present(c.device())).collect();
        let applied = Self::apply_presence(&mut tx, &changes).await?;
        out.presence_applied = applied.len();
        events.extend(applied);
        let records = self.enqueue(&mut tx, events).await?;
        tx.commit().await?;
        self.outbox.committed(records);
        Ok(out)
    }

    /// The group's messages in one `UNNEST` insert; a known message id is a duplicate and emits nothing.
    async fn insert_messages(
        tx: &mut PgTx<'_>,
        messages: &[NewMessage],
        now: i64,
        out: &mut IngestOutcome,
    ) -> std::result::Result<Vec<BusEvent>, sqlx::Error> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let m = messages;
        let inserted: Vec<(String, String, String)> = sqlx::query_as(
            "INSERT INTO device_messages
                 (product_id, device_id, message_id, data_type, payload, payload_json, sent_at, stored_at)
             SELECT p, d, m, t, b, j::JSONB, s, $8
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BYTEA[], $6::TEXT[], $7::BIGINT[])
                  AS u(p, d, m, t, b, j, s)
             ON CONFLICT DO NOTHING
             RETURNING product_id, device_id, message_id",
        )
        .bind(m.iter().map(|x| x.device.product.as_str()).collect::<Vec<_>>())
        .bind(m.iter().map(|x| x.device.device.as_str()).collect::<Vec<_>>())
        .bind(m.iter().map(|x| x.message_id.as_str()).collect::<Vec<_>>())
        .bind(m.iter().map(|x| x.data_type.as_str()).collect::<Vec<_>>())
        .bind(m.iter().map(|x| x.payload.as_slice()).collect::<Vec<_>>())
        .bind(m.iter().map(|x| x.payload_json.as_deref()).collect::<Vec<_>>())
        .bind(m.iter().map(|x| x.sent_at).collect::<Vec<_>>())
        .bind(now)
        .fetch_all(&mut **tx)
        .await?;
        let fresh: std::collections::HashSet<(&str, &str, &str)> =
            inserted.iter().map(|(p, d, m)| (p.as_str(), d.as_str(), m.as_str())).collect();
        let mut events = Vec::new();
        for msg in m {
            if fresh.contains(&(msg.device.product.as_str(), msg.device.device.as_str(), msg.message_id.as_str())) {
                out.messages_stored += 1;
                events.push(msg.event.clone());
            } else {
                out.messages_duplicate += 1;
            }
        }
        Ok(events)
    }

    /// Locks every device the group's reports and presence changes touch, in one statement and one global
    /// order, before writing any of them: each presence recompute must see every session another
    /// transaction added, and neither concurrent groups nor a device deletion can deadlock with us (the
    /// deletion waits). Returns the devices that still exist.
    async fn lock_devices(
        tx: &mut PgTx<'_>,
        batch: &IngestBatch,
    ) -> std::result::Result<Vec<(String, String)>, sqlx::Error> {
        if batch.presence.is_empty() && batch.reports.is_empty() {
            return Ok(Vec::new());
        }
        let devices: std::collections::BTreeSet<(&str, &str)> = batch
            .reports
            .iter()
            .map(|r| &r.device)
            .chain(batch.presence.iter().map(PresenceChange::device))
            .map(|d| (d.product.as_str(), d.device.as_str()))
            .collect();
        let locked = sqlx::query_as(
            "SELECT d.product_id, d.device_id FROM devices d
             JOIN UNNEST($1::TEXT[], $2::TEXT[]) AS u(p, i) ON d.product_id = u.p AND d.device_id = u.i
             ORDER BY d.product_id, d.device_id
             FOR NO KEY UPDATE OF d",
        )
        .bind(devices.iter().map(|k| k.0).collect::<Vec<_>>())
        .bind(devices.iter().map(|k| k.1).collect::<Vec<_>>())
        .fetch_all(&mut **tx)
        .await?;
        Ok(locked)
    }

    /// The newest status report per device and kind wins (broker time); one `UNNEST` upsert.
    async fn upsert_reports(tx: &mut PgTx<'_>, r: &[&NewReport]) -> std::result::Result<usize, sqlx::Error> {
        if r.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(
            "INSERT INTO device_reports (product_id, device_id, kind, payload, message_id, reported_at)
             SELECT u.p, u.d, u.k, u.j::JSONB, u.m, u.r
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::BIGINT[]) AS u(p, d, k, j, m, r)
             WHERE EXISTS (SELECT 1 FROM devices v WHERE v.product_id = u.p AND v.device_id = u.d)
             ON CONFLICT (product_id, device_id, kind) DO UPDATE SET
                 payload = excluded.payload, message_id = excluded.message_id, reported_at = excluded.reported_at
             WHERE device_reports.reported_at <= excluded.reported_at",
        )
        .bind(r.iter().map(|x| x.device.product.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.device.device.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.kind.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.payload_json.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.message_id.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.reported_at).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected() as usize)
    }

    /// Prunes each connecting device's old sessions once, relative to its oldest connect in the group.
    async fn prune_sessions(tx: &mut PgTx<'_>, presence: &[PresenceChange]) -> std::result::Result<(), sqlx::Error> {
        let mut oldest_connect: std::collections::BTreeMap<(&str, &str), i64> = std::collections::BTreeMap::new();
        for change in presence {
            if let PresenceChange::Connected { device, connected_at, .. } = change {
                let slot =
                    oldest_connect.entry((device.product.as_str(), device.device.as_str())).or_insert(*connected_at);
                *slot = (*slot).min(*connected_at);
            }
        }
        if oldest_connect.is_empty() {
            return Ok(());
        }
        const PRUNE: &str = prune_sessions!(
            "DELETE FROM device_connections c USING UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[]) AS u(p, i, before)
             WHERE c.product_id = u.p AND c.device_id = u.i AND",
            "u.before"
        );
        sqlx::query(PRUNE)
            .bind(oldest_connect.keys().map(|k| k.0).collect::<Vec<_>>())
            .bind(oldest_connect.keys().map(|k| k.1).collect::<Vec<_>>())
            .bind(oldest_connect.values().map(|t| t - SESSION_RETENTION_MS).collect::<Vec<_>>())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// One round trip for all of the group's presence changes (`iothub_apply_presence`), ordered by device
    /// (stable: a device's changes keep their order) so the function writes each device's row once. The
    /// events go out in the order the changes were given.
    async fn apply_presence(
        tx: &mut PgTx<'_>,
        given: &[&PresenceChange],
    ) -> std::result::Result<Vec<BusEvent>, sqlx::Error> {
        let mut changes: Vec<(usize, &PresenceChange)> = given.iter().copied().enumerate().collect();
        changes.sort_by(|a, b| {
            let (x, y) = (a.1.device(), b.1.device());
            (x.product.as_str(), x.device.as_str()).cmp(&(y.product.as_str(), y.device.as_str()))
        });
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let mut cols = PresenceColumns::default();
        for (_, change) in &changes {
            cols.push(change);
        }
        let rows =
            sqlx::query("SELECT * FROM iothub_apply_presence($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)")
                .bind(&cols.products)
                .bind(&cols.devices)
                .bind(&cols.clients)
                .bind(&cols.keys)
                .bind(&cols.is_connect)
                .bind(&cols.connected_at)
                .bind(&cols.disconnected_at)
                .bind(&cols.reasons)
                .bind(&cols.ips)
                .bind(&cols.protos)
                .bind(&cols.keepalives)
                .bind(&cols.cleans)
                .bind(&cols.nodes)
                .fetch_all(&mut **tx)
                .await?;
        let mut applied = Vec::with_capacity(rows.len());
        for row in &rows {
            let ord: i32 = row.try_get("ord")?;
            let (arrival, change) = changes[(ord - 1) as usize];
            let online: bool = row.try_get("online")?;
            let event =
                on_postgres::connection_event(change, row, online).map_err(|e| sqlx::Error::Decode(e.into()))?;
            applied.push((arrival, event));
        }
        applied.sort_by_key(|(arrival, _)| *arrival);
        Ok(applied.into_iter().map(|(_, event)| event).collect())
    }
}

/// A group's presence changes as the column arrays `iothub_apply_presence` takes.
#[derive(Default)]
struct PresenceColumns {
    products: Vec<String>,
    devices: Vec<String>,
    clients: Vec<String>,
    keys: Vec<String>,
    is_connect: Vec<bool>,
    connected_at: Vec<Option<i64>>,
    disconnected_at: Vec<Option<i64>>,
    reasons: Vec<Option<String>>,
    ips: Vec<Option<String>>,
    protos: Vec<Option<i32>>,
    keepalives: Vec<Option<i32>>,
    cleans: Vec<Option<bool>>,
    nodes: Vec<Option<String>>,
}

impl PresenceColumns {
    fn push(&mut self, change: &PresenceChange) {
        let device = change.device();
        self.products.push(device.product.to_string());
        self.devices.push(device.device.to_string());
        let (PresenceChange::Connected { client_id, session_key, ip_address, node, .. }
        | PresenceChange::Disconnected { client_id, session_key, ip_address, node, .. }) = change;
        self.clients.push(client_id.clone());
        self.keys.push(session_key.clone());
        self.ips.push(ip_address.clone());
        self.nodes.push(node.clone());
        match change {
            PresenceChange::Connected { connected_at, proto_ver, keepalive, clean_start, .. } => {
                self.is_connect.push(true);
                self.connected_at.push(Some(*connected_at));
                self.disconnected_at.push(None);
                self.reasons.push(None);
                self.protos.push(*proto_ver);
                self.keepalives.push(Some(*keepalive));
                self.cleans.push(*clean_start);
            }
            PresenceChange::Disconnected { connected_at, disconnected_at, reason, .. } => {
                self.is_connect.push(false);
                self.connected_at.push(*connected_at);
                self.disconnected_at.push(Some(*disconnected_at));
                self.reasons.push(Some(reason.clone()));
                self.protos.push(None);
                self.keepalives.push(None);
                self.cleans.push(None);
            }
        }
    }
}

type SqliteTx<'c> = sqlx::Transaction<'c, sqlx::Sqlite>;

impl SqliteStore {
    /// The group statement by statement on the single writer, in one transaction.
    async fn ingest_batch(&self, batch: &IngestBatch) -> Result<IngestOutcome> {
        let now = now_ms();
        let mut out = IngestOutcome::default();
        let mut events = Vec::new();
        let mut tx = self.write().begin().await?;
        for msg in &batch.messages {
            let done = sqlx::query(
                "INSERT INTO device_messages
                     (product_id, device_id, message_id, data_type, payload, payload_json, sent_at, stored_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            )
            .bind(msg.device.product.as_str())
            .bind(msg.device.device.as_str())
            .bind(&msg.message_id)
            .bind(&msg.data_type)
            .bind(&msg.payload)
            .bind(msg.payload_json.as_deref())
            .bind(msg.sent_at)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                out.messages_stored += 1;
                events.push(msg.event.clone());
            } else {
                out.messages_duplicate += 1;
            }
        }
        for r in &batch.reports {
            out.reports_applied += Self::upsert_report(&mut tx, r).await?;
        }
        events.extend(batch.events.iter().cloned());
        for change in &batch.presence {
            if let Some(event) = Self::apply_presence_change(&mut tx, change).await? {
                out.presence_applied += 1;
                events.push(event);
            }
        }
        self.commit_with_events(tx, events).await?;
        Ok(out)
    }

    async fn upsert_report(tx: &mut SqliteTx<'_>, r: &NewReport) -> Result<usize> {
        let done = sqlx::query(
            "INSERT INTO device_reports (product_id, device_id, kind, payload, message_id, reported_at)
             SELECT $1, $2, $3, $4, $5, $6
             WHERE EXISTS (SELECT 1 FROM devices v WHERE v.product_id = $1 AND v.device_id = $2)
             ON CONFLICT (product_id, device_id, kind) DO UPDATE SET
                 payload = excluded.payload, message_id = excluded.message_id, reported_at = excluded.reported_at
             WHERE device_reports.reported_at <= excluded.reported_at",
        )
        .bind(r.device.product.as_str())
        .bind(r.device.device.as_str())
        .bind(r.kind.as_str())
        .bind(&r.payload_json)
        .bind(&r.message_id)
        .bind(r.reported_at)
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected() as usize)
    }

    /// One presence change: merge the session row, recompute the device's presence, build the event
    /// (`None`: the device is gone or the change was already known).
    async fn apply_presence_change(tx: &mut SqliteTx<'_>, change: &PresenceChange) -> Result<Option<BusEvent>> {
        let device = change.device();
        let exists = sqlx::query("SELECT 1 FROM devices WHERE product_id = $1 AND device_id = $2")
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .fetch_optional(&mut **tx)
            .await?;
        if exists.is_none() {
            return Ok(None);
        }
        let (PresenceChange::Connected { client_id, session_key, ip_address, node, .. }
        | PresenceChange::Disconnected { client_id, session_key, ip_address, node, .. }) = change;
        let session = |statement: &'static str| {
            sqlx::query(statement)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .bind(client_id)
                .bind(session_key)
        };
        let merged = match change {
            PresenceChange::Connected { connected_at, proto_ver, keepalive, clean_start, .. } => {
                const PRUNE: &str = prune_sessions!(
                    "DELETE FROM device_connections AS c WHERE c.product_id = $1 AND c.device_id = $2 AND",
                    "$3"
                );
                sqlx::query(PRUNE)
                    .bind(device.product.as_str())
                    .bind(device.device.as_str())
                    .bind(connected_at - SESSION_RETENTION_MS)
                    .execute(&mut **tx)
                    .await?;
                session(CONNECTED)
                    .bind(connected_at)
                    .bind(ip_address)
                    .bind(proto_ver)
                    .bind(keepalive)
                    .bind(clean_start)
                    .bind(node)
                    .fetch_optional(&mut **tx)
                    .await?
            }
            PresenceChange::Disconnected { connected_at, disconnected_at, reason, .. } => {
                session(DISCONNECTED)
                    .bind(connected_at)
                    .bind(disconnected_at)
                    .bind(reason)
                    .bind(ip_address)
                    .bind(node)
                    .fetch_optional(&mut **tx)
                    .await?
            }
        };
        let Some(merged) = merged else { return Ok(None) };
        let online: bool = sqlx::query_scalar(RECOMPUTE)
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .bind(change.at())
            .fetch_one(&mut **tx)
            .await?;
        Ok(Some(on_sqlite::connection_event(change, &merged, online)?))
    }
}

for_each_backend! {
    type DbRow = <Db as sqlx::Database>::Row;

    pub(super) fn connection_row(r: &DbRow) -> Result<ConnectionRecord> {
        session_of(r, r.try_get("client_id")?)
    }

    /// A session row of `client_id` (presence upserts return the row without its key).
    fn session_of(r: &DbRow, client_id: String) -> Result<ConnectionRecord> {
        Ok(ConnectionRecord {
            client_id,
            connected_at: r.try_get("connected_at")?,
            disconnected_at: r.try_get("disconnected_at")?,
            reason: r.try_get("reason")?,
            ip_address: r.try_get("ip_address")?,
            proto_ver: r.try_get("proto_ver")?,
            keepalive: r.try_get("keepalive")?,
            clean_start: r.try_get("clean_start")?,
            node: r.try_get("node")?,
        })
    }

    /// The connection event of a presence change, from the merged row its upsert returned.
    pub(super) fn connection_event(change: &PresenceChange, row: &DbRow, online: bool) -> Result<BusEvent> {
        let (device, client_id, session_key, event) = match change {
            PresenceChange::Connected { device, client_id, session_key, .. } => {
                (device, client_id, session_key, "connected")
            }
            PresenceChange::Disconnected { device, client_id, session_key, .. } => {
                (device, client_id, session_key, "disconnected")
            }
        };
        let session = session_of(row, client_id.clone())?;
        Ok(ConnectionEvent {
            event_id: ConnectionEvent::id_for(device, client_id, session_key, event, change.at()),
            event: event.to_string(),
            product_id: device.product.to_string(),
            device_id: device.device.to_string(),
            online,
            session,
        }
        .into_bus_event(device))
    }

    fn message_row(r: &DbRow) -> Result<MessageRecord> {
        Ok(MessageRecord {
            message_id: r.try_get("message_id")?,
            data_type: r.try_get("data_type")?,
            payload: r.try_get("payload")?,
            sent_at: r.try_get("sent_at")?,
            stored_at: r.try_get("stored_at")?,
        })
    }

    #[async_trait]
    impl TelemetryStore for Store {
        #[tracing::instrument(skip_all, name = "sql.ingest",
            fields(messages = batch.messages.len(), reports = batch.reports.len(), presence = batch.presence.len()))]
        async fn ingest(&self, batch: &IngestBatch) -> Result<IngestOutcome> {
            self.ingest_batch(batch).await
        }

        #[tracing::instrument(skip(self), fields(device = %device), name = "sql.list_connections")]
        async fn list_connections(&self, device: &DeviceRef, limit: u32) -> Result<Vec<ConnectionRecord>> {
            let rows = sqlx::query(LIST_CONNECTIONS)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .bind(i64::from(limit))
                .fetch_all(self.read())
                .await?;
            rows.iter().map(connection_row).collect()
        }

        #[tracing::instrument(skip(self), name = "sql.count_online")]
        async fn count_online(&self, product: &ProductId) -> Result<i64> {
            Ok(sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE product_id = $1 AND online")
                .bind(product.as_str())
                .fetch_one(self.read())
                .await?)
        }

        #[tracing::instrument(skip(self, filter), fields(device = %device), name = "sql.list_messages")]
        async fn list_messages(&self, device: &DeviceRef, filter: &MessageFilter) -> Result<Vec<MessageRecord>> {
            let (after_at, after_id) = filter.after.clone().unzip();
            let rows = sqlx::query(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM device_messages
                 WHERE product_id = $1 AND device_id = $2
                   AND (CAST($3 AS TEXT) IS NULL OR data_type = $3)
                   AND (CAST($4 AS BIGINT) IS NULL OR sent_at >= $4)
                   AND (CAST($5 AS BIGINT) IS NULL OR sent_at < $5)
                   AND (CAST($6 AS BIGINT) IS NULL OR (sent_at, message_id) > ($6, CAST($7 AS TEXT)))
                 ORDER BY sent_at, message_id LIMIT $8"
            ))
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .bind(filter.data_type.as_deref())
            .bind(filter.from)
            .bind(filter.to)
            .bind(after_at)
            .bind(after_id)
            .bind(i64::from(filter.limit))
            .fetch_all(self.read())
            .await?;
            rows.iter().map(message_row).collect()
        }

        #[tracing::instrument(skip(self), fields(device = %device), name = "sql.get_message")]
        async fn get_message(&self, device: &DeviceRef, message_id: &str) -> Result<Option<MessageRecord>> {
            let row = sqlx::query(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM device_messages
                 WHERE product_id = $1 AND device_id = $2 AND message_id = $3"
            ))
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .bind(message_id)
            .fetch_optional(self.read())
            .await?;
            row.as_ref().map(message_row).transpose()
        }

        #[tracing::instrument(skip(self), fields(device = %device), name = "sql.get_report")]
        async fn get_report(&self, device: &DeviceRef, kind: ReportKind) -> Result<Option<ReportRecord>> {
            let row = sqlx::query(
                "SELECT message_id, CAST(payload AS TEXT) AS payload, reported_at FROM device_reports
                 WHERE product_id = $1 AND device_id = $2 AND kind = $3",
            )
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .bind(kind.as_str())
            .fetch_optional(self.read())
            .await?;
            row.map(|r| {
                Ok(ReportRecord {
                    message_id: r.try_get("message_id")?,
                    payload_json: r.try_get("payload")?,
                    reported_at: r.try_get("reported_at")?,
                })
            })
            .transpose()
        }
    }
}

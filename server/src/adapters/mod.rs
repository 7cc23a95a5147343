//! Adapters: concrete implementations of the ports, chosen by configuration in `startup`.
//!
//! - `postgres` / `sqlite`: the [`Store`](crate::ports::store::Store) for production and embedded profiles;
//!   `command_log`, `tag_store`, `shadow_store` and `ota_store`: the [`CommandStore`](crate::ports::commands::CommandStore),
//!   [`TagStore`](crate::ports::tags::TagStore) and [`ShadowStore`](crate::ports::shadows::ShadowStore) on the
//!   same two databases.
//! - `broker_http`: the [`BrokerApi`](crate::ports::broker::BrokerApi) over EMQX 5 or EMQX 4 / RMQTT REST.
//! - `embedded_broker`: RMQTT running inside this process, wired to this instance's hooks; `rmqtt_dollar`
//!   makes it route and report iothub's inner-`$` topics as MQTT (and EMQX) do.
//! - `redis_dedup` / `memory_dedup`: the [`Deduplicator`](crate::ports::dedup::Deduplicator).
//! - `rabbitmq` / `memory_bus`: the [`EventBus`](crate::ports::event_bus::EventBus).
//! - `redis_replies` / `memory_replies`: the [`ReplyHub`](crate::ports::replies::ReplyHub) RPC callers wait on.

pub mod broker_http;
pub mod broker_tls;
pub mod command_log;
pub mod embedded_broker;
pub mod kick_store;
pub mod memory_bus;
pub mod memory_dedup;
pub mod memory_replies;
pub mod ota_store;
pub mod postgres;
pub mod rabbitmq;
pub mod redis_dedup;
pub mod redis_replies;
pub mod rmqtt_dollar;
pub mod rmqtt_identity;
pub mod shadow_store;
pub mod sqlite;
pub mod tag_store;

use crate::error::Error;

/// Row-to-record mapping shared by both SQL stores (same column names and types in both schemas),
/// generated per row type because sqlx rows are not interchangeable across drivers.
macro_rules! row_mappers {
    ($row:ty) => {
        fn product_row(r: &$row) -> Result<ProductRecord> {
            Ok(ProductRecord {
                id: ProductId::parse(r.try_get::<String, _>("id")?)
                    .map_err(|e| anyhow::anyhow!("stored product id: {e}"))?,
                name: r.try_get("name")?,
                description: r.try_get("description")?,
                created_at: r.try_get("created_at")?,
                device_count: r.try_get("device_count")?,
            })
        }

        fn device_row(r: &$row) -> Result<DeviceRecord> {
            let status: String = r.try_get("status")?;
            Ok(DeviceRecord {
                product: ProductId::parse(r.try_get::<String, _>("product_id")?)
                    .map_err(|e| anyhow::anyhow!("stored id: {e}"))?,
                device: DeviceId::parse(r.try_get::<String, _>("device_id")?)
                    .map_err(|e| anyhow::anyhow!("stored id: {e}"))?,
                status: DeviceStatus::parse(&status).ok_or_else(|| anyhow::anyhow!("stored status {status}"))?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
                online: r.try_get("online")?,
                last_seen_at: r.try_get("last_seen_at")?,
            })
        }

        fn credential_row(r: &$row) -> Result<CredentialRecord> {
            Ok(CredentialRecord {
                id: r.try_get("id")?,
                secret: SecretHash { salt: r.try_get("salt")?, hash: r.try_get("password_hash")? },
                created_at: r.try_get("created_at")?,
                expires_at: r.try_get("expires_at")?,
            })
        }

        fn message_row(r: &$row) -> Result<MessageRecord> {
            Ok(MessageRecord {
                message_id: r.try_get("message_id")?,
                data_type: r.try_get("data_type")?,
                payload: r.try_get("payload")?,
                sent_at: r.try_get("sent_at")?,
                stored_at: r.try_get("stored_at")?,
            })
        }

        fn report_row(r: &$row) -> Result<ReportRecord> {
            Ok(ReportRecord {
                message_id: r.try_get("message_id")?,
                payload_json: r.try_get("payload")?,
                reported_at: r.try_get("reported_at")?,
            })
        }

        fn api_key_row(r: &$row) -> Result<ApiKeyRecord> {
            let scopes: String = r.try_get("scopes")?;
            Ok(ApiKeyRecord {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                key_hash: r.try_get("key_hash")?,
                scopes: scopes.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect(),
                created_at: r.try_get("created_at")?,
                revoked_at: r.try_get("revoked_at")?,
            })
        }
    };
}
pub(crate) use row_mappers;

/// Maps a unique-constraint violation to 409 with a message naming what was duplicated.
pub(crate) fn conflict_or(e: sqlx::Error, what: impl FnOnce() -> String) -> Error {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => Error::Conflict(what()),
        _ => e.into(),
    }
}

/// Presence SQL, written with `$n` placeholders (SQLite gets `?n`). SQLite runs these statement by statement;
/// PostgreSQL runs the same rules for a whole group in one call of `iothub_apply_presence`
/// (migrations/postgres/0009_presence_per_device.sql). The presence property tests hold both to one truth.
///
/// A session's connect and disconnect merge into one row keyed by `session_key`, so the two events commute
/// and replays change nothing (`RETURNING` yields a row only when something changed). A row always converges
/// to the newest session with its key, which matters where the key can repeat (RMQTT keys by peer address,
/// and a device may reconnect from the same address): a connect newer than the row starts a new session
/// (keeping a disconnect that is newer still), a disconnect applies only if it is not older than the row's
/// connect and newer than its disconnect. A device is online when, for some client id, its newest session
/// (by connect time, or disconnect time while the connect is still unknown) is open: a stale disconnect
/// or a taken-over session never hides a newer connection.
pub(crate) mod presence_sql {
    pub const CONNECTED: &str = "INSERT INTO device_connections
            (product_id, device_id, client_id, session_key, connected_at, ip_address, proto_ver, keepalive, clean_start, node)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        ON CONFLICT (product_id, device_id, client_id, session_key) DO UPDATE SET
            connected_at = EXCLUDED.connected_at, ip_address = EXCLUDED.ip_address, proto_ver = EXCLUDED.proto_ver,
            keepalive = EXCLUDED.keepalive, clean_start = EXCLUDED.clean_start, node = EXCLUDED.node,
            disconnected_at = CASE WHEN device_connections.disconnected_at >= EXCLUDED.connected_at
                                   THEN device_connections.disconnected_at END,
            reason = CASE WHEN device_connections.disconnected_at >= EXCLUDED.connected_at
                          THEN device_connections.reason END
        WHERE device_connections.keepalive IS NULL
           OR device_connections.connected_at IS NULL
           OR device_connections.connected_at < EXCLUDED.connected_at
        RETURNING connected_at, disconnected_at, reason, ip_address, proto_ver, keepalive, clean_start, node";

    pub const DISCONNECTED: &str = "INSERT INTO device_connections
            (product_id, device_id, client_id, session_key, connected_at, disconnected_at, reason, ip_address, node)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        ON CONFLICT (product_id, device_id, client_id, session_key) DO UPDATE SET
            disconnected_at = EXCLUDED.disconnected_at, reason = EXCLUDED.reason,
            connected_at = COALESCE(device_connections.connected_at, EXCLUDED.connected_at),
            ip_address = COALESCE(device_connections.ip_address, EXCLUDED.ip_address),
            node = COALESCE(device_connections.node, EXCLUDED.node)
        WHERE (device_connections.disconnected_at IS NULL OR device_connections.disconnected_at < EXCLUDED.disconnected_at)
          AND (device_connections.connected_at IS NULL OR EXCLUDED.disconnected_at >= device_connections.connected_at)
        RETURNING connected_at, disconnected_at, reason, ip_address, proto_ver, keepalive, clean_start, node";

    /// Sessions that ended (or, open, were superseded by a newer session of their client id, whose
    /// disconnect webhook was lost) more than the retention before a new connect go. Relative to the
    /// broker's time of that connect, not the wall clock: a replayed old connect prunes nothing, finds its
    /// session still recorded and changes nothing. A superseded open session goes with the session that
    /// superseded it, so it can never become its client's newest again.
    pub const PRUNABLE: &str = "COALESCE(c.disconnected_at, c.connected_at) < $before
        AND (c.disconnected_at IS NOT NULL OR EXISTS (
            SELECT 1 FROM device_connections n
            WHERE n.product_id = c.product_id AND n.device_id = c.device_id AND n.client_id = c.client_id
              AND (COALESCE(n.connected_at, n.disconnected_at), n.session_key)
                > (COALESCE(c.connected_at, c.disconnected_at), c.session_key)))";

    pub const RECOMPUTE: &str = "UPDATE devices SET
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

    pub const LIST: &str = "SELECT client_id, connected_at, disconnected_at, reason, ip_address, proto_ver, keepalive,
            clean_start, node
        FROM device_connections WHERE product_id = $1 AND device_id = $2
        ORDER BY COALESCE(connected_at, disconnected_at) DESC, session_key DESC LIMIT $3";

    /// Closed sessions are kept this long (ms) for the connection list.
    pub const RETENTION_MS: i64 = 24 * 60 * 60 * 1000;
}

/// Builds the connection event from the merged row a presence upsert returned.
macro_rules! connection_event {
    ($change:expr, $row:expr, $online:expr) => {{
        use sqlx::Row;
        let change: &PresenceChange = $change;
        let row = $row;
        let (device, client_id, session_key, event) = match change {
            PresenceChange::Connected { device, client_id, session_key, .. } => {
                (device, client_id, session_key, "connected")
            }
            PresenceChange::Disconnected { device, client_id, session_key, .. } => {
                (device, client_id, session_key, "disconnected")
            }
        };
        crate::model::events::ConnectionEvent {
            event_id: crate::model::events::ConnectionEvent::id_for(device, client_id, session_key, event, change.at()),
            event: event.to_string(),
            product_id: device.product.to_string(),
            device_id: device.device.to_string(),
            client_id: client_id.clone(),
            online: $online,
            connected_at: row.try_get("connected_at")?,
            disconnected_at: row.try_get("disconnected_at")?,
            reason: row.try_get("reason")?,
            ip_address: row.try_get("ip_address")?,
            proto_ver: row.try_get("proto_ver")?,
            keepalive: row.try_get("keepalive")?,
            clean_start: row.try_get("clean_start")?,
            node: row.try_get("node")?,
        }
        .into_bus_event(device)
    }};
}
pub(crate) use connection_event;

macro_rules! connection_row {
    ($row:expr) => {{
        use sqlx::Row;
        let r = $row;
        ConnectionRecord {
            client_id: r.try_get("client_id")?,
            connected_at: r.try_get("connected_at")?,
            disconnected_at: r.try_get("disconnected_at")?,
            reason: r.try_get("reason")?,
            ip_address: r.try_get("ip_address")?,
            proto_ver: r.try_get("proto_ver")?,
            keepalive: r.try_get("keepalive")?,
            clean_start: r.try_get("clean_start")?,
            node: r.try_get("node")?,
        }
    }};
}
pub(crate) use connection_row;

/// Rows of `(product_id, device_id)` as device references (rows that are not valid ids are skipped: the
/// registry never writes them).
pub(crate) fn active_set(rows: Vec<(String, String)>) -> std::collections::HashSet<crate::ids::DeviceRef> {
    rows.into_iter()
        .filter_map(|(p, d)| {
            Some(crate::ids::DeviceRef::new(
                crate::ids::ProductId::parse(p).ok()?,
                crate::ids::DeviceId::parse(d).ok()?,
            ))
        })
        .collect()
}

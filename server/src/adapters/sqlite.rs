//! SQLite store (embedded profile).
//!
//! SQLite allows one writer at a time, so writes go through a single-connection pool (serialised in
//! process, never `SQLITE_BUSY`), while reads use a separate pool over WAL. Same semantics as PostgreSQL.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::Row;

use super::active_set;
use super::conflict_or;
use super::{connection_event, connection_row, presence_sql};
use crate::error::{Error, Result};
use crate::ids::{DeviceId, DeviceRef, ProductId};
use crate::model::event_bus::BusEvent;
use crate::model::event_bus::EventKind;
use crate::model::store::*;
use crate::ports::store::*;
use crate::secrets::SecretHash;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

#[derive(Clone)]
pub struct SqliteStore {
    reader: SqlitePool,
    writer: SqlitePool,
}

impl SqliteStore {
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        if let Some(parent) = options.get_filename().parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)?;
            }
        }
        // A file connection cannot go stale: the ping sqlx sends before each acquire would only cost a
        // hop to the connection's thread and back.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .test_before_acquire(false)
            .connect_with(options.read_only(false))
            .await?;
        Ok(Self { reader, writer })
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    pub(crate) fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    pub(crate) fn reader(&self) -> &SqlitePool {
        &self.reader
    }
}

super::row_mappers!(SqliteRow);

const PRODUCT_COLUMNS: &str =
    "p.id, p.name, p.description, p.created_at, (SELECT COUNT(*) FROM devices d WHERE d.product_id = p.id) AS device_count";

#[async_trait]
impl Store for SqliteStore {
    #[tracing::instrument(skip(self), name = "sqlite.ping")]
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    #[tracing::instrument(skip(self, name, description), name = "sqlite.create_product")]
    async fn create_product(&self, id: &ProductId, name: &str, description: &str, now: i64) -> Result<bool> {
        let done = sqlx::query("INSERT INTO products (id, name, description, created_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (id) DO NOTHING")
            .bind(id.as_str())
            .bind(name)
            .bind(description)
            .bind(now)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(skip(self), name = "sqlite.get_product")]
    async fn get_product(&self, id: &ProductId) -> Result<Option<ProductRecord>> {
        let row = sqlx::query(&format!("SELECT {PRODUCT_COLUMNS} FROM products p WHERE p.id = ?1"))
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(product_row).transpose()
    }

    #[tracing::instrument(skip(self), name = "sqlite.list_products")]
    async fn list_products(&self, after: Option<&ProductId>, limit: u32) -> Result<Vec<ProductRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {PRODUCT_COLUMNS} FROM products p WHERE (?1 IS NULL OR p.id > ?1) ORDER BY p.id LIMIT ?2"
        ))
        .bind(after.map(|a| a.as_str()))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(product_row).collect()
    }

    #[tracing::instrument(skip(self), name = "sqlite.delete_product")]
    async fn delete_product(&self, id: &ProductId, force: bool) -> Result<ProductDelete> {
        // The single writer connection makes this read-decide-write sequence atomic.
        let mut tx = self.writer.begin().await?;
        let exists =
            sqlx::query("SELECT id FROM products WHERE id = ?1").bind(id.as_str()).fetch_optional(&mut *tx).await?;
        if exists.is_none() {
            return Ok(ProductDelete::NotFound);
        }
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE product_id = ?1")
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await?;
        if count > 0 && !force {
            return Ok(ProductDelete::HasDevices(count));
        }
        let usernames: Vec<String> =
            sqlx::query_scalar("DELETE FROM devices WHERE product_id = ?1 RETURNING broker_username")
                .bind(id.as_str())
                .fetch_all(&mut *tx)
                .await?;
        sqlx::query("DELETE FROM device_messages WHERE product_id = ?1").bind(id.as_str()).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM products WHERE id = ?1").bind(id.as_str()).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(ProductDelete::Deleted(usernames))
    }

    #[tracing::instrument(skip(self, devices), fields(count = devices.len()), name = "sqlite.insert_devices")]
    async fn insert_devices(&self, product: &ProductId, devices: &[NewDevice], now: i64) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let exists = sqlx::query("SELECT id FROM products WHERE id = ?1")
            .bind(product.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(Error::not_found("product", product));
        }
        for d in devices {
            let username = format!("{product}/{}", d.device);
            sqlx::query(
                "INSERT INTO devices (product_id, device_id, broker_username, status, created_at, updated_at)
                 VALUES (?1, ?2, ?3, 'active', ?4, ?4)",
            )
            .bind(product.as_str())
            .bind(d.device.as_str())
            .bind(&username)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| conflict_or(e, || format!("device `{username}` already exists")))?;
            sqlx::query("INSERT INTO device_credentials (broker_username, salt, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)")
                .bind(&username)
                .bind(&d.secret.salt)
                .bind(&d.secret.hash)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "sqlite.get_device")]
    async fn get_device(&self, device: &DeviceRef) -> Result<Option<DeviceRecord>> {
        let row = sqlx::query(
            "SELECT product_id, device_id, status, created_at, updated_at, online, last_seen_at FROM devices WHERE product_id = ?1 AND device_id = ?2",
        )
        .bind(device.product.as_str())
        .bind(device.device.as_str())
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(device_row).transpose()
    }

    #[tracing::instrument(skip(self, filter), name = "sqlite.list_devices")]
    async fn list_devices(&self, product: &ProductId, filter: &DeviceFilter) -> Result<Vec<DeviceRecord>> {
        let rows = sqlx::query(
            "SELECT product_id, device_id, status, created_at, updated_at, online, last_seen_at FROM devices
             WHERE product_id = ?1 AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR device_id > ?3)
               AND (?5 IS NULL OR online = ?5)
               AND (?6 IS NULL OR EXISTS (SELECT 1 FROM device_tags t WHERE t.product_id = devices.product_id
                    AND t.device_id = devices.device_id AND t.tag = ?6))
             ORDER BY device_id LIMIT ?4",
        )
        .bind(product.as_str())
        .bind(filter.status.as_ref().map(|s| s.as_str()))
        .bind(filter.after.as_ref().map(|a| a.as_str()))
        .bind(i64::from(filter.limit))
        .bind(filter.online)
        .bind(filter.tag.as_deref())
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(device_row).collect()
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "sqlite.set_device_status")]
    async fn set_device_status(&self, device: &DeviceRef, status: DeviceStatus, now: i64) -> Result<bool> {
        let done =
            sqlx::query("UPDATE devices SET status = ?3, updated_at = ?4 WHERE product_id = ?1 AND device_id = ?2")
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .bind(status.as_str())
                .bind(now)
                .execute(&self.writer)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "sqlite.delete_device")]
    async fn delete_device(&self, device: &DeviceRef) -> Result<bool> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("DELETE FROM devices WHERE product_id = ?1 AND device_id = ?2")
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM device_messages WHERE product_id = ?1 AND device_id = ?2")
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "sqlite.device_auth")]
    async fn device_auth(&self, device: &DeviceRef) -> Result<Option<DeviceAuthRecord>> {
        let rows = sqlx::query(
            "SELECT d.status, c.id, c.salt, c.password_hash, c.created_at, c.expires_at
             FROM devices d LEFT JOIN device_credentials c ON c.broker_username = d.broker_username
             WHERE d.broker_username = ?1 ORDER BY c.id DESC",
        )
        .bind(device.broker_username())
        .fetch_all(&self.reader)
        .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let status: String = first.try_get("status")?;
        let mut credentials = Vec::with_capacity(rows.len());
        for r in &rows {
            if r.try_get::<Option<i64>, _>("id")?.is_some() {
                credentials.push(credential_row(r)?);
            }
        }
        Ok(Some(DeviceAuthRecord {
            status: DeviceStatus::parse(&status).ok_or_else(|| anyhow::anyhow!("stored status {status}"))?,
            credentials,
        }))
    }

    #[tracing::instrument(skip(self, secret), fields(device = %device), name = "sqlite.rotate_credential")]
    async fn rotate_credential(
        &self,
        device: &DeviceRef,
        secret: &SecretHash,
        old_expires_at: i64,
        now: i64,
    ) -> Result<bool> {
        let username = device.broker_username();
        let mut tx = self.writer.begin().await?;
        let exists = sqlx::query("SELECT 1 FROM devices WHERE broker_username = ?1")
            .bind(&username)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(false);
        }
        sqlx::query(
            "DELETE FROM device_credentials WHERE broker_username = ?1 AND expires_at IS NOT NULL AND expires_at <= ?2",
        )
        .bind(&username)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE device_credentials SET expires_at = MIN(COALESCE(expires_at, ?2), ?2) WHERE broker_username = ?1",
        )
        .bind(&username)
        .bind(old_expires_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO device_credentials (broker_username, salt, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(&username)
        .bind(&secret.salt)
        .bind(&secret.hash)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "sqlite.list_credentials")]
    async fn list_credentials(&self, device: &DeviceRef) -> Result<Vec<CredentialRecord>> {
        let rows = sqlx::query(
            "SELECT id, salt, password_hash, created_at, expires_at FROM device_credentials WHERE broker_username = ?1 ORDER BY id DESC",
        )
        .bind(device.broker_username())
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(credential_row).collect()
    }

    #[tracing::instrument(skip(self, key), name = "sqlite.insert_api_key")]
    async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<()> {
        sqlx::query("INSERT INTO api_keys (id, name, key_hash, scopes, created_at) VALUES (?1, ?2, ?3, ?4, ?5)")
            .bind(&key.id)
            .bind(&key.name)
            .bind(&key.key_hash)
            .bind(key.scopes.join(","))
            .bind(key.created_at)
            .execute(&self.writer)
            .await
            .map_err(|e| conflict_or(e, || "api key id already exists".into()))?;
        Ok(())
    }

    #[tracing::instrument(skip(self), name = "sqlite.get_api_key")]
    async fn get_api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>> {
        let row = sqlx::query("SELECT id, name, key_hash, scopes, created_at, revoked_at FROM api_keys WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(api_key_row).transpose()
    }

    #[tracing::instrument(skip(self), name = "sqlite.list_api_keys")]
    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>> {
        let rows = sqlx::query(
            "SELECT id, name, key_hash, scopes, created_at, revoked_at FROM api_keys ORDER BY created_at, id",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(api_key_row).collect()
    }

    #[tracing::instrument(skip(self), name = "sqlite.revoke_api_key")]
    async fn revoke_api_key(&self, id: &str, now: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL")
            .bind(id)
            .bind(now)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(skip(self), name = "sqlite.count_api_keys")]
    async fn count_api_keys(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetch_one(&self.reader).await?)
    }

    #[tracing::instrument(skip_all, fields(devices = devices.len()), name = "sqlite.active_devices")]
    async fn active_devices(&self, devices: &[DeviceRef]) -> Result<std::collections::HashSet<DeviceRef>> {
        // One statement with a JSON array of [product, device] pairs (no per-device round trips).
        let pairs =
            serde_json::to_string(&devices.iter().map(|d| [d.product.as_str(), d.device.as_str()]).collect::<Vec<_>>())
                .expect("id pairs serialise");
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT d.product_id, d.device_id FROM devices d
             JOIN json_each(?1) j ON d.product_id = json_extract(j.value, '$[0]')
                                 AND d.device_id = json_extract(j.value, '$[1]')
             WHERE d.status = 'active'",
        )
        .bind(pairs)
        .fetch_all(&self.reader)
        .await?;
        Ok(active_set(rows))
    }

    #[tracing::instrument(skip(self, session), name = "sqlite.put_token_session")]
    async fn put_token_session(
        &self,
        client_id: &str,
        username: &str,
        session: &StoredTokenSession,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM mqtt_token_sessions WHERE expires_at < ?1").bind(now).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO mqtt_token_sessions (client_id, username, acl, expires_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (client_id, username) DO UPDATE SET acl = excluded.acl, expires_at = excluded.expires_at",
        )
        .bind(client_id)
        .bind(username)
        .bind(&session.acl_json)
        .bind(session.expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    #[tracing::instrument(skip(self), name = "sqlite.get_token_session")]
    async fn get_token_session(&self, client_id: &str, username: &str) -> Result<Option<StoredTokenSession>> {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT acl, expires_at FROM mqtt_token_sessions WHERE client_id = ?1 AND username = ?2")
                .bind(client_id)
                .bind(username)
                .fetch_optional(&self.reader)
                .await?;
        Ok(row.map(|(acl_json, expires_at)| StoredTokenSession { acl_json, expires_at }))
    }

    #[tracing::instrument(skip_all, name = "sqlite.ingest",
        fields(messages = batch.messages.len(), reports = batch.reports.len(), presence = batch.presence.len()))]
    async fn ingest(&self, batch: &IngestBatch, now: i64, lease_ms: i64) -> Result<IngestOutcome> {
        let mut out = IngestOutcome::default();
        let mut events: Vec<BusEvent> = Vec::new();
        let mut tx = self.writer.begin().await?;

        for msg in &batch.messages {
            let done = sqlx::query(
                "INSERT INTO device_messages
                     (product_id, device_id, message_id, data_type, payload, payload_json, sent_at, stored_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
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
            let done = sqlx::query(
                "INSERT INTO device_reports (product_id, device_id, kind, payload, message_id, reported_at)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6
                 WHERE EXISTS (SELECT 1 FROM devices v WHERE v.product_id = ?1 AND v.device_id = ?2)
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
            .execute(&mut *tx)
            .await?;
            out.reports_applied += done.rows_affected() as usize;
        }
        events.extend(batch.events.iter().cloned());

        for change in &batch.presence {
            let device = change.device();
            let exists = sqlx::query("SELECT 1 FROM devices WHERE product_id = ?1 AND device_id = ?2")
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                continue;
            }
            let merged = match change {
                PresenceChange::Connected {
                    client_id,
                    session_key,
                    connected_at,
                    ip_address,
                    proto_ver,
                    keepalive,
                    clean_start,
                    node,
                    ..
                } => {
                    sqlx::query(&SQL.prune)
                        .bind(device.product.as_str())
                        .bind(device.device.as_str())
                        .bind(connected_at - presence_sql::RETENTION_MS)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(&SQL.connected)
                        .bind(device.product.as_str())
                        .bind(device.device.as_str())
                        .bind(client_id)
                        .bind(session_key)
                        .bind(connected_at)
                        .bind(ip_address)
                        .bind(proto_ver)
                        .bind(keepalive)
                        .bind(clean_start)
                        .bind(node)
                        .fetch_optional(&mut *tx)
                        .await?
                }
                PresenceChange::Disconnected {
                    client_id,
                    session_key,
                    connected_at,
                    disconnected_at,
                    reason,
                    ip_address,
                    node,
                    ..
                } => {
                    sqlx::query(&SQL.disconnected)
                        .bind(device.product.as_str())
                        .bind(device.device.as_str())
                        .bind(client_id)
                        .bind(session_key)
                        .bind(connected_at)
                        .bind(disconnected_at)
                        .bind(reason)
                        .bind(ip_address)
                        .bind(node)
                        .fetch_optional(&mut *tx)
                        .await?
                }
            };
            let Some(merged) = merged else { continue };
            let online: bool = sqlx::query_scalar(&SQL.recompute)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .bind(change.at())
                .fetch_one(&mut *tx)
                .await?;
            out.presence_applied += 1;
            events.push(connection_event!(change, &merged, online));
        }

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
            .fetch_one(&mut *tx)
            .await?;
            out.outbox.push(OutboxRecord { id, event });
        }
        tx.commit().await?;
        Ok(out)
    }

    #[tracing::instrument(skip(self), name = "sqlite.outbox_lease")]
    async fn outbox_lease(&self, limit: u32, now: i64, lease_ms: i64) -> Result<Vec<OutboxRecord>> {
        let rows = sqlx::query(
            "UPDATE event_outbox SET leased_until = ?1 WHERE id IN (
                 SELECT id FROM event_outbox WHERE leased_until < ?2 ORDER BY id LIMIT ?3)
             RETURNING id, kind, routing_key, event_id, body",
        )
        .bind(now + lease_ms)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.writer)
        .await?;
        let mut records = rows.iter().map(outbox_row).collect::<Result<Vec<_>>>()?;
        records.sort_by_key(|r| r.id);
        Ok(records)
    }

    #[tracing::instrument(skip(self), name = "sqlite.prune_messages")]
    async fn prune_messages(&self, before: i64, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM device_messages
             WHERE rowid IN (SELECT rowid FROM device_messages WHERE sent_at < ?1 LIMIT ?2)",
        )
        .bind(before)
        .bind(limit as i64)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    #[tracing::instrument(skip_all, fields(count = ids.len()), name = "sqlite.outbox_ack")]
    async fn outbox_ack(&self, ids: &[i64]) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        for id in ids {
            sqlx::query("DELETE FROM event_outbox WHERE id = ?1").bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(count = ids.len()), name = "sqlite.outbox_release")]
    async fn outbox_release(&self, ids: &[i64]) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        for id in ids {
            sqlx::query("UPDATE event_outbox SET leased_until = 0 WHERE id = ?1").bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    #[tracing::instrument(skip(self), name = "sqlite.outbox_len")]
    async fn outbox_len(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM event_outbox").fetch_one(&self.reader).await?)
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "sqlite.list_connections")]
    async fn list_connections(&self, device: &DeviceRef, limit: u32) -> Result<Vec<ConnectionRecord>> {
        let rows = sqlx::query(&SQL.list)
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(|r| Ok(connection_row!(r))).collect()
    }

    #[tracing::instrument(skip(self), name = "sqlite.count_online")]
    async fn count_online(&self, product: &ProductId) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE product_id = ?1 AND online")
            .bind(product.as_str())
            .fetch_one(&self.reader)
            .await?)
    }

    #[tracing::instrument(skip(self, filter), fields(device = %device), name = "sqlite.list_messages")]
    async fn list_messages(&self, device: &DeviceRef, filter: &MessageFilter) -> Result<Vec<MessageRecord>> {
        let (after_at, after_id) = filter.after.clone().unzip();
        let rows = sqlx::query(
            "SELECT message_id, data_type, payload, sent_at, stored_at FROM device_messages
             WHERE product_id = ?1 AND device_id = ?2
               AND (?3 IS NULL OR data_type = ?3)
               AND (?4 IS NULL OR sent_at >= ?4)
               AND (?5 IS NULL OR sent_at < ?5)
               AND (?6 IS NULL OR (sent_at, message_id) > (?6, ?7))
             ORDER BY sent_at, message_id LIMIT ?8",
        )
        .bind(device.product.as_str())
        .bind(device.device.as_str())
        .bind(filter.data_type.as_deref())
        .bind(filter.from)
        .bind(filter.to)
        .bind(after_at)
        .bind(after_id)
        .bind(i64::from(filter.limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(message_row).collect()
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "sqlite.get_message")]
    async fn get_message(&self, device: &DeviceRef, message_id: &str) -> Result<Option<MessageRecord>> {
        let row = sqlx::query(
            "SELECT message_id, data_type, payload, sent_at, stored_at FROM device_messages
             WHERE product_id = ?1 AND device_id = ?2 AND message_id = ?3",
        )
        .bind(device.product.as_str())
        .bind(device.device.as_str())
        .bind(message_id)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(message_row).transpose()
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "sqlite.get_report")]
    async fn get_report(&self, device: &DeviceRef, kind: ReportKind) -> Result<Option<ReportRecord>> {
        let row = sqlx::query(
            "SELECT message_id, payload, reported_at FROM device_reports
             WHERE product_id = ?1 AND device_id = ?2 AND kind = ?3",
        )
        .bind(device.product.as_str())
        .bind(device.device.as_str())
        .bind(kind.as_str())
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(report_row).transpose()
    }
}

/// The shared presence SQL with SQLite's `?n` placeholders.
struct PresenceSql {
    connected: String,
    disconnected: String,
    prune: String,
    recompute: String,
    list: String,
}

static SQL: std::sync::LazyLock<PresenceSql> = std::sync::LazyLock::new(|| {
    let q = |s: &str| s.replace('$', "?");
    PresenceSql {
        connected: q(presence_sql::CONNECTED),
        disconnected: q(presence_sql::DISCONNECTED),
        prune: q(&format!(
            "DELETE FROM device_connections AS c WHERE c.product_id = $1 AND c.device_id = $2 AND {}",
            presence_sql::PRUNABLE.replace("$before", "$3")
        )),
        recompute: q(presence_sql::RECOMPUTE),
        list: q(presence_sql::LIST),
    }
});

fn outbox_row(r: &SqliteRow) -> Result<OutboxRecord> {
    let kind: String = r.try_get("kind")?;
    Ok(OutboxRecord {
        id: r.try_get("id")?,
        event: BusEvent {
            kind: EventKind::parse(&kind).ok_or_else(|| anyhow::anyhow!("stored event kind {kind}"))?,
            routing_key: r.try_get("routing_key")?,
            event_id: r.try_get("event_id")?,
            body: r.try_get("body")?,
        },
    })
}

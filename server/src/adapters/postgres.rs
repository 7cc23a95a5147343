//! PostgreSQL store (production profile).
//!
//! Bulk registration uses `UNNEST` arrays so thousands of devices are one round trip per table, inside one
//! transaction. The schema also carries the `mqtt_user` / `mqtt_acl` views EMQX 5 reads directly.

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions};
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

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Sessions with `synchronous_commit = off`, for writes whose loss in a database crash costs only a
    /// repetition (see [`crate::model::commands::Durability`]): no fsync wait, no extra round trip.
    relaxed: PgPool,
}

/// A connection that was just in use is handed out as it is; one idle for longer is pinged first, so a
/// database restart or a dropped idle connection costs no request an error. (sqlx's default pings before
/// every acquire: one extra round trip per statement, a quarter of an RPC's time in the database.)
fn pool_options(max_connections: u32) -> PgPoolOptions {
    const PING_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_AFTER_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        let pool = pool_options(max_connections).connect(url).await?;
        let options: sqlx::postgres::PgConnectOptions = url.parse()?;
        // The relaxed pool carries RPC inserts and command bookkeeping: statements that find rows by key
        // (set-based ones run with `enable_seqscan = off`). Left to choose, PostgreSQL re-plans the group
        // insert for every RPC (its one-row custom plan looks cheaper than the generic one), and planning
        // that statement costs twice its execution (~0.5 ms of every RPC); here the generic plan is kept.
        let relaxed = pool_options((max_connections / 4).max(2)).connect_lazy_with(
            options.options([("synchronous_commit", "off"), ("plan_cache_mode", "force_generic_plan")]),
        );
        Ok(Self { pool, relaxed })
    }

    /// The pool whose sessions commit with the given durability.
    pub fn pool_for(&self, durability: crate::model::commands::Durability) -> &PgPool {
        match durability {
            crate::model::commands::Durability::Required => &self.pool,
            crate::model::commands::Durability::Relaxed => &self.relaxed,
        }
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

super::row_mappers!(sqlx::postgres::PgRow);

const PRODUCT_COLUMNS: &str =
    "p.id, p.name, p.description, p.created_at, (SELECT COUNT(*) FROM devices d WHERE d.product_id = p.id) AS device_count";

#[async_trait]
impl Store for PgStore {
    #[tracing::instrument(skip(self), name = "pg.ping")]
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    #[tracing::instrument(skip(self, name, description), name = "pg.create_product")]
    async fn create_product(&self, id: &ProductId, name: &str, description: &str, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO products (id, name, description, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(name)
        .bind(description)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(skip(self), name = "pg.get_product")]
    async fn get_product(&self, id: &ProductId) -> Result<Option<ProductRecord>> {
        let row = sqlx::query(&format!("SELECT {PRODUCT_COLUMNS} FROM products p WHERE p.id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(product_row).transpose()
    }

    #[tracing::instrument(skip(self), name = "pg.list_products")]
    async fn list_products(&self, after: Option<&ProductId>, limit: u32) -> Result<Vec<ProductRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {PRODUCT_COLUMNS} FROM products p WHERE ($1::TEXT IS NULL OR p.id > $1) ORDER BY p.id LIMIT $2"
        ))
        .bind(after.map(|a| a.as_str()))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(product_row).collect()
    }

    #[tracing::instrument(skip(self), name = "pg.delete_product")]
    async fn delete_product(&self, id: &ProductId, force: bool) -> Result<ProductDelete> {
        let mut tx = self.pool.begin().await?;
        // Lock the product row so no device can be registered into it while we decide.
        let exists = sqlx::query("SELECT id FROM products WHERE id = $1 FOR UPDATE")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(ProductDelete::NotFound);
        }
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE product_id = $1")
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await?;
        if count > 0 && !force {
            return Ok(ProductDelete::HasDevices(count));
        }
        let usernames: Vec<String> =
            sqlx::query_scalar("DELETE FROM devices WHERE product_id = $1 RETURNING broker_username")
                .bind(id.as_str())
                .fetch_all(&mut *tx)
                .await?;
        sqlx::query("DELETE FROM device_messages WHERE product_id = $1").bind(id.as_str()).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM products WHERE id = $1").bind(id.as_str()).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(ProductDelete::Deleted(usernames))
    }

    #[tracing::instrument(skip(self, devices), fields(count = devices.len()), name = "pg.insert_devices")]
    async fn insert_devices(&self, product: &ProductId, devices: &[NewDevice], now: i64) -> Result<()> {
        let ids: Vec<&str> = devices.iter().map(|d| d.device.as_str()).collect();
        let usernames: Vec<String> = devices.iter().map(|d| format!("{product}/{}", d.device)).collect();
        let salts: Vec<&str> = devices.iter().map(|d| d.secret.salt.as_str()).collect();
        let hashes: Vec<&str> = devices.iter().map(|d| d.secret.hash.as_str()).collect();
        let mut tx = self.pool.begin().await?;
        // Share-lock the product so a concurrent forced delete cannot interleave.
        let exists = sqlx::query("SELECT id FROM products WHERE id = $1 FOR SHARE")
            .bind(product.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(Error::not_found("product", product));
        }
        let inserted = sqlx::query(
            "INSERT INTO devices (product_id, device_id, broker_username, status, created_at, updated_at)
             SELECT $1, d, u, 'active', $4, $4 FROM UNNEST($2::TEXT[], $3::TEXT[]) AS t(d, u)
             ON CONFLICT DO NOTHING",
        )
        .bind(product.as_str())
        .bind(&ids)
        .bind(&usernames)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| conflict_or(e, || "device id already exists".into()))?;
        if inserted.rows_affected() != devices.len() as u64 {
            // Name one taken id; the transaction is dropped, so nothing was written.
            let taken: Option<String> = sqlx::query_scalar(
                "SELECT device_id FROM devices WHERE product_id = $1 AND device_id = ANY($2::TEXT[]) LIMIT 1",
            )
            .bind(product.as_str())
            .bind(&ids)
            .fetch_optional(&self.pool)
            .await?;
            return Err(match taken {
                Some(id) => Error::Conflict(format!("device `{product}/{id}` already exists")),
                None => Error::Conflict("device ids must be unique within the request".into()),
            });
        }
        sqlx::query(
            "INSERT INTO device_credentials (broker_username, salt, password_hash, created_at)
             SELECT u, s, h, $4 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[]) AS t(u, s, h)",
        )
        .bind(&usernames)
        .bind(&salts)
        .bind(&hashes)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "pg.get_device")]
    async fn get_device(&self, device: &DeviceRef) -> Result<Option<DeviceRecord>> {
        let row = sqlx::query(
            "SELECT product_id, device_id, status, created_at, updated_at, online, last_seen_at FROM devices WHERE product_id = $1 AND device_id = $2",
        )
        .bind(device.product.as_str())
        .bind(device.device.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(device_row).transpose()
    }

    #[tracing::instrument(skip(self, filter), name = "pg.list_devices")]
    async fn list_devices(&self, product: &ProductId, filter: &DeviceFilter) -> Result<Vec<DeviceRecord>> {
        let rows = sqlx::query(
            "SELECT product_id, device_id, status, created_at, updated_at, online, last_seen_at FROM devices
             WHERE product_id = $1 AND ($2::TEXT IS NULL OR status = $2) AND ($3::TEXT IS NULL OR device_id > $3)
               AND ($5::BOOLEAN IS NULL OR online = $5)
               AND ($6::TEXT IS NULL OR EXISTS (SELECT 1 FROM device_tags t WHERE t.product_id = devices.product_id
                    AND t.device_id = devices.device_id AND t.tag = $6))
             ORDER BY device_id LIMIT $4",
        )
        .bind(product.as_str())
        .bind(filter.status.as_ref().map(|s| s.as_str()))
        .bind(filter.after.as_ref().map(|a| a.as_str()))
        .bind(i64::from(filter.limit))
        .bind(filter.online)
        .bind(filter.tag.as_deref())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(device_row).collect()
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "pg.set_device_status")]
    async fn set_device_status(&self, device: &DeviceRef, status: DeviceStatus, now: i64) -> Result<bool> {
        let done =
            sqlx::query("UPDATE devices SET status = $3, updated_at = $4 WHERE product_id = $1 AND device_id = $2")
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .bind(status.as_str())
                .bind(now)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "pg.delete_device")]
    async fn delete_device(&self, device: &DeviceRef) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM devices WHERE product_id = $1 AND device_id = $2")
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM device_messages WHERE product_id = $1 AND device_id = $2")
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "pg.device_auth")]
    async fn device_auth(&self, device: &DeviceRef) -> Result<Option<DeviceAuthRecord>> {
        let rows = sqlx::query(
            "SELECT d.status, c.id, c.salt, c.password_hash, c.created_at, c.expires_at
             FROM devices d LEFT JOIN device_credentials c ON c.broker_username = d.broker_username
             WHERE d.broker_username = $1 ORDER BY c.id DESC",
        )
        .bind(device.broker_username())
        .fetch_all(&self.pool)
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

    #[tracing::instrument(skip(self, secret), fields(device = %device), name = "pg.rotate_credential")]
    async fn rotate_credential(
        &self,
        device: &DeviceRef,
        secret: &SecretHash,
        old_expires_at: i64,
        now: i64,
    ) -> Result<bool> {
        let username = device.broker_username();
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query("SELECT 1 FROM devices WHERE broker_username = $1 FOR UPDATE")
            .bind(&username)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(false);
        }
        sqlx::query(
            "DELETE FROM device_credentials WHERE broker_username = $1 AND expires_at IS NOT NULL AND expires_at <= $2",
        )
        .bind(&username)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE device_credentials SET expires_at = LEAST(COALESCE(expires_at, $2), $2) WHERE broker_username = $1",
        )
        .bind(&username)
        .bind(old_expires_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO device_credentials (broker_username, salt, password_hash, created_at) VALUES ($1, $2, $3, $4)",
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

    #[tracing::instrument(skip(self), fields(device = %device), name = "pg.list_credentials")]
    async fn list_credentials(&self, device: &DeviceRef) -> Result<Vec<CredentialRecord>> {
        let rows = sqlx::query(
            "SELECT id, salt, password_hash, created_at, expires_at FROM device_credentials WHERE broker_username = $1 ORDER BY id DESC",
        )
        .bind(device.broker_username())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(credential_row).collect()
    }

    #[tracing::instrument(skip(self, key), name = "pg.insert_api_key")]
    async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<()> {
        sqlx::query("INSERT INTO api_keys (id, name, key_hash, scopes, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&key.id)
            .bind(&key.name)
            .bind(&key.key_hash)
            .bind(key.scopes.join(","))
            .bind(key.created_at)
            .execute(&self.pool)
            .await
            .map_err(|e| conflict_or(e, || "api key id already exists".into()))?;
        Ok(())
    }

    #[tracing::instrument(skip(self), name = "pg.get_api_key")]
    async fn get_api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>> {
        let row = sqlx::query("SELECT id, name, key_hash, scopes, created_at, revoked_at FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(api_key_row).transpose()
    }

    #[tracing::instrument(skip(self), name = "pg.list_api_keys")]
    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>> {
        let rows = sqlx::query(
            "SELECT id, name, key_hash, scopes, created_at, revoked_at FROM api_keys ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(api_key_row).collect()
    }

    #[tracing::instrument(skip(self), name = "pg.revoke_api_key")]
    async fn revoke_api_key(&self, id: &str, now: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(skip(self), name = "pg.count_api_keys")]
    async fn count_api_keys(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetch_one(&self.pool).await?)
    }

    #[tracing::instrument(skip_all, fields(devices = devices.len()), name = "pg.active_devices")]
    async fn active_devices(&self, devices: &[DeviceRef]) -> Result<std::collections::HashSet<DeviceRef>> {
        let (products, ids): (Vec<&str>, Vec<&str>) =
            devices.iter().map(|d| (d.product.as_str(), d.device.as_str())).unzip();
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT product_id, device_id FROM devices
             WHERE status = 'active' AND (product_id, device_id) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
        )
        .bind(&products)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(active_set(rows))
    }

    #[tracing::instrument(skip(self, session), name = "pg.put_token_session")]
    async fn put_token_session(
        &self,
        client_id: &str,
        username: &str,
        session: &StoredTokenSession,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM mqtt_token_sessions WHERE expires_at < $1").bind(now).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO mqtt_token_sessions (client_id, username, acl, expires_at) VALUES ($1, $2, $3, $4) \
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

    #[tracing::instrument(skip(self), name = "pg.get_token_session")]
    async fn get_token_session(&self, client_id: &str, username: &str) -> Result<Option<StoredTokenSession>> {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT acl, expires_at FROM mqtt_token_sessions WHERE client_id = $1 AND username = $2")
                .bind(client_id)
                .bind(username)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(acl_json, expires_at)| StoredTokenSession { acl_json, expires_at }))
    }

    #[tracing::instrument(skip_all, name = "pg.ingest",
        fields(messages = batch.messages.len(), reports = batch.reports.len(), presence = batch.presence.len()))]
    async fn ingest(&self, batch: &IngestBatch, now: i64, lease_ms: i64) -> Result<IngestOutcome> {
        let mut attempt = 0;
        loop {
            match self.ingest_once(batch, now, lease_ms).await {
                // Another instance touching the same devices in a different order: run the batch again.
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

    // The outbox is a queue: between vacuums its file swings from one page to thousands of dead rows. A
    // plan cached while it was small scans the whole file for every statement (seen: 5 ms to delete 20
    // rows, a third of PostgreSQL's time in the command benchmark), so outbox statements are unnamed and
    // planned against the table's current size each time.
    #[tracing::instrument(skip(self), name = "pg.outbox_lease")]
    async fn outbox_lease(&self, limit: u32, now: i64, lease_ms: i64) -> Result<Vec<OutboxRecord>> {
        let rows = sqlx::query(
            "UPDATE event_outbox SET leased_until = $1 WHERE id IN (
                 SELECT id FROM event_outbox WHERE leased_until < $2 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
             RETURNING id, kind, routing_key, event_id, body",
        )
        .persistent(false)
        .bind(now + lease_ms)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut records = rows.iter().map(outbox_row).collect::<Result<Vec<_>>>()?;
        records.sort_by_key(|r| r.id);
        Ok(records)
    }

    #[tracing::instrument(skip(self), name = "pg.prune_messages")]
    async fn prune_messages(&self, before: i64, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            // By row address: the batch is found through the BRIN index on sent_at and deleted without a
            // join (which the planner likes to make a scan of the whole table). Messages are never
            // updated, so an address cannot move under us.
            "DELETE FROM device_messages
             WHERE ctid = ANY(ARRAY(SELECT ctid FROM device_messages WHERE sent_at < $1 LIMIT $2))",
        )
        // Planned with the actual cutoff every time: a cached generic plan guesses a third of the table
        // matches and prefers a sequential scan, which reads the whole table once nothing is old.
        .persistent(false)
        .bind(before)
        .bind(limit as i64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    #[tracing::instrument(skip_all, fields(count = ids.len()), name = "pg.outbox_ack")]
    async fn outbox_ack(&self, ids: &[i64]) -> Result<()> {
        // Published and confirmed: an ack lost in a database crash only publishes those events again
        // (consumers drop duplicates by event id), so it need not wait for fsync.
        sqlx::query("DELETE FROM event_outbox WHERE id = ANY($1)")
            .persistent(false)
            .bind(ids)
            .execute(&self.relaxed)
            .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(count = ids.len()), name = "pg.outbox_release")]
    async fn outbox_release(&self, ids: &[i64]) -> Result<()> {
        sqlx::query("UPDATE event_outbox SET leased_until = 0 WHERE id = ANY($1)")
            .persistent(false)
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    #[tracing::instrument(skip(self), name = "pg.outbox_len")]
    async fn outbox_len(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM event_outbox").fetch_one(&self.pool).await?)
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "pg.list_connections")]
    async fn list_connections(&self, device: &DeviceRef, limit: u32) -> Result<Vec<ConnectionRecord>> {
        let rows = sqlx::query(presence_sql::LIST)
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(connection_row!(r))).collect()
    }

    #[tracing::instrument(skip(self), name = "pg.count_online")]
    async fn count_online(&self, product: &ProductId) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE product_id = $1 AND online")
            .bind(product.as_str())
            .fetch_one(&self.pool)
            .await?)
    }

    #[tracing::instrument(skip(self, filter), fields(device = %device), name = "pg.list_messages")]
    async fn list_messages(&self, device: &DeviceRef, filter: &MessageFilter) -> Result<Vec<MessageRecord>> {
        let (after_at, after_id) = filter.after.clone().unzip();
        let rows = sqlx::query(
            "SELECT message_id, data_type, payload, sent_at, stored_at FROM device_messages
             WHERE product_id = $1 AND device_id = $2
               AND ($3::TEXT IS NULL OR data_type = $3)
               AND ($4::BIGINT IS NULL OR sent_at >= $4)
               AND ($5::BIGINT IS NULL OR sent_at < $5)
               AND ($6::BIGINT IS NULL OR (sent_at, message_id) > ($6, $7::TEXT))
             ORDER BY sent_at, message_id LIMIT $8",
        )
        .bind(device.product.as_str())
        .bind(device.device.as_str())
        .bind(filter.data_type.as_deref())
        .bind(filter.from)
        .bind(filter.to)
        .bind(after_at)
        .bind(after_id)
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(message_row).collect()
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "pg.get_message")]
    async fn get_message(&self, device: &DeviceRef, message_id: &str) -> Result<Option<MessageRecord>> {
        let row = sqlx::query(
            "SELECT message_id, data_type, payload, sent_at, stored_at FROM device_messages
             WHERE product_id = $1 AND device_id = $2 AND message_id = $3",
        )
        .bind(device.product.as_str())
        .bind(device.device.as_str())
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(message_row).transpose()
    }

    #[tracing::instrument(skip(self), fields(device = %device), name = "pg.get_report")]
    async fn get_report(&self, device: &DeviceRef, kind: ReportKind) -> Result<Option<ReportRecord>> {
        let row = sqlx::query(
            "SELECT message_id, payload::TEXT AS payload, reported_at FROM device_reports
             WHERE product_id = $1 AND device_id = $2 AND kind = $3",
        )
        .bind(device.product.as_str())
        .bind(device.device.as_str())
        .bind(kind.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(report_row).transpose()
    }
}

impl PgStore {
    async fn ingest_once(
        &self,
        batch: &IngestBatch,
        now: i64,
        lease_ms: i64,
    ) -> std::result::Result<IngestOutcome, sqlx::Error> {
        let mut out = IngestOutcome::default();
        let mut events: Vec<BusEvent> = Vec::new();
        let mut tx = self.pool.begin().await?;

        if !batch.messages.is_empty() {
            let m = &batch.messages;
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
            .fetch_all(&mut *tx)
            .await?;
            let fresh: std::collections::HashSet<(&str, &str, &str)> =
                inserted.iter().map(|(p, d, m)| (p.as_str(), d.as_str(), m.as_str())).collect();
            for msg in m {
                if fresh.contains(&(msg.device.product.as_str(), msg.device.device.as_str(), msg.message_id.as_str())) {
                    out.messages_stored += 1;
                    events.push(msg.event.clone());
                } else {
                    out.messages_duplicate += 1;
                }
            }
        }

        // Lock every device the group's reports and presence changes touch, in one statement and one global
        // order, before writing any of them: each presence recompute must see every session another
        // transaction added, and neither concurrent groups nor a device deletion can deadlock with us (the
        // deletion waits). Devices that no longer exist are skipped. Then prune once per device, relative to
        // its oldest connect in the group (broker time).
        let mut locked: Vec<(String, String)> = Vec::new();
        let mut oldest_connect: std::collections::BTreeMap<(&str, &str), i64> = std::collections::BTreeMap::new();
        if !batch.presence.is_empty() || !batch.reports.is_empty() {
            let mut devices: std::collections::BTreeSet<(&str, &str)> = std::collections::BTreeSet::new();
            for report in &batch.reports {
                devices.insert((report.device.product.as_str(), report.device.device.as_str()));
            }
            for change in &batch.presence {
                let d = change.device();
                let key = (d.product.as_str(), d.device.as_str());
                devices.insert(key);
                if let PresenceChange::Connected { connected_at, .. } = change {
                    let slot = oldest_connect.entry(key).or_insert(*connected_at);
                    *slot = (*slot).min(*connected_at);
                }
            }
            locked = sqlx::query_as(
                "SELECT d.product_id, d.device_id FROM devices d
                 JOIN UNNEST($1::TEXT[], $2::TEXT[]) AS u(p, i) ON d.product_id = u.p AND d.device_id = u.i
                 ORDER BY d.product_id, d.device_id
                 FOR NO KEY UPDATE OF d",
            )
            .bind(devices.iter().map(|k| k.0).collect::<Vec<_>>())
            .bind(devices.iter().map(|k| k.1).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
        }
        let present: std::collections::HashSet<(&str, &str)> =
            locked.iter().map(|(p, d)| (p.as_str(), d.as_str())).collect();
        let is_present = |d: &DeviceRef| present.contains(&(d.product.as_str(), d.device.as_str()));

        let r: Vec<&NewReport> = batch.reports.iter().filter(|x| is_present(&x.device)).collect();
        if !r.is_empty() {
            let done = sqlx::query(
                "INSERT INTO device_reports (product_id, device_id, kind, payload, message_id, reported_at)
                 SELECT u.p, u.d, u.k, u.j::JSONB, u.m, u.r
                 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::BIGINT[]) AS u(p, d, k, j, m, r)
                 WHERE EXISTS (SELECT 1 FROM devices v WHERE v.product_id = u.p AND v.device_id = u.d)
                 ON CONFLICT (product_id, device_id, kind) DO UPDATE SET
                     payload = EXCLUDED.payload, message_id = EXCLUDED.message_id, reported_at = EXCLUDED.reported_at
                 WHERE device_reports.reported_at <= EXCLUDED.reported_at",
            )
            .bind(r.iter().map(|x| x.device.product.as_str()).collect::<Vec<_>>())
            .bind(r.iter().map(|x| x.device.device.as_str()).collect::<Vec<_>>())
            .bind(r.iter().map(|x| x.kind.as_str()).collect::<Vec<_>>())
            .bind(r.iter().map(|x| x.payload_json.as_str()).collect::<Vec<_>>())
            .bind(r.iter().map(|x| x.message_id.as_str()).collect::<Vec<_>>())
            .bind(r.iter().map(|x| x.reported_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
            out.reports_applied = done.rows_affected() as usize;
        }
        events.extend(batch.events.iter().cloned());

        if !oldest_connect.is_empty() {
            sqlx::query(&format!(
                "DELETE FROM device_connections c
                 USING UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[]) AS u(p, i, before)
                 WHERE c.product_id = u.p AND c.device_id = u.i AND {}",
                presence_sql::PRUNABLE.replace("$before", "u.before")
            ))
            .bind(oldest_connect.keys().map(|k| k.0).collect::<Vec<_>>())
            .bind(oldest_connect.keys().map(|k| k.1).collect::<Vec<_>>())
            .bind(oldest_connect.values().map(|t| t - presence_sql::RETENTION_MS).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        // One round trip for all of the group's changes (migrations/postgres/0009_presence_per_device.sql),
        // ordered by device (stable: a device's changes keep their order) so the function writes each
        // device's row once. Ingest hands them over sorted already; the store does not rely on it, and
        // their events go out in the order the changes were given.
        let mut changes: Vec<(usize, &PresenceChange)> =
            batch.presence.iter().filter(|c| is_present(c.device())).enumerate().collect();
        changes.sort_by(|a, b| {
            let (x, y) = (a.1.device(), b.1.device());
            (x.product.as_str(), x.device.as_str()).cmp(&(y.product.as_str(), y.device.as_str()))
        });
        if !changes.is_empty() {
            let mut cols = PresenceColumns::default();
            for (_, change) in &changes {
                cols.push(change);
            }
            let rows = sqlx::query(
                "SELECT * FROM iothub_apply_presence($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            )
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
            .fetch_all(&mut *tx)
            .await?;
            let mut applied = Vec::with_capacity(rows.len());
            for row in &rows {
                let ord: i32 = row.try_get("ord")?;
                let (arrival, change) = changes[(ord - 1) as usize];
                let online: bool = row.try_get("online")?;
                applied.push((arrival, connection_event!(change, row, online)));
            }
            applied.sort_by_key(|(arrival, _)| *arrival);
            out.presence_applied += applied.len();
            events.extend(applied.into_iter().map(|(_, event)| event));
        }

        if !events.is_empty() {
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
            .fetch_all(&mut *tx)
            .await?;
            out.outbox = pair_outbox_ids(events, ids);
        }
        tx.commit().await?;
        Ok(out)
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
        match change {
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
                self.clients.push(client_id.clone());
                self.keys.push(session_key.clone());
                self.is_connect.push(true);
                self.connected_at.push(Some(*connected_at));
                self.disconnected_at.push(None);
                self.reasons.push(None);
                self.ips.push(ip_address.clone());
                self.protos.push(*proto_ver);
                self.keepalives.push(Some(*keepalive));
                self.cleans.push(*clean_start);
                self.nodes.push(node.clone());
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
                self.clients.push(client_id.clone());
                self.keys.push(session_key.clone());
                self.is_connect.push(false);
                self.connected_at.push(*connected_at);
                self.disconnected_at.push(Some(*disconnected_at));
                self.reasons.push(Some(reason.clone()));
                self.ips.push(ip_address.clone());
                self.protos.push(None);
                self.keepalives.push(None);
                self.cleans.push(None);
                self.nodes.push(node.clone());
            }
        }
    }
}

/// Matches returned outbox ids to events by event id (events with equal ids are the same fact).
pub(crate) fn pair_outbox_ids(events: Vec<BusEvent>, ids: Vec<(i64, String)>) -> Vec<OutboxRecord> {
    let mut by_id: std::collections::HashMap<String, Vec<BusEvent>> = std::collections::HashMap::new();
    for e in events {
        by_id.entry(e.event_id.clone()).or_default().push(e);
    }
    let mut out: Vec<OutboxRecord> = ids
        .into_iter()
        .filter_map(|(id, event_id)| {
            by_id.get_mut(&event_id).and_then(Vec::pop).map(|event| OutboxRecord { id, event })
        })
        .collect();
    out.sort_by_key(|r| r.id);
    out
}

fn outbox_row(r: &sqlx::postgres::PgRow) -> Result<OutboxRecord> {
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

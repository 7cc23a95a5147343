//! PostgreSQL store (production profile).
//!
//! Bulk registration uses `UNNEST` arrays so thousands of devices are one round trip per table, inside one
//! transaction. The schema also carries the `mqtt_user` / `mqtt_acl` views EMQX 5 reads directly.

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;

use super::conflict_or;
use crate::error::{Error, Result};
use crate::ids::{DeviceId, DeviceRef, ProductId};
use crate::ports::store::*;
use crate::secrets::SecretHash;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await?;
        Ok(Self { pool })
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
            "SELECT product_id, device_id, status, created_at, updated_at FROM devices WHERE product_id = $1 AND device_id = $2",
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
            "SELECT product_id, device_id, status, created_at, updated_at FROM devices
             WHERE product_id = $1 AND ($2::TEXT IS NULL OR status = $2) AND ($3::TEXT IS NULL OR device_id > $3)
             ORDER BY device_id LIMIT $4",
        )
        .bind(product.as_str())
        .bind(filter.status.as_ref().map(|s| s.as_str()))
        .bind(filter.after.as_ref().map(|a| a.as_str()))
        .bind(i64::from(filter.limit))
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
        let done = sqlx::query("DELETE FROM devices WHERE product_id = $1 AND device_id = $2")
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .execute(&self.pool)
            .await?;
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
}

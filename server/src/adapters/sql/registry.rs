//! The registry: products, devices, their credentials, API keys and token-client grants
//! ([`RegistryStore`]). Every multi-row change is one transaction, so a failed bulk registration writes
//! nothing. PostgreSQL registers a bulk in one `UNNEST` statement per table and locks the rows it decides
//! on; SQLite inserts row by row on its single writer, which already serialises the decisions.

use async_trait::async_trait;
use sqlx::Row;

use super::{conflict_or, for_each_backend, stored, stored_device, PgStore, SqliteStore};
use crate::error::{Error, Result};
use crate::ids::{DeviceRef, ProductId};
use crate::model::store::*;
use crate::ports::store::RegistryStore;
use crate::secrets::SecretHash;

const PRODUCT_COLUMNS: &str =
    "p.id, p.name, p.description, p.created_at, (SELECT COUNT(*) FROM devices d WHERE d.product_id = p.id) AS device_count";
const DEVICE_COLUMNS: &str = "product_id, device_id, status, created_at, updated_at, online, last_seen_at";
const API_KEY_COLUMNS: &str = "id, name, key_hash, scopes, created_at, revoked_at";

const CREATE_PRODUCT: &str =
    "INSERT INTO products (id, name, description, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING";
const COUNT_DEVICES: &str = "SELECT COUNT(*) FROM devices WHERE product_id = $1";
const DELETE_DEVICES_OF_PRODUCT: &str = "DELETE FROM devices WHERE product_id = $1 RETURNING broker_username";
const DELETE_MESSAGES_OF_PRODUCT: &str = "DELETE FROM device_messages WHERE product_id = $1";
const DELETE_PRODUCT: &str = "DELETE FROM products WHERE id = $1";
const SET_STATUS: &str = "UPDATE devices SET status = $3, updated_at = $4 WHERE product_id = $1 AND device_id = $2";
const DELETE_DEVICE: &str = "DELETE FROM devices WHERE product_id = $1 AND device_id = $2";
const DELETE_MESSAGES_OF_DEVICE: &str = "DELETE FROM device_messages WHERE product_id = $1 AND device_id = $2";
const DEVICE_AUTH: &str = "SELECT d.status, c.id, c.salt, c.password_hash, c.created_at, c.expires_at
     FROM devices d LEFT JOIN device_credentials c ON c.broker_username = d.broker_username
     WHERE d.broker_username = $1 ORDER BY c.id DESC";
const PURGE_EXPIRED_CREDENTIALS: &str =
    "DELETE FROM device_credentials WHERE broker_username = $1 AND expires_at IS NOT NULL AND expires_at <= $2";
/// Existing credentials expire at `$2` at the latest (`LEAST`/`MIN` are not portable).
const EXPIRE_CREDENTIALS: &str = "UPDATE device_credentials
     SET expires_at = CASE WHEN expires_at IS NOT NULL AND expires_at < $2 THEN expires_at ELSE $2 END
     WHERE broker_username = $1";
const INSERT_CREDENTIAL: &str =
    "INSERT INTO device_credentials (broker_username, salt, password_hash, created_at) VALUES ($1, $2, $3, $4)";
const LIST_CREDENTIALS: &str = "SELECT id, salt, password_hash, created_at, expires_at FROM device_credentials
     WHERE broker_username = $1 ORDER BY id DESC";
const INSERT_API_KEY: &str =
    "INSERT INTO api_keys (id, name, key_hash, scopes, created_at) VALUES ($1, $2, $3, $4, $5)";
const REVOKE_API_KEY: &str = "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL";
const COUNT_API_KEYS: &str = "SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL";
const PURGE_TOKEN_SESSIONS: &str = "DELETE FROM mqtt_token_sessions WHERE expires_at < $1";
const PUT_TOKEN_SESSION: &str = "INSERT INTO mqtt_token_sessions (client_id, username, acl, expires_at)
     VALUES ($1, $2, $3, $4)
     ON CONFLICT (client_id, username) DO UPDATE SET acl = excluded.acl, expires_at = excluded.expires_at";
const GET_TOKEN_SESSION: &str =
    "SELECT acl, expires_at FROM mqtt_token_sessions WHERE client_id = $1 AND username = $2";

// Row locks: PostgreSQL locks the row a decision rests on (the product while a forced delete decides, or
// while devices are registered into it; the device while its credentials rotate). SQLite's single writer
// serialises those transactions already.
impl PgStore {
    const PRODUCT_FOR_DELETE: &'static str = "SELECT id FROM products WHERE id = $1 FOR UPDATE";
    const PRODUCT_FOR_INSERT: &'static str = "SELECT id FROM products WHERE id = $1 FOR SHARE";
    const DEVICE_FOR_ROTATION: &'static str = "SELECT 1 FROM devices WHERE broker_username = $1 FOR UPDATE";
}
impl SqliteStore {
    const PRODUCT_FOR_DELETE: &'static str = "SELECT id FROM products WHERE id = $1";
    const PRODUCT_FOR_INSERT: &'static str = Self::PRODUCT_FOR_DELETE;
    const DEVICE_FOR_ROTATION: &'static str = "SELECT 1 FROM devices WHERE broker_username = $1";
}

impl PgStore {
    /// The devices and their first credentials, one `UNNEST` statement per table.
    async fn insert_device_rows(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        product: &ProductId,
        devices: &[NewDevice],
        now: i64,
    ) -> Result<()> {
        let ids: Vec<&str> = devices.iter().map(|d| d.device.as_str()).collect();
        let usernames: Vec<String> = devices.iter().map(|d| format!("{product}/{}", d.device)).collect();
        let inserted = sqlx::query(
            "INSERT INTO devices (product_id, device_id, broker_username, status, created_at, updated_at)
             SELECT $1, d, u, 'active', $4, $4 FROM UNNEST($2::TEXT[], $3::TEXT[]) AS t(d, u)
             ON CONFLICT DO NOTHING",
        )
        .bind(product.as_str())
        .bind(&ids)
        .bind(&usernames)
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(|e| conflict_or(e, || "device id already exists".into()))?;
        if inserted.rows_affected() != devices.len() as u64 {
            // Name one taken id; the caller's transaction is dropped, so nothing was written.
            let taken: Option<String> = sqlx::query_scalar(
                "SELECT device_id FROM devices WHERE product_id = $1 AND device_id = ANY($2::TEXT[]) LIMIT 1",
            )
            .bind(product.as_str())
            .bind(&ids)
            .fetch_optional(&mut **tx)
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
        .bind(devices.iter().map(|d| d.secret.salt.as_str()).collect::<Vec<_>>())
        .bind(devices.iter().map(|d| d.secret.hash.as_str()).collect::<Vec<_>>())
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Which of `devices` are active: one statement over `UNNEST`ed pairs.
    async fn active_rows(&self, devices: &[DeviceRef]) -> Result<Vec<(String, String)>> {
        let (products, ids): (Vec<&str>, Vec<&str>) =
            devices.iter().map(|d| (d.product.as_str(), d.device.as_str())).unzip();
        Ok(sqlx::query_as(
            "SELECT product_id, device_id FROM devices
             WHERE status = 'active' AND (product_id, device_id) IN (SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[]))",
        )
        .bind(&products)
        .bind(&ids)
        .fetch_all(self.read())
        .await?)
    }
}

impl SqliteStore {
    /// The devices and their first credentials, row by row on the single writer.
    async fn insert_device_rows(
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        product: &ProductId,
        devices: &[NewDevice],
        now: i64,
    ) -> Result<()> {
        for d in devices {
            let username = format!("{product}/{}", d.device);
            sqlx::query(
                "INSERT INTO devices (product_id, device_id, broker_username, status, created_at, updated_at)
                 VALUES ($1, $2, $3, 'active', $4, $4)",
            )
            .bind(product.as_str())
            .bind(d.device.as_str())
            .bind(&username)
            .bind(now)
            .execute(&mut **tx)
            .await
            .map_err(|e| conflict_or(e, || format!("device `{username}` already exists")))?;
            sqlx::query(INSERT_CREDENTIAL)
                .bind(&username)
                .bind(&d.secret.salt)
                .bind(&d.secret.hash)
                .bind(now)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Which of `devices` are active: one statement over a JSON array of `[product, device]` pairs.
    async fn active_rows(&self, devices: &[DeviceRef]) -> Result<Vec<(String, String)>> {
        let pairs =
            serde_json::to_string(&devices.iter().map(|d| [d.product.as_str(), d.device.as_str()]).collect::<Vec<_>>())
                .expect("id pairs serialise");
        Ok(sqlx::query_as(
            "SELECT d.product_id, d.device_id FROM devices d
             JOIN json_each($1) j ON d.product_id = json_extract(j.value, '$[0]')
                                 AND d.device_id = json_extract(j.value, '$[1]')
             WHERE d.status = 'active'",
        )
        .bind(pairs)
        .fetch_all(self.read())
        .await?)
    }
}

for_each_backend! {
    type DbRow = <Db as sqlx::Database>::Row;

    fn product_row(r: &DbRow) -> Result<ProductRecord> {
        let id: String = r.try_get("id")?;
        Ok(ProductRecord {
            id: stored("product id", id, |s| ProductId::parse(s).ok())?,
            name: r.try_get("name")?,
            description: r.try_get("description")?,
            created_at: r.try_get("created_at")?,
            device_count: r.try_get("device_count")?,
        })
    }

    fn device_row(r: &DbRow) -> Result<DeviceRecord> {
        let DeviceRef { product, device } = stored_device(r.try_get("product_id")?, r.try_get("device_id")?)?;
        Ok(DeviceRecord {
            product,
            device,
            status: stored("status", r.try_get("status")?, DeviceStatus::parse)?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            online: r.try_get("online")?,
            last_seen_at: r.try_get("last_seen_at")?,
        })
    }

    fn credential_row(r: &DbRow) -> Result<CredentialRecord> {
        Ok(CredentialRecord {
            id: r.try_get("id")?,
            secret: SecretHash { salt: r.try_get("salt")?, hash: r.try_get("password_hash")? },
            created_at: r.try_get("created_at")?,
            expires_at: r.try_get("expires_at")?,
        })
    }

    fn api_key_row(r: &DbRow) -> Result<ApiKeyRecord> {
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

    #[async_trait]
    impl RegistryStore for Store {
        #[tracing::instrument(skip(self), name = "sql.ping")]
        async fn ping(&self) -> Result<()> {
            sqlx::query("SELECT 1").execute(self.read()).await?;
            Ok(())
        }

        fn backend(&self) -> &'static str {
            Store::BACKEND
        }

        #[tracing::instrument(skip(self, name, description), name = "sql.create_product")]
        async fn create_product(&self, id: &ProductId, name: &str, description: &str, now: i64) -> Result<bool> {
            let done = sqlx::query(CREATE_PRODUCT)
                .bind(id.as_str())
                .bind(name)
                .bind(description)
                .bind(now)
                .execute(self.write())
                .await?;
            Ok(done.rows_affected() == 1)
        }

        #[tracing::instrument(skip(self), name = "sql.get_product")]
        async fn get_product(&self, id: &ProductId) -> Result<Option<ProductRecord>> {
            let row = sqlx::query(&format!("SELECT {PRODUCT_COLUMNS} FROM products p WHERE p.id = $1"))
                .bind(id.as_str())
                .fetch_optional(self.read())
                .await?;
            row.as_ref().map(product_row).transpose()
        }

        #[tracing::instrument(skip(self), name = "sql.list_products")]
        async fn list_products(&self, after: Option<&ProductId>, limit: u32) -> Result<Vec<ProductRecord>> {
            let rows = sqlx::query(&format!(
                "SELECT {PRODUCT_COLUMNS} FROM products p
                 WHERE (CAST($1 AS TEXT) IS NULL OR p.id > $1) ORDER BY p.id LIMIT $2"
            ))
            .bind(after.map(|a| a.as_str()))
            .bind(i64::from(limit))
            .fetch_all(self.read())
            .await?;
            rows.iter().map(product_row).collect()
        }

        #[tracing::instrument(skip(self), name = "sql.delete_product")]
        async fn delete_product(&self, id: &ProductId, force: bool) -> Result<ProductDelete> {
            let mut tx = self.write().begin().await?;
            let exists = sqlx::query(Store::PRODUCT_FOR_DELETE).bind(id.as_str()).fetch_optional(&mut *tx).await?;
            if exists.is_none() {
                return Ok(ProductDelete::NotFound);
            }
            let count: i64 = sqlx::query_scalar(COUNT_DEVICES).bind(id.as_str()).fetch_one(&mut *tx).await?;
            if count > 0 && !force {
                return Ok(ProductDelete::HasDevices(count));
            }
            let usernames: Vec<String> =
                sqlx::query_scalar(DELETE_DEVICES_OF_PRODUCT).bind(id.as_str()).fetch_all(&mut *tx).await?;
            sqlx::query(DELETE_MESSAGES_OF_PRODUCT).bind(id.as_str()).execute(&mut *tx).await?;
            sqlx::query(DELETE_PRODUCT).bind(id.as_str()).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(ProductDelete::Deleted(usernames))
        }

        #[tracing::instrument(skip(self, devices), fields(count = devices.len()), name = "sql.insert_devices")]
        async fn insert_devices(&self, product: &ProductId, devices: &[NewDevice], now: i64) -> Result<()> {
            let mut tx = self.write().begin().await?;
            let exists =
                sqlx::query(Store::PRODUCT_FOR_INSERT).bind(product.as_str()).fetch_optional(&mut *tx).await?;
            if exists.is_none() {
                return Err(Error::not_found("product", product));
            }
            Store::insert_device_rows(&mut tx, product, devices, now).await?;
            tx.commit().await?;
            Ok(())
        }

        #[tracing::instrument(skip(self), fields(device = %device), name = "sql.get_device")]
        async fn get_device(&self, device: &DeviceRef) -> Result<Option<DeviceRecord>> {
            let row = sqlx::query(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE product_id = $1 AND device_id = $2"
            ))
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .fetch_optional(self.read())
            .await?;
            row.as_ref().map(device_row).transpose()
        }

        #[tracing::instrument(skip(self, filter), name = "sql.list_devices")]
        async fn list_devices(&self, product: &ProductId, filter: &DeviceFilter) -> Result<Vec<DeviceRecord>> {
            let rows = sqlx::query(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices
                 WHERE product_id = $1 AND (CAST($2 AS TEXT) IS NULL OR status = $2)
                   AND (CAST($3 AS TEXT) IS NULL OR device_id > $3)
                   AND (CAST($5 AS BOOLEAN) IS NULL OR online = $5)
                   AND (CAST($6 AS TEXT) IS NULL OR EXISTS (SELECT 1 FROM device_tags t
                        WHERE t.product_id = devices.product_id AND t.device_id = devices.device_id AND t.tag = $6))
                 ORDER BY device_id LIMIT $4"
            ))
            .bind(product.as_str())
            .bind(filter.status.as_ref().map(|s| s.as_str()))
            .bind(filter.after.as_ref().map(|a| a.as_str()))
            .bind(i64::from(filter.limit))
            .bind(filter.online)
            .bind(filter.tag.as_deref())
            .fetch_all(self.read())
            .await?;
            rows.iter().map(device_row).collect()
        }

        #[tracing::instrument(skip(self), fields(device = %device), name = "sql.set_device_status")]
        async fn set_device_status(&self, device: &DeviceRef, status: DeviceStatus, now: i64) -> Result<bool> {
            let done = sqlx::query(SET_STATUS)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .bind(status.as_str())
                .bind(now)
                .execute(self.write())
                .await?;
            Ok(done.rows_affected() == 1)
        }

        #[tracing::instrument(skip(self), fields(device = %device), name = "sql.delete_device")]
        async fn delete_device(&self, device: &DeviceRef) -> Result<bool> {
            let mut tx = self.write().begin().await?;
            let done = sqlx::query(DELETE_DEVICE)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .execute(&mut *tx)
                .await?;
            sqlx::query(DELETE_MESSAGES_OF_DEVICE)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(done.rows_affected() == 1)
        }

        #[tracing::instrument(skip(self), fields(device = %device), name = "sql.device_auth")]
        async fn device_auth(&self, device: &DeviceRef) -> Result<Option<DeviceAuthRecord>> {
            let rows = sqlx::query(DEVICE_AUTH).bind(device.broker_username()).fetch_all(self.read()).await?;
            let Some(first) = rows.first() else {
                return Ok(None);
            };
            let mut credentials = Vec::with_capacity(rows.len());
            for r in &rows {
                if r.try_get::<Option<i64>, _>("id")?.is_some() {
                    credentials.push(credential_row(r)?);
                }
            }
            Ok(Some(DeviceAuthRecord {
                status: stored("status", first.try_get("status")?, DeviceStatus::parse)?,
                credentials,
            }))
        }

        #[tracing::instrument(skip_all, fields(devices = devices.len()), name = "sql.active_devices")]
        async fn active_devices(&self, devices: &[DeviceRef]) -> Result<std::collections::HashSet<DeviceRef>> {
            // Rows that are not valid ids are skipped: the registry never writes them.
            let rows = self.active_rows(devices).await?;
            Ok(rows.into_iter().filter_map(|(p, d)| stored_device(p, d).ok()).collect())
        }

        #[tracing::instrument(skip(self, secret), fields(device = %device), name = "sql.rotate_credential")]
        async fn rotate_credential(
            &self,
            device: &DeviceRef,
            secret: &SecretHash,
            old_expires_at: i64,
            now: i64,
        ) -> Result<bool> {
            let username = device.broker_username();
            let mut tx = self.write().begin().await?;
            let exists = sqlx::query(Store::DEVICE_FOR_ROTATION).bind(&username).fetch_optional(&mut *tx).await?;
            if exists.is_none() {
                return Ok(false);
            }
            sqlx::query(PURGE_EXPIRED_CREDENTIALS).bind(&username).bind(now).execute(&mut *tx).await?;
            sqlx::query(EXPIRE_CREDENTIALS).bind(&username).bind(old_expires_at).execute(&mut *tx).await?;
            sqlx::query(INSERT_CREDENTIAL)
                .bind(&username)
                .bind(&secret.salt)
                .bind(&secret.hash)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(true)
        }

        #[tracing::instrument(skip(self), fields(device = %device), name = "sql.list_credentials")]
        async fn list_credentials(&self, device: &DeviceRef) -> Result<Vec<CredentialRecord>> {
            let rows = sqlx::query(LIST_CREDENTIALS).bind(device.broker_username()).fetch_all(self.read()).await?;
            rows.iter().map(credential_row).collect()
        }

        #[tracing::instrument(skip(self, key), name = "sql.insert_api_key")]
        async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<()> {
            sqlx::query(INSERT_API_KEY)
                .bind(&key.id)
                .bind(&key.name)
                .bind(&key.key_hash)
                .bind(key.scopes.join(","))
                .bind(key.created_at)
                .execute(self.write())
                .await
                .map_err(|e| conflict_or(e, || "api key id already exists".into()))?;
            Ok(())
        }

        #[tracing::instrument(skip(self), name = "sql.get_api_key")]
        async fn get_api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>> {
            let row = sqlx::query(&format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = $1"))
                .bind(id)
                .fetch_optional(self.read())
                .await?;
            row.as_ref().map(api_key_row).transpose()
        }

        #[tracing::instrument(skip(self), name = "sql.list_api_keys")]
        async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>> {
            let rows = sqlx::query(&format!("SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"))
                .fetch_all(self.read())
                .await?;
            rows.iter().map(api_key_row).collect()
        }

        #[tracing::instrument(skip(self), name = "sql.revoke_api_key")]
        async fn revoke_api_key(&self, id: &str, now: i64) -> Result<bool> {
            let done = sqlx::query(REVOKE_API_KEY).bind(id).bind(now).execute(self.write()).await?;
            Ok(done.rows_affected() == 1)
        }

        #[tracing::instrument(skip(self), name = "sql.count_api_keys")]
        async fn count_api_keys(&self) -> Result<i64> {
            Ok(sqlx::query_scalar(COUNT_API_KEYS).fetch_one(self.read()).await?)
        }

        #[tracing::instrument(skip(self, session), name = "sql.put_token_session")]
        async fn put_token_session(
            &self,
            client_id: &str,
            username: &str,
            session: &StoredTokenSession,
            now: i64,
        ) -> Result<()> {
            let mut tx = self.write().begin().await?;
            sqlx::query(PURGE_TOKEN_SESSIONS).bind(now).execute(&mut *tx).await?;
            sqlx::query(PUT_TOKEN_SESSION)
                .bind(client_id)
                .bind(username)
                .bind(&session.acl_json)
                .bind(session.expires_at)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        }

        #[tracing::instrument(skip(self), name = "sql.get_token_session")]
        async fn get_token_session(&self, client_id: &str, username: &str) -> Result<Option<StoredTokenSession>> {
            let row: Option<(String, i64)> = sqlx::query_as(GET_TOKEN_SESSION)
                .bind(client_id)
                .bind(username)
                .fetch_optional(self.read())
                .await?;
            Ok(row.map(|(acl_json, expires_at)| StoredTokenSession { acl_json, expires_at }))
        }
    }
}

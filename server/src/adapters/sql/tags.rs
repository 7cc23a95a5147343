//! Device tags ([`TagStore`]): tags in `device_tags`, the version on the device row.
//!
//! `set_tags` runs in one transaction that first bumps `devices.tags_version` (`UPDATE ... RETURNING`),
//! which also locks the device row, so two concurrent updates serialise and each gets its own version.

use async_trait::async_trait;
use sqlx::Row;

use super::for_each_backend;
use crate::error::Result;
use crate::ids::DeviceRef;
use crate::model::tags::DeviceTags;
use crate::ports::tags::TagStore;

const GET_DEVICE: &str = "SELECT tags_version, online FROM devices WHERE product_id = $1 AND device_id = $2";
const BUMP: &str = "UPDATE devices SET tags_version = tags_version + 1, updated_at = $3
     WHERE product_id = $1 AND device_id = $2 RETURNING tags_version, online";
const CLEAR: &str = "DELETE FROM device_tags WHERE product_id = $1 AND device_id = $2";
const ADD: &str = "INSERT INTO device_tags (product_id, device_id, tag) VALUES ($1, $2, $3)";
const LIST: &str = "SELECT tag FROM device_tags WHERE product_id = $1 AND device_id = $2 ORDER BY tag";

for_each_backend! {
    #[async_trait]
    impl TagStore for Store {
        #[tracing::instrument(skip(self), name = "sql.get_tags")]
        async fn get_tags(&self, device: &DeviceRef) -> Result<Option<DeviceTags>> {
            let mut conn = self.read().acquire().await?;
            let Some(row) = sqlx::query(GET_DEVICE)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .fetch_optional(&mut *conn)
                .await?
            else {
                return Ok(None);
            };
            let tags = sqlx::query_scalar::<Db, String>(LIST)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .fetch_all(&mut *conn)
                .await?;
            Ok(Some(DeviceTags { tags, version: row.try_get("tags_version")?, online: row.try_get("online")? }))
        }

        #[tracing::instrument(skip(self, tags), fields(count = tags.len()), name = "sql.set_tags")]
        async fn set_tags(&self, device: &DeviceRef, tags: &[String], now: i64) -> Result<Option<DeviceTags>> {
            let mut tx = self.write().begin().await?;
            let Some(row) = sqlx::query(BUMP)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?
            else {
                return Ok(None);
            };
            sqlx::query(CLEAR).bind(device.product.as_str()).bind(device.device.as_str()).execute(&mut *tx).await?;
            for tag in tags {
                sqlx::query(ADD)
                    .bind(device.product.as_str())
                    .bind(device.device.as_str())
                    .bind(tag)
                    .execute(&mut *tx)
                    .await?;
            }
            let result = DeviceTags {
                tags: tags.to_vec(),
                version: row.try_get("tags_version")?,
                online: row.try_get("online")?,
            };
            tx.commit().await?;
            Ok(Some(result))
        }
    }
}

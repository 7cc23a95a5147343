//! OTA rollouts and their targets ([`OtaStore`]): `ota_rollouts` and `ota_targets`. Rollouts are created
//! with their commands by the command log (`CommandStore::create_rollout`).
//!
//! Progress is applied in broker-time order (`progress_at <=` the report's time) and never touches a
//! target that already succeeded. Success is decided in SQL from the status document itself (PostgreSQL
//! `->>`, SQLite `json_extract`), one statement per status report, using the partial index of open targets.

use async_trait::async_trait;
use sqlx::Row;

use super::{for_each_backend, stored_device, PgStore, SqliteStore};
use crate::error::{Error, Result};
use crate::ids::{DeviceRef, ProductId};
use crate::model::ota::{NewRollout, OtaProgress, RolloutRecord, TargetRecord};
use crate::ports::ota::OtaStore;

macro_rules! rollout_columns {
    () => {
        "r.id, r.product_id, r.tag, r.type, r.version, r.url, r.size, r.md5, r.created_at"
    };
}
macro_rules! target_columns {
    () => {
        "t.rollout_id, t.device_id, t.state, t.progress, t.error, t.progress_at, t.succeeded_at, \
         t.created_at AS target_created_at"
    };
}

const GET_ROLLOUT: &str =
    concat!("SELECT ", rollout_columns!(), " FROM ota_rollouts r WHERE r.product_id = $1 AND r.id = $2");
const TARGETS: &str = concat!(
    "SELECT ",
    target_columns!(),
    ", t.product_id FROM ota_targets t WHERE t.rollout_id = $1 ORDER BY t.device_id"
);
const DEVICE_TARGETS: &str = concat!(
    "SELECT ",
    rollout_columns!(),
    ", ",
    target_columns!(),
    " FROM ota_targets t JOIN ota_rollouts r ON r.id = t.rollout_id
     WHERE t.product_id = $1 AND t.device_id = $2 ORDER BY r.created_at DESC, r.id DESC LIMIT $3"
);
const PROGRESS: &str = "UPDATE ota_targets SET progress = $4, progress_at = $5, error = $6,
         state = CASE WHEN $4 = 100 THEN 'installed' WHEN $4 < 0 THEN 'failed' ELSE 'in_progress' END
     WHERE product_id = $1 AND device_id = $2 AND state <> 'succeeded'
       AND (progress_at IS NULL OR progress_at <= $5)
       AND rollout_id IN (SELECT id FROM ota_rollouts
                          WHERE product_id = $1 AND version = $3 AND (CAST($7 AS TEXT) IS NULL OR type = $7))";

// A status report whose `{type}_version` equals a rollout's version makes its open targets succeed.
impl PgStore {
    const OTA_STATUS: &'static str = "UPDATE ota_targets t SET state = 'succeeded', succeeded_at = $4
         FROM ota_rollouts r
         WHERE r.id = t.rollout_id AND t.product_id = $1 AND t.device_id = $2 AND t.state <> 'succeeded'
           AND (CAST($3 AS JSONB) ->> (r.type || '_version')) = r.version";

    async fn open_targets(&self, devices: &[DeviceRef]) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT product_id, device_id FROM ota_targets
             WHERE state <> 'succeeded' AND (product_id, device_id) IN (SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[]))",
        )
        .bind(devices.iter().map(|d| d.product.as_str()).collect::<Vec<_>>())
        .bind(devices.iter().map(|d| d.device.as_str()).collect::<Vec<_>>())
        .fetch_all(self.read())
        .await?)
    }
}
impl SqliteStore {
    const OTA_STATUS: &'static str = "UPDATE ota_targets SET state = 'succeeded', succeeded_at = $4
         WHERE product_id = $1 AND device_id = $2 AND state <> 'succeeded'
           AND rollout_id IN (SELECT r.id FROM ota_rollouts r
                WHERE r.id = ota_targets.rollout_id AND json_extract($3, '$.' || r.type || '_version') = r.version)";

    async fn open_targets(&self, devices: &[DeviceRef]) -> Result<Vec<(String, String)>> {
        let mut open = Vec::new();
        for device in devices {
            let found: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM ota_targets WHERE product_id = $1 AND device_id = $2 AND state <> 'succeeded' LIMIT 1",
            )
            .bind(device.product.as_str())
            .bind(device.device.as_str())
            .fetch_optional(self.read())
            .await?;
            if found.is_some() {
                open.push((device.product.to_string(), device.device.to_string()));
            }
        }
        Ok(open)
    }
}

for_each_backend! {
    type DbRow = <Db as sqlx::Database>::Row;

    fn rollout_row(r: &DbRow) -> Result<RolloutRecord> {
        let product: String = r.try_get("product_id")?;
        let rollout = NewRollout {
            id: r.try_get("id")?,
            product: ProductId::parse(product).map_err(|e| Error::Internal(anyhow::anyhow!("stored id: {e}")))?,
            tag: r.try_get("tag")?,
            kind: r.try_get("type")?,
            version: r.try_get("version")?,
            url: r.try_get("url")?,
            size: r.try_get("size")?,
            md5: r.try_get("md5")?,
        };
        Ok(RolloutRecord { rollout, created_at: r.try_get("created_at")? })
    }

    fn target_row(r: &DbRow) -> Result<TargetRecord> {
        Ok(TargetRecord {
            rollout_id: r.try_get("rollout_id")?,
            device: stored_device(r.try_get("product_id")?, r.try_get("device_id")?)?,
            state: r.try_get("state")?,
            progress: r.try_get("progress")?,
            error: r.try_get("error")?,
            progress_at: r.try_get("progress_at")?,
            succeeded_at: r.try_get("succeeded_at")?,
            created_at: r.try_get("target_created_at")?,
        })
    }

    #[async_trait]
    impl OtaStore for Store {
        #[tracing::instrument(skip(self), name = "sql.get_rollout")]
        async fn get_rollout(&self, product: &ProductId, id: &str) -> Result<Option<(RolloutRecord, Vec<TargetRecord>)>> {
            let Some(row) = sqlx::query(GET_ROLLOUT).bind(product.as_str()).bind(id).fetch_optional(self.read()).await?
            else {
                return Ok(None);
            };
            let rollout = rollout_row(&row)?;
            let rows = sqlx::query(TARGETS).bind(id).fetch_all(self.read()).await?;
            let targets = rows.iter().map(target_row).collect::<Result<Vec<_>>>()?;
            Ok(Some((rollout, targets)))
        }

        #[tracing::instrument(skip(self), name = "sql.device_targets")]
        async fn device_targets(&self, device: &DeviceRef, limit: u32) -> Result<Vec<(RolloutRecord, TargetRecord)>> {
            let rows = sqlx::query(DEVICE_TARGETS)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .bind(i64::from(limit))
                .fetch_all(self.read())
                .await?;
            rows.iter().map(|r| Ok((rollout_row(r)?, target_row(r)?))).collect()
        }

        #[tracing::instrument(skip_all, fields(reports = reports.len()), name = "sql.apply_ota_progress")]
        async fn apply_ota_progress(&self, reports: &[OtaProgress]) -> Result<usize> {
            let mut tx = self.write().begin().await?;
            let mut applied = 0;
            for p in reports {
                let done = sqlx::query(PROGRESS)
                    .bind(p.device.product.as_str())
                    .bind(p.device.device.as_str())
                    .bind(p.version.as_str())
                    .bind(p.progress)
                    .bind(p.at)
                    .bind(p.error.as_deref())
                    .bind(p.kind.as_deref())
                    .execute(&mut *tx)
                    .await?;
                applied += done.rows_affected() as usize;
            }
            tx.commit().await?;
            Ok(applied)
        }

        #[tracing::instrument(skip_all, fields(devices = devices.len()), name = "sql.open_targets")]
        async fn devices_with_open_targets(&self, devices: &[DeviceRef]) -> Result<Vec<DeviceRef>> {
            if devices.is_empty() {
                return Ok(Vec::new());
            }
            self.open_targets(devices).await?.into_iter().map(|(p, d)| stored_device(p, d)).collect()
        }

        #[tracing::instrument(skip(self, status_json), name = "sql.apply_ota_status")]
        async fn apply_ota_status(&self, device: &DeviceRef, status_json: &str, at: i64) -> Result<usize> {
            let done = sqlx::query(Store::OTA_STATUS)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .bind(status_json)
                .bind(at)
                .execute(self.write())
                .await?;
            Ok(done.rows_affected() as usize)
        }
    }
}

//! [`OtaStore`] for PostgreSQL and SQLite: `ota_rollouts` and `ota_targets`.
//!
//! Progress is applied in broker-time order (`progress_at <=` the report's time) and never touches a
//! target that already succeeded. Success is decided in SQL from the status document itself (PostgreSQL
//! `->>`, SQLite `json_extract`), one statement per status report, using the partial index of open targets.

use async_trait::async_trait;
use sqlx::Row;

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use crate::error::{Error, Result};
use crate::ids::{DeviceId, DeviceRef, ProductId};
use crate::model::ota::{OtaProgress, RolloutRecord, TargetRecord};
use crate::ports::ota::OtaStore;

const ROLLOUT_COLUMNS: &str = "r.id, r.product_id, r.tag, r.type, r.version, r.url, r.size, r.md5, r.created_at";
const TARGET_COLUMNS: &str = "t.rollout_id, t.device_id, t.state, t.progress, t.error, t.progress_at, t.succeeded_at, \
     t.created_at AS target_created_at";

fn get_rollout_sql() -> String {
    format!("SELECT {ROLLOUT_COLUMNS} FROM ota_rollouts r WHERE r.product_id = $1 AND r.id = $2")
}
fn targets_sql() -> String {
    format!("SELECT {TARGET_COLUMNS}, t.product_id FROM ota_targets t WHERE t.rollout_id = $1 ORDER BY t.device_id")
}
fn device_targets_sql() -> String {
    format!(
        "SELECT {ROLLOUT_COLUMNS}, {TARGET_COLUMNS} FROM ota_targets t JOIN ota_rollouts r ON r.id = t.rollout_id
         WHERE t.product_id = $1 AND t.device_id = $2 ORDER BY r.created_at DESC, r.id DESC LIMIT $3"
    )
}
const PROGRESS: &str = "UPDATE ota_targets SET progress = $4, progress_at = $5, error = $6,
         state = CASE WHEN $4 = 100 THEN 'installed' WHEN $4 < 0 THEN 'failed' ELSE 'in_progress' END
     WHERE product_id = $1 AND device_id = $2 AND state <> 'succeeded'
       AND (progress_at IS NULL OR progress_at <= $5)
       AND rollout_id IN (SELECT id FROM ota_rollouts WHERE product_id = $1 AND version = $3 AND ($7 IS NULL OR type = $7))";
const PG_STATUS: &str = "UPDATE ota_targets t SET state = 'succeeded', succeeded_at = $4
     FROM ota_rollouts r
     WHERE r.id = t.rollout_id AND t.product_id = $1 AND t.device_id = $2 AND t.state <> 'succeeded'
       AND ($3::JSONB ->> (r.type || '_version')) = r.version";
// Retention, in two steps so a rollout to a million devices goes in bounded batches: its targets first, then
// the rollout once it has none (every call, so emptied rollouts are not probed again by the next batch). The
// conditions are on the rollout, whose `created_at` never changes. Old rollouts are found by reading
// `ota_rollouts` (one row per push; no index on `created_at` alone).
const PRUNE_TARGETS: &str = "DELETE FROM ota_targets WHERE (rollout_id, device_id) IN (
         SELECT t.rollout_id, t.device_id FROM ota_targets t JOIN ota_rollouts r ON r.id = t.rollout_id
         WHERE r.created_at < $1 LIMIT $2)";
const PRUNE_ROLLOUTS: &str = "DELETE FROM ota_rollouts WHERE id IN (
         SELECT r.id FROM ota_rollouts r
         WHERE r.created_at < $1 AND NOT EXISTS (SELECT 1 FROM ota_targets t WHERE t.rollout_id = r.id) LIMIT $2)";
const SQLITE_STATUS: &str = "UPDATE ota_targets SET state = 'succeeded', succeeded_at = ?4
     WHERE product_id = ?1 AND device_id = ?2 AND state <> 'succeeded'
       AND rollout_id IN (SELECT r.id FROM ota_rollouts r
            WHERE r.id = ota_targets.rollout_id AND json_extract(?3, '$.' || r.type || '_version') = r.version)";

fn id_err(e: crate::ids::IdError) -> Error {
    Error::Internal(anyhow::anyhow!("stored id: {e}"))
}

macro_rules! rollout_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, Error>(RolloutRecord {
            id: r.try_get("id")?,
            product: ProductId::parse(r.try_get::<String, _>("product_id")?).map_err(id_err)?,
            tag: r.try_get("tag")?,
            kind: r.try_get("type")?,
            version: r.try_get("version")?,
            url: r.try_get("url")?,
            size: r.try_get("size")?,
            md5: r.try_get("md5")?,
            created_at: r.try_get("created_at")?,
        })
    }};
}

macro_rules! target_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, Error>(TargetRecord {
            rollout_id: r.try_get("rollout_id")?,
            device: DeviceRef::new(
                ProductId::parse(r.try_get::<String, _>("product_id")?).map_err(id_err)?,
                DeviceId::parse(r.try_get::<String, _>("device_id")?).map_err(id_err)?,
            ),
            state: r.try_get("state")?,
            progress: r.try_get("progress")?,
            error: r.try_get("error")?,
            progress_at: r.try_get("progress_at")?,
            succeeded_at: r.try_get("succeeded_at")?,
            created_at: r.try_get("target_created_at")?,
        })
    }};
}

macro_rules! ota_store_impl {
    ($store:ty, $sql:expr, $read:ident, $write:ident, $status:expr, $progress_kind:literal, $open_targets:ident) => {
        #[async_trait]
        impl OtaStore for $store {
            #[tracing::instrument(skip(self), name = "ota.get_rollout")]
            async fn get_rollout(
                &self,
                product: &ProductId,
                id: &str,
            ) -> Result<Option<(RolloutRecord, Vec<TargetRecord>)>> {
                let Some(row) = sqlx::query(&$sql(&get_rollout_sql()))
                    .bind(product.as_str())
                    .bind(id)
                    .fetch_optional(self.$read())
                    .await?
                else {
                    return Ok(None);
                };
                let rollout = rollout_row!(&row)?;
                let rows = sqlx::query(&$sql(&targets_sql())).bind(id).fetch_all(self.$read()).await?;
                let targets = rows.iter().map(|r| target_row!(r)).collect::<Result<Vec<_>>>()?;
                Ok(Some((rollout, targets)))
            }

            #[tracing::instrument(skip(self), name = "ota.device_targets")]
            async fn device_targets(
                &self,
                device: &DeviceRef,
                limit: u32,
            ) -> Result<Vec<(RolloutRecord, TargetRecord)>> {
                let rows = sqlx::query(&$sql(&device_targets_sql()))
                    .bind(device.product.as_str())
                    .bind(device.device.as_str())
                    .bind(i64::from(limit))
                    .fetch_all(self.$read())
                    .await?;
                rows.iter().map(|r| Ok((rollout_row!(r)?, target_row!(r)?))).collect()
            }

            #[tracing::instrument(skip_all, fields(reports = reports.len()), name = "ota.apply_progress")]
            async fn apply_ota_progress(&self, reports: &[OtaProgress]) -> Result<usize> {
                let mut tx = self.$write().begin().await?;
                let mut applied = 0;
                let sql = $sql(&PROGRESS.replace("$7 IS NULL", $progress_kind));
                for p in reports {
                    let done = sqlx::query(&sql)
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

            #[tracing::instrument(skip_all, fields(devices = devices.len()), name = "ota.open_targets")]
            async fn devices_with_open_targets(&self, devices: &[DeviceRef]) -> Result<Vec<DeviceRef>> {
                if devices.is_empty() {
                    return Ok(Vec::new());
                }
                $open_targets(self.$read(), devices).await
            }

            #[tracing::instrument(skip(self, status_json), name = "ota.apply_status")]
            async fn apply_ota_status(&self, device: &DeviceRef, status_json: &str, at: i64) -> Result<usize> {
                let done = sqlx::query($status)
                    .bind(device.product.as_str())
                    .bind(device.device.as_str())
                    .bind(status_json)
                    .bind(at)
                    .execute(self.$write())
                    .await?;
                Ok(done.rows_affected() as usize)
            }

            #[tracing::instrument(skip(self), name = "ota.prune_rollouts")]
            async fn prune_rollouts(&self, before: i64, limit: u32) -> Result<u64> {
                // Targets first, then the rollouts they emptied. Unnamed statements: planned with the actual
                // cutoff each time (see prune_commands).
                let mut deleted = 0;
                for statement in [PRUNE_TARGETS, PRUNE_ROLLOUTS] {
                    deleted += sqlx::query(&$sql(statement))
                        .persistent(false)
                        .bind(before)
                        .bind(i64::from(limit))
                        .execute(self.$write())
                        .await?
                        .rows_affected();
                }
                Ok(deleted)
            }
        }
    };
}

fn pg(sql: &str) -> String {
    sql.to_string()
}

fn sqlite(sql: &str) -> String {
    sql.replace('$', "?")
}

async fn pg_open_targets(pool: &sqlx::PgPool, devices: &[DeviceRef]) -> Result<Vec<DeviceRef>> {
    let rows = sqlx::query(
        "SELECT DISTINCT product_id, device_id FROM ota_targets
         WHERE state <> 'succeeded' AND (product_id, device_id) IN (SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[]))",
    )
    .bind(devices.iter().map(|d| d.product.as_str()).collect::<Vec<_>>())
    .bind(devices.iter().map(|d| d.device.as_str()).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DeviceRef::new(
                ProductId::parse(r.try_get::<String, _>("product_id")?).map_err(id_err)?,
                DeviceId::parse(r.try_get::<String, _>("device_id")?).map_err(id_err)?,
            ))
        })
        .collect()
}

async fn sqlite_open_targets(pool: &sqlx::SqlitePool, devices: &[DeviceRef]) -> Result<Vec<DeviceRef>> {
    let mut open = Vec::new();
    for device in devices {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM ota_targets WHERE product_id = ?1 AND device_id = ?2 AND state <> 'succeeded' LIMIT 1",
        )
        .bind(device.product.as_str())
        .bind(device.device.as_str())
        .fetch_optional(pool)
        .await?;
        if found.is_some() {
            open.push(device.clone());
        }
    }
    Ok(open)
}

ota_store_impl!(PgStore, pg, pool, pool, PG_STATUS, "$7::TEXT IS NULL", pg_open_targets);
ota_store_impl!(SqliteStore, sqlite, reader, writer, SQLITE_STATUS, "$7 IS NULL", sqlite_open_targets);

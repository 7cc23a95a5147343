//! Device shadows ([`ShadowStore`]): `device_shadows`, written by compare-and-set on `version`.
//!
//! Version 0 means "no row yet"; the first write inserts (a concurrent first write loses on the primary
//! key), later writes update `WHERE version = $expected`. Either way exactly one writer per version wins,
//! and its `shadow` event commits with it.

use async_trait::async_trait;
use sqlx::Row;

use super::{for_each_backend, missing_device, PgStore, SqliteStore};
use crate::clock::now_ms;
use crate::error::Result;
use crate::ids::DeviceRef;
use crate::model::event_bus::BusEvent;
use crate::ports::shadows::ShadowStore;

const GET: &str =
    "SELECT version, CAST(document AS TEXT) AS document FROM device_shadows WHERE product_id = $1 AND device_id = $2";

/// The write statements, with the new document (`$3`, JSON text) as the backend stores it.
macro_rules! shadow_writes {
    ($document:literal) => {
        (
            concat!(
                "INSERT INTO device_shadows (product_id, device_id, version, document, updated_at)
                 VALUES ($1, $2, 1, ",
                $document,
                ", $4) ON CONFLICT DO NOTHING"
            ),
            concat!(
                "UPDATE device_shadows SET version = version + 1, document = ",
                $document,
                ", updated_at = $4 WHERE product_id = $1 AND device_id = $2 AND version = $5"
            ),
        )
    };
}

// PostgreSQL keeps the document as JSONB (queryable); SQLite as text.
impl PgStore {
    const SHADOW_WRITES: (&'static str, &'static str) = shadow_writes!("CAST($3 AS JSONB)");
}
impl SqliteStore {
    const SHADOW_WRITES: (&'static str, &'static str) = shadow_writes!("$3");
}

for_each_backend! {
    #[async_trait]
    impl ShadowStore for Store {
        #[tracing::instrument(skip(self), name = "sql.get_shadow")]
        async fn get_shadow(&self, device: &DeviceRef) -> Result<Option<(i64, String)>> {
            let row = sqlx::query(GET)
                .bind(device.product.as_str())
                .bind(device.device.as_str())
                .fetch_optional(self.read())
                .await?;
            row.map(|r| Ok((r.try_get("version")?, r.try_get("document")?))).transpose()
        }

        #[tracing::instrument(skip(self, document, event), name = "sql.put_shadow")]
        async fn put_shadow(&self, device: &DeviceRef, expected: i64, document: &str, event: &BusEvent) -> Result<bool> {
            let (insert, update) = Store::SHADOW_WRITES;
            let mut tx = self.write().begin().await?;
            let written = if expected == 0 {
                sqlx::query(insert)
                    .bind(device.product.as_str())
                    .bind(device.device.as_str())
                    .bind(document)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| missing_device(e, device))?
            } else {
                sqlx::query(update)
                    .bind(device.product.as_str())
                    .bind(device.device.as_str())
                    .bind(document)
                    .bind(now_ms())
                    .bind(expected)
                    .execute(&mut *tx)
                    .await?
            };
            if written.rows_affected() == 0 {
                return Ok(false);
            }
            self.commit_with_events(tx, vec![event.clone()]).await?;
            Ok(true)
        }
    }
}

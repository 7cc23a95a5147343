//! [`ShadowStore`] for PostgreSQL and SQLite: `device_shadows`, written by compare-and-set on `version`.
//!
//! Version 0 means "no row yet"; the first write inserts (a concurrent first write loses on the primary
//! key), later writes update `WHERE version = $expected`. Either way exactly one writer per version wins.

use async_trait::async_trait;
use sqlx::Row;

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use crate::error::{Error, Result};
use crate::ids::DeviceRef;
use crate::model::event_bus::BusEvent;
use crate::model::store::OutboxRecord;
use crate::ports::shadows::ShadowStore;

/// `{doc}`: the document column as text; `{new}`: the new document parameter.
const GET: &str = "SELECT version, {doc} AS document FROM device_shadows WHERE product_id = $1 AND device_id = $2";
const INSERT: &str = "INSERT INTO device_shadows (product_id, device_id, version, document, updated_at)
     VALUES ($1, $2, 1, {new}, $4) ON CONFLICT DO NOTHING";
const UPDATE: &str = "UPDATE device_shadows SET version = version + 1, document = {new}, updated_at = $4
     WHERE product_id = $1 AND device_id = $2 AND version = $5";
const OUTBOX: &str = "INSERT INTO event_outbox (kind, routing_key, event_id, body, created_at, leased_until)
     VALUES ($1, $2, $3, $4, $5, $6) RETURNING id";

fn missing_device(e: sqlx::Error, device: &DeviceRef) -> Error {
    match &e {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => Error::not_found("device", device),
        _ => e.into(),
    }
}

macro_rules! shadow_store_impl {
    ($store:ty, $sql:expr, $read:ident, $write:ident, $get_span:literal, $put_span:literal) => {
        #[async_trait]
        impl ShadowStore for $store {
            #[tracing::instrument(skip(self), name = $get_span)]
            async fn get_shadow(&self, device: &DeviceRef) -> Result<Option<(i64, String)>> {
                let row = sqlx::query(&$sql(GET))
                    .bind(device.product.as_str())
                    .bind(device.device.as_str())
                    .fetch_optional(self.$read())
                    .await?;
                row.map(|r| Ok((r.try_get("version")?, r.try_get("document")?))).transpose()
            }

            #[tracing::instrument(skip(self, document, event), name = $put_span)]
            async fn put_shadow(
                &self,
                device: &DeviceRef,
                expected: i64,
                document: &str,
                event: &BusEvent,
                now: i64,
                lease_ms: i64,
            ) -> Result<Option<Vec<OutboxRecord>>> {
                let mut tx = self.$write().begin().await?;
                let written = if expected == 0 {
                    sqlx::query(&$sql(INSERT))
                        .bind(device.product.as_str())
                        .bind(device.device.as_str())
                        .bind(document)
                        .bind(now)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| missing_device(e, device))?
                } else {
                    sqlx::query(&$sql(UPDATE))
                        .bind(device.product.as_str())
                        .bind(device.device.as_str())
                        .bind(document)
                        .bind(now)
                        .bind(expected)
                        .execute(&mut *tx)
                        .await?
                };
                if written.rows_affected() == 0 {
                    return Ok(None);
                }
                let id: i64 = sqlx::query_scalar(&$sql(OUTBOX))
                    .bind(event.kind.as_str())
                    .bind(&event.routing_key)
                    .bind(&event.event_id)
                    .bind(&event.body)
                    .bind(now)
                    .bind(now + lease_ms)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Some(vec![OutboxRecord { id, event: event.clone() }]))
            }
        }
    };
}

/// PostgreSQL keeps the document as JSONB (queryable); it travels as text.
fn pg(sql: &str) -> String {
    sql.replace("{doc}", "document::TEXT").replace("{new}", "$3::JSONB")
}

fn sqlite(sql: &str) -> String {
    sql.replace("{doc}", "document").replace("{new}", "$3").replace('$', "?")
}

shadow_store_impl!(PgStore, pg, pool, pool, "pg.get_shadow", "pg.put_shadow");
shadow_store_impl!(SqliteStore, sqlite, reader, writer, "sqlite.get_shadow", "sqlite.put_shadow");

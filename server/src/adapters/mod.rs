//! Adapters: concrete implementations of the ports, chosen by configuration in `startup`.
//!
//! - `postgres` / `sqlite`: the [`Store`](crate::ports::store::Store) for production and embedded profiles.
//! - `broker_http`: the [`BrokerApi`](crate::ports::broker::BrokerApi) over EMQX 5 or EMQX 4 / RMQTT REST.
//! - `embedded_broker`: RMQTT running inside this process, wired to this instance's hooks.

pub mod broker_http;
pub mod embedded_broker;
pub mod postgres;
pub mod sqlite;

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

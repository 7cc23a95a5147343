//! Business API keys: creation, verification and revocation, with scopes.
//!
//! Scopes are ordered: `admin` includes `write`, which includes `read`. Keys are `ihk_{id}_{secret}`; only
//! sha256(secret) is stored (the secret is 256 random bits, so a fast hash is sufficient) and the clear key
//! is returned once, at creation. Verified key records may be served from memory for
//! `cache.api_key_ttl_ms` (one database read per key per interval instead of one per request); revocation
//! through this instance applies at once, through another within that interval.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::model::store::ApiKeyRecord;
use crate::ports::store::Store;
use crate::secrets::{new_api_key, parse_api_key, verify_api_key, PlainSecret};

#[derive(strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "lowercase")]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Self> {
        s.parse().ok()
    }

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The authenticated caller of the business API.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub scopes: Vec<Scope>,
}

impl Principal {
    pub fn require(&self, needed: Scope) -> Result<()> {
        if self.scopes.iter().any(|s| *s >= needed) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!("this API key lacks the `{}` scope", needed.as_str())))
        }
    }
}

pub struct ApiKeyService {
    store: Arc<dyn Store>,
    /// Key records by id (only keys that exist: a new key is usable at once on every instance).
    cache: Option<moka::future::Cache<String, Arc<ApiKeyRecord>>>,
}

impl ApiKeyService {
    /// No cache: every request reads its key (CLI, tools).
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, cache: None }
    }

    /// Serves key records from memory for up to `ttl` (zero: no cache).
    pub fn with_cache(store: Arc<dyn Store>, ttl: Duration) -> Self {
        let cache =
            (!ttl.is_zero()).then(|| moka::future::Cache::builder().max_capacity(10_000).time_to_live(ttl).build());
        Self { store, cache }
    }

    async fn record(&self, id: &str) -> Result<Option<Arc<ApiKeyRecord>>> {
        if let Some(hit) = match &self.cache {
            Some(cache) => cache.get(id).await,
            None => None,
        } {
            return Ok(Some(hit));
        }
        let Some(record) = self.store.get_api_key(id).await?.map(Arc::new) else { return Ok(None) };
        if let Some(cache) = &self.cache {
            cache.insert(id.to_string(), record.clone()).await;
        }
        Ok(Some(record))
    }

    pub async fn create(&self, name: &str, scopes: &[Scope]) -> Result<(ApiKeyRecord, PlainSecret)> {
        if name.is_empty() || name.chars().count() > 100 {
            return Err(Error::validation("name", "must be 1-100 characters"));
        }
        if scopes.is_empty() {
            return Err(Error::validation("scopes", "at least one of read, write, admin"));
        }
        let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
        let (key, key_hash) = new_api_key(&id);
        let mut scopes: Vec<String> = scopes.iter().map(|s| s.as_str().to_string()).collect();
        scopes.sort();
        scopes.dedup();
        let record =
            ApiKeyRecord { id, name: name.to_string(), key_hash, scopes, created_at: now_ms(), revoked_at: None };
        self.store.insert_api_key(&record).await?;
        Ok((record, key))
    }

    /// Resolves a presented bearer key. Unknown, malformed, revoked or wrong keys are all just 401.
    #[tracing::instrument(skip_all, fields(key_id))]
    pub async fn authenticate(&self, presented: &str) -> Result<Principal> {
        let unauthorized = || Error::Unauthorized("missing or invalid API key".into());
        let (id, secret) = parse_api_key(presented).ok_or_else(unauthorized)?;
        tracing::Span::current().record("key_id", id);
        let record = self.record(id).await?.ok_or_else(unauthorized)?;
        if record.revoked_at.is_some() || !verify_api_key(&record.key_hash, secret) {
            return Err(unauthorized());
        }
        Ok(Principal {
            key_id: record.id.clone(),
            scopes: record.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
        })
    }

    pub async fn list(&self) -> Result<Vec<ApiKeyRecord>> {
        self.store.list_api_keys().await
    }

    pub async fn revoke(&self, id: &str) -> Result<()> {
        if self.store.revoke_api_key(id, now_ms()).await? {
            if let Some(cache) = &self.cache {
                cache.invalidate(id).await;
            }
            Ok(())
        } else {
            Err(Error::not_found("api key", id))
        }
    }

    pub async fn count_active(&self) -> Result<i64> {
        self.store.count_api_keys().await
    }
}

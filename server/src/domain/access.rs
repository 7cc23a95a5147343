//! Broker access decisions: who may connect (authn) and what a connected client may do (authz).
//!
//! Two kinds of MQTT clients exist:
//! - **devices**, username `{ProductId}/{DeviceId}`, password = a secret issued by the registry. Their
//!   rights come from the ACL templates in [`crate::topics`], and only while the device is active.
//! - **internal/ops clients** holding a short-lived JWT from `POST /api/v1/tokens` (username without `/`),
//!   whose rights come from the token's `acl` claim (EMQX 5 format).
//!
//! Everything not positively allowed is denied: unknown users, wrong secrets, suspended devices, expired
//! tokens, topics outside the grant, and any storage error. Connects always read the store; authz (every
//! publish or subscribe the broker cannot decide itself) reads a short-lived in-memory cache (config
//! `cache.*`) that changes made through this instance invalidate at once.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::ids::DeviceRef;
use crate::ports::store::{DeviceAuthRecord, DeviceStatus, Store};
use crate::secrets::verify_device_secret;
use crate::topics::{self, Action};

/// One entry of a JWT `acl` claim, as EMQX 5.5+ reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AclClaim {
    /// `allow` or `deny`.
    pub permission: String,
    /// `publish`, `subscribe` or `all`.
    pub action: String,
    /// MQTT topic filter.
    pub topic: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MqttClaims {
    pub username: String,
    pub exp: i64,
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl: Option<Vec<AclClaim>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AuthnDecision {
    AllowDevice,
    AllowToken { acl: Vec<AclClaim>, expire_at: i64 },
    Deny(&'static str),
}

impl AuthnDecision {
    pub fn allowed(&self) -> bool {
        !matches!(self, AuthnDecision::Deny(_))
    }
}

pub struct AccessService {
    store: Arc<dyn Store>,
    devices: moka::future::Cache<String, Arc<Option<DeviceAuthRecord>>>,
    /// ACLs of token clients, keyed by `clientid\0username`, kept until the token expires.
    token_acls: moka::future::Cache<String, Arc<(Vec<AclClaim>, i64)>>,
    jwt_encoding: EncodingKey,
    jwt_decoding: DecodingKey,
    jwt_max_ttl_secs: u64,
}

fn acl_allows(acl: &[AclClaim], action: Action, topic: &str) -> bool {
    // First matching rule wins, as in EMQX.
    for rule in acl {
        let action_matches = rule.action == "all" || rule.action == action.as_str();
        if action_matches && topics::filter_permits(&rule.topic, action, topic) {
            return rule.permission == "allow";
        }
    }
    false
}

impl AccessService {
    pub fn new(store: Arc<dyn Store>, jwt_secret: &[u8], jwt_max_ttl_secs: u64, ttl: Duration, capacity: u64) -> Self {
        Self {
            store,
            devices: moka::future::Cache::builder().max_capacity(capacity).time_to_live(ttl).build(),
            token_acls: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(jwt_max_ttl_secs))
                .build(),
            jwt_encoding: EncodingKey::from_secret(jwt_secret),
            jwt_decoding: DecodingKey::from_secret(jwt_secret),
            jwt_max_ttl_secs,
        }
    }

    async fn device_record(&self, device: &DeviceRef) -> Result<Arc<Option<DeviceAuthRecord>>> {
        let store = self.store.clone();
        let key = device.broker_username();
        let d = device.clone();
        self.devices
            .try_get_with(key, async move { store.device_auth(&d).await.map(Arc::new) })
            .await
            .map_err(|e: Arc<Error>| Error::Unavailable(format!("device lookup failed: {e}")))
    }

    /// Reads the store (never the cache) and refreshes the cache with what it found. Connects use this so
    /// a suspension made through any instance bites at the device's next connect, whatever the cache holds.
    async fn fresh_device_record(&self, device: &DeviceRef) -> Result<Arc<Option<DeviceAuthRecord>>> {
        let record = Arc::new(self.store.device_auth(device).await?);
        self.devices.insert(device.broker_username(), record.clone()).await;
        Ok(record)
    }

    /// Drops the cached auth record so the next decision reads the store.
    pub async fn forget_device(&self, device: &DeviceRef) {
        self.devices.invalidate(&device.broker_username()).await;
    }

    #[tracing::instrument(skip(self, password), fields(decision))]
    pub async fn authenticate(&self, clientid: &str, username: &str, password: &str) -> AuthnDecision {
        let decision = self.decide_authn(clientid, username, password).await;
        tracing::Span::current().record("decision", tracing::field::debug(&decision));
        metrics::counter!("iothub_broker_authn_total", "result" => if decision.allowed() { "allow" } else { "deny" })
            .increment(1);
        decision
    }

    async fn decide_authn(&self, clientid: &str, username: &str, password: &str) -> AuthnDecision {
        if clientid.is_empty() {
            return AuthnDecision::Deny("empty client id");
        }
        if let Some(device) = DeviceRef::from_broker_username(username) {
            let record = match self.fresh_device_record(&device).await {
                Ok(r) => r,
                Err(_) => return AuthnDecision::Deny("registry unavailable"),
            };
            let Some(record) = record.as_ref() else {
                return AuthnDecision::Deny("unknown device");
            };
            if record.status != DeviceStatus::Active {
                return AuthnDecision::Deny("device suspended");
            }
            let now = now_ms();
            let valid = record
                .credentials
                .iter()
                .filter(|c| c.expires_at.is_none_or(|at| at > now))
                .any(|c| verify_device_secret(&c.secret, password));
            return if valid { AuthnDecision::AllowDevice } else { AuthnDecision::Deny("bad secret") };
        }
        if username.contains('/') || username.is_empty() {
            return AuthnDecision::Deny("malformed username");
        }
        match self.verify_token(username, password) {
            Some(claims) => {
                let acl = claims.acl.unwrap_or_default();
                let key = format!("{clientid}\0{username}");
                self.token_acls.insert(key, Arc::new((acl.clone(), claims.exp))).await;
                AuthnDecision::AllowToken { acl, expire_at: claims.exp }
            }
            None => AuthnDecision::Deny("bad token"),
        }
    }

    #[tracing::instrument(skip(self), fields(allowed))]
    pub async fn authorize(&self, clientid: &str, username: &str, action: Action, topic: &str) -> bool {
        let allowed = self.decide_authz(clientid, username, action, topic).await;
        tracing::Span::current().record("allowed", allowed);
        metrics::counter!("iothub_broker_authz_total", "result" => if allowed { "allow" } else { "deny" }, "action" => action.as_str())
            .increment(1);
        allowed
    }

    async fn decide_authz(&self, clientid: &str, username: &str, action: Action, topic: &str) -> bool {
        if let Some(device) = DeviceRef::from_broker_username(username) {
            let active = matches!(
                self.device_record(&device).await.as_deref(),
                Ok(Some(DeviceAuthRecord { status: DeviceStatus::Active, .. }))
            );
            return active && topics::device_may(device.product.as_str(), device.device.as_str(), action, topic);
        }
        let key = format!("{clientid}\0{username}");
        match self.token_acls.get(&key).await {
            Some(entry) if entry.1 * 1000 > now_ms() => acl_allows(&entry.0, action, topic),
            _ => false,
        }
    }

    /// Issues an MQTT JWT (always with `exp`) that EMQX's JWT authenticator and this service accept.
    pub fn issue_token(
        &self,
        username: &str,
        ttl_secs: Option<u64>,
        acl: Option<Vec<AclClaim>>,
    ) -> Result<(String, i64)> {
        // A username that could be a product id would inherit the broker's auto-subscriptions
        // (`cmd/${username}/+/+/+/#` covers every device of that product), so token usernames must contain
        // a character ids never do.
        let well_formed = !username.is_empty()
            && username.len() <= 128
            && username.is_ascii()
            && !username.contains(['/', '+', '#', '$', '\0', ' '])
            && username.contains(['.', ':', '@']);
        if !well_formed {
            return Err(Error::validation(
                "username",
                "must be 1-128 ASCII characters containing '.', ':' or '@' and none of '/', '+', '#', '$' \
                 (so it can never be a device or product identity), e.g. `svc.billing`",
            ));
        }
        let ttl = ttl_secs.unwrap_or(600);
        if ttl == 0 || ttl > self.jwt_max_ttl_secs {
            return Err(Error::validation("ttl_seconds", format!("must be between 1 and {}", self.jwt_max_ttl_secs)));
        }
        if let Some(rules) = &acl {
            for (i, r) in rules.iter().enumerate() {
                if !matches!(r.permission.as_str(), "allow" | "deny") {
                    return Err(Error::validation(format!("acl[{i}].permission"), "must be `allow` or `deny`"));
                }
                if !matches!(r.action.as_str(), "publish" | "subscribe" | "all") {
                    return Err(Error::validation(
                        format!("acl[{i}].action"),
                        "must be `publish`, `subscribe` or `all`",
                    ));
                }
                if !topics::is_valid_filter(&r.topic) {
                    return Err(Error::validation(format!("acl[{i}].topic"), "must be a valid MQTT topic filter"));
                }
            }
        }
        let iat = now_ms() / 1000;
        let claims = MqttClaims { username: username.to_string(), exp: iat + ttl as i64, iat, acl };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.jwt_encoding)
            .map_err(|e| Error::Internal(anyhow::anyhow!("jwt encode: {e}")))?;
        Ok((token, claims.exp))
    }

    fn verify_token(&self, username: &str, token: &str) -> Option<MqttClaims> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<MqttClaims>(token, &self.jwt_decoding, &validation).ok()?;
        (data.claims.username == username).then_some(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_acl_first_match_wins() {
        let acl = vec![
            AclClaim { permission: "deny".into(), action: "publish".into(), topic: "a/secret".into() },
            AclClaim { permission: "allow".into(), action: "all".into(), topic: "a/#".into() },
        ];
        assert!(!acl_allows(&acl, Action::Publish, "a/secret"));
        assert!(acl_allows(&acl, Action::Publish, "a/other"));
        assert!(acl_allows(&acl, Action::Subscribe, "a/+"));
        assert!(!acl_allows(&acl, Action::Publish, "b"));
        assert!(!acl_allows(&[], Action::Publish, "a"));
    }
}

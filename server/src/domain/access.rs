//! Broker access decisions: who may connect (authn) and what a connected client may do (authz).
//!
//! Two kinds of MQTT clients exist:
//! - **devices**, username `{ProductId}/{DeviceId}`, password = a secret issued by the registry. Their
//!   rights come from the ACL templates in [`crate::topics`], and only while the device is active.
//! - **internal/ops clients** holding a short-lived JWT from `POST /api/v1/tokens` (username with `.`, `:`
//!   or `@`, never `/`), whose rights come from the token's `acl` claim (EMQX 5 format).
//!
//! Before any credential is looked at, the identity itself must be well formed
//! ([`crate::identity::check_identity`]): a device- or token-shaped username with nothing a broker plugin could
//! reinterpret, and a client id derived from it (`{username}` or `{username}/{suffix}`), so no client can
//! take over another identity's broker session.
//!
//! Everything not positively allowed is denied: malformed identities, unknown users, wrong secrets,
//! suspended devices, expired tokens, topics outside the grant, and any storage error. Connects always read
//! the store; authz (every publish or subscribe the broker cannot decide itself) reads a short-lived
//! in-memory cache (config `cache.*`) that changes made through this instance invalidate at once. A token
//! client's ACL is stored at CONNECT (the authz request carries no credential, and the broker may ask any
//! instance), so it holds on every instance and across restarts until the token expires.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::identity::{check_identity, Principal};
use crate::ids::DeviceRef;
use crate::model::store::{DeviceAuthRecord, DeviceStatus, StoredTokenSession};
use crate::ports::store::Store;
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
    /// The one client id the token may connect with. EMQX's JWT authenticator checks it
    /// (`verify_claims.clientid`), iothub too: a token can never take over another client's session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clientid: Option<String>,
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

/// The denial of a well-formed token identity whose password is not a token this instance can verify.
pub const BAD_TOKEN: &str = "bad token";

impl AuthnDecision {
    pub fn allowed(&self) -> bool {
        !matches!(self, AuthnDecision::Deny(_))
    }

    /// A well-formed token identity whose token iothub could not verify: another authenticator in the broker's
    /// chain (EMQX's JWT one) may still know it. Every other denial is final.
    pub fn is_unverified_token(&self) -> bool {
        matches!(self, AuthnDecision::Deny(BAD_TOKEN))
    }
}

pub struct AccessService {
    store: Arc<dyn Store>,
    devices: moka::future::Cache<String, Arc<Option<DeviceAuthRecord>>>,
    /// ACLs of token clients read from the store, keyed by `clientid\0username`, for `cache.device_ttl_ms`.
    token_sessions: moka::future::Cache<String, Arc<TokenSession>>,
    jwt_encoding: EncodingKey,
    jwt_decoding: DecodingKey,
    jwt_max_ttl_secs: u64,
}

/// A token client's grant as authz uses it.
#[derive(Debug)]
struct TokenSession {
    acl: Vec<AclClaim>,
    expires_at: i64,
}

fn token_key(clientid: &str, username: &str) -> String {
    format!("{clientid}\0{username}")
}

/// A token ACL topic that every broker reads as the same plain MQTT filter iothub matches: EMQX treats
/// an `eq ` prefix as a literal match and `${…}` as a template, RMQTT its `%u`/`%c` placeholders, and a
/// shared-subscription prefix is not a filter at all.
fn is_plain_acl_filter(topic: &str) -> bool {
    topic.len() <= 256
        && topics::is_valid_filter(topic)
        && !topic.starts_with("eq ")
        && !topic.starts_with("$share/")
        && !topic.starts_with("$queue/")
        && !topic.contains("${")
        && !topic.contains('%')
        && !topic.chars().any(char::is_control)
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
            token_sessions: moka::future::Cache::builder().max_capacity(capacity).time_to_live(ttl).build(),
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
        let principal = match check_identity(username, clientid) {
            Ok(p) => p,
            Err(e) => {
                metrics::counter!("iothub_broker_identity_refused_total", "reason" => e.as_str()).increment(1);
                return AuthnDecision::Deny(e.as_str());
            }
        };
        match principal {
            Principal::Device(device) => self.authenticate_device(&device, password).await,
            Principal::Token(_) => self.authenticate_token(clientid, username, password).await,
        }
    }

    async fn authenticate_device(&self, device: &DeviceRef, password: &str) -> AuthnDecision {
        let record = match self.fresh_device_record(device).await {
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
        if valid {
            AuthnDecision::AllowDevice
        } else {
            AuthnDecision::Deny("bad secret")
        }
    }

    /// A valid token's ACL is written to the store before the CONNECT is allowed: whichever instance the
    /// broker asks about this client's subscriptions later reads it there.
    async fn authenticate_token(&self, clientid: &str, username: &str, password: &str) -> AuthnDecision {
        let Some(claims) = self.verify_token(clientid, username, password) else {
            return AuthnDecision::Deny(BAD_TOKEN);
        };
        let acl = claims.acl.unwrap_or_default();
        let session = TokenSession { acl: acl.clone(), expires_at: claims.exp };
        let stored = StoredTokenSession {
            acl_json: serde_json::to_string(&acl).expect("ACL rules serialise"),
            expires_at: claims.exp,
        };
        if self.store.put_token_session(clientid, username, &stored, now_ms() / 1000).await.is_err() {
            return AuthnDecision::Deny("registry unavailable");
        }
        self.token_sessions.insert(token_key(clientid, username), Arc::new(session)).await;
        AuthnDecision::AllowToken { acl, expire_at: claims.exp }
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
        // EMQX authorizes shared subscriptions on the real filter (it strips `$share/{group}/` before asking);
        // deciding the same way keeps every dialect in agreement.
        let topic = match action {
            Action::Subscribe => topics::shared_subscription_filter(topic).unwrap_or(topic),
            Action::Publish => topic,
        };
        // The identity was checked at CONNECT, but an authz request is answered on its own: a broker that
        // rewrites identities between the two (RMQTT's placeholders) must not reach another identity here.
        let Ok(principal) = check_identity(username, clientid) else {
            return false;
        };
        match principal {
            Principal::Device(device) => {
                let active = matches!(
                    self.device_record(&device).await.as_deref(),
                    Ok(Some(DeviceAuthRecord { status: DeviceStatus::Active, .. }))
                );
                active && topics::device_may(device.product.as_str(), device.device.as_str(), action, topic)
            }
            Principal::Token(_) => match self.token_session(clientid, username).await {
                Ok(Some(session)) if session.expires_at * 1000 > now_ms() => acl_allows(&session.acl, action, topic),
                _ => false,
            },
        }
    }

    /// Only found sessions are cached: a lookup that finds none (the CONNECT is still being answered by
    /// another instance) must not hide the session once it is stored.
    async fn token_session(&self, clientid: &str, username: &str) -> Result<Option<Arc<TokenSession>>> {
        let key = token_key(clientid, username);
        if let Some(hit) = self.token_sessions.get(&key).await {
            return Ok(Some(hit));
        }
        let Some(stored) = self.store.get_token_session(clientid, username).await? else {
            return Ok(None);
        };
        // A row that does not parse grants nothing (fail closed), like a missing one.
        let Ok(acl) = serde_json::from_str(&stored.acl_json) else {
            return Ok(None);
        };
        let found = Arc::new(TokenSession { acl, expires_at: stored.expires_at });
        self.token_sessions.insert(key, found.clone()).await;
        Ok(Some(found))
    }

    /// Issues an MQTT JWT (always with `exp`) that EMQX's JWT authenticator and this service accept.
    pub fn issue_token(
        &self,
        username: &str,
        client_id: Option<&str>,
        ttl_secs: Option<u64>,
        acl: Option<Vec<AclClaim>>,
    ) -> Result<(String, i64)> {
        // A username that could be a product id would inherit the broker's auto-subscriptions
        // (`cmd/${username}/+/+/+/#` covers every device of that product), so token usernames must contain
        // a character ids never do.
        if !crate::identity::is_token_username(username) {
            return Err(Error::validation(
                "username",
                "must be 1-128 printable ASCII characters containing '.', ':' or '@' and none of \
                 '/', '+', '#', '$', '%', '{', '}', quotes or backslashes (so it can never be a device or product \
                 identity, nor template syntax to a broker), e.g. `svc.billing`",
            ));
        }
        let client_id = client_id.unwrap_or(username);
        if !crate::identity::client_id_is_bound(username, client_id) {
            return Err(Error::validation(
                "client_id",
                "must be the username or `{username}/{suffix}` with a suffix of [A-Za-z0-9_-]{1,64}",
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
                if !is_plain_acl_filter(&r.topic) {
                    return Err(Error::validation(
                        format!("acl[{i}].topic"),
                        "must be a valid MQTT topic filter of at most 256 bytes, without `$share/`/`$queue/`, \
                         an `eq ` prefix or `${`/`%` placeholders (brokers read those as syntax iothub would not)",
                    ));
                }
            }
        }
        let iat = now_ms() / 1000;
        let claims = MqttClaims {
            username: username.to_string(),
            clientid: Some(client_id.to_string()),
            exp: iat + ttl as i64,
            iat,
            acl,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.jwt_encoding)
            .map_err(|e| Error::Internal(anyhow::anyhow!("jwt encode: {e}")))?;
        Ok((token, claims.exp))
    }

    fn verify_token(&self, clientid: &str, username: &str, token: &str) -> Option<MqttClaims> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<MqttClaims>(token, &self.jwt_decoding, &validation).ok()?;
        // Every token iothub mints is bound to one client id; one without the claim (minted before it
        // existed) is refused, as EMQX's JWT authenticator refuses it (`verify_claims.clientid`).
        let client_matches = data.claims.clientid.as_deref() == Some(clientid);
        (data.claims.username == username && client_matches).then_some(data.claims)
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

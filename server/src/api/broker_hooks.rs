//! `/broker/*`: the broker asks iothub who may connect and what they may do.
//!
//! Three contracts, one decision ([`AccessService`](crate::domain::access::AccessService)):
//! - EMQX 5 HTTP authn/authz: JSON in, `200 {"result": "allow"|"deny"}` out.
//! - EMQX 4 `emqx_auth_http`: form or query params, the answer is the status code (200 allow,
//!   401/403 deny); `access` is `1` (subscribe) or `2` (publish).
//! - RMQTT `rmqtt-auth-http`: EMQX 4 params, but any non-2xx means "ignore" there, so denials must be a
//!   2xx with `{"result": "deny"}`.
//!
//! Every call must carry `broker.hook_token` (`Authorization: Bearer ...`, or as the HTTP Basic password for
//! RMQTT's web-hook); anything else is 401 and decides
//! nothing. Errors inside a decision deny (fail closed); they never "ignore" into the next authenticator.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::extract::bearer;
use super::SharedState;
use crate::domain::access::AuthnDecision;
use crate::error::Error;
use crate::ids::DeviceRef;
use crate::topics::Action;

pub async fn require_hook_token(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let presented = presented_token(req.headers());
    let ok = presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(state.hook_token.as_bytes())));
    if ok {
        next.run(req).await
    } else {
        metrics::counter!("iothub_broker_hook_unauthorized_total").increment(1);
        Error::Unauthorized("missing or wrong broker hook token".into()).into_response()
    }
}

/// The token from `Bearer {token}` (parsed like API keys are), or the password of
/// `Basic base64(user:{token})` (RMQTT's web-hook can only send credentials as URL userinfo, which
/// becomes Basic auth).
fn presented_token(headers: &HeaderMap) -> Option<String> {
    if let Some(token) = bearer(headers) {
        return Some(token.to_string());
    }
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(BASE64_STANDARD.decode(encoded.trim()).ok()?).ok()?;
    decoded.split_once(':').map(|(_, password)| password.to_string())
}

/// Hook parameters from a JSON body, a form body, or the query string, as strings.
pub struct HookParams(HashMap<String, String>);

impl HookParams {
    fn get(&self, key: &str) -> &str {
        self.0.get(key).map(String::as_str).unwrap_or("")
    }
}

impl<S: Send + Sync> FromRequest<S> for HookParams {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        let query: HashMap<String, String> =
            req.uri().query().map(|q| serde_urlencoded::from_str(q).unwrap_or_default()).unwrap_or_default();
        let is_json =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|c| c.contains("json"));
        let body = Bytes::from_request(req, state).await.map_err(|e| Error::validation("body", e))?;
        let mut params = query;
        if is_json {
            let v: Value = serde_json::from_slice(&body).map_err(|e| Error::validation("body", e))?;
            let Value::Object(map) = v else {
                return Err(Error::validation("body", "expected a JSON object"));
            };
            for (k, v) in map {
                let s = match v {
                    Value::String(s) => s,
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                params.insert(k, s);
            }
        } else if !body.is_empty() {
            let form: HashMap<String, String> =
                serde_urlencoded::from_bytes(&body).map_err(|e| Error::validation("body", e))?;
            params.extend(form);
        }
        Ok(HookParams(params))
    }
}

fn emqx4_action(access: &str) -> Option<Action> {
    match access {
        "1" => Some(Action::Subscribe),
        "2" => Some(Action::Publish),
        _ => None,
    }
}

fn emqx5_action(action: &str) -> Option<Action> {
    match action {
        "publish" => Some(Action::Publish),
        "subscribe" => Some(Action::Subscribe),
        _ => None,
    }
}

async fn authz(state: &SharedState, p: &HookParams, action: Option<Action>) -> bool {
    match action {
        Some(a) => state.access.authorize(p.get("clientid"), p.get("username"), a, p.get("topic")).await,
        None => false,
    }
}

pub async fn emqx5_authn(State(state): State<SharedState>, p: HookParams) -> Json<Value> {
    let username = p.get("username");
    match state.access.authenticate(p.get("clientid"), username, p.get("password")).await {
        // The device ACL travels with the answer (EMQX >= 5.7.2), so publishes need no authz round trip.
        AuthnDecision::AllowDevice => {
            Json(json!({"result": "allow", "is_superuser": false, "acl": device_publish_acl(username)}))
        }
        AuthnDecision::AllowToken { acl, expire_at } => {
            Json(json!({"result": "allow", "is_superuser": false, "acl": broker_grants(&acl), "expire_at": expire_at}))
        }
        // A well-formed token identity with a token this instance cannot verify: let the rest of EMQX's chain
        // (its JWT authenticator) decide; an exhausted chain refuses the client. Everything else is final: a
        // malformed identity or a client id bound to someone else must not reach an authenticator that does
        // not check them (EMQX's JWT authenticator would accept a valid token under a device's client id).
        d @ AuthnDecision::Deny(_) if d.is_unverified_token() => Json(json!({"result": "ignore"})),
        AuthnDecision::Deny(_) => Json(json!({"result": "deny"})),
    }
}

/// The part of a token ACL the broker may evaluate itself: publish grants before the first deny rule
/// (first match wins, so they mean the same there). Subscriptions stay with the hook, whose filter
/// coverage check is exact (brokers let a granted `+` match a requested `#`).
fn broker_grants(acl: &[crate::domain::access::AclClaim]) -> Vec<Value> {
    acl.iter()
        .take_while(|r| r.permission == "allow")
        .filter(|r| r.action == "publish" || r.action == "all")
        .map(|r| json!({"permission": "allow", "action": "publish", "topic": r.topic}))
        .collect()
}

/// A token's whole ACL in RMQTT's rule format (first match wins there too), then a deny of everything else.
/// RMQTT's matcher lets a granted `+` match a requested `#` in a subscription: a token's grant is an admin's
/// explicit choice, and docs/architecture.md says what it means.
fn token_full_acl(acl: &[crate::domain::access::AclClaim]) -> Vec<Value> {
    acl.iter()
        .map(|r| json!({"permission": r.permission, "action": r.action, "topic": r.topic}))
        .chain(std::iter::once(json!({"permission": "deny", "action": "all", "topic": "#"})))
        .collect()
}

/// The device's publish grants in EMQX's client-info ACL format. Publishes are the hot path (every message
/// id is a new topic, so per-topic caches miss); carrying the grants in the authn answer lets the broker
/// decide them itself. Subscriptions, rare and wildcard-laden, keep going through the authz hook, where
/// filter coverage is checked precisely. Nothing here is a deny rule: whatever is not granted falls
/// through to the hook, which denies it.
fn device_publish_acl(username: &str) -> Vec<Value> {
    let Some(device) = DeviceRef::from_broker_username(username) else {
        return Vec::new();
    };
    crate::topics::DEVICE_ACL
        .iter()
        .filter(|r| r.action == Action::Publish)
        .map(|r| {
            json!({
                "permission": "allow",
                "action": r.action.as_str(),
                "topic": crate::topics::expand_template(r.topic, device.product.as_str(), device.device.as_str()),
            })
        })
        .collect()
}

/// A device's ACL in RMQTT's rule format, decided in the broker on the identity authenticated at CONNECT:
/// publish grants, subscribe grants, then a deny of every other subscription. The auto-subscribed filters are
/// literal (`eq `), because a broker's own matcher lets a granted `+` match a requested `#`. The tag grant
/// stays a filter (tags change during a connection); what that matcher lets through beyond iothub's exact
/// check stays inside the product's own tag namespace (`tags/{p}/{tag}/cmd/a/b/#` also reaches 6-level
/// topics there, which nothing iothub sends uses). Publishes with a `$` level (iothub's internal requests)
/// cannot be matched by RMQTT's wildcards and go to the acl hook ([`rmqtt_acl`]).
fn device_full_acl(username: &str) -> Vec<Value> {
    let deny_subscriptions = json!({"permission": "deny", "action": "subscribe", "topic": "#"});
    let Some(device) = DeviceRef::from_broker_username(username) else {
        return vec![deny_subscriptions];
    };
    let (p, d) = (device.product.as_str(), device.device.as_str());
    let mut rules = device_publish_acl(username);
    for rule in crate::topics::DEVICE_ACL.iter().filter(|r| r.action == Action::Subscribe) {
        let filter = crate::topics::expand_template(rule.topic, p, d);
        let topic = if rule.topic.starts_with("tags/") { filter } else { format!("eq {filter}") };
        rules.push(json!({"permission": "allow", "action": "subscribe", "topic": topic}));
    }
    rules.push(deny_subscriptions);
    rules
}

pub async fn emqx5_authz(State(state): State<SharedState>, p: HookParams) -> Json<Value> {
    let allowed = authz(&state, &p, emqx5_action(p.get("action"))).await;
    Json(json!({"result": if allowed { "allow" } else { "deny" }}))
}

pub async fn emqx4_auth(State(state): State<SharedState>, p: HookParams) -> StatusCode {
    let d = state.access.authenticate(p.get("clientid"), p.get("username"), p.get("password")).await;
    if d.allowed() {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    }
}

pub async fn emqx4_acl(State(state): State<SharedState>, p: HookParams) -> StatusCode {
    if authz(&state, &p, emqx4_action(p.get("access"))).await {
        StatusCode::OK
    } else {
        StatusCode::FORBIDDEN
    }
}

/// Nobody is a superuser: every client, internal ones included, is bound by an ACL.
pub async fn emqx4_superuser(_: HookParams) -> StatusCode {
    StatusCode::FORBIDDEN
}

pub async fn rmqtt_auth(State(state): State<SharedState>, p: HookParams) -> Json<Value> {
    let username = p.get("username");
    match state.access.authenticate(p.get("clientid"), username, p.get("password")).await {
        // RMQTT evaluates a returned ACL in the broker. A device gets every grant RMQTT can match and a final
        // deny of other subscriptions, so the acl hook is asked about a device only for internal `$` publishes:
        // rmqtt-auth-http fills its request placeholders one after another, so an external RMQTT (without the
        // bundled broker's identity gate) could present another username there than the one authenticated
        // (`P/d4%A` is `P/d4` at CONNECT and `P/d41` at ACL time).
        AuthnDecision::AllowDevice => {
            Json(json!({"result": "allow", "superuser": false, "acl": device_full_acl(username)}))
        }
        // A token client's whole grant, decided in the broker on the identity authenticated at CONNECT, for the
        // same reason as a device's: the acl hook could be asked under a rewritten username.
        AuthnDecision::AllowToken { acl, expire_at } => {
            Json(json!({"result": "allow", "superuser": false, "acl": token_full_acl(&acl), "expire_at": expire_at}))
        }
        AuthnDecision::Deny(_) => Json(json!({"result": "deny"})),
    }
}

pub async fn rmqtt_acl(State(state): State<SharedState>, p: HookParams) -> Json<Value> {
    let action = emqx4_action(p.get("access"));
    // A device's authn answer already decided everything RMQTT can match itself: every subscription, and
    // every publish without a `$` level (RMQTT's wildcards never match one, so `get/{p}/{d}/$ntp/…` comes
    // here). So a device question reaching this hook is either such an internal publish or something to
    // refuse, and the identity presented here may have been rewritten by rmqtt-auth-http's placeholders on
    // an external RMQTT (emqx-config/README.md, section 10): never grant it a subscription or a plain topic.
    // Token clients got their whole grant the same way, and a token has no namespace of its own that a
    // rewritten identity could be confined to: the hook grants them nothing.
    let allowed = match (crate::identity::parse_username(p.get("username")), action) {
        (Ok(crate::identity::Principal::Token(_)), _) => false,
        (Ok(crate::identity::Principal::Device(_)), Some(Action::Subscribe)) => false,
        (Ok(crate::identity::Principal::Device(_)), Some(Action::Publish))
            if !has_inner_dollar_level(p.get("topic")) =>
        {
            false
        }
        _ => authz(&state, &p, action).await,
    };
    Json(json!({"result": if allowed { "allow" } else { "deny" }}))
}

/// Whether a topic has a `$`-prefixed level after the first (iothub's internal names, e.g. `$ntp`).
fn has_inner_dollar_level(topic: &str) -> bool {
    topic.split('/').skip(1).any(|level| level.starts_with('$'))
}

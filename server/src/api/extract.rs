//! Request extractors shared by all handlers: JSON bodies with field-naming errors, API-key scopes,
//! and validated path ids.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;

use super::SharedState;
use crate::domain::api_keys::{Principal, Scope};
use crate::error::Error;
use crate::ids::{DeviceId, DeviceRef, ProductId};

/// JSON body whose errors name the offending field (`devices[3].device_id`), as problem+json 4xx.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        json_body(req, state, false).await.map(|v: Option<T>| ApiJson(v.expect("required body")))
    }
}

/// Like [`ApiJson`], but an empty body means `T::default()` (for requests whose fields are all optional).
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        json_body(req, state, true).await.map(|v: Option<T>| OptionalJson(v.unwrap_or_default()))
    }
}

async fn json_body<T: DeserializeOwned, S: Send + Sync>(
    req: Request,
    state: &S,
    optional: bool,
) -> Result<Option<T>, Error> {
    {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json") || ct.contains("+json"));
        let has_body = req.headers().get(header::CONTENT_LENGTH).is_none_or(|l| l != "0");
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| Error::validation("body", format!("could not read body: {e}")))?;
        if optional && (bytes.is_empty() || !has_body) {
            return Ok(None);
        }
        if !is_json {
            return Err(Error::validation("body", "expected Content-Type: application/json"));
        }
        parse_json(&bytes).map(Some)
    }
}

/// Query string whose errors name the offending parameter, as problem+json 4xx.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(url::form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(ApiQuery).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." || path.is_empty() { "query".to_string() } else { path };
            Error::validation(field, e.inner())
        })
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() { "body".to_string() } else { path };
        // serde's message already says what was expected; keep it without line/column noise.
        let msg = e.inner().to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        Error::validation(field, msg)
    })
}

/// The credentials of `Authorization: Bearer ...` (scheme matched case-insensitively, RFC 9110).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credentials.trim())
}

async fn principal(parts: &Parts, state: &SharedState, needed: Scope) -> Result<Principal, Error> {
    let key = bearer(&parts.headers)
        .ok_or_else(|| Error::Unauthorized("missing API key (Authorization: Bearer ihk_...)".into()))?;
    let principal = state.api_keys.authenticate(key).await?;
    principal.require(needed)?;
    Ok(principal)
}

macro_rules! scope_extractor {
    ($name:ident, $scope:expr, $doc:literal) => {
        #[doc = $doc]
        #[allow(dead_code)]
        pub struct $name(pub Principal);

        impl FromRequestParts<SharedState> for $name {
            type Rejection = Error;

            async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, Error> {
                principal(parts, state, $scope).await.map($name)
            }
        }
    };
}

scope_extractor!(ReadAccess, Scope::Read, "A caller whose key has at least the `read` scope.");
scope_extractor!(WriteAccess, Scope::Write, "A caller whose key has at least the `write` scope.");
scope_extractor!(AdminAccess, Scope::Admin, "A caller whose key has the `admin` scope.");

pub fn product_id(raw: String) -> Result<ProductId, Error> {
    ProductId::parse(raw).map_err(|e| Error::validation("product_id", e))
}

pub fn device_ref(product: String, device: String) -> Result<DeviceRef, Error> {
    let product = product_id(product)?;
    let device = DeviceId::parse(device).map_err(|e| Error::validation("device_id", e))?;
    Ok(DeviceRef::new(product, device))
}

pub async fn not_found(uri: axum::http::Uri) -> Error {
    Error::NotFound { what: "route", id: uri.path().to_string() }
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Error {
    Error::MethodNotAllowed(format!("{method} is not supported on {}", uri.path()))
}

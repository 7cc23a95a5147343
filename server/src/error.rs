//! The one error type of iothub and its mapping to RFC 9457 `application/problem+json`.
//!
//! Domain services return [`Error`]; the HTTP edge turns it into a problem document. Validation errors
//! always name the offending field so API users can fix their request without reading logs. Internal
//! errors are logged with their cause and answered with a generic 500 that leaks nothing.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid `{field}`: {message}")]
    Validation { field: String, message: String },
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Unavailable(String),
    /// Waited for something outside iothub (a device's reply) longer than allowed.
    #[error("{0}")]
    Timeout(String),
    /// A per-caller limit is reached (e.g. concurrent event streams of one API key).
    #[error("{0}")]
    TooManyRequests(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl Error {
    pub fn validation(field: impl Into<String>, message: impl ToString) -> Self {
        Error::Validation { field: field.into(), message: message.to_string() }
    }

    pub fn not_found(what: &'static str, id: impl ToString) -> Self {
        Error::NotFound { what, id: id.to_string() }
    }

    /// The same failure for each of several callers that shared one operation (a group commit).
    pub fn share(&self) -> Self {
        match self {
            Error::Validation { field, message } => {
                Error::Validation { field: field.clone(), message: message.clone() }
            }
            Error::NotFound { what, id } => Error::NotFound { what, id: id.clone() },
            Error::Conflict(m) => Error::Conflict(m.clone()),
            Error::Unauthorized(m) => Error::Unauthorized(m.clone()),
            Error::Forbidden(m) => Error::Forbidden(m.clone()),
            Error::MethodNotAllowed(m) => Error::MethodNotAllowed(m.clone()),
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
            Error::Timeout(m) => Error::Timeout(m.clone()),
            Error::TooManyRequests(m) => Error::TooManyRequests(m.clone()),
            Error::Internal(e) => Error::Internal(anyhow::anyhow!("{e:#}")),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Error::Validation { .. } => "validation",
            Error::NotFound { .. } => "not-found",
            Error::Conflict(_) => "conflict",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::MethodNotAllowed(_) => "method-not-allowed",
            Error::Unavailable(_) => "unavailable",
            Error::Timeout(_) => "timeout",
            Error::TooManyRequests(_) => "too-many-requests",
            Error::Internal(_) => "internal",
        }
    }
}

/// SQLSTATEs (five characters; SQLite's numeric codes never are) worth repeating later: connection
/// exceptions (08), insufficient resources (53), operator intervention (57: restart, failover) except a
/// statement timeout (57014, which would time out again), serialization failures and deadlocks.
fn retryable_sqlstate(code: &str) -> bool {
    code.len() == 5
        && (code.starts_with("08")
            || code.starts_with("53")
            || (code.starts_with("57") && code != "57014")
            || code == "40001"
            || code == "40P01")
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Error::Unavailable(format!("database unavailable: {e}"))
            }
            // The server going away or refusing work, or a lost race: a retryable 503, not a 500.
            sqlx::Error::Database(db) if db.code().as_deref().is_some_and(retryable_sqlstate) => {
                // The server's text may name roles or databases: it goes to the log, not to the client.
                tracing::warn!(error = %e, "database refused the statement");
                Error::Unavailable(format!("database unavailable (SQLSTATE {})", db.code().unwrap_or_default()))
            }
            _ => Error::Internal(anyhow::Error::new(e).context("database")),
        }
    }
}

/// The problem document. `field` is an iothub extension member naming the invalid input.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// URI reference identifying the problem type, e.g. `urn:iothub:problem:validation`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = match &self {
            Error::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                "internal error; see server logs".to_string()
            }
            Error::Unavailable(msg) => {
                tracing::warn!(%msg, "dependency unavailable");
                self.to_string()
            }
            other => other.to_string(),
        };
        let field = match &self {
            Error::Validation { field, .. } => Some(field.clone()),
            _ => None,
        };
        let problem = Problem {
            kind: format!("urn:iothub:problem:{}", self.kind()),
            title: status.canonical_reason().unwrap_or("error").to_string(),
            status: status.as_u16(),
            detail,
            field,
        };
        let mut resp = (status, axum::Json(problem)).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/problem+json"));
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Db(&'static str);

    impl std::fmt::Display for Db {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "database error {}", self.0)
        }
    }

    impl std::error::Error for Db {}

    impl sqlx::error::DatabaseError for Db {
        fn message(&self) -> &str {
            "test"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn status_of(code: &'static str) -> u16 {
        Error::from(sqlx::Error::Database(Box::new(Db(code)))).status().as_u16()
    }

    #[test]
    fn database_going_away_is_retryable() {
        // admin_shutdown (restart), cannot_connect_now, connection_failure, too_many_connections,
        // serialization_failure, deadlock_detected
        for code in ["57P01", "57P03", "08006", "53300", "40001", "40P01"] {
            assert_eq!(status_of(code), 503, "{code}");
        }
        // unique_violation is a bug if it reaches here; SQLite's numeric I/O error code is not a SQLSTATE.
        for code in ["23505", "5386", "42P01", "57014"] {
            assert_eq!(status_of(code), 500, "{code}");
        }
    }
}

//! Operator endpoints: liveness, readiness (every dependency checked) and Prometheus metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use super::SharedState;

/// Alive: the process answers. Never touches dependencies, so a database outage does not get us restarted.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready: every dependency answered just now. 503 names the ones that did not.
pub async fn readyz(State(state): State<SharedState>) -> (StatusCode, Json<Value>) {
    let (store, broker, dedup, bus) =
        tokio::join!(state.store.ping(), state.broker.ping(), state.dedup.ping(), state.bus.ping());
    let check = |name: &str, kind: &str, r: &crate::error::Result<()>| match r {
        Ok(()) => json!({"name": name, "kind": kind, "ok": true}),
        Err(e) => json!({"name": name, "kind": kind, "ok": false, "error": e.to_string()}),
    };
    let checks = vec![
        check("database", state.store.backend(), &store),
        check("broker", state.broker.kind(), &broker),
        check("dedup", state.dedup.kind(), &dedup),
        check("events", state.bus.kind(), &bus),
    ];
    let ready = store.is_ok() && broker.is_ok() && dedup.is_ok() && bus.is_ok();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"status": if ready { "ready" } else { "not_ready" }, "checks": checks})))
}

pub async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

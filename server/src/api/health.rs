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

/// Ready: every dependency is checked just now (the answer says which failed, never why: that is logged). Only the database is critical (without it the instance
/// cannot answer the broker's auth hooks or store anything): 503 names it. The broker's management API,
/// Redis and RabbitMQ are not: without them iothub still authenticates devices and stores every event
/// (commands wait in the log and are published when the API answers again, dedup falls back to the
/// database's unique keys, events wait in the outbox), so their failure reports `degraded` with 200 —
/// taking every instance out of the load balancer because one dependency's API is down would stop the
/// broker's auth hooks, and with them every device.
pub async fn readyz(State(state): State<SharedState>) -> (StatusCode, Json<Value>) {
    let (store, broker, dedup, bus) =
        tokio::join!(state.store.ping(), state.broker.ping(), state.dedup.ping(), state.bus.ping());
    // `/readyz` is unauthenticated and often reachable from the load balancer's public side: an error text
    // (hosts, ports, database names, SQLSTATEs) would describe the internals to anyone, so it goes to the log.
    let check = |name: &str, kind: &str, critical: bool, r: &crate::error::Result<()>| {
        if let Err(e) = r {
            tracing::warn!(check = name, kind, critical, error = %e, "readiness check failed");
        }
        json!({"name": name, "kind": kind, "critical": critical, "ok": r.is_ok()})
    };
    let mut checks = vec![
        check("database", state.store.backend(), true, &store),
        check("broker", state.broker.kind(), false, &broker),
        check("dedup", state.dedup.kind(), false, &dedup),
        check("events", state.bus.kind(), false, &bus),
    ];
    // Events wait in the queue while no instance consumes it: degraded, not unready.
    let queue = state.broker_queue.as_ref().map(|q| q.ping());
    if let (Some(q), Some(result)) = (&state.broker_queue, &queue) {
        checks.push(check("broker_queue", q.kind(), false, result));
    }
    let ready = store.is_ok();
    let degraded = broker.is_err() || dedup.is_err() || bus.is_err() || queue.is_some_and(|q| q.is_err());
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let label = match (ready, degraded) {
        (false, _) => "not_ready",
        (true, true) => "degraded",
        (true, false) => "ready",
    };
    (status, Json(json!({"status": label, "checks": checks})))
}

pub async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

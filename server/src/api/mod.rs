//! The HTTP edge: routing, authentication of callers, request parsing and response shapes.
//! (`broker_queue` is the one edge that is not HTTP: broker events consumed from RabbitMQ, parsed by the
//! same code as the event webhooks.)
//!
//! Handlers translate HTTP to domain calls and back; they hold no SQL and no business rules. Three
//! audiences share the listener: business systems (`/api/v1`, API keys), the broker (`/broker/*`, a shared
//! hook token) and operators (`/healthz`, `/readyz`, `/metrics`, unauthenticated).

pub mod api_keys;
pub mod broker_events;
pub mod broker_hooks;
pub mod broker_queue;
pub mod commands;
pub mod devices;
pub mod extract;
pub mod health;
pub mod openapi;
pub mod ota;
pub mod page;
pub mod products;
pub mod shadows;
pub mod tags;
pub mod telemetry;
pub mod tokens;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::domain::access::AccessService;
use crate::domain::api_keys::ApiKeyService;
use crate::domain::commands::CommandService;
use crate::domain::history::HistoryService;
use crate::domain::ingest::IngestService;
use crate::domain::ota::OtaService;
use crate::domain::registry::RegistryService;
use crate::domain::shadows::ShadowService;
use crate::domain::tags::TagService;
use crate::ports::broker::BrokerApi;
use crate::ports::dedup::Deduplicator;
use crate::ports::event_bus::EventBus;
use crate::ports::store::Store;

pub struct AppState {
    pub store: Arc<dyn Store>,
    pub broker: Arc<dyn BrokerApi>,
    pub registry: RegistryService,
    pub access: Arc<AccessService>,
    pub api_keys: ApiKeyService,
    pub history: HistoryService,
    pub ingest: IngestService,
    pub commands: CommandService,
    pub tags: TagService,
    pub shadows: ShadowService,
    pub ota: OtaService,
    pub dedup: Arc<dyn Deduplicator>,
    pub bus: Arc<dyn EventBus>,
    /// The RabbitMQ queue broker events also arrive on (`rabbitmq.ingest_queue`), when configured.
    pub broker_queue: Option<broker_queue::BrokerQueue>,
    pub hook_token: String,
    /// Flips to `true` when shutdown begins, so long-lived responses (SSE) end and HTTP can drain.
    pub closing: tokio::sync::watch::Sender<bool>,
    /// Open event streams per API key (`http.sse_streams_per_key`).
    pub event_streams: StreamSlots,
    pub metrics: PrometheusHandle,
}

pub type SharedState = Arc<AppState>;

/// Counts the long-lived streams each API key holds on this instance, so one key (or a leaked one) cannot
/// pin an unbounded number of connections and bus subscriptions.
#[derive(Clone)]
pub struct StreamSlots {
    per_key: u32,
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
}

/// One open stream; frees its slot when dropped.
pub struct StreamSlot {
    key: String,
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
}

impl StreamSlots {
    pub fn new(per_key: u32) -> Self {
        Self { per_key, open: Arc::default() }
    }

    pub fn acquire(&self, key_id: &str) -> crate::error::Result<StreamSlot> {
        let mut open = self.open.lock().expect("stream slots lock");
        let held = open.entry(key_id.to_string()).or_default();
        if *held >= self.per_key {
            metrics::counter!("iothub_sse_streams_refused_total").increment(1);
            return Err(crate::error::Error::TooManyRequests(format!(
                "this API key already holds {} event streams on this instance (http.sse_streams_per_key)",
                self.per_key
            )));
        }
        *held += 1;
        metrics::gauge!("iothub_sse_streams_open").increment(1.0);
        Ok(StreamSlot { key: key_id.to_string(), open: self.open.clone() })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("stream slots lock");
        if let Some(held) = open.get_mut(&self.key) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.key);
            }
        }
        metrics::gauge!("iothub_sse_streams_open").decrement(1.0);
    }
}

pub fn router(state: SharedState, request_timeout: Duration, body_limit: usize) -> Router {
    let api = Router::new()
        .route("/products", post(products::create).get(products::list))
        .route("/products/{product_id}", get(products::get).delete(products::delete))
        .route("/products/{product_id}/devices", post(devices::register).get(devices::list))
        .route("/products/{product_id}/devices/bulk", post(devices::register_bulk))
        .route("/products/{product_id}/devices/{device_id}", get(devices::get).delete(devices::delete))
        .route("/products/{product_id}/devices/{device_id}/suspend", post(devices::suspend))
        .route("/products/{product_id}/devices/{device_id}/resume", post(devices::resume))
        .route("/products/{product_id}/devices/{device_id}/rotate-secret", post(devices::rotate_secret))
        .route("/products/{product_id}/devices/{device_id}/messages", get(telemetry::list_messages))
        .route("/products/{product_id}/devices/{device_id}/messages/{message_id}", get(telemetry::get_message))
        .route("/products/{product_id}/devices/{device_id}/status", get(telemetry::get_status))
        .route("/products/{product_id}/devices/{device_id}/commands", post(commands::send).get(commands::list))
        .route("/products/{product_id}/devices/{device_id}/commands/{request_id}", get(commands::get))
        .route("/products/{product_id}/devices/{device_id}/rpc", post(commands::rpc))
        .route("/products/{product_id}/devices/{device_id}/tags", get(tags::get_tags).put(tags::set_tags))
        .route("/products/{product_id}/tags/{tag}/commands", post(tags::send_to_tag))
        .route(
            "/products/{product_id}/devices/{device_id}/shadow",
            get(shadows::get_shadow).put(shadows::update_shadow),
        )
        .route("/products/{product_id}/devices/{device_id}/ota", post(ota::push_ota_device).get(ota::device_ota))
        .route("/products/{product_id}/tags/{tag}/ota", post(ota::push_ota_tag))
        .route("/products/{product_id}/ota-rollouts/{rollout_id}", get(ota::get_rollout))
        .route("/products/{product_id}/tag-commands/{request_id}", get(tags::get_tag_command))
        .route("/events", get(telemetry::stream))
        .route("/api-keys", post(api_keys::create).get(api_keys::list))
        .route("/api-keys/{key_id}", delete(api_keys::revoke))
        .route("/tokens", post(tokens::issue))
        .layer(TimeoutLayer::with_status_code(axum::http::StatusCode::REQUEST_TIMEOUT, request_timeout));

    let broker = Router::new()
        .route("/emqx5/authn", post(broker_hooks::emqx5_authn))
        .route("/emqx5/authz", post(broker_hooks::emqx5_authz))
        // POST only: a GET would carry passwords in the URI, which proxies and request logs record.
        .route("/emqx4/auth", post(broker_hooks::emqx4_auth))
        .route("/emqx4/acl", post(broker_hooks::emqx4_acl))
        .route("/emqx4/superuser", post(broker_hooks::emqx4_superuser))
        .route("/rmqtt/auth", post(broker_hooks::rmqtt_auth))
        .route("/rmqtt/acl", post(broker_hooks::rmqtt_acl))
        .route("/emqx5/events", post(broker_events::emqx5_events))
        .route("/emqx4/webhook", post(broker_events::emqx4_webhook))
        .route("/rmqtt/webhook", post(broker_events::rmqtt_webhook))
        .route_layer(middleware::from_fn_with_state(state.clone(), broker_hooks::require_hook_token))
        // A hook that ran out of time was not durably handled: the broker must send it again, and EMQX 5
        // retries 503 but drops an event answered 408 (replays are harmless: events are idempotent).
        .layer(TimeoutLayer::with_status_code(axum::http::StatusCode::SERVICE_UNAVAILABLE, request_timeout));

    Router::new()
        .nest("/api/v1", api)
        .nest("/broker", broker)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(extract::not_found)
        .method_not_allowed_fallback(extract::method_not_allowed)
        .layer(middleware::from_fn(track_metrics))
        .layer(TraceLayer::new_for_http())
        .layer(RequestBodyLimitLayer::new(body_limit))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::new())
        .with_state(state)
}

/// Request count and latency per route template (never per concrete path: ids would explode cardinality).
async fn track_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("iothub_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("iothub_http_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

//! Logging (pretty or JSON, by config) and the process-wide Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::{LogConfig, LogFormat};

const SECRET_BEARING_TARGETS: &[&str] = &["rmqtt_http_api", "rmqtt_auth_http", "rmqtt_web_hook"];

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init_tracing(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    // RMQTT's plugins print their whole configuration (the http-api bearer token, the hook token in
    // auth-http headers and web-hook URLs) at info/debug. Secrets are never logged, whatever the level.
    let filter = SECRET_BEARING_TARGETS
        .iter()
        .fold(filter, |f, target| f.add_directive(format!("{target}=warn").parse().expect("static directive")));
    // The web-hook plugin warns about every topic with an inner `$` level, which it cannot parse; those are
    // reported by `adapters::rmqtt_dollar` instead, so the warning is noise (one per internal message).
    let filter = filter.add_directive("rmqtt_web_hook=error".parse().expect("static directive"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match cfg.format {
        LogFormat::Json => registry.with(fmt::layer().json().with_current_span(true).with_span_list(false)).try_init(),
        LogFormat::Pretty => registry.with(fmt::layer()).try_init(),
    };
    // A second init (tests start several servers) keeps the first subscriber.
    let _ = result;
}

/// The metrics recorder is global by nature of the `metrics` facade; installed once per process.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
                .expect("static buckets are valid")
                // Event counts per ingest transaction, not seconds.
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full("iothub_ingest_batch_events".into()),
                    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0],
                )
                .expect("static buckets are valid")
                // Commands per group commit, not seconds.
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full("iothub_command_group_size".into()),
                    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0],
                )
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            // Histogram samples accumulate until drained; without a scraper they would grow without bound.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

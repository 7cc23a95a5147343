//! Typed, layered configuration: built-in defaults, then an optional TOML file, then `IOTHUB_*` env vars.
//!
//! Nested keys use `__` in env names (`IOTHUB_DATABASE__URL`, `IOTHUB_BROKER__KIND`). The defaults are the
//! embedded profile: SQLite in `./iothub-data`, in-process cache, and the bundled RMQTT broker on :1883, so
//! `iothub serve` with nothing configured is a working hub. Every key is documented in `docs/configuration.md`;
//! a test keeps that document and [`Config::default`] in sync.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the embedded profile keeps its files (SQLite database, generated secrets, bootstrap key).
    pub data_dir: PathBuf,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub database: DatabaseConfig,
    pub broker: BrokerConfig,
    pub auth: AuthConfig,
    pub cache: CacheConfig,
    pub redis: RedisConfig,
    pub rabbitmq: RabbitMqConfig,
    pub events: EventsConfig,
    pub commands: CommandsConfig,
    pub limits: LimitsConfig,
    pub retention: RetentionConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// REST API, broker hooks, health and metrics.
    pub listen: SocketAddr,
    /// Upper bound for one request, in seconds.
    pub request_timeout_secs: u64,
    /// Largest request body accepted (bulk registration is the biggest), in bytes.
    pub body_limit_bytes: usize,
    /// URL the broker uses to reach this instance's hooks. Default: derived from `listen` (loopback).
    pub public_url: Option<String>,
    /// Most event streams (`GET /api/v1/events`) one API key may hold open on one instance at a time.
    pub sse_streams_per_key: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing` env-filter syntax, e.g. `info,iothub=debug`. `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://path/to/file.db` (embedded) or `postgres://user:pass@host/db` (production).
    /// Empty means `sqlite://{data_dir}/iothub.db`.
    pub url: String,
    pub max_connections: u32,
    /// Run pending migrations at `serve` start. Production deployments may prefer `iothub migrate` once.
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BrokerKind {
    /// RMQTT started inside this process, wired to this instance's hooks.
    Embedded,
    /// An EMQX 5 cluster (REST API v5).
    Emqx5,
    /// EMQX 4.x (REST API v4).
    Emqx4,
    /// An external RMQTT broker (its http-api plugin, `/api/v1`).
    Rmqtt,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub kind: BrokerKind,
    /// Shared secret the broker sends on every hook call (`Authorization: Bearer ...`).
    /// Required for external brokers; generated per start for the embedded one when empty.
    pub hook_token: String,
    /// Base URL of the broker's management API, e.g. `http://emqx:18083` or `http://rmqtt:6060`.
    pub api_url: String,
    /// Path prefix of that API: `/api/v5` (EMQX 5), `/api/v4` (EMQX 4), `/api/v1` (RMQTT).
    pub api_prefix: String,
    /// API key/secret (EMQX 5 API key, EMQX 4 AppId/AppSecret) sent as HTTP Basic; for RMQTT `api_key`
    /// is its `http_bearer_token` and `api_secret` stays empty. Empty for none.
    pub api_key: String,
    pub api_secret: String,
    /// Timeout of one broker API call, in milliseconds.
    pub api_timeout_ms: u64,
    pub embedded: EmbeddedBrokerConfig,
}

/// Shortest `broker.hook_token` accepted.
pub const MIN_HOOK_TOKEN_LEN: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedBrokerConfig {
    /// MQTT TCP listener for devices.
    pub mqtt_listen: SocketAddr,
    /// MQTTS (MQTT over TLS) listener for devices, e.g. `0.0.0.0:8883`; empty: no TLS listener.
    pub mqtts_listen: String,
    /// PEM certificate chain of the MQTTS listener. Empty (with `tls_key_file` empty): a self-signed pair is
    /// generated on first start into `{data_dir}/tls/` and reused after; its SHA-256 fingerprint is logged.
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
    /// Extra DNS names or IP addresses the generated certificate is valid for (`localhost`, `127.0.0.1` and
    /// `::1` always are). Only read when the pair is generated.
    pub tls_hostnames: Vec<String>,
    /// RMQTT http-api listener (publish, kick); loopback only.
    pub api_listen: SocketAddr,
}

impl EmbeddedBrokerConfig {
    /// The MQTTS listen address, or `None` when TLS is off.
    pub fn mqtts_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.mqtts_listen.trim().is_empty() {
            return Ok(None);
        }
        let addr = self.mqtts_listen.trim().parse().map_err(|e| {
            anyhow::anyhow!("broker.embedded.mqtts_listen: {e} (an address such as 0.0.0.0:8883, or empty for none)")
        })?;
        Ok(Some(addr))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HMAC-SHA256 key for MQTT JWTs (`POST /api/v1/tokens`), shared with EMQX's JWT authenticator.
    /// Empty: generated once and kept in `{data_dir}/jwt-secret` (embedded profile).
    pub jwt_secret: String,
    /// Longest lifetime of an MQTT JWT, in seconds.
    pub jwt_max_ttl_secs: u64,
    /// Default overlap during which the previous device secret keeps working after a rotation, seconds.
    pub rotation_overlap_secs: u64,
    /// Write a first admin API key to `{data_dir}/admin-api-key` when no key exists yet.
    pub bootstrap_admin_key: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a device's auth record may be served from memory, in milliseconds. Changes made through
    /// this instance invalidate at once; this bounds staleness for changes made through other instances.
    pub device_ttl_ms: u64,
    /// Most device auth records kept in memory.
    pub device_capacity: u64,
    /// How long a business API key's record may be served from memory, in milliseconds (0: read it on
    /// every request). Revocation through this instance applies at once; this bounds it for the others.
    pub api_key_ttl_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://` URL shared by all instances (message dedup). Empty: in-process dedup (one instance only).
    pub url: String,
    /// Prefix of every key iothub writes, so several deployments (or tests) can share one Redis.
    pub key_prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitMqConfig {
    /// `amqp://` URL for northbound events. Empty: events go to the in-process stream (SSE) only.
    pub url: String,
    /// Exchanges are `{exchange_prefix}.{kind}`, e.g. `iothub.events.upload_data`.
    pub exchange_prefix: String,
    /// Connect and publisher-confirm timeout, in milliseconds.
    pub timeout_ms: u64,
    /// Durable queue of broker events (EMQX's RabbitMQ action fills it; iothub declares it). Empty: broker
    /// events arrive by webhook only. Needs `url`.
    pub ingest_queue: String,
    /// Most broker events from that queue in flight on this instance (AMQP prefetch).
    pub ingest_prefetch: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// How long a device message id is remembered for deduplication, in seconds.
    pub dedup_window_secs: u64,
    /// Most broker events applied in one database transaction.
    pub batch_max: usize,
    /// Concurrent batch workers per instance.
    pub workers: usize,
    /// How long an outbox row stays with the instance publishing it before any instance may retry it (ms).
    pub outbox_lease_ms: u64,
    /// How often the outbox is swept for events that could not be published at once (ms).
    pub outbox_sweep_ms: u64,
    /// How long the relay gathers events before a publish round (ms; 0 = publish each hand-off at once).
    pub publish_linger_ms: u64,
    /// Events buffered per Server-Sent Events subscriber of the in-process stream.
    pub stream_buffer: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// How often each instance expires commands past their TTL and sends what is due (ms).
    pub sweep_ms: u64,
    /// How long a command being published is protected from other instances' dispatchers (ms).
    pub dispatch_lease_ms: u64,
    /// Most devices one tag command may target (1 to 100000); more is refused with 422 naming `tag`.
    pub max_tag_targets: u32,
}

/// Per-device limits on device-generated work (`domain/limits.rs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Messages, reports and data requests one device may have stored or announced per second (per instance);
    /// 0: unlimited.
    pub device_messages_per_sec: u32,
    /// Burst above that rate.
    pub device_messages_burst: u32,
    /// Internal `$` requests (`$ntp`, `$tags`, `$shadow*`) one device may have answered per second; 0: unlimited.
    pub device_requests_per_sec: u32,
    /// Burst above that rate.
    pub device_requests_burst: u32,
    /// Internal requests answered at once by one instance (each may hold a database connection).
    pub internal_concurrency: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            device_messages_per_sec: 100,
            device_messages_burst: 200,
            device_requests_per_sec: 10,
            device_requests_burst: 20,
            internal_concurrency: 4,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days stored device messages are kept (by the broker's receive time); 0 keeps them forever.
    pub messages_days: u32,
    /// Days finished commands (replied, expired, failed) are kept; 0 keeps them forever.
    pub commands_days: u32,
    /// Days OTA rollouts and their targets' progress are kept after the rollout; 0 keeps them forever.
    pub ota_days: u32,
    /// How often each instance prunes (seconds).
    pub sweep_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self { messages_days: 0, commands_days: 0, ota_days: 0, sweep_secs: 3_600 }
    }
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self { sweep_ms: 1_000, dispatch_lease_ms: 30_000, max_tag_targets: 10_000 }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { url: String::new(), key_prefix: "iothub:".into() }
    }
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            exchange_prefix: "iothub.events".into(),
            timeout_ms: 5_000,
            ingest_queue: String::new(),
            ingest_prefetch: 500,
        }
    }
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            dedup_window_secs: 6 * 3600,
            batch_max: 1_000,
            workers: 2,
            outbox_lease_ms: 30_000,
            outbox_sweep_ms: 1_000,
            publish_linger_ms: 5,
            stream_buffer: 4_096,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("iothub-data"),
            http: HttpConfig::default(),
            log: LogConfig::default(),
            database: DatabaseConfig::default(),
            broker: BrokerConfig::default(),
            auth: AuthConfig::default(),
            cache: CacheConfig::default(),
            redis: RedisConfig::default(),
            rabbitmq: RabbitMqConfig::default(),
            events: EventsConfig::default(),
            commands: CommandsConfig::default(),
            limits: LimitsConfig::default(),
            retention: RetentionConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("static addr"),
            request_timeout_secs: 30,
            body_limit_bytes: 8 * 1024 * 1024,
            public_url: None,
            sse_streams_per_key: 8,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, level: "info".into() }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { url: String::new(), max_connections: 16, migrate_on_start: true }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            kind: BrokerKind::Embedded,
            hook_token: String::new(),
            api_url: String::new(),
            api_prefix: String::new(),
            api_key: String::new(),
            api_secret: String::new(),
            api_timeout_ms: 5_000,
            embedded: EmbeddedBrokerConfig::default(),
        }
    }
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        Self {
            mqtt_listen: "0.0.0.0:1883".parse().expect("static addr"),
            mqtts_listen: "0.0.0.0:8883".into(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_hostnames: Vec::new(),
            api_listen: "127.0.0.1:6060".parse().expect("static addr"),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            jwt_max_ttl_secs: 86_400,
            rotation_overlap_secs: 3_600,
            bootstrap_admin_key: true,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { device_ttl_ms: 5_000, device_capacity: 1_000_000, api_key_ttl_ms: 1_000 }
    }
}

/// Suffix of a variable that names a file holding the value.
const SECRET_FILE_SUFFIX: &str = "_FILE";

/// The `IOTHUB_*` layer: `IOTHUB_SECTION__KEY=value` sets `section.key`, and `IOTHUB_SECTION__KEY_FILE=path`
/// sets it to the file's content without its trailing line break, so secrets can come from Docker/Kubernetes
/// secret files instead of the environment (where `/proc/*/environ` and `docker inspect` show them). Setting
/// both forms of one key is refused rather than silently picking one.
///
/// Values are typed by the key they set: a key whose default is text (or unset) takes the text as is, so a
/// digits-only secret such as `0123` stays the string `0123`; other keys parse it (`6`, `true`, `[..]`).
fn env_layer(
    vars: impl Iterator<Item = (String, String)>,
    defaults: &serde_json::Value,
) -> anyhow::Result<Vec<(String, figment::value::Value)>> {
    let vars: Vec<(String, String)> = vars.filter(|(name, _)| name.starts_with("IOTHUB_")).collect();
    let mut values = Vec::new();
    for (name, raw) in &vars {
        let key = &name["IOTHUB_".len()..];
        // IOTHUB_CONFIG names the file itself (read by the CLI), it is not a key.
        if key == "CONFIG" {
            continue;
        }
        let (key, text) = match key.strip_suffix(SECRET_FILE_SUFFIX) {
            Some(key) if !key.is_empty() => {
                let direct = format!("IOTHUB_{key}");
                anyhow::ensure!(
                    !vars.iter().any(|(n, _)| *n == direct),
                    "both {direct} and {name} are set; set only one of them"
                );
                let content =
                    std::fs::read_to_string(raw).map_err(|e| anyhow::anyhow!("{name}: cannot read {raw}: {e}"))?;
                (key, content.trim_end_matches(['\n', '\r']).to_string())
            }
            _ => (key, raw.clone()),
        };
        let path = key.to_ascii_lowercase().replace("__", ".");
        let default = path.split('.').try_fold(defaults, |v, k| v.get(k));
        let value = match default {
            Some(serde_json::Value::String(_) | serde_json::Value::Null) => figment::value::Value::from(text),
            _ => text.parse().expect("infallible"),
        };
        values.push((path, value));
    }
    Ok(values)
}

impl Config {
    /// Defaults, then `file` (if given), then `IOTHUB_*` variables.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            anyhow::ensure!(path.exists(), "config file {} does not exist", path.display());
            figment = figment.merge(Toml::file(path));
        }
        let defaults = serde_json::to_value(Config::default())?;
        for (key_path, value) in env_layer(std::env::vars(), &defaults)? {
            figment = figment.merge(Serialized::global(&key_path, value));
        }
        let config: Config = figment.extract()?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_broker()?;
        self.validate_ingest_queue()?;
        self.validate_limits()
    }

    fn validate_ingest_queue(&self) -> anyhow::Result<()> {
        let queue = &self.rabbitmq.ingest_queue;
        if queue.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(!self.rabbitmq.url.is_empty(), "rabbitmq.ingest_queue needs rabbitmq.url");
        anyhow::ensure!(
            queue.len() <= 200 && queue.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "rabbitmq.ingest_queue must be at most 200 characters of [A-Za-z0-9._-]"
        );
        anyhow::ensure!(self.rabbitmq.ingest_prefetch >= 1, "rabbitmq.ingest_prefetch must be at least 1");
        Ok(())
    }

    fn validate_broker(&self) -> anyhow::Result<()> {
        if self.broker.kind == BrokerKind::Embedded {
            self.broker.embedded.mqtts_addr()?;
            anyhow::ensure!(
                self.broker.embedded.tls_cert_file.is_empty() == self.broker.embedded.tls_key_file.is_empty(),
                "broker.embedded.tls_cert_file and tls_key_file go together (both empty: a generated self-signed pair)"
            );
        }
        // The hook token is all that stands between the network and the authn/authz answers: a short one
        // could be guessed. Empty means generated (embedded profile only).
        anyhow::ensure!(
            self.broker.hook_token.is_empty() || self.broker.hook_token.len() >= MIN_HOOK_TOKEN_LEN,
            "broker.hook_token must be at least {MIN_HOOK_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`)"
        );
        if self.broker.kind != BrokerKind::Embedded {
            anyhow::ensure!(!self.broker.hook_token.is_empty(), "broker.hook_token is required for an external broker");
            anyhow::ensure!(!self.broker.api_url.is_empty(), "broker.api_url is required for an external broker");
            // Instances and EMQX's JWT authenticator must share one key; a generated per-instance key would
            // make tokens fail at random.
            anyhow::ensure!(
                self.auth.jwt_secret.len() >= 32,
                "auth.jwt_secret (at least 32 bytes) is required with an external broker"
            );
        }
        Ok(())
    }

    fn validate_limits(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.cache.device_ttl_ms <= 60_000, "cache.device_ttl_ms must be at most 60000");
        anyhow::ensure!(self.http.sse_streams_per_key >= 1, "http.sse_streams_per_key must be at least 1");
        anyhow::ensure!(
            (1..=1024).contains(&self.limits.internal_concurrency),
            "limits.internal_concurrency must be between 1 and 1024"
        );
        anyhow::ensure!(
            (1..=100_000).contains(&self.commands.max_tag_targets),
            "commands.max_tag_targets must be between 1 and 100000"
        );
        anyhow::ensure!(
            (1..=100_000).contains(&self.events.batch_max),
            "events.batch_max must be between 1 and 100000"
        );
        anyhow::ensure!((1..=64).contains(&self.events.workers), "events.workers must be between 1 and 64");
        anyhow::ensure!(self.events.dedup_window_secs >= 1, "events.dedup_window_secs must be at least 1");
        anyhow::ensure!(self.events.outbox_lease_ms >= 100, "events.outbox_lease_ms must be at least 100");
        anyhow::ensure!(self.events.outbox_sweep_ms >= 10, "events.outbox_sweep_ms must be at least 10");
        anyhow::ensure!(self.events.publish_linger_ms <= 1_000, "events.publish_linger_ms must be at most 1000");
        // Hand-offs older than half their lease are left to the sweep; gathering must end well before that.
        anyhow::ensure!(
            self.events.publish_linger_ms * 4 <= self.events.outbox_lease_ms,
            "events.publish_linger_ms must be at most a quarter of events.outbox_lease_ms"
        );
        anyhow::ensure!(
            [self.retention.messages_days, self.retention.commands_days, self.retention.ota_days]
                .iter()
                .all(|days| *days <= 36_500),
            "retention.messages_days, retention.commands_days and retention.ota_days must be at most 36500"
        );
        anyhow::ensure!(
            self.retention.ota_days == 0
                || i64::from(self.retention.ota_days) * 86_400_000 >= crate::domain::commands::MAX_TTL_MS,
            "retention.ota_days must be 0 or at least {} (the longest command TTL): a rollout must outlive its \
             $ota_upgrade commands, or a device upgrading late would report to nothing",
            crate::domain::commands::MAX_TTL_MS / 86_400_000
        );
        anyhow::ensure!(
            (1..=86_400).contains(&self.retention.sweep_secs),
            "retention.sweep_secs must be between 1 and 86400"
        );
        anyhow::ensure!(
            (10..=60_000).contains(&self.commands.sweep_ms),
            "commands.sweep_ms must be between 10 and 60000"
        );
        anyhow::ensure!(
            self.commands.dispatch_lease_ms >= 2 * self.broker.api_timeout_ms,
            "commands.dispatch_lease_ms must be at least twice broker.api_timeout_ms (a publish must finish within its lease)"
        );
        anyhow::ensure!(
            (1..=30 * 86_400).contains(&self.auth.jwt_max_ttl_secs),
            "auth.jwt_max_ttl_secs must be between 1 and 2592000"
        );
        Ok(())
    }

    pub fn database_url(&self) -> String {
        if self.database.url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("iothub.db").display())
        } else {
            self.database.url.clone()
        }
    }

    pub fn broker_api_prefix(&self) -> &str {
        match (self.broker.api_prefix.as_str(), self.broker.kind) {
            ("", BrokerKind::Emqx5) => "/api/v5",
            ("", BrokerKind::Emqx4) => "/api/v4",
            ("", BrokerKind::Embedded | BrokerKind::Rmqtt) => "/api/v1",
            (p, _) => p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_linger_must_end_well_inside_the_outbox_lease() {
        let mut config = Config::default();
        config.events.outbox_lease_ms = 100;
        config.events.publish_linger_ms = 25;
        assert!(config.validate().is_ok());
        config.events.publish_linger_ms = 26;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("events.publish_linger_ms"), "{error}");
    }

    #[test]
    fn the_broker_event_queue_needs_rabbitmq_and_a_plain_name() {
        let mut config = Config::default();
        config.rabbitmq.ingest_queue = "iothub.ingest".into();
        assert!(config.validate().unwrap_err().to_string().contains("needs rabbitmq.url"));
        config.rabbitmq.url = "amqp://localhost".into();
        assert!(config.validate().is_ok());
        for bad in ["a b", "q#", "x".repeat(201).as_str()] {
            config.rabbitmq.ingest_queue = bad.into();
            assert!(config.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn ota_retention_must_outlive_the_longest_command_ttl() {
        let mut config = Config::default();
        for (days, ok) in [(0, true), (29, false), (30, true), (36_500, true), (36_501, false)] {
            config.retention.ota_days = days;
            assert_eq!(config.validate().is_ok(), ok, "{days}");
        }
    }

    #[test]
    fn documented_keys_match_defaults() {
        let doc = include_str!("../../docs/configuration.md");
        let value = serde_json::to_value(Config::default()).unwrap();
        let mut keys = Vec::new();
        fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
            if let serde_json::Value::Object(map) = v {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    if v.is_object() {
                        walk(&key, v, out)
                    } else {
                        out.push(key)
                    }
                }
            }
        }
        walk("", &value, &mut keys);
        for key in keys {
            assert!(doc.contains(&format!("`{key}`")), "docs/configuration.md does not document `{key}`");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
    fn secrets_are_read_from_files_named_by_file_variables() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("hook_token", "s3cret-token-of-at-least-32-chars\n")?;
            jail.create_file("db_url", "postgres://iothub:pw@db/iothub\r\n")?;
            jail.set_env("IOTHUB_BROKER__HOOK_TOKEN_FILE", "hook_token");
            jail.set_env("IOTHUB_DATABASE__URL_FILE", "db_url");
            jail.create_file("pool", "6\n")?;
            jail.set_env("IOTHUB_DATABASE__MAX_CONNECTIONS_FILE", "pool");
            jail.create_file("api_secret", "0123456789\n")?;
            jail.set_env("IOTHUB_BROKER__API_SECRET_FILE", "api_secret");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.broker.hook_token, "s3cret-token-of-at-least-32-chars");
            assert_eq!(c.database.url, "postgres://iothub:pw@db/iothub");
            assert_eq!(c.database.max_connections, 6);
            assert_eq!(c.broker.api_secret, "0123456789", "a digits-only secret stays text, leading zero kept");
            jail.set_env("IOTHUB_REDIS__KEY_PREFIX", "007");
            jail.set_env("IOTHUB_HTTP__PUBLIC_URL", "http://lb:8080");
            jail.set_env("IOTHUB_AUTH__BOOTSTRAP_ADMIN_KEY", "false");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.redis.key_prefix, "007");
            assert_eq!(c.http.public_url.as_deref(), Some("http://lb:8080"));
            assert!(!c.auth.bootstrap_admin_key);

            jail.set_env("IOTHUB_BROKER__HOOK_TOKEN", "other");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("IOTHUB_BROKER__HOOK_TOKEN_FILE"), "{err}");

            jail.clear_env();
            jail.set_env("IOTHUB_AUTH__JWT_SECRET_FILE", "missing");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("IOTHUB_AUTH__JWT_SECRET_FILE") && err.contains("missing"), "{err}");

            jail.clear_env();
            jail.create_file("typo", "x")?;
            jail.set_env("IOTHUB_BROKER__HOOK_TOKN_FILE", "typo");
            assert!(Config::load(None).is_err(), "a misspelt key read from a file is rejected like any other");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
    fn env_overrides_file_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("iothub.toml", "[http]\nrequest_timeout_secs = 7\n[database]\nmax_connections = 3\n")?;
            jail.set_env("IOTHUB_DATABASE__MAX_CONNECTIONS", "9");
            jail.set_env("IOTHUB_CONFIG", "iothub.toml");
            let c = Config::load(Some(Path::new("iothub.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.http.request_timeout_secs, 7);
            assert_eq!(c.database.max_connections, 9);
            assert_eq!(c.broker.kind, BrokerKind::Embedded);
            Ok(())
        });
    }
}

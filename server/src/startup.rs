//! Wiring: turns a [`Config`] into running adapters, services and the HTTP server.
//!
//! [`Application::build`] takes an already-bound listener so tests can start the real server on port 0;
//! [`Application::serve`] runs until the shutdown future resolves, then drains HTTP and stops the
//! embedded broker.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::adapters::broker_http::HttpBroker;
use crate::adapters::embedded_broker::{EmbeddedBroker, EmbeddedBrokerSettings};
use crate::adapters::memory_bus::MemoryBus;
use crate::adapters::memory_dedup::MemoryDedup;
use crate::adapters::memory_replies::MemoryReplies;
use crate::adapters::rabbitmq::RabbitBus;
use crate::adapters::redis_dedup::RedisDedup;
use crate::adapters::redis_replies::RedisReplies;
use crate::adapters::sql::{OutboxHandOff, PgStore, SqliteStore};
use crate::api::broker_queue::{BrokerQueue, QueueSettings};
use crate::api::{self, AppState, SharedState};
use crate::config::{BrokerKind, Config};
use crate::domain::access::AccessService;
use crate::domain::api_keys::{ApiKeyService, Scope};
use crate::domain::commands::{CommandService, CommandSettings};
use crate::domain::history::HistoryService;
use crate::domain::ingest::{DeviceControl, IngestService, IngestSettings, IN_FLIGHT_TTL};
use crate::domain::kicks::KickService;
use crate::domain::ota::OtaService;
use crate::domain::registry::RegistryService;
use crate::domain::relay::{self, RelaySettings};
use crate::domain::shadows::ShadowService;
use crate::domain::tags::TagService;
use crate::ports::broker::BrokerApi;
use crate::ports::commands::CommandStore;
use crate::ports::dedup::Deduplicator;
use crate::ports::event_bus::EventBus;
use crate::ports::kicks::KickStore;
use crate::ports::ota::OtaStore;
use crate::ports::replies::ReplyHub;
use crate::ports::retention::RetentionStore;
use crate::ports::shadows::ShadowStore;
use crate::ports::store::Store;
use crate::ports::tags::TagStore;
use crate::secrets::random_token;
use crate::telemetry;

/// Opens the configured store (PostgreSQL or SQLite, by URL scheme), optionally migrating it.
pub async fn open_store(config: &Config, migrate: bool) -> anyhow::Result<Arc<dyn Store>> {
    Ok(open_stores(config, migrate, OutboxHandOff::detached()).await?.store)
}

/// The ports backed by the one database.
pub struct Stores {
    pub store: Arc<dyn Store>,
    pub commands: Arc<dyn CommandStore>,
    pub tags: Arc<dyn TagStore>,
    pub shadows: Arc<dyn ShadowStore>,
    pub ota: Arc<dyn OtaStore>,
    pub kicks: Arc<dyn KickStore>,
    pub retention: Arc<dyn RetentionStore>,
}

impl Stores {
    fn of<S: Store + CommandStore + TagStore + ShadowStore + OtaStore + KickStore + RetentionStore>(store: S) -> Self {
        let store = Arc::new(store);
        Self {
            store: store.clone(),
            commands: store.clone(),
            tags: store.clone(),
            shadows: store.clone(),
            ota: store.clone(),
            kicks: store.clone(),
            retention: store,
        }
    }
}

/// Every storage port, all in the one database; the outbox rows they commit go to `outbox`.
pub async fn open_stores(config: &Config, migrate: bool, outbox: OutboxHandOff) -> anyhow::Result<Stores> {
    let url = config.database_url();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store =
            PgStore::connect(&url, config.database.max_connections).await.context("connecting to PostgreSQL")?;
        if migrate {
            store.migrate().await.context("migrating PostgreSQL")?;
        }
        Ok(Stores::of(store.with_outbox(outbox)))
    } else if url.starts_with("sqlite:") {
        let store = SqliteStore::connect(&url, config.database.max_connections).await.context("opening SQLite")?;
        if migrate {
            store.migrate().await.context("migrating SQLite")?;
        }
        Ok(Stores::of(store.with_outbox(outbox)))
    } else {
        anyhow::bail!("database.url must start with postgres://, postgresql:// or sqlite:")
    }
}

/// The data directory holds the SQLite database (credential hashes) and generated secrets: owner only.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Reads a secret from `path`, or creates it (mode 0600) when absent.
fn persisted_secret(path: &Path) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim().to_string();
        if !existing.is_empty() {
            return Ok(existing);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let secret = random_token();
    crate::secrets::write_private(path, &secret)?;
    Ok(secret)
}

pub struct Application {
    listener: TcpListener,
    state: SharedState,
    config: Config,
    embedded: Option<EmbeddedBroker>,
    /// The broker-event queue consumer, awaited at shutdown so what it holds is acknowledged or handed back.
    broker_queue_task: Option<tokio::task::JoinHandle<()>>,
}

/// The JWT signing secret (generated once and kept in the data directory unless configured) and the
/// token the broker's hooks present (random per start unless configured).
fn secrets(config: &Config) -> anyhow::Result<(String, String)> {
    let jwt_secret = if config.auth.jwt_secret.is_empty() {
        persisted_secret(&config.data_dir.join("jwt-secret"))?
    } else {
        config.auth.jwt_secret.clone()
    };
    let hook_token =
        if config.broker.hook_token.is_empty() { random_token() } else { config.broker.hook_token.clone() };
    Ok((jwt_secret, hook_token))
}

fn relay_settings(config: &Config) -> RelaySettings {
    RelaySettings {
        lease_ms: config.events.outbox_lease_ms as i64,
        sweep_every: Duration::from_millis(config.events.outbox_sweep_ms),
        linger: Duration::from_millis(config.events.publish_linger_ms),
    }
}

fn command_settings(config: &Config) -> CommandSettings {
    CommandSettings {
        dispatch_lease_ms: config.commands.dispatch_lease_ms as i64,
        sweep_every: Duration::from_millis(config.commands.sweep_ms),
        // An RPC must answer before the HTTP request times out.
        max_rpc_timeout: crate::domain::commands::MAX_RPC_TIMEOUT
            .min(Duration::from_secs(config.http.request_timeout_secs).saturating_sub(Duration::from_secs(2)))
            .max(Duration::from_secs(1)),
        max_tag_targets: config.commands.max_tag_targets,
    }
}

impl Application {
    pub async fn build(config: Config, listener: TcpListener) -> anyhow::Result<Self> {
        config.validate()?;
        create_private_dir(&config.data_dir)?;
        let http_addr = listener.local_addr()?;
        // The relay's intake exists before the stores, which hand it the events they commit.
        let (relay_handle, relay_intake) = relay::channel();
        let outbox = OutboxHandOff::new(Arc::new(relay_handle), config.events.outbox_lease_ms as i64);
        let Stores {
            store,
            commands: command_log,
            tags: tag_store,
            shadows: shadow_store,
            ota: ota_store,
            kicks,
            retention,
        } = open_stores(&config, config.database.migrate_on_start, outbox).await?;

        let (jwt_secret, hook_token) = secrets(&config)?;

        let (broker, embedded) = start_broker(&config, http_addr, &hook_token).await?;

        let access = Arc::new(AccessService::new(
            store.clone(),
            jwt_secret.as_bytes(),
            config.auth.jwt_max_ttl_secs,
            Duration::from_millis(config.cache.device_ttl_ms),
            config.cache.device_capacity,
        ));
        let kicks = KickService::new(kicks, broker.clone());
        kicks.start_sweeper(Duration::from_millis(config.commands.sweep_ms));
        let registry =
            RegistryService::new(store.clone(), kicks.clone(), access.clone(), config.auth.rotation_overlap_secs);
        let api_keys = ApiKeyService::with_cache(store.clone(), Duration::from_millis(config.cache.api_key_ttl_ms));
        bootstrap_admin_key(&config, &api_keys).await?;

        let (dedup, bus) = (deduplicator(&config).await?, event_bus(&config));
        relay::start(relay_intake, store.clone(), bus.clone(), relay_settings(&config));
        let replies = reply_hub(&config).await?;
        crate::domain::retention::start(&retention, (&config.retention).into());
        let commands = CommandService::start(
            store.clone(),
            command_log.clone(),
            broker.clone(),
            replies,
            command_settings(&config),
        );
        let tags = TagService::new(tag_store, commands.clone());
        let shadows = ShadowService::new(shadow_store, store.clone(), commands.clone());
        let ota = OtaService::new(ota_store, command_log.clone(), store.clone(), commands.clone());
        let closing = tokio::sync::watch::channel(false).0;
        let ingest = IngestService::start(
            store.clone(),
            dedup.clone(),
            DeviceControl {
                kicks,
                commands: commands.clone(),
                tags: tags.clone(),
                shadows: shadows.clone(),
                ota: ota.clone(),
            },
            IngestSettings {
                batch_max: config.events.batch_max,
                workers: config.events.workers,
                limits: crate::domain::limits::DeviceLimits::new(&config.limits),
            },
        );

        let (broker_queue, broker_queue_task) = start_broker_queue(&config, &ingest, &closing).unzip();

        let state = Arc::new(AppState {
            history: HistoryService::new(store.clone()),
            store,
            broker,
            registry,
            access,
            api_keys,
            ingest,
            commands,
            tags,
            shadows,
            ota,
            dedup,
            bus,
            broker_queue,
            hook_token,
            closing,
            event_streams: crate::api::StreamSlots::new(config.http.sse_streams_per_key),
            metrics: telemetry::metrics_handle(),
        });
        Ok(Self { listener, state, config, embedded, broker_queue_task })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Where devices connect, when the broker is the embedded one.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.embedded.as_ref().map(EmbeddedBroker::mqtt_addr)
    }

    /// The bundled broker's MQTTS address, when it has a TLS listener.
    pub fn mqtts_addr(&self) -> Option<SocketAddr> {
        self.embedded.as_ref().and_then(EmbeddedBroker::mqtts_addr)
    }

    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves. The embedded broker stops first (its clients are kicked while the
    /// hooks can still answer), then in-flight HTTP requests finish.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let app = api::router(
            self.state.clone(),
            Duration::from_secs(self.config.http.request_timeout_secs),
            self.config.http.body_limit_bytes,
        );
        tracing::info!(http = %self.http_addr(), store = self.state.store.backend(), broker = self.state.broker.kind(), "iothub serving");
        let embedded = self.embedded;
        let state = self.state.clone();
        let shutdown = async move {
            shutdown.await;
            state.closing.send_replace(true);
            if let Some(broker) = embedded {
                broker.stop().await;
            }
        };
        // Hook responses are small and brokers pipeline them on a few connections (EMQX: enable_pipelining);
        // with Nagle on, each response would wait for the previous one's ACK.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        });
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
        if let Some(task) = self.broker_queue_task {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        tracing::info!("iothub stopped");
        served.map_err(Into::into)
    }
}

/// The broker's management API, and the bundled broker when the profile is embedded.
async fn start_broker(
    config: &Config,
    http_addr: SocketAddr,
    hook_token: &str,
) -> anyhow::Result<(Arc<dyn BrokerApi>, Option<EmbeddedBroker>)> {
    let timeout = Duration::from_millis(config.broker.api_timeout_ms);
    Ok(match config.broker.kind {
        BrokerKind::Embedded => {
            let hooks_url = config.http.public_url.clone().unwrap_or_else(|| loopback_url(http_addr));
            let api_token =
                if config.broker.api_key.is_empty() { random_token() } else { config.broker.api_key.clone() };
            let embedded_cfg = &config.broker.embedded;
            let tls = match embedded_cfg.mqtts_addr()? {
                Some(addr) => Some((
                    addr,
                    crate::adapters::broker_tls::ensure(
                        &config.data_dir,
                        &embedded_cfg.tls_cert_file,
                        &embedded_cfg.tls_key_file,
                        &embedded_cfg.tls_hostnames,
                    )?,
                )),
                None => None,
            };
            let embedded = EmbeddedBroker::start(EmbeddedBrokerSettings {
                mqtt_listen: config.broker.embedded.mqtt_listen,
                tls,
                api_listen: config.broker.embedded.api_listen,
                hooks_base_url: hooks_url,
                hook_token: hook_token.to_string(),
                api_token: api_token.clone(),
                auto_subscribe_delay: None,
                identity_gate: true,
            })
            .await
            .context("starting the embedded MQTT broker")?;
            let api_url = format!("http://{}", config.broker.embedded.api_listen);
            let broker = HttpBroker::new(BrokerKind::Rmqtt, &api_url, "/api/v1", &api_token, "", timeout)?;
            (Arc::new(broker), Some(embedded))
        }
        kind => {
            let broker = HttpBroker::new(
                kind,
                &config.broker.api_url,
                config.broker_api_prefix(),
                &config.broker.api_key,
                &config.broker.api_secret,
                timeout,
            )?;
            (Arc::new(broker), None)
        }
    })
}

/// Writes a bootstrap admin key to `{data_dir}/admin-api-key` when none exists (and the config asks for it).
async fn bootstrap_admin_key(config: &Config, api_keys: &ApiKeyService) -> anyhow::Result<()> {
    if config.auth.bootstrap_admin_key && api_keys.count_active().await? == 0 {
        let (_, key) = api_keys.create("bootstrap-admin", &[Scope::Admin]).await?;
        let path = config.data_dir.join("admin-api-key");
        std::fs::create_dir_all(&config.data_dir)?;
        crate::secrets::write_private(&path, key.expose())?;
        tracing::warn!(path = %path.display(), "no API key existed; wrote a bootstrap admin key to this file (mode 0600)");
    }
    Ok(())
}

/// Two-phase dedup of device message ids: Redis in production, an in-process map embedded.
async fn deduplicator(config: &Config) -> anyhow::Result<Arc<dyn Deduplicator>> {
    let window = Duration::from_secs(config.events.dedup_window_secs);
    Ok(if config.redis.url.is_empty() {
        Arc::new(MemoryDedup::new(window, IN_FLIGHT_TTL))
    } else {
        Arc::new(
            RedisDedup::connect(&config.redis.url, &config.redis.key_prefix, window, IN_FLIGHT_TTL)
                .await
                .context("Redis URL")?,
        )
    })
}

/// Northbound events: RabbitMQ in production, the in-process stream embedded.
fn event_bus(config: &Config) -> Arc<dyn EventBus> {
    if config.rabbitmq.url.is_empty() {
        Arc::new(MemoryBus::new(config.events.stream_buffer))
    } else {
        // Connected lazily: RabbitMQ being down at start must not stop devices from being served;
        // events wait in the outbox.
        Arc::new(RabbitBus::new(
            &config.rabbitmq.url,
            &config.rabbitmq.exchange_prefix,
            Duration::from_millis(config.rabbitmq.timeout_ms),
        ))
    }
}

/// Where RPC callers hear of replies committed on any instance.
async fn reply_hub(config: &Config) -> anyhow::Result<Arc<dyn ReplyHub>> {
    Ok(if config.redis.url.is_empty() {
        Arc::new(MemoryReplies::default())
    } else {
        Arc::new(RedisReplies::connect(&config.redis.url, &config.redis.key_prefix).await.context("Redis URL")?)
    })
}

/// The broker-event queue consumer, when `rabbitmq.ingest_queue` is set.
fn start_broker_queue(
    config: &Config,
    ingest: &IngestService,
    closing: &tokio::sync::watch::Sender<bool>,
) -> Option<(BrokerQueue, tokio::task::JoinHandle<()>)> {
    if config.rabbitmq.ingest_queue.is_empty() {
        return None;
    }
    Some(BrokerQueue::start(
        QueueSettings {
            url: config.rabbitmq.url.clone(),
            queue: config.rabbitmq.ingest_queue.clone(),
            prefetch: config.rabbitmq.ingest_prefetch,
            timeout: Duration::from_millis(config.rabbitmq.timeout_ms),
        },
        ingest.clone(),
        closing.subscribe(),
    ))
}

fn loopback_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown signal received");
}

//! The bundled MQTT broker of the embedded profile: RMQTT running inside the iothub process.
//!
//! RMQTT is composed from its plugin crates exactly the way an operator would deploy an EMQX-4-style
//! broker next to iothub, so the embedded profile exercises the same contracts as production:
//! - an identity gate ([`crate::adapters::rmqtt_identity`]) refuses malformed usernames and client ids not
//!   bound to the username before any plugin sees them;
//! - `rmqtt-auth-http` asks iothub's `/broker/rmqtt/auth|acl` hooks for every connect, subscribe and
//!   (uncached) publish, sending the hook token as HTTP Basic credentials;
//! - `rmqtt-acl` holds a single `["deny", "all"]` rule, so whatever the hooks do not allow (including
//!   "ignore" answers, non-2xx statuses and transport errors) is refused: fail-closed;
//! - `rmqtt-http-api` (loopback, bearer token) is what iothub's broker adapter publishes and kicks through;
//! - `rmqtt-web-hook` carries broker events to iothub; `rmqtt-retainer` keeps retained messages in memory;
//! - an optional MQTTS listener serves the operator's certificate or a generated self-signed one
//!   ([`crate::adapters::broker_tls`]);
//! - `rmqtt-auto-subscription` subscribes each device to its command, RPC and M2M topics on connect.
//!
//! RMQTT has no stop API (its server loop and several plugins run forever), so each broker gets its own
//! tokio runtime and everything RMQTT spawns lives there; [`EmbeddedBroker::stop`] closes the listener,
//! kicks the sessions and then shuts that runtime down. RMQTT keeps no process-wide singletons in the
//! library crates, so several brokers can run in one process (the test suite relies on this).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use rmqtt::context::ServerContext;
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::Id;

pub struct EmbeddedBrokerSettings {
    pub mqtt_listen: SocketAddr,
    /// MQTTS listener and the certificate it serves; `None`: plain MQTT only.
    pub tls: Option<(SocketAddr, crate::adapters::broker_tls::TlsFiles)>,
    pub api_listen: SocketAddr,
    /// Base URL of this iothub instance's hooks, e.g. `http://127.0.0.1:8080`.
    pub hooks_base_url: String,
    pub hook_token: String,
    /// Bearer token protecting the broker's http-api.
    pub api_token: String,
    /// Delays the broker's auto-subscription step after CONNECT (tests only: it opens, on purpose, the window
    /// in which the connect webhook has arrived but the device is not subscribed yet).
    pub auto_subscribe_delay: Option<Duration>,
    /// Runs iothub's identity gate before every plugin. Always on in iothub; off only in tests that stand in
    /// for an external RMQTT built from the same plugins and emqx-config/'s RMQTT files.
    pub identity_gate: bool,
}

/// Username RMQTT presents (as HTTP Basic user) when calling iothub's hooks.
const HOOK_USER: &str = "rmqtt";

/// A TOML basic string (JSON string escapes are valid TOML escapes).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

fn hook_url(base: &str, path: &str, with_credentials: Option<&str>) -> anyhow::Result<url::Url> {
    let raw = format!("{}{path}", base.trim_end_matches('/'));
    let mut url = url::Url::parse(&raw).with_context(|| format!("hook URL {raw}"))?;
    if let Some(token) = with_credentials {
        url.set_username(HOOK_USER).map_err(|_| anyhow!("hook URL cannot carry credentials"))?;
        url.set_password(Some(token)).map_err(|_| anyhow!("hook URL cannot carry credentials"))?;
    }
    Ok(url)
}

fn basic_auth(token: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{HOOK_USER}:{token}")))
}

/// Plugin configurations, as the TOML each plugin would read from `plugins/{name}.toml`.
fn plugin_configs(s: &EmbeddedBrokerSettings) -> anyhow::Result<Vec<(&'static str, String)>> {
    // Two-element rule = every action including CONNECT.
    let acl = "disconnect_if_pub_rejected = true\nrules = [[\"deny\", \"all\"]]\n".to_string();
    let auth_http = format!(
        r#"http_timeout = "5s"
deny_if_error = true
disconnect_if_pub_rejected = true
disconnect_if_expiry = true
priority = 100
http_headers = {{ "accept" = "application/json", "authorization" = {authz} }}
http_auth_req.url = {auth}
http_auth_req.method = "post"
http_auth_req.headers = {{ "content-type" = "application/json" }}
http_auth_req.params = {{ clientid = "%c", username = "%u", password = "%P", ipaddr = "%a", protocol = "%r" }}
http_acl_req.url = {acl}
http_acl_req.method = "post"
http_acl_req.headers = {{ "content-type" = "application/json" }}
http_acl_req.params = {{ access = "%A", username = "%u", clientid = "%c", ipaddr = "%a", topic = "%t", protocol = "%r" }}
"#,
        authz = toml_str(&basic_auth(&s.hook_token)),
        auth = toml_str(hook_url(&s.hooks_base_url, "/broker/rmqtt/auth", None)?.as_str()),
        acl = toml_str(hook_url(&s.hooks_base_url, "/broker/rmqtt/acl", None)?.as_str()),
    );
    // web-hook cannot send headers: the token rides as URL userinfo, which becomes Basic auth on the wire.
    // Publishes are forwarded only for the upstream topics iothub consumes (topics::UPSTREAM_FILTERS).
    let publish_topics = crate::topics::UPSTREAM_FILTERS.iter().map(|t| toml_str(t)).collect::<Vec<_>>().join(", ");
    // Deliveries are reported for command topics only (the command log tracks them), and only as
    // `message_delivered`: a command is `delivered` on its first report, and RMQTT's `message_acked` for a
    // QoS 1/2 command always comes after it, so it would be a second webhook per command changing nothing.
    let command_topics = crate::topics::DOWNSTREAM_FILTERS.iter().map(|t| toml_str(t)).collect::<Vec<_>>().join(", ");
    let web_hook = format!(
        "queue_capacity = 100000\nconcurrency_limit = 64\nhttp_timeout = \"5s\"\nretry_max_elapsed_time = \"60s\"\nretry_multiplier = 2.5\nurls = [{}]\n\
         rule.client_connected = [{{ action = \"client_connected\" }}]\n\
         rule.client_disconnected = [{{ action = \"client_disconnected\" }}]\n\
         rule.message_publish = [{{ action = \"message_publish\", topics = [{publish_topics}] }}]\n\
         rule.message_delivered = [{{ action = \"message_delivered\", topics = [{command_topics}] }}]\n",
        toml_str(hook_url(&s.hooks_base_url, "/broker/rmqtt/webhook", Some(&s.hook_token))?.as_str())
    );
    let auto_subscription = format!(
        "subscribes = [\n{}]\n",
        crate::topics::AUTO_SUBSCRIPTIONS
            .iter()
            .map(|t| format!("  {{ topic_filter = {}, qos = 1 }},\n", toml_str(t)))
            .collect::<String>()
    );
    let http_api = format!(
        "http_laddr = {}\nhttp_reuseaddr = true\nmessage_expiry_interval = \"5m\"\nhttp_bearer_token = {}\n",
        toml_str(&s.api_listen.to_string()),
        toml_str(&s.api_token)
    );
    let retainer = "storage.type = \"ram\"\nmax_retained_messages = 0\nmax_payload_size = \"1MB\"\n".to_string();
    Ok(vec![
        ("rmqtt-acl", acl),
        ("rmqtt-auth-http", auth_http),
        ("rmqtt-web-hook", web_hook),
        ("rmqtt-http-api", http_api),
        ("rmqtt-retainer", retainer),
        ("rmqtt-auto-subscription", auto_subscription),
    ])
}
/// Wires iothub's pieces into the broker before any client connects: the router and hooks for inner-`$`
/// topics, the identity gate, then the plugins (auth-http at priority 100 runs before acl at 10). Returns
/// the hook registration, which must live as long as the broker.
async fn install_plugins(
    scx: &ServerContext,
    webhook_url: url::Url,
    identity_gate: bool,
    auto_subscribe_delay: Option<Duration>,
) -> anyhow::Result<Box<dyn rmqtt::hook::Register>> {
    // Before any plugin or client uses it: the router that routes iothub's inner-`$` topics.
    *scx.extends.router_mut().await = Box::new(crate::adapters::rmqtt_dollar::DollarTolerantRouter::new(
        rmqtt::router::DefaultRouter::new(Some(scx.clone())),
    ));
    let dollar_hooks = scx.extends.hook_mgr().register();
    let forwarder = Arc::new(crate::adapters::rmqtt_dollar::DollarTopicForwarder::start(webhook_url));
    for hook in [rmqtt::hook::Type::MessagePublish, rmqtt::hook::Type::MessageDelivered] {
        dollar_hooks.add(hook, Box::new(crate::adapters::rmqtt_dollar::Shared(forwarder.clone()))).await;
    }
    // Before every plugin: identities that are not well formed never reach auth-http's templates.
    if identity_gate {
        dollar_hooks
            .add_priority(
                rmqtt::hook::Type::ClientAuthenticate,
                crate::adapters::rmqtt_identity::GATE_PRIORITY,
                Box::new(crate::adapters::rmqtt_identity::IdentityGate),
            )
            .await;
    }
    dollar_hooks.start().await;
    rmqtt_acl::register(scx, true, false).await.context("rmqtt-acl")?;
    rmqtt_retainer::register(scx, true, false).await.context("rmqtt-retainer")?;
    rmqtt_auth_http::register(scx, true, false).await.context("rmqtt-auth-http")?;
    rmqtt_web_hook::register(scx, true, false).await.context("rmqtt-web-hook")?;
    rmqtt_http_api::register(scx, true, false).await.context("rmqtt-http-api")?;
    rmqtt_auto_subscription::register(scx, true, false).await.context("rmqtt-auto-subscription")?;
    if let Some(delay) = auto_subscribe_delay {
        let mut slot = scx.extends.auto_subscription_mut().await;
        let inner = std::mem::replace(&mut *slot, Box::new(rmqtt::subscribe::DefaultAutoSubscription));
        *slot = Box::new(DelayedAutoSubscription { inner, delay });
    }
    Ok(dollar_hooks)
}

/// The auto-subscription step, late (see [`EmbeddedBrokerSettings::auto_subscribe_delay`]).
struct DelayedAutoSubscription {
    inner: Box<dyn rmqtt::subscribe::AutoSubscription>,
    delay: Duration,
}

#[async_trait::async_trait]
impl rmqtt::subscribe::AutoSubscription for DelayedAutoSubscription {
    fn enable(&self) -> bool {
        self.inner.enable()
    }

    async fn subscribes(&self, id: &Id) -> rmqtt::Result<Vec<rmqtt::types::Subscribe>> {
        tokio::time::sleep(self.delay).await;
        self.inner.subscribes(id).await
    }
}

pub struct EmbeddedBroker {
    runtime: Option<tokio::runtime::Runtime>,
    scx: ServerContext,
    server_task: Option<tokio::task::JoinHandle<()>>,
    mqtt_addr: SocketAddr,
    mqtts_addr: Option<SocketAddr>,
    /// Keeps the `$`-topic forwarder registered for the broker's lifetime.
    _dollar_hooks: Box<dyn rmqtt::hook::Register>,
}

impl EmbeddedBroker {
    #[tracing::instrument(skip_all, fields(mqtt = %settings.mqtt_listen, api = %settings.api_listen))]
    pub async fn start(settings: EmbeddedBrokerSettings) -> anyhow::Result<Self> {
        // Plugin configs can be overridden by RMQTT_PLUGIN_* env vars; refuse to start if anyone tries,
        // because that is a silent way to turn the fail-closed setup open.
        if let Some((k, _)) = std::env::vars().find(|(k, _)| k.to_ascii_lowercase().starts_with("rmqtt_plugin_")) {
            anyhow::bail!("environment variable {k} would override the embedded broker's security config; unset it");
        }
        let configs = plugin_configs(&settings)?;
        let webhook_url = hook_url(&settings.hooks_base_url, "/broker/rmqtt/webhook", Some(&settings.hook_token))?;
        let mqtt_listen = settings.mqtt_listen;
        let tls = settings.tls.clone();
        let identity_gate = settings.identity_gate;
        let auto_subscribe_delay = settings.auto_subscribe_delay;
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("rmqtt").enable_all().build()?;
        let boot = runtime.spawn(async move {
            // The busy check refuses CONNECTs when the host is loaded (e.g. while compiling); iothub's
            // own limits apply instead.
            let mut builder = ServerContext::new().node_id(1).busy_check_enable(false);
            for (name, toml) in configs {
                builder = builder.plugins_config_map_add(name, toml);
            }
            let scx = builder.build().await;
            let dollar_hooks = install_plugins(&scx, webhook_url, identity_gate, auto_subscribe_delay).await?;
            let listener = Builder::new()
                .name("external/tcp")
                .laddr(mqtt_listen)
                .allow_anonymous(false)
                .reuseaddr(Some(true))
                .nodelay(true)
                .bind()
                .and_then(|l| l.tcp())
                .map_err(|e| anyhow!("binding MQTT listener {mqtt_listen}: {e}"))?;
            let bound = listener.local_addr().map_err(|e| anyhow!("{e}"))?;
            let mut server = MqttServer::new(scx.clone()).listener_by_id(listener, 1);
            let mut tls_bound = None;
            if let Some((addr, files)) = tls {
                let listener = Builder::new()
                    .name("external/tls")
                    .laddr(addr)
                    .allow_anonymous(false)
                    .reuseaddr(Some(true))
                    .nodelay(true)
                    .tls_cert(Some(files.cert.display().to_string()))
                    .tls_key(Some(files.key.display().to_string()))
                    .bind()
                    .and_then(|l| l.tls())
                    .map_err(|e| anyhow!("binding MQTTS listener {addr}: {e:#}"))?;
                tls_bound = Some(listener.local_addr().map_err(|e| anyhow!("{e}"))?);
                server = server.listener_by_id(listener, 2);
            }
            let server = server.build();
            let task = tokio::spawn(async move {
                if let Err(e) = server.run().await {
                    tracing::error!(error = %e, "embedded MQTT server stopped");
                }
            });
            anyhow::Ok((scx, task, bound, tls_bound, dollar_hooks))
        });
        match boot.await {
            Ok(Ok((scx, task, bound, tls_bound, dollar_hooks))) => {
                tracing::info!(mqtt = %bound, "embedded MQTT broker listening");
                if let (Some(addr), Some((_, files))) = (tls_bound, &settings.tls) {
                    tracing::info!(mqtts = %addr, cert = %files.cert.display(), sha256 = %files.fingerprint,
                        "embedded MQTT broker listening for TLS");
                }
                Ok(Self {
                    runtime: Some(runtime),
                    scx,
                    server_task: Some(task),
                    mqtt_addr: bound,
                    mqtts_addr: tls_bound,
                    _dollar_hooks: dollar_hooks,
                })
            }
            Ok(Err(e)) => {
                runtime.shutdown_background();
                Err(e)
            }
            Err(e) => {
                runtime.shutdown_background();
                Err(anyhow!("embedded broker boot task failed: {e}"))
            }
        }
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// Where the MQTTS listener is bound, when TLS is on.
    pub fn mqtts_addr(&self) -> Option<SocketAddr> {
        self.mqtts_addr
    }

    /// Closes the listener, disconnects every client (so they see a clean kick and reconnect elsewhere),
    /// lets in-flight hooks drain briefly, then stops every RMQTT task.
    pub async fn stop(mut self) {
        if let Some(task) = self.server_task.take() {
            task.abort();
        }
        if let Some(runtime) = self.runtime.take() {
            let scx = self.scx.clone();
            let kicked = runtime.spawn(async move {
                let ids: Vec<Id> = scx.extends.shared().await.iter().map(|e| e.id()).collect();
                for id in ids {
                    let _ = scx.extends.shared().await.entry(id).kick(true, true, true).await;
                }
            });
            let _ = tokio::time::timeout(Duration::from_secs(5), kicked).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_secs(2))).await;
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EmbeddedBrokerSettings {
        EmbeddedBrokerSettings {
            mqtt_listen: "127.0.0.1:1883".parse().unwrap(),
            tls: None,
            api_listen: "127.0.0.1:6060".parse().unwrap(),
            hooks_base_url: "http://127.0.0.1:8080".into(),
            hook_token: "t".into(),
            api_token: "a".into(),
            auto_subscribe_delay: None,
            identity_gate: true,
        }
    }

    /// The bundled broker forwards the same events as the documented external RMQTT config.
    #[test]
    fn web_hook_rules_match_the_published_config() {
        let settings = settings();
        let configs = plugin_configs(&settings).unwrap();
        let (_, web_hook) = configs.iter().find(|(name, _)| *name == "rmqtt-web-hook").unwrap();
        let rules =
            |text: &str| text.lines().filter(|l| l.starts_with("rule.")).map(str::to_string).collect::<Vec<_>>();
        let published =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../emqx-config/rmqtt-web-hook.toml"))
                .unwrap();
        assert_eq!(rules(web_hook), rules(&published));
        assert_eq!(rules(web_hook).len(), 4);
        let (_, auto) = configs.iter().find(|(name, _)| *name == "rmqtt-auto-subscription").unwrap();
        let published = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../emqx-config/rmqtt-auto-subscription.toml"
        ))
        .unwrap();
        let entries = |text: &str| {
            text.lines().filter(|l| l.contains("topic_filter")).map(|l| l.trim().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(entries(auto), entries(&published));
        assert_eq!(entries(auto).len(), crate::topics::AUTO_SUBSCRIPTIONS.len());
    }

    /// The fail-closed settings published for an external RMQTT are the ones the bundled broker runs with.
    #[test]
    fn auth_and_acl_settings_match_the_published_config() {
        let settings = settings();
        let configs = plugin_configs(&settings).unwrap();
        for (plugin, file, expected_lines) in
            [("rmqtt-auth-http", "rmqtt-auth-http.toml", 6), ("rmqtt-acl", "rmqtt-acl.toml", 2)]
        {
            let (_, generated) = configs.iter().find(|(name, _)| *name == plugin).unwrap();
            let path = format!("{}/../emqx-config/{file}", env!("CARGO_MANIFEST_DIR"));
            let published = std::fs::read_to_string(path).unwrap();
            let (_, checked) = published.split_once("## --- checked ---").expect("a checked section");
            let lines: Vec<&str> = checked.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).collect();
            assert_eq!(lines.len(), expected_lines, "{file}");
            for line in lines {
                assert!(generated.lines().any(|g| g == line), "{plugin} runs without `{line}` of {file}");
            }
        }
    }
}

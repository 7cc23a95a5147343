//! Test harness: starts the real iothub (HTTP on port 0, embedded RMQTT on free ports) against a real
//! SQLite file or a fresh PostgreSQL database, and gives tests an authenticated HTTP client and MQTT helpers.
//!
//! PostgreSQL comes from `TEST_POSTGRES_URL` (an admin URL; `scripts/test.sh` starts a server and
//! sets it). Each test creates its own database and drops it afterwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iothub::adapters::embedded_broker::{EmbeddedBroker, EmbeddedBrokerSettings};
use iothub::config::Config;
use iothub::startup::Application;
use reqwest::{Method, RequestBuilder, StatusCode};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use sqlx::{Connection, Executor};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

pub fn admin_database_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .expect("TEST_POSTGRES_URL is not set: run the suite with scripts/test.sh, which starts PostgreSQL and sets it")
}

/// A PostgreSQL database that exists for one test.
pub struct TestDatabase {
    pub url: String,
    name: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let admin = admin_database_url();
        let name = format!("iothub_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin).await.expect("connect to the test PostgreSQL");
        conn.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create test database");
        let url = match admin.rfind('/') {
            Some(i) => format!("{}/{name}", &admin[..i]),
            None => panic!("TEST_POSTGRES_URL needs a database path"),
        };
        Self { url, name }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Best effort, off the test's runtime (which may be shutting down).
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_database_url()).await {
                    let _ = conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await;
                }
            });
        })
        .join()
        .ok();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

pub struct TestHub {
    pub base: String,
    pub http: reqwest::Client,
    pub admin_key: String,
    pub mqtt_addr: SocketAddr,
    /// The bundled broker's MQTTS listener (its certificate is in `{data_dir}/tls/`).
    pub mqtts_addr: Option<SocketAddr>,
    pub state: iothub::api::SharedState,
    pub config: Config,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
    _pg: Option<TestDatabase>,
}

impl TestHub {
    pub async fn start(db: Db) -> Self {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: Db, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.log.level = "warn".into();
        config.broker.embedded.mqtt_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.broker.embedded.mqtts_listen = "127.0.0.1:0".into();
        config.broker.embedded.api_listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let pg = match db {
            Db::Sqlite => {
                config.database.url = format!("sqlite://{}", dir.path().join("hub.db").display());
                None
            }
            Db::Postgres => {
                let pg = TestDatabase::create().await;
                config.database.url = pg.url.clone();
                config.database.max_connections = 8;
                Some(pg)
            }
        };
        tweak(&mut config);
        // The broker's http-api needs a concrete port, picked by bind-and-release; another test may grab it
        // in between, so a start that fails is retried on a fresh port.
        let mut attempt = 0;
        let app = loop {
            let listener = tokio::net::TcpListener::bind(config.http.listen).await.expect("bind http");
            match Application::build(config.clone(), listener).await {
                Ok(app) => break app,
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    eprintln!("iothub start failed ({e:#}); retrying on other ports");
                    config.broker.embedded.api_listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
                }
                Err(e) => panic!("iothub starts: {e:#}"),
            }
        };
        let base = format!("http://{}", app.http_addr());
        // An instance sharing another one's broker (scale-out tests) has none of its own.
        let mqtt_addr = app.mqtt_addr().unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mqtts_addr = app.mqtts_addr();
        let state = app.state();
        let used_config = config.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(async move {
            let _ = rx.await;
        }));
        // Absent when the test disabled the bootstrap key or created keys itself.
        let admin_key = std::fs::read_to_string(dir.path().join("admin-api-key")).unwrap_or_default();
        Self {
            base,
            http: reqwest::Client::new(),
            admin_key,
            mqtt_addr,
            mqtts_addr,
            state,
            config: used_config,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
            _pg: pg,
        }
    }

    /// The production profile on one machine: PostgreSQL, Redis and RabbitMQ (with this test's own key and
    /// exchange prefixes), and the bundled RMQTT standing in for EMQX.
    pub async fn start_production() -> Self {
        Self::start_production_with(|_| {}).await
    }

    pub async fn start_production_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Self::start_with(Db::Postgres, |c| {
            c.redis.url = redis_url();
            c.redis.key_prefix = format!("t{tag}:");
            c.rabbitmq.url = amqp_url();
            c.rabbitmq.exchange_prefix = format!("t{tag}.events");
            tweak(c);
        })
        .await
    }

    pub fn pg_url(&self) -> Option<&str> {
        self._pg.as_ref().map(|p| p.url.as_str())
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{}", self.base, path)).bearer_auth(&self.admin_key)
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut rb = self.request(method, path);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.expect("http call");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn create_product(&self, id: &str) {
        let (s, b) = self.call(Method::POST, "/api/v1/products", Some(json!({"id": id}))).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }

    /// Registers a device and returns its secret.
    pub async fn register(&self, product: &str, device: &str) -> String {
        let (s, b) = self
            .call(Method::POST, &format!("/api/v1/products/{product}/devices"), Some(json!({"device_id": device})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b["secret"].as_str().expect("secret in response").to_string()
    }

    /// `/readyz` now: its status code, its body, and the names of the checks that failed.
    pub async fn readiness(&self) -> (StatusCode, Value, Vec<String>) {
        let r = self.http.get(format!("{}/readyz", self.base)).send().await.unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        let failed = body["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["ok"] == false)
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        (status, body, failed)
    }

    /// Asserts `/readyz` answers 200 `degraded` with exactly `check` failing; returns the body.
    pub async fn assert_degraded_by(&self, check: &str) -> Value {
        let (status, body, failed) = self.readiness().await;
        assert_eq!(
            (status, body["status"].as_str(), failed),
            (StatusCode::OK, Some("degraded"), vec![check.to_string()]),
            "{body}"
        );
        body
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("graceful shutdown in time")
                .unwrap()
                .unwrap();
        }
    }
}

/// Connects and waits for CONNACK; `Err` carries why the broker refused (or that it timed out).
pub async fn mqtt_connect(
    addr: SocketAddr,
    client_id: &str,
    username: &str,
    password: &str,
) -> Result<(AsyncClient, EventLoop), String> {
    mqtt_connect_session(addr, client_id, username, password, true).await.map(|(c, e, _)| (c, e))
}

/// Like [`mqtt_connect`] with the session kind chosen (`clean = false`: a persistent session, as the reference
/// IotHub SDK connects); also returns CONNACK's session-present flag.
pub async fn mqtt_connect_session(
    addr: SocketAddr,
    client_id: &str,
    username: &str,
    password: &str,
    clean: bool,
) -> Result<(AsyncClient, EventLoop, bool), String> {
    let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_credentials(username, password);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(clean);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    // Devices that answer at once must not wait for the broker's delayed ACK (Nagle).
    eventloop.network_options.set_tcp_nodelay(true);
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return Err("timeout waiting for CONNACK".into()),
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Success => {
                    return Ok((client, eventloop, ack.session_present))
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Err(format!("{:?}", ack.code)),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

pub async fn must_connect(
    addr: SocketAddr,
    client_id: &str,
    username: &str,
    password: &str,
) -> (AsyncClient, EventLoop) {
    match mqtt_connect(addr, client_id, username, password).await {
        Ok(connected) => connected,
        Err(why) => panic!("{username} should connect, was refused: {why}"),
    }
}

pub async fn must_be_refused(addr: SocketAddr, client_id: &str, username: &str, password: &str) {
    match mqtt_connect(addr, client_id, username, password).await {
        Ok(_) => panic!("{username} connected but should have been refused"),
        // A refusal is an answer from the broker, not silence: a dead broker must not pass as "refused".
        Err(why) => assert!(!why.contains("timeout"), "{username}: no answer from the broker ({why})"),
    }
}

/// Polls the event loop until `pred` matches an incoming packet, the connection drops (Err), or timeout.
pub async fn wait_for(
    eventloop: &mut EventLoop,
    timeout: Duration,
    mut pred: impl FnMut(&Packet) -> bool,
) -> Result<Packet, String> {
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return Err("timeout".into()),
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(p)) if pred(&p) => return Ok(p),
                Ok(_) => {}
                Err(e) => return Err(format!("connection closed: {e}")),
            }
        }
    }
}

/// Posts one EMQX 5 `message.publish` event to iothub, as EMQX's rule would, received by the broker at
/// `at` (Unix ms); expects the 204 of a durably handled event.
pub async fn emqx5_publish_at(hub: &TestHub, client_id: &str, username: &str, topic: &str, payload: &[u8], at: i64) {
    use base64::Engine as _;
    let event = json!({
        "event": "message.publish", "id": format!("{at:x}"), "clientid": client_id, "username": username,
        "payload": base64::engine::general_purpose::STANDARD.encode(payload), "peerhost": "127.0.0.1",
        "topic": topic, "qos": 1, "flags": {"retain": false, "dup": false}, "publish_received_at": at,
        "timestamp": at, "node": "emqx@127.0.0.1",
    });
    let r = hub
        .http
        .post(format!("{}/broker/emqx5/events", hub.base))
        .bearer_auth(&hub.state.hook_token)
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").expect("TEST_REDIS_URL is not set: run the suite with scripts/test.sh")
}

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL").expect("TEST_AMQP_URL is not set: run the suite with scripts/test.sh")
}

/// A RabbitMQ consumer bound to one product's events, the way a business system would consume them.
pub struct EventConsumer {
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Value)>,
    conn: lapin::Connection,
}

impl EventConsumer {
    /// Binds `queue` (durable when named, exclusive when empty) to every event exchange for `product`.
    pub async fn bind(url: &str, exchange_prefix: &str, product: &str, queue: &str) -> Self {
        use futures::StreamExt;
        use lapin::options::*;
        use lapin::types::FieldTable;
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await.expect("amqp connect");
        let ch = conn.create_channel().await.expect("channel");
        let options = if queue.is_empty() {
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }
        } else {
            QueueDeclareOptions { durable: true, ..Default::default() }
        };
        let q = ch.queue_declare(queue.into(), options, FieldTable::default()).await.expect("queue declare");
        for kind in iothub::model::event_bus::EventKind::ALL.map(|k| k.as_str()) {
            let exchange = format!("{exchange_prefix}.{kind}");
            ch.exchange_declare(
                exchange.clone().into(),
                lapin::ExchangeKind::Direct,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("exchange declare");
            ch.queue_bind(
                q.name().clone(),
                exchange.into(),
                product.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        }
        let mut consumer = ch
            .basic_consume(q.name().clone(), "test".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .expect("consume");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                if tx.is_closed() {
                    // The test dropped this consumer: hand the message back for the next one.
                    let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                    break;
                }
                let kind = delivery.properties.kind().as_ref().map(|k| k.to_string()).unwrap_or_default();
                assert_eq!(delivery.properties.delivery_mode(), &Some(2), "events are persistent");
                let body: Value = serde_json::from_slice(&delivery.data).expect("event body is JSON");
                assert_eq!(
                    delivery.properties.message_id().as_ref().map(|m| m.to_string()).as_deref(),
                    body["event_id"].as_str(),
                    "AMQP message_id is the event id"
                );
                let _ = delivery.ack(BasicAckOptions::default()).await;
                if tx.send((kind, body)).is_err() {
                    break;
                }
            }
        });
        Self { rx, conn }
    }

    /// Stops consuming: the connection closes, unacknowledged messages go back to the queue.
    pub async fn close(self) {
        let _ = self.conn.close(200, "test done".into()).await;
    }

    /// Collects events until `done` says so (given everything received so far), or panics after `timeout`.
    pub async fn collect_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[(String, Value)]) -> bool,
    ) -> Vec<(String, Value)> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(&seen) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(event)) => seen.push(event),
                Ok(None) => panic!("consumer stopped; got {seen:?}"),
                Err(_) => panic!("timed out waiting for events ({} received); got {seen:#?}", seen.len()),
            }
        }
        seen
    }

    /// Everything that arrives within `window` (to prove nothing more comes).
    pub async fn drain(&mut self, window: Duration) -> Vec<(String, Value)> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            seen.push(event);
        }
        seen
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drives an MQTT client's event loop in the background until it sends DISCONNECT or the connection
/// drops (no automatic reconnect: tests decide when a device comes back).
pub fn drive(mut eventloop: EventLoop) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
}

/// A TCP proxy in front of the broker's management API that a test can cut: while cut, every connection is
/// accepted and closed at once, as an unreachable or crashing API looks to iothub.
pub struct ApiSwitch {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl ApiSwitch {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let is_cut = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if is_cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, cut }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

/// iothub configured for an external RMQTT (the bundled composition, started by the test), whose
/// management API it reaches through an [`ApiSwitch`].
pub async fn hub_with_switchable_broker_api(db: Db) -> (TestHub, EmbeddedBroker, ApiSwitch) {
    hub_with_external_rmqtt(db, true, None).await
}

/// The same, choosing whether the broker runs iothub's identity gate (an external RMQTT does not) and
/// delaying its auto-subscription step by `auto_subscribe_delay`.
pub async fn hub_with_external_rmqtt(
    db: Db,
    identity_gate: bool,
    auto_subscribe_delay: Option<Duration>,
) -> (TestHub, EmbeddedBroker, ApiSwitch) {
    let api_listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let switch = ApiSwitch::start(api_listen).await;
    let (hook_token, api_token) = ("h".repeat(40), "a".repeat(40));
    let api_url = format!("http://{}", switch.addr);
    let (hook, api) = (hook_token.clone(), api_token.clone());
    let hub = TestHub::start_with(db, move |c| {
        c.broker.kind = iothub::config::BrokerKind::Rmqtt;
        c.broker.api_url = api_url;
        c.broker.api_key = api;
        c.broker.api_timeout_ms = 1_000;
        c.broker.hook_token = hook;
        c.auth.jwt_secret = "j".repeat(40);
        c.commands.sweep_ms = 200;
    })
    .await;
    let broker = EmbeddedBroker::start(EmbeddedBrokerSettings {
        mqtt_listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        api_listen,
        hooks_base_url: hub.base.clone(),
        hook_token,
        api_token,
        auto_subscribe_delay,
        identity_gate,
    })
    .await
    .unwrap();
    (hub, broker, switch)
}

// ---- A simulated device for the device-control tests (commands, tags, shadows, OTA, guarantees). ----

/// What a simulated device received: (topic, payload).
pub type Inbox = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A device that answers like firmware built for the reference IotHub: `cmd` → `cmd_resp` with
/// `ok:{name}`, `rpc` → `rpc_resp` with a JSON reading; commands named `slow` are never answered.
pub fn answering_device(
    client: AsyncClient,
    mut eventloop: EventLoop,
    device: &str,
) -> (Inbox, tokio::task::JoinHandle<()>) {
    let inbox: Inbox = Arc::default();
    let seen = inbox.clone();
    let device = device.to_string();
    let task = tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    seen.lock().unwrap().push((p.topic.clone(), p.payload.to_vec()));
                    let levels: Vec<&str> = p.topic.split('/').collect();
                    // cmd|rpc/{p}/{d}/{name}/{enc}/{req}[/{exp}] or tags/{p}/{tag}/cmd/{name}/{enc}/{req}[/{exp}]
                    let (mode, product, name, request_id) = match levels[..] {
                        ["tags", product, _, "cmd", name, _, request_id, ..] => ("cmd", product, name, request_id),
                        [mode, product, _, name, _, request_id, ..] => (mode, product, name, request_id),
                        _ => continue,
                    };
                    if name == "slow" || name.starts_with('$') {
                        continue;
                    }
                    n += 1;
                    let (topic, reply) = match mode {
                        "cmd" => {
                            (format!("cmd_resp/{product}/{device}/{name}/{request_id}/r{n}"), format!("ok:{name}"))
                        }
                        _ => {
                            (format!("rpc_resp/{product}/{device}/{name}/{request_id}/r{n}"), r#"{"temp":21.5}"#.into())
                        }
                    };
                    let _ = client.try_publish(topic, QoS::AtLeastOnce, false, reply);
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    (inbox, task)
}

pub async fn command(hub: &TestHub, p: &str, d: &str, request_id: &str) -> Value {
    let (s, v) = hub.call(Method::GET, &format!("/api/v1/products/{p}/devices/{d}/commands/{request_id}"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

pub async fn wait_state(hub: &TestHub, p: &str, d: &str, request_id: &str, state: &str) -> Value {
    eventually(Duration::from_secs(20), &format!("command {request_id} {state}"), || async {
        let v = command(hub, p, d, request_id).await;
        (v["state"] == state).then_some(v)
    })
    .await
}

pub async fn wait_online(hub: &TestHub, p: &str, d: &str) {
    eventually(Duration::from_secs(15), &format!("{p}/{d} online"), || async {
        let (_, v) = hub.call(Method::GET, &format!("/api/v1/products/{p}/devices/{d}"), None).await;
        (v["online"] == true).then_some(())
    })
    .await
}

pub fn received(inbox: &Inbox, needle: &str) -> Vec<(String, Vec<u8>)> {
    inbox.lock().unwrap().iter().filter(|(t, _)| t.contains(needle)).cloned().collect()
}

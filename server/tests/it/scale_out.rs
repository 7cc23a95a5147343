//! Stateless scale-out, as deployed: two `iothub` processes (the release binary, configured only by
//! `IOTHUB_*` variables and secret files) share one PostgreSQL, Redis and RabbitMQ and one broker, behind a
//! round-robin HTTP load balancer that carries both the business API and the broker's hooks. Every request
//! may land on either instance; presence, deduplication, RPC, the command log, shadow and tag versions must
//! come out exactly as with one instance.
//!
//! The broker is the RMQTT bundled in the first process (its hooks go to the load balancer, not to its own
//! process); the second process publishes through that broker's REST API as it would through EMQX's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use reqwest::{Method, StatusCode};
use rumqttc::QoS;
use serde_json::{json, Value};

use crate::helpers::*;

/// A round-robin HTTP load balancer: each request goes to the next backend (per request, like haproxy in
/// HTTP mode), and to the one after it when a backend refuses the connection (not started yet).
#[derive(Clone)]
struct LoadBalancer {
    backends: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    client: reqwest::Client,
}

async fn balance(State(lb): State<LoadBalancer>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20).await.expect("request body");
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let first = lb.next.fetch_add(1, Ordering::Relaxed);
    for i in 0..lb.backends.len() {
        let backend = &lb.backends[(first + i) % lb.backends.len()];
        let mut headers = parts.headers.clone();
        headers.remove(axum::http::header::HOST);
        let sent = lb
            .client
            .request(parts.method.clone(), format!("{backend}{path}"))
            .headers(headers)
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(resp) => {
                let mut out = Response::builder().status(resp.status());
                for (name, value) in resp.headers() {
                    out = out.header(name, value);
                }
                let bytes = resp.bytes().await.unwrap_or_default();
                return out.body(Body::from(bytes)).unwrap();
            }
            Err(e) if e.is_connect() => continue,
            Err(e) => return Response::builder().status(502).body(Body::from(e.to_string())).unwrap(),
        }
    }
    Response::builder().status(503).body(Body::from("no backend up")).unwrap()
}

async fn start_load_balancer(backends: Vec<String>) -> SocketAddr {
    let lb = LoadBalancer {
        backends: Arc::new(backends),
        next: Arc::default(),
        client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(balance).with_state(lb);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn iothub_binary() -> &'static str {
    env!("CARGO_BIN_EXE_iothub")
}

/// One `iothub serve` process.
struct HubProcess {
    child: tokio::process::Child,
    base: String,
    _data_dir: tempfile::TempDir,
}

impl HubProcess {
    async fn spawn(name: &str, port: u16, env: &[(String, String)]) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let child = tokio::process::Command::new(iothub_binary())
            .arg("serve")
            .env_clear()
            .envs(env.iter().cloned())
            .env("IOTHUB_HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("IOTHUB_DATA_DIR", data_dir.path())
            .env("IOTHUB_LOG__LEVEL", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start iothub");
        let mut hub = Self { child, base, _data_dir: data_dir };
        hub.wait_ready(name).await;
        hub
    }

    /// Polls with the binary's own `healthcheck --ready`, as the container health check does.
    async fn wait_ready(&mut self, name: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("iothub {name} exited during start: {status}");
            }
            let out = tokio::process::Command::new(iothub_binary())
                .args(["healthcheck", "--ready", "--url", &self.base])
                .env_clear()
                .output()
                .await
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "iothub {name} not ready: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn data_dir(&self) -> &Path {
        self._data_dir.path()
    }

    /// SIGTERM, as systemd and Docker stop a service: the process drains and exits 0.
    async fn terminate(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let killed = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("graceful shutdown in time")
            .unwrap();
        assert!(status.success(), "iothub exits cleanly on SIGTERM: {status}");
    }

    /// Sum of `iothub_http_requests_total` over routes starting with `route_prefix`, read from `/metrics`.
    async fn requests_served(&self, route_prefix: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.base)).await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with("iothub_http_requests_total{"))
            .filter(|l| l.contains(&format!("route=\"{route_prefix}")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// The API as a business system sees it: through the load balancer, a new connection per request so
/// consecutive calls alternate between the instances.
struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut rb = self.http.request(method, format!("{}/api/v1{path}", self.base)).bearer_auth(&self.key);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.expect("http call through the load balancer");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// Two `iothub serve` processes behind the load balancer, sharing PostgreSQL, Redis, RabbitMQ and the broker
/// bundled in A (whose hooks go to the load balancer).
struct Cluster {
    a: HubProcess,
    b: HubProcess,
    /// B's port and environment, to start it again after a restart.
    port_b: u16,
    b_env: Vec<(String, String)>,
    api: Api,
    mqtt: SocketAddr,
    exchange_prefix: String,
    /// The broker hook token, for asking the instances (through the load balancer) as a broker would.
    hook_token: String,
    _db: TestDatabase,
    _secrets: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let db = TestDatabase::create().await;
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let (key_prefix, exchange_prefix) = (format!("t{tag}:"), format!("t{tag}.events"));
        let (port_a, port_b) = (free_port(), free_port());
        let lb =
            start_load_balancer(vec![format!("http://127.0.0.1:{port_a}"), format!("http://127.0.0.1:{port_b}")]).await;

        // Secrets come from files, as from Docker/Kubernetes secrets.
        let secrets = tempfile::tempdir().unwrap();
        let secret_file = |name: &str, value: &str| {
            let path = secrets.path().join(name);
            std::fs::write(&path, format!("{value}\n")).unwrap();
            path.display().to_string()
        };
        let hook_token_file = secret_file("hook_token", &format!("hook{tag}"));
        let jwt_secret_file = secret_file("jwt_secret", &"j".repeat(40));
        let database_url_file = secret_file("database_url", &db.url);
        let broker_api_token = format!("api{tag}");
        let (mqtt_port, broker_api_port) = (free_port(), free_port());

        let common: Vec<(String, String)> = [
            ("IOTHUB_DATABASE__URL_FILE", database_url_file.as_str()),
            ("IOTHUB_DATABASE__MIGRATE_ON_START", "false"),
            ("IOTHUB_DATABASE__MAX_CONNECTIONS", "6"),
            ("IOTHUB_REDIS__URL", &redis_url()),
            ("IOTHUB_REDIS__KEY_PREFIX", &key_prefix),
            ("IOTHUB_RABBITMQ__URL", &amqp_url()),
            ("IOTHUB_RABBITMQ__EXCHANGE_PREFIX", &exchange_prefix),
            ("IOTHUB_BROKER__HOOK_TOKEN_FILE", &hook_token_file),
            ("IOTHUB_BROKER__API_KEY", &broker_api_token),
            ("IOTHUB_AUTH__JWT_SECRET_FILE", &jwt_secret_file),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();

        // Migrations run once, before any instance starts (as the compose file's `migrate` service does).
        let migrated = tokio::process::Command::new(iothub_binary())
            .arg("migrate")
            .env_clear()
            .envs(common.iter().cloned())
            .output()
            .await
            .unwrap();
        assert!(migrated.status.success(), "iothub migrate: {}", String::from_utf8_lossy(&migrated.stderr));

        let with = |extra: &[(&str, String)]| {
            let mut env = common.clone();
            env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
            env
        };
        let a = HubProcess::spawn(
            "A",
            port_a,
            &with(&[
                ("IOTHUB_BROKER__KIND", "embedded".into()),
                ("IOTHUB_BROKER__EMBEDDED__MQTT_LISTEN", format!("127.0.0.1:{mqtt_port}")),
                ("IOTHUB_BROKER__EMBEDDED__MQTTS_LISTEN", "127.0.0.1:0".into()),
                ("IOTHUB_BROKER__EMBEDDED__API_LISTEN", format!("127.0.0.1:{broker_api_port}")),
                // The broker's hooks go to the load balancer, so they are spread over both instances.
                ("IOTHUB_HTTP__PUBLIC_URL", format!("http://{lb}")),
            ]),
        )
        .await;
        let b_env = with(&[
            ("IOTHUB_BROKER__KIND", "rmqtt".into()),
            ("IOTHUB_BROKER__API_URL", format!("http://127.0.0.1:{broker_api_port}")),
            ("IOTHUB_AUTH__BOOTSTRAP_ADMIN_KEY", "false".into()),
        ]);
        let b = HubProcess::spawn("B", port_b, &b_env).await;
        let admin_key = std::fs::read_to_string(a.data_dir().join("admin-api-key")).expect("bootstrap admin key");
        let api = Api {
            base: format!("http://{lb}"),
            key: admin_key.trim().to_string(),
            http: reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap(),
        };
        let mqtt: SocketAddr = ([127, 0, 0, 1], mqtt_port).into();
        let hook_token = format!("hook{tag}");
        Self { a, b, port_b, b_env, api, mqtt, exchange_prefix, hook_token, _db: db, _secrets: secrets }
    }

    /// Stops B (SIGTERM) and starts it again with the same configuration.
    async fn restart_b(self) -> Self {
        let Cluster { a, b, port_b, b_env, api, mqtt, exchange_prefix, hook_token, _db, _secrets } = self;
        b.terminate().await;
        let b = HubProcess::spawn("B again", port_b, &b_env).await;
        Cluster { a, b, port_b, b_env, api, mqtt, exchange_prefix, hook_token, _db, _secrets }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_behind_a_load_balancer_stay_consistent() {
    let Cluster { a, b, api, mqtt, exchange_prefix, _db, _secrets, .. } = Cluster::start().await;
    let mut consumer = EventConsumer::bind(&amqp_url(), &exchange_prefix, "p", "").await;

    // Registration alternates between the instances; every device gets its own secret.
    let (s, v) = api.call(Method::POST, "/products", Some(json!({"id": "p"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let devices: Vec<String> = (0..6).map(|i| format!("d{i}")).collect();
    let registrations =
        devices.iter().map(|d| api.call(Method::POST, "/products/p/devices", Some(json!({"device_id": d}))));
    let mut secrets_by_device = HashMap::new();
    for (d, (s, v)) in devices.iter().zip(futures::future::join_all(registrations).await) {
        assert_eq!(s, StatusCode::CREATED, "{v}");
        secrets_by_device.insert(d.clone(), v["secret"].as_str().unwrap().to_string());
    }

    // Presence: connects are authenticated and reported through the load balancer, whichever instance
    // answers; every device is online, then the one that leaves is offline.
    let mut clients = Vec::new();
    let mut tasks = Vec::new();
    for d in &devices[..5] {
        let (client, eventloop) = must_connect(mqtt, &format!("p/{d}"), &format!("p/{d}"), &secrets_by_device[d]).await;
        let (_inbox, task) = answering_device(client.clone(), eventloop, d);
        clients.push(client);
        tasks.push(task);
    }
    let (leaver, leaver_loop) = must_connect(mqtt, "p/d5", "p/d5", &secrets_by_device["d5"]).await;
    let leaver_task = drive(leaver_loop);
    eventually(Duration::from_secs(15), "6 devices online", || async {
        let (_, v) = api.call(Method::GET, "/products/p/devices?online=true", None).await;
        (v["items"].as_array().map(Vec::len) == Some(6)).then_some(())
    })
    .await;
    leaver.disconnect().await.unwrap();
    let _ = leaver_task.await;
    eventually(Duration::from_secs(15), "d5 offline", || async {
        let (_, v) = api.call(Method::GET, "/products/p/devices?online=true", None).await;
        let online: Vec<&str> = v["items"].as_array()?.iter().filter_map(|d| d["device_id"].as_str()).collect();
        (online.len() == 5 && !online.contains(&"d5")).then_some(())
    })
    .await;

    // Deduplication across instances: each device sends m1 twice (the copies' webhooks may reach different
    // instances at the same moment) and m2 once; each message is stored and announced once.
    for (i, client) in clients.iter().enumerate() {
        let d = &devices[i];
        for m in ["m1", "m1", "m2"] {
            client
                .publish(format!("upload_data/p/{d}/reading/{m}"), QoS::AtLeastOnce, false, format!("{{\"v\":{i}}}"))
                .await
                .unwrap();
        }
    }
    let events = consumer
        .collect_until(Duration::from_secs(20), |seen| seen.iter().filter(|(k, _)| k == "upload_data").count() >= 10)
        .await;
    let late = consumer.drain(Duration::from_secs(1)).await;
    let mut announced: HashMap<(String, String), usize> = HashMap::new();
    for (_, e) in events.iter().chain(late.iter()).filter(|(k, _)| k == "upload_data") {
        *announced
            .entry((e["device_id"].as_str().unwrap().into(), e["message_id"].as_str().unwrap().into()))
            .or_default() += 1;
    }
    assert_eq!(announced.len(), 10, "every (device, message id) announced: {announced:?}");
    assert!(announced.values().all(|n| *n == 1), "each announced once, however the copies were spread: {announced:?}");
    for d in &devices[..5] {
        let (s, v) = api.call(Method::GET, &format!("/products/p/devices/{d}/messages"), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["items"].as_array().unwrap().len(), 2, "{d} history holds m1 and m2 once: {v}");
    }

    // RPC: whichever instance takes the call, the device's reply (reported to either instance) reaches it.
    for _ in 0..6 {
        let started = std::time::Instant::now();
        let (s, v) = api
            .call(Method::POST, "/products/p/devices/d0/rpc", Some(json!({"name": "getTemp", "timeout_ms": 5000})))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["reply"]["json"], json!({"temp": 21.5}));
        assert!(started.elapsed() < Duration::from_secs(2), "answered over pub/sub, not at the timeout");
    }

    // Command log: a command for the offline device, queued by one instance, is sent exactly once when the
    // device comes back, whichever instance learns of the connect; its reply completes it.
    let (s, v) = api
        .call(Method::POST, "/products/p/devices/d5/commands", Some(json!({"name": "reboot", "payload": "now"})))
        .await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::CREATED, Some("queued")), "{v}");
    let request_id = v["request_id"].as_str().unwrap().to_string();
    let (client5, loop5) = must_connect(mqtt, "p/d5", "p/d5", &secrets_by_device["d5"]).await;
    let (inbox5, task5) = answering_device(client5.clone(), loop5, "d5");
    let command = eventually(Duration::from_secs(15), "queued command replied", || async {
        let (_, v) = api.call(Method::GET, &format!("/products/p/devices/d5/commands/{request_id}"), None).await;
        (v["state"] == "replied").then_some(v)
    })
    .await;
    assert_eq!(command["attempts"], 1, "{command}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deliveries = inbox5.lock().unwrap().iter().filter(|(t, _)| t.contains(&request_id)).count();
    assert_eq!(deliveries, 1, "sent once, not once per instance");

    // Shadow: eight writers with the same expected version, spread over both instances: exactly one wins.
    let url = "/products/p/devices/d0/shadow";
    let (s, v) = api.call(Method::PUT, url, Some(json!({"state": {"desired": {"rate": 1}}, "version": 0}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let writes =
        (0..8).map(|i| api.call(Method::PUT, url, Some(json!({"state": {"desired": {"rate": i}}, "version": 1}))));
    let statuses: Vec<StatusCode> = futures::future::join_all(writes).await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::CONFLICT).count(), 7, "{statuses:?}");

    // Tags: ten concurrent updates over both instances get ten distinct versions.
    let tags = "/products/p/devices/d1/tags";
    let updates = (0..10).map(|i| api.call(Method::PUT, tags, Some(json!({"tags": [format!("t{i}")]}))));
    let mut versions: Vec<i64> = futures::future::join_all(updates)
        .await
        .into_iter()
        .map(|(s, v)| {
            assert_eq!(s, StatusCode::OK, "{v}");
            v["tags_version"].as_i64().unwrap()
        })
        .collect();
    versions.sort();
    assert_eq!(versions, (1..=10).collect::<Vec<_>>());

    // Both instances really served: business calls and broker hooks reached each of them.
    for (name, hub) in [("A", &a), ("B", &b)] {
        assert!(hub.requests_served("/api/v1/").await >= 10.0, "{name} served API calls");
        assert!(hub.requests_served("/broker/").await >= 5.0, "{name} served broker hooks");
    }

    client5.disconnect().await.unwrap();
    let _ = task5.await;
    for (client, task) in clients.into_iter().zip(tasks) {
        client.disconnect().await.unwrap();
        let _ = task.await;
    }
    consumer.close().await;
    b.terminate().await;
    a.terminate().await;
}

/// A token client's ACL holds on whichever instance the broker's authz request reaches, and after an
/// instance restarts: the broker asks about subscriptions without any credential, so the grant cannot live
/// in the memory of the instance that answered the CONNECT (it did until the device-boundary work; then
/// about half of these subscriptions were refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_clients_keep_their_acl_on_every_instance() {
    let cluster = Cluster::start().await;
    let (s, v) = cluster.api.call(Method::POST, "/products", Some(json!({"id": "p"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = cluster
        .api
        .call(
            Method::POST,
            "/tokens",
            Some(json!({"username": "svc.monitor", "ttl_seconds": 600, "acl": [
                {"permission": "allow", "action": "subscribe", "topic": "upload_data/p/#"},
                {"permission": "allow", "action": "publish", "topic": "ops/p/announce"}
            ]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let token = v["token"].as_str().unwrap().to_string();

    let (client, mut eventloop) = must_connect(cluster.mqtt, "svc.monitor", "svc.monitor", &token).await;
    // Each SUBSCRIBE is one authz request; the load balancer alternates them between A and B.
    let mut subscribe = async |filter: &str| {
        client.subscribe(filter, QoS::AtMostOnce).await.unwrap();
        match wait_for(&mut eventloop, Duration::from_secs(10), |p| matches!(p, rumqttc::Packet::SubAck(_))).await {
            Ok(rumqttc::Packet::SubAck(ack)) => matches!(ack.return_codes[0], rumqttc::SubscribeReasonCode::Success(_)),
            other => panic!("no SUBACK for {filter}: {other:?}"),
        }
    };
    for i in 0..6 {
        assert!(subscribe(&format!("upload_data/p/d{i}/+/+")).await, "allowed filter {i} refused");
    }
    assert!(!subscribe("upload_data/#").await, "wider than the grant");
    assert!(!subscribe("cmd/p/d0/+/+/+/#").await, "outside the grant");
    // RMQTT decides a token's subscriptions itself from its authn answer; EMQX 5 and EMQX 4 ask the authz
    // hook, without any credential, on any instance. Asked through the balancer, both instances answer from
    // the grant stored when the bundled broker's CONNECT was authenticated.
    let (lb_base, hook_token) = (cluster.api.base.clone(), cluster.hook_token.clone());
    let hub_authz = |filter: String| {
        let (base, token) = (lb_base.clone(), hook_token.clone());
        async move {
            let body =
                json!({"clientid": "svc.monitor", "username": "svc.monitor", "topic": filter, "action": "subscribe"});
            let r = reqwest::Client::new()
                .post(format!("{base}/broker/emqx5/authz"))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()["result"] == "allow"
        }
    };
    for i in 0..6 {
        assert!(hub_authz(format!("upload_data/p/h{i}/+/+")).await, "EMQX-style authz {i} refused");
    }
    assert!(!hub_authz("cmd/p/d0/+/+/+/#".into()).await);

    // B restarts (A holds the broker): the grant was stored, not kept in memory.
    let cluster = cluster.restart_b().await;
    for i in 0..6 {
        assert!(subscribe(&format!("upload_data/p/e{i}/+/+")).await, "allowed filter {i} refused after a restart");
        assert!(hub_authz(format!("upload_data/p/k{i}/+/+")).await, "EMQX-style authz {i} refused after a restart");
    }
    assert!(!subscribe("update_status/p/+/+").await, "outside the grant after a restart");
    drop(client);
    cluster.b.terminate().await;
    cluster.a.terminate().await;
}

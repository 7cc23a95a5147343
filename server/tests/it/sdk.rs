//! The device SDK (`iothub-device`) and the server together, through the real broker (the bundled RMQTT),
//! PostgreSQL, Redis and RabbitMQ: what device code written against the SDK gets, with no topic in sight —
//! including iothub's internal `$` protocol (NTP, tags, shadow, OTA), which the bundled broker routes
//! thanks to `adapters::rmqtt_dollar`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use iothub_device::{CommandKind, Device, DeviceConfig, Event, Tls};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::helpers::*;

/// An SDK device that answers like firmware would: commands with `ok:{name}`, RPCs with a reading; it
/// records every event it saw (commands by request id).
struct Firmware {
    device: Device,
    seen: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Firmware {
    async fn start(config: DeviceConfig) -> Self {
        let (device, mut events) = Device::connect(config).await.expect("SDK connects");
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = seen.clone();
        let upgrade_device = device.clone();
        let task = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                // Logged before answering: a test that sees the answer's effect also sees the entry.
                let entry = match &event {
                    Event::Command(c) => format!("command {} {}", c.name, c.request_id),
                    Event::Message(m) => format!("message {} {}", m.sender, String::from_utf8_lossy(&m.payload)),
                    Event::ShadowDesired(d) => format!("shadow {} {}", d.version, Value::Object(d.delta.clone())),
                    Event::OtaUpgrade(upgrade) => format!("ota {}", upgrade.version),
                    Event::TagsChanged { tags, version } => format!("tags {version} {}", tags.join(",")),
                    Event::Connected { .. } => "connected".into(),
                    Event::Disconnected { .. } => "disconnected".into(),
                    other => format!("{other:?}"),
                };
                log.lock().unwrap().push(entry);
                match event {
                    Event::Command(c) => {
                        let reply = match c.kind {
                            CommandKind::Rpc => json!({"temp": 21.5}).to_string(),
                            _ => format!("ok:{}", c.name),
                        };
                        c.respond(reply).await.expect("respond");
                    }
                    Event::ShadowDesired(desired) => desired.applied().await.expect("ack the desired state"),
                    Event::OtaUpgrade(upgrade) => {
                        let reporter = upgrade.reporter();
                        for percent in [0, 40, 100] {
                            reporter.progress(percent).await.expect("progress");
                        }
                        upgrade_device.update_status(&upgrade.success_status()).await.expect("status");
                    }
                    _ => {}
                }
            }
        });
        Self { device, seen, task }
    }

    fn saw(&self, prefix: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|e| e.starts_with(prefix)).count()
    }

    async fn stop(self) {
        self.device.disconnect().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("event stream ends").unwrap();
    }
}

fn config(hub: &TestHub, device: &str, secret: &str) -> DeviceConfig {
    let mut c = DeviceConfig::new("p", device, secret, hub.mqtt_addr.ip().to_string(), hub.mqtt_addr.port());
    c.reconnect_min = Duration::from_millis(100);
    c.reconnect_max = Duration::from_millis(500);
    c
}

async fn online(hub: &TestHub, device: &str, want: bool) {
    eventually(Duration::from_secs(15), &format!("{device} online={want}"), || async {
        let (_, v) = hub.call(Method::GET, &format!("/api/v1/products/p/devices/{device}"), None).await;
        (v["online"] == want).then_some(())
    })
    .await
}

/// Waits until the broker has subscribed the device to its command topics. The broker reports the connect
/// (and iothub marks the device online) before its auto-subscription lands, so an RPC sent the instant a
/// device shows online can find no subscriber; an `$ntp` round trip comes back on `cmd/…`, subscribed in the
/// same step as `rpc/…` (asked again until one answer arrives: an answer sent too early is lost the same way).
async fn subscribed(fw: &Firmware) {
    eventually(Duration::from_secs(15), "subscribed to its command topics", || async {
        fw.device.sync_time(Duration::from_millis(500)).await.ok().map(|_| ())
    })
    .await
}

async fn command_state(hub: &TestHub, device: &str, request_id: &str, state: &str) -> Value {
    eventually(Duration::from_secs(15), &format!("command {request_id} {state}"), || async {
        let (_, v) =
            hub.call(Method::GET, &format!("/api/v1/products/p/devices/{device}/commands/{request_id}"), None).await;
        (v["state"] == state).then_some(v)
    })
    .await
}

/// Data, status, data requests, commands, RPC and M2M from SDK devices; a command queued while the device
/// was away reaches it exactly once after it comes back (with its state directory), an expired one never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_devices_round_trip_through_the_broker() {
    let hub = TestHub::start_production().await;
    hub.create_product("p").await;
    let (s1, s2) = (hub.register("p", "d1").await, hub.register("p", "d2").await);
    let mut consumer = EventConsumer::bind(&amqp_url(), &hub.config.rabbitmq.exchange_prefix, "p", "").await;
    let state_dir = tempfile::tempdir().unwrap();
    let mut c1 = config(&hub, "d1", &s1);
    c1.state_dir = Some(state_dir.path().to_path_buf());

    // A wrong secret is a typed refusal, not a hang.
    let refused = Device::connect(config(&hub, "d1", "wrong")).await;
    assert!(matches!(refused, Err(iothub_device::Error::Refused(_))), "{refused:?}");

    let d1 = Firmware::start(c1.clone()).await;
    let d2 = Firmware::start(config(&hub, "d2", &s2)).await;
    online(&hub, "d1", true).await;
    online(&hub, "d2", true).await;

    // Upstream: data, status and a data request, each announced once with the SDK's message id.
    let data_id = d1.device.upload_data("temperature", br#"{"celsius":21.5}"#.to_vec()).await.unwrap();
    let status_id = d1.device.update_status(&json!({"firmware_version": "1.0.0"})).await.unwrap();
    let request_id = d1.device.request_data("weather", b"{}".to_vec()).await.unwrap();
    assert!(matches!(
        d1.device.upload_data("$shadow_reported", b"{}".to_vec()).await,
        Err(iothub_device::Error::InvalidArgument { field: "data_type", .. })
    ));
    let events = consumer
        .collect_until(Duration::from_secs(15), |seen| {
            let has = |kind: &str, id: &str| seen.iter().any(|(k, v)| k == kind && v["message_id"] == id);
            has("upload_data", &data_id) && has("update_status", &status_id) && has("data_request", &request_id)
        })
        .await;
    assert!(events.iter().any(|(k, v)| k == "data_request" && v["resource"] == "weather"));
    let (_, msg) = hub.call(Method::GET, &format!("/api/v1/products/p/devices/d1/messages/{data_id}"), None).await;
    assert_eq!(msg["data_type"], "temperature", "{msg}");
    let (_, status) = hub.call(Method::GET, "/api/v1/products/p/devices/d1/status", None).await;
    assert_eq!(status["status"], json!({"firmware_version": "1.0.0"}), "{status}");

    // A command and an RPC, answered through `respond`.
    let (s, cmd) = hub
        .call(Method::POST, "/api/v1/products/p/devices/d1/commands", Some(json!({"name": "blink", "payload": "x"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{cmd}");
    let blink = cmd["request_id"].as_str().unwrap().to_string();
    let replied = command_state(&hub, "d1", &blink, "replied").await;
    assert_eq!(replied["reply"]["payload"], "b2s6Ymxpbms=", "ok:blink, base64: {replied}");
    let (s, rpc) = hub
        .call(Method::POST, "/api/v1/products/p/devices/d1/rpc", Some(json!({"name": "getTemp", "timeout_ms": 5000})))
        .await;
    assert_eq!((s, rpc["reply"]["json"].clone()), (StatusCode::OK, json!({"temp": 21.5})), "{rpc}");

    // M2M: d2 writes to d1, who learns the sender.
    d2.device.send_to_device("d1", b"hello d1".to_vec()).await.unwrap();
    eventually(Duration::from_secs(10), "m2m message", || async { (d1.saw("message d2 hello d1") == 1).then_some(()) })
        .await;

    // Away: one command waits, a short-lived one expires.
    d1.stop().await;
    online(&hub, "d1", false).await;
    let send = |body: Value| hub.call(Method::POST, "/api/v1/products/p/devices/d1/commands", Some(body));
    let (_, reboot) = send(json!({"name": "reboot", "ttl_secs": 120})).await;
    let (_, short) = send(json!({"name": "short", "ttl_secs": 1})).await;
    let (reboot, short) = (reboot["request_id"].as_str().unwrap(), short["request_id"].as_str().unwrap());
    command_state(&hub, "d1", short, "expired").await;
    let back = Firmware::start(c1).await;
    command_state(&hub, "d1", reboot, "replied").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(back.saw(&format!("command reboot {reboot}")), 1, "delivered once: {:?}", back.seen);
    assert_eq!(back.saw("command short"), 0, "an expired command never reaches the device");
    assert_eq!(back.saw("command blink"), 0, "nothing from before is replayed");

    back.stop().await;
    d2.stop().await;
    consumer.close().await;
    hub.stop().await;
}

/// The SDK keeps the connection up by itself: a device kicked by a suspension reconnects (with backoff) once
/// it is resumed, delivers what it sent while disconnected, and works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_reconnects_after_the_broker_drops_it() {
    let hub = TestHub::start(Db::Sqlite).await;
    hub.create_product("p").await;
    let secret = hub.register("p", "d").await;
    let device = Firmware::start(config(&hub, "d", &secret)).await;
    online(&hub, "d", true).await;
    // A burst, then the kick right behind it: whatever was still unacknowledged when the connection went is
    // sent again on the next one (the broker starts a new session, so rumqttc alone would drop it).
    // The broker drops it (a kick through its API, as an operator or a broker restart would): the device is
    // not suspended, so everything it sent counts.
    let mut ids = Vec::new();
    for n in 0..200 {
        ids.push(device.device.upload_data("burst", format!("{{\"n\":{n}}}")).await.unwrap());
    }
    hub.state.broker.kick_username("p/d").await.unwrap();
    eventually(Duration::from_secs(30), "kicked", || async { (device.saw("disconnected") >= 1).then_some(()) }).await;
    eventually(Duration::from_secs(30), "back", || async { (device.saw("connected") >= 2).then_some(()) }).await;
    eventually(Duration::from_secs(30), "the burst stored", || async {
        let (_, v) = hub.call(Method::GET, "/api/v1/products/p/devices/d/messages?limit=1000", None).await;
        (v["items"].as_array()?.len() >= 200).then_some(())
    })
    .await;
    // Suspended, it is kicked again and cannot come back (its data would be dropped: none is sent meanwhile).
    let (s, _) = hub.call(Method::POST, "/api/v1/products/p/devices/d/suspend", None).await;
    assert_eq!(s, StatusCode::OK);
    eventually(Duration::from_secs(30), "kicked", || async { (device.saw("disconnected") >= 2).then_some(()) }).await;
    online(&hub, "d", false).await;
    // Data sent while the connection is down waits in the SDK and goes out after the reconnect.
    for n in 0..3 {
        ids.push(device.device.upload_data("reading", format!("{{\"n\":{n}}}")).await.unwrap());
    }
    // While suspended, the reconnect attempts are refused; after resume one of them gets in.
    let (s, _) = hub.call(Method::POST, "/api/v1/products/p/devices/d/resume", None).await;
    assert_eq!(s, StatusCode::OK);
    eventually(Duration::from_secs(30), "reconnected", || async { (device.saw("connected") >= 3).then_some(()) }).await;
    online(&hub, "d", true).await;
    let stored = eventually(Duration::from_secs(30), "every message stored", || async {
        let (_, v) = hub.call(Method::GET, "/api/v1/products/p/devices/d/messages?limit=1000", None).await;
        let stored: std::collections::HashSet<String> =
            v["items"].as_array()?.iter().filter_map(|m| m["message_id"].as_str().map(str::to_string)).collect();
        ids.iter().all(|id| stored.contains(id)).then_some(stored)
    })
    .await;
    assert_eq!(stored.len(), 203, "no message lost or invented");
    subscribed(&device).await;
    let (s, rpc) = hub
        .call(Method::POST, "/api/v1/products/p/devices/d/rpc", Some(json!({"name": "ping", "timeout_ms": 5000})))
        .await;
    assert_eq!(s, StatusCode::OK, "{rpc}");
    device.stop().await;
    hub.stop().await;
}

/// Sends a command to every device tagged `lab` and waits until one device replied.
async fn tag_command(hub: &TestHub, name: &str) {
    let (s, v) = hub.call(Method::POST, "/api/v1/products/p/tags/lab/commands", Some(json!({"name": name}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["request_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "tag command replied", || async {
        let (_, v) = hub.call(Method::GET, &format!("/api/v1/products/p/tag-commands/{id}"), None).await;
        (v["replied"] == 1).then_some(())
    })
    .await;
}

/// The internal protocol end to end through the bundled broker: clock sync, tags pushed and followed
/// (tag commands reach the device, also after a reconnect that lost the broker session), the shadow's
/// desired state applied and reported, and an OTA upgrade that succeeds by the device's own status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_devices_follow_time_tags_shadow_and_ota() {
    let hub = TestHub::start_production().await;
    hub.create_product("p").await;
    let secret = hub.register("p", "d").await;
    let state_dir = tempfile::tempdir().unwrap();
    let mut c = config(&hub, "d", &secret);
    c.state_dir = Some(state_dir.path().to_path_buf());
    let fw = Firmware::start(c.clone()).await;
    online(&hub, "d", true).await;

    // NTP: `$ntp` reaches iothub, `$set_ntp` reaches the device; same machine, so the offset is tiny.
    let offset = fw.device.sync_time(Duration::from_secs(5)).await.expect("$set_ntp answered");
    assert!(offset.abs() < 1_000, "offset {offset} ms");

    // Tags pushed by iothub are applied, persisted and subscribed; a tag command then reaches the device.
    let (s, v) = hub.call(Method::PUT, "/api/v1/products/p/devices/d/tags", Some(json!({"tags": ["lab"]}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    eventually(Duration::from_secs(10), "tags applied", || async { (fw.saw("tags 1 lab") == 1).then_some(()) }).await;
    assert_eq!(fw.device.tags(), (vec!["lab".to_string()], 1));
    tag_command(&hub, "identify").await;
    assert_eq!(fw.saw("command identify"), 1);

    // Shadow: a desired change is applied by the device (it becomes reported); a report merges in.
    let url = "/api/v1/products/p/devices/d/shadow";
    let (s, v) = hub.call(Method::PUT, url, Some(json!({"state": {"desired": {"led": "on"}}, "version": 0}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let shadow = eventually(Duration::from_secs(10), "desired applied", || async {
        let (_, v) = hub.call(Method::GET, url, None).await;
        (v["state"]["reported"]["led"] == "on").then_some(v)
    })
    .await;
    assert_eq!(shadow["delta"], json!({}), "{shadow}");
    assert_eq!(fw.saw("shadow 1 {\"led\":\"on\"}"), 1);
    fw.device.report_shadow(json!({"temp": 20})).await.unwrap();
    let shadow = eventually(Duration::from_secs(10), "report merged", || async {
        let (_, v) = hub.call(Method::GET, url, None).await;
        (v["state"]["reported"]["temp"] == 20).then_some(v)
    })
    .await;
    assert_eq!(shadow["state"]["reported"]["led"], "on", "{shadow}");
    eventually(Duration::from_secs(10), "device knows the version", || async {
        (fw.device.shadow_version() == shadow["version"].as_i64().unwrap()).then_some(())
    })
    .await;

    // OTA: pushed, progressed to 100 %, and succeeded once the device reports the version in its status.
    let package = json!({"url": "https://fw.example/1.2.0.bin", "version": "1.2.0", "size": 1024,
        "md5": "9e107d9d372bb6826bd81d3542a419d6", "type": "firmware"});
    let (s, rollout) = hub.call(Method::POST, "/api/v1/products/p/devices/d/ota", Some(package)).await;
    assert_eq!(s, StatusCode::CREATED, "{rollout}");
    let id = rollout["rollout_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(15), "OTA succeeded", || async {
        let (_, v) = hub.call(Method::GET, &format!("/api/v1/products/p/ota-rollouts/{id}"), None).await;
        (v["targets"][0]["state"] == "succeeded").then_some(())
    })
    .await;
    // The `$ota_upgrade` command's delivery is reported like any command's (the bundled broker's web-hook
    // cannot build it; the `$` forwarder does).
    eventually(Duration::from_secs(10), "OTA command delivered", || async {
        let (_, v) = hub.call(Method::GET, &format!("/api/v1/products/p/devices/d/commands/{id}"), None).await;
        v["delivered_at"].as_i64().map(|_| ())
    })
    .await;

    // The broker forgets subscriptions with the session; the SDK re-subscribes its stored tags on connect.
    fw.stop().await;
    online(&hub, "d", false).await;
    let fw = Firmware::start(c).await;
    online(&hub, "d", true).await;
    assert_eq!(fw.device.tags(), (vec!["lab".to_string()], 1), "tags persisted across the restart");
    tag_command(&hub, "locate").await;
    assert_eq!(fw.saw("command locate"), 1);
    fw.stop().await;
    hub.stop().await;
}

/// A self-signed certificate for `localhost`: (certificate PEM, rustls server config).
fn self_signed() -> (Vec<u8>, rustls::ServerConfig) {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(key.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![key.cert.der().clone()], private)
        .expect("server config");
    (key.cert.pem().into_bytes(), config)
}

/// Terminates TLS in front of the bundled broker's plain MQTT port, as a load balancer would.
async fn tls_terminator(broker: std::net::SocketAddr, config: rustls::ServerConfig) -> std::net::SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut plain) = tokio::net::TcpStream::connect(broker).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

/// TLS: the SDK verifies the broker's certificate against the CA it was given and then works as over TCP;
/// a device that trusts another CA does not connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_devices_connect_over_tls() {
    let hub = TestHub::start(Db::Sqlite).await;
    hub.create_product("p").await;
    let secret = hub.register("p", "d").await;
    let (ca_pem, server) = self_signed();
    let addr = tls_terminator(hub.mqtt_addr, server).await;
    let tls_config = |ca_pem: Vec<u8>| {
        let mut c = DeviceConfig::new("p", "d", secret.as_str(), "localhost", addr.port());
        c.tls = Some(Tls { ca_pem, client_auth: None });
        c.connect_timeout = Duration::from_secs(3);
        c
    };
    let fw = Firmware::start(tls_config(ca_pem)).await;
    online(&hub, "d", true).await;
    subscribed(&fw).await;
    let (s, rpc) = hub
        .call(Method::POST, "/api/v1/products/p/devices/d/rpc", Some(json!({"name": "getTemp", "timeout_ms": 5000})))
        .await;
    assert_eq!((s, rpc["reply"]["json"].clone()), (StatusCode::OK, json!({"temp": 21.5})), "{rpc}");
    fw.stop().await;

    let (other_ca, _) = self_signed();
    let refused = Device::connect(tls_config(other_ca)).await;
    assert!(matches!(refused, Err(iothub_device::Error::Connect(_))), "{refused:?}");
    let bad = Device::connect(tls_config(b"not a certificate".to_vec())).await;
    assert!(matches!(bad, Err(iothub_device::Error::Config(_))), "{bad:?}");
    hub.stop().await;
}

//! Broker events in, end to end: a real device (rumqttc) on the bundled RMQTT, whose web-hook calls iothub,
//! which stores in PostgreSQL/SQLite, dedups in Redis (or in process) and publishes to RabbitMQ (or SSE).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use base64::Engine;
use reqwest::{Method, StatusCode};
use rumqttc::QoS;
use serde_json::{json, Value};

use crate::helpers::*;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

async fn device_view(hub: &TestHub, p: &str, d: &str) -> Value {
    let (s, v) = hub.call(Method::GET, &format!("/api/v1/products/{p}/devices/{d}"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

async fn wait_online(hub: &TestHub, p: &str, d: &str, online: bool) -> Value {
    eventually(Duration::from_secs(15), &format!("{p}/{d} online={online}"), || async {
        let v = device_view(hub, p, d).await;
        (v["online"] == json!(online)).then_some(v)
    })
    .await
}

fn of_kind<'a>(events: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|(k, _)| k == kind).map(|(_, v)| v).collect()
}

/// The production path: data, status and presence reach PostgreSQL and a RabbitMQ consumer exactly once per
/// message id, and the history/status/presence APIs return them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_events_reach_storage_and_rabbitmq() {
    let hub = TestHub::start_production().await;
    hub.create_product("p1").await;
    let secret = hub.register("p1", "d1").await;
    let mut consumer = EventConsumer::bind(&amqp_url(), &hub.config.rabbitmq.exchange_prefix, "p1", "").await;

    let (client, eventloop) = must_connect(hub.mqtt_addr, "p1/d1/main", "p1/d1", &secret).await;
    let driver = drive(eventloop);
    let online = wait_online(&hub, "p1", "d1", true).await;
    let conns = online["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1, "{online}");
    assert_eq!(conns[0]["client_id"], "p1/d1/main");
    assert_eq!(conns[0]["connected"], true);
    assert_eq!(conns[0]["ip_address"], "127.0.0.1");
    assert_eq!(conns[0]["keepalive"], 30);
    let (_, product) = hub.call(Method::GET, "/api/v1/products/p1", None).await;
    assert_eq!(product["online_count"], 1, "{product}");
    let (_, listed) = hub.call(Method::GET, "/api/v1/products/p1/devices?online=true", None).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");

    let binary = vec![0x00u8, 0x9f, 0x92, 0x96, 0xff];
    client.publish("upload_data/p1/d1/raw/m1", QoS::AtLeastOnce, false, binary.clone()).await.unwrap();
    // The same message id again (a device retry): stored and announced once.
    client.publish("upload_data/p1/d1/raw/m1", QoS::AtLeastOnce, false, binary.clone()).await.unwrap();
    client.publish("upload_data/p1/d1/temp/m2", QoS::AtLeastOnce, false, r#"{"t":21.5}"#).await.unwrap();
    client.publish("update_status/p1/d1/s1", QoS::AtLeastOnce, false, r#"{"fw":"1.0"}"#).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    client.publish("update_status/p1/d1/s2", QoS::AtLeastOnce, false, r#"{"fw":"1.1"}"#).await.unwrap();
    // Internal data types and non-JSON status are never stored or announced.
    client.publish("upload_data/p1/d1/$shadow_reported/m3", QoS::AtLeastOnce, false, "{}").await.unwrap();
    client.publish("update_status/p1/d1/s3", QoS::AtLeastOnce, false, "not json").await.unwrap();

    let mut events = consumer
        .collect_until(Duration::from_secs(20), |seen| {
            of_kind(seen, "upload_data").len() >= 2 && of_kind(seen, "update_status").len() >= 2
        })
        .await;
    events.extend(consumer.drain(Duration::from_millis(1500)).await);
    let data = of_kind(&events, "upload_data");
    assert_eq!(data.len(), 2, "one event per message id: {data:#?}");
    let m1 = data.iter().find(|e| e["message_id"] == "m1").expect("m1 announced");
    assert_eq!(m1["product_id"], "p1");
    assert_eq!(m1["device_id"], "d1");
    assert_eq!(m1["data_type"], "raw");
    assert_eq!(m1["encoding"], "base64");
    assert_eq!(B64.decode(m1["payload"].as_str().unwrap()).unwrap(), binary, "payload byte-exact");
    assert!(m1["sent_at"].as_i64().unwrap() > 1_700_000_000_000);
    let statuses = of_kind(&events, "update_status");
    assert_eq!(statuses.len(), 2, "{statuses:#?}");
    assert!(statuses.iter().any(|e| e["report"] == json!({"fw": "1.1"})));
    let connected = of_kind(&events, "device_connection");
    assert!(connected.iter().any(|e| e["event"] == "connected" && e["online"] == true), "{connected:#?}");

    // History, lookup by id, filters, pagination.
    let base = "/api/v1/products/p1/devices/d1/messages";
    let (s, page) = hub.call(Method::GET, base, None).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{page}");
    let (_, one) = hub.call(Method::GET, &format!("{base}/m1"), None).await;
    assert_eq!(B64.decode(one["payload"].as_str().unwrap()).unwrap(), binary);
    assert!(one.get("json").is_none());
    let (_, two) = hub.call(Method::GET, &format!("{base}/m2"), None).await;
    assert_eq!(two["json"], json!({"t": 21.5}));
    let (_, temp_only) = hub.call(Method::GET, &format!("{base}?data_type=temp"), None).await;
    assert_eq!(temp_only["items"].as_array().unwrap().len(), 1, "{temp_only}");
    let (_, first) = hub.call(Method::GET, &format!("{base}?limit=1"), None).await;
    let cursor = first["next_cursor"].as_str().expect("a next page").to_string();
    let (_, second) = hub.call(Method::GET, &format!("{base}?limit=1&cursor={cursor}"), None).await;
    assert_eq!(second["items"].as_array().unwrap().len(), 1);
    assert!(second.get("next_cursor").is_none(), "{second}");
    assert_ne!(first["items"][0]["message_id"], second["items"][0]["message_id"]);
    let future = m1["sent_at"].as_i64().unwrap() + 3_600_000;
    let (_, none) = hub.call(Method::GET, &format!("{base}?from={future}"), None).await;
    assert_eq!(none["items"], json!([]));
    let (s, bad) = hub.call(Method::GET, &format!("{base}?from=10&to=5"), None).await;
    assert_eq!((s, bad["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("to")));
    let (s, _) = hub.call(Method::GET, &format!("{base}/nope"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, status) = hub.call(Method::GET, "/api/v1/products/p1/devices/d1/status", None).await;
    assert_eq!(s, StatusCode::OK, "{status}");
    assert_eq!(status["status"], json!({"fw": "1.1"}), "the newest report wins");
    assert_eq!(status["message_id"], "s2");

    // Presence follows a clean disconnect...
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    let offline = wait_online(&hub, "p1", "d1", false).await;
    assert_eq!(offline["connections"][0]["connected"], false, "{offline}");
    assert!(offline["connections"][0]["disconnected_at"].as_i64().is_some());
    let gone = consumer
        .collect_until(Duration::from_secs(10), |seen| {
            of_kind(seen, "device_connection").iter().any(|e| e["event"] == "disconnected")
        })
        .await;
    let gone = of_kind(&gone, "device_connection").into_iter().find(|e| e["event"] == "disconnected").unwrap().clone();
    assert_eq!(gone["online"], false);
    assert_eq!(gone["client_id"], "p1/d1/main");
    assert!(gone["connected_at"].as_i64().is_some(), "filled in from the connect: {gone}");

    // ...and a kick (suspension).
    let (_client, eventloop) = must_connect(hub.mqtt_addr, "p1/d1/main", "p1/d1", &secret).await;
    let _driver = drive(eventloop);
    wait_online(&hub, "p1", "d1", true).await;
    let (s, _) = hub.call(Method::POST, "/api/v1/products/p1/devices/d1/suspend", None).await;
    assert_eq!(s, StatusCode::OK);
    let kicked = wait_online(&hub, "p1", "d1", false).await;
    let latest = &kicked["connections"][0];
    assert_eq!(latest["connected"], false, "{kicked}");
    assert!(latest["reason"].as_str().is_some_and(|r| !r.is_empty()), "{kicked}");
    let (_, product) = hub.call(Method::GET, "/api/v1/products/p1", None).await;
    assert_eq!(product["online_count"], 0);
    assert_eq!(hub.state.store.outbox_len().await.unwrap(), 0, "every event confirmed and removed");
    hub.stop().await;
}

/// The embedded profile: SQLite, in-process dedup, events on the Server-Sent Events stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_profile_streams_events_over_sse() {
    let hub = TestHub::start(Db::Sqlite).await;
    hub.create_product("p1").await;
    hub.create_product("p2").await;
    let secret = hub.register("p1", "d1").await;
    let secret2 = hub.register("p2", "d9").await;

    let (s, bad) = hub.call(Method::GET, "/api/v1/events?product=p1&kinds=nope", None).await;
    assert_eq!((s, bad["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("kinds")));
    let resp = hub.request(Method::GET, "/api/v1/events?product=p1").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp;

    let (client, eventloop) = must_connect(hub.mqtt_addr, "p1/d1", "p1/d1", &secret).await;
    let _driver = drive(eventloop);
    let (other, eventloop2) = must_connect(hub.mqtt_addr, "p2/d9", "p2/d9", &secret2).await;
    let _driver2 = drive(eventloop2);
    other.publish("upload_data/p2/d9/t/x1", QoS::AtLeastOnce, false, "other product").await.unwrap();
    client.publish("upload_data/p1/d1/t/m1", QoS::AtLeastOnce, false, "hello").await.unwrap();
    client.publish("upload_data/p1/d1/t/m1", QoS::AtLeastOnce, false, "hello").await.unwrap();
    client.publish("upload_data/p1/d1/t/m2", QoS::AtLeastOnce, false, "world").await.unwrap();

    let mut text = String::new();
    let mut data_events: Vec<Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while data_events.len() < 2 {
        let chunk =
            tokio::time::timeout_at(deadline, body.chunk()).await.expect("SSE events in time").unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let kind = frame.lines().find_map(|l| l.strip_prefix("event: ").or_else(|| l.strip_prefix("event:")));
            let data = frame.lines().find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")));
            if let (Some("upload_data"), Some(data)) = (kind, data) {
                data_events.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    // Each once, only product p1. Order across ingest groups is not guaranteed (events carry broker time).
    let mut ids: Vec<&str> = data_events.iter().map(|e| e["message_id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["m1", "m2"], "{data_events:#?}");
    let m1 = data_events.iter().find(|e| e["message_id"] == "m1").unwrap();
    assert_eq!(B64.decode(m1["payload"].as_str().unwrap()).unwrap(), b"hello");
    let v = wait_online(&hub, "p1", "d1", true).await;
    assert_eq!(v["connections"].as_array().unwrap().len(), 1);
    let (_, page) = hub.call(Method::GET, "/api/v1/products/p1/devices/d1/messages", None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
    hub.stop().await;
}

/// RabbitMQ stops while devices publish and comes back later: every event arrives, none is lost; the
/// webhooks kept being answered (PostgreSQL holds the events meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_outage_loses_nothing() {
    let script = std::env::var("TEST_RABBITMQ_NODE_SCRIPT").expect("TEST_RABBITMQ_NODE_SCRIPT (scripts/test.sh)");
    let node_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let node = |action: &'static str| {
        let (script, dir) = (script.clone(), node_dir.path().to_path_buf());
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(&script);
            cmd.arg(action).arg(&dir);
            if action == "start" {
                cmd.arg(port.to_string());
            }
            let out = cmd.output().expect("run rabbitmq-node");
            assert!(out.status.success(), "rabbitmq-node {action}: {}", String::from_utf8_lossy(&out.stderr));
        })
    };
    node("start").await.unwrap();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let hub_url = url.clone();
    let hub = TestHub::start_production_with(move |c| {
        c.rabbitmq.url = hub_url;
        c.rabbitmq.timeout_ms = 2_000;
        c.events.outbox_sweep_ms = 200;
        // Rows whose publish failed wait out their lease before the sweep retries them: keep that short so
        // the test measures loss, not the default 30 s lease on a loaded machine.
        c.events.outbox_lease_ms = 2_000;
    })
    .await;
    hub.create_product("p1").await;
    let secret = hub.register("p1", "d1").await;
    let queue = format!("outage-{}", uuid::Uuid::new_v4().simple());
    let consumer = EventConsumer::bind(&url, &hub.config.rabbitmq.exchange_prefix, "p1", &queue).await;
    consumer.close().await; // The durable queue keeps collecting while nobody consumes.

    let (client, eventloop) = must_connect(hub.mqtt_addr, "p1/d1", "p1/d1", &secret).await;
    let _driver = drive(eventloop);
    const TOTAL: usize = 150;
    let mut stop = None;
    for i in 0..TOTAL {
        client.publish(format!("upload_data/p1/d1/n/m{i:04}"), QoS::AtLeastOnce, false, format!("{i}")).await.unwrap();
        if i == 40 {
            stop = Some(node("stop"));
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    stop.unwrap().await.unwrap();
    // Everything is stored although RabbitMQ is down.
    eventually(Duration::from_secs(20), "all messages stored", || async {
        let (_, page) = hub.call(Method::GET, "/api/v1/products/p1/devices/d1/messages?limit=1000", None).await;
        (page["items"].as_array().map_or(0, Vec::len) == TOTAL).then_some(())
    })
    .await;
    assert!(hub.state.store.outbox_len().await.unwrap() > 0, "events wait in the outbox while RabbitMQ is down");
    node("start").await.unwrap();

    let mut consumer = EventConsumer::bind(&url, &hub.config.rabbitmq.exchange_prefix, "p1", &queue).await;
    let events = consumer
        .collect_until(Duration::from_secs(60), |seen| {
            let ids: HashSet<&str> = seen.iter().filter_map(|(_, e)| e["message_id"].as_str()).collect();
            ids.len() >= TOTAL
        })
        .await;
    let mut per_id: HashMap<String, (usize, String)> = HashMap::new();
    for (_, e) in of_kind(&events, "upload_data").into_iter().map(|e| ((), e)) {
        let entry = per_id.entry(e["message_id"].as_str().unwrap().to_string()).or_insert((0, String::new()));
        entry.0 += 1;
        entry.1 = e["event_id"].as_str().unwrap().to_string();
    }
    assert_eq!(per_id.len(), TOTAL, "every message arrived");
    eventually(Duration::from_secs(20), "outbox drained", || async {
        (hub.state.store.outbox_len().await.unwrap() == 0).then_some(())
    })
    .await;
    hub.stop().await;
    node("stop").await.unwrap();
}

/// Readiness checks Redis and RabbitMQ: a dead RabbitMQ reports the instance degraded, naming the
/// dependency, but keeps it ready (devices are still served; events wait in the outbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_a_dead_event_bus() {
    let dead = free_port();
    let hub = TestHub::start_production_with(move |c| {
        c.rabbitmq.url = format!("amqp://guest:guest@127.0.0.1:{dead}/%2f");
        c.rabbitmq.timeout_ms = 1_000;
    })
    .await;
    let body = hub.assert_degraded_by("events").await;
    let ok = body["checks"].as_array().unwrap().iter().find(|c| c["name"] == "dedup").unwrap();
    assert_eq!(ok["kind"], "redis");
    hub.stop().await;
}

/// Redis down from the start: the instance starts anyway, reports dedup `degraded`, and every event is
/// still stored once (the database's unique keys deduplicate) without waiting long for Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_and_stores_events_without_redis() {
    let dead = free_port();
    let hub = TestHub::start_production_with(move |c| c.redis.url = format!("redis://127.0.0.1:{dead}")).await;
    hub.assert_degraded_by("dedup").await;

    hub.create_product("p1").await;
    let secret = hub.register("p1", "d1").await;
    let (client, eventloop) = must_connect(hub.mqtt_addr, "p1/d1", "p1/d1", &secret).await;
    let driver = drive(eventloop);
    wait_online(&hub, "p1", "d1", true).await;
    let started = std::time::Instant::now();
    for (n, id) in ["m1", "m1", "m2", "m3"].iter().enumerate() {
        client
            .publish(format!("upload_data/p1/d1/t/{id}"), QoS::AtLeastOnce, false, format!("{{\"n\":{n}}}"))
            .await
            .unwrap();
    }
    let page = eventually(Duration::from_secs(20), "messages stored", || async {
        let (_, page) = hub.call(Method::GET, "/api/v1/products/p1/devices/d1/messages", None).await;
        (page["items"].as_array().map_or(0, Vec::len) >= 3).then_some(page)
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(10), "no long wait on the dead Redis: {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, page_after) = hub.call(Method::GET, "/api/v1/products/p1/devices/d1/messages", None).await;
    assert_eq!(page_after["items"].as_array().unwrap().len(), 3, "m1 once: {page} {page_after}");
    driver.abort();
    drop(client);
    hub.stop().await;
}

/// One API key holds at most `http.sse_streams_per_key` event streams on an instance; the next one is a
/// 429 problem, a closed stream frees its slot, and other keys are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_per_key_are_bounded() {
    let hub = TestHub::start_with(Db::Sqlite, |c| c.http.sse_streams_per_key = 2).await;
    hub.create_product("p1").await;
    let open = |key: String| {
        let http = hub.http.clone();
        let url = format!("{}/api/v1/events?product=p1", hub.base);
        async move { http.get(url).bearer_auth(key).send().await.unwrap() }
    };
    let first = open(hub.admin_key.clone()).await;
    let second = open(hub.admin_key.clone()).await;
    assert_eq!((first.status(), second.status()), (StatusCode::OK, StatusCode::OK));
    let third = open(hub.admin_key.clone()).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.headers()["content-type"], "application/problem+json");
    // Another key has slots of its own.
    let (s, key) =
        hub.call(Method::POST, "/api/v1/api-keys", Some(json!({"name": "dashboard", "scopes": ["read"]}))).await;
    assert_eq!(s, StatusCode::CREATED, "{key}");
    let other = open(key["key"].as_str().unwrap().to_string()).await;
    assert_eq!(other.status(), StatusCode::OK);
    // Closing a stream frees its slot.
    drop(first);
    eventually(Duration::from_secs(5), "a freed stream slot", || async {
        let again = open(hub.admin_key.clone()).await;
        (again.status() == StatusCode::OK).then_some(again)
    })
    .await;
    drop((second, other));
    hub.stop().await;
}

//! Device control out, end to end: business calls on iothub's API reach a real device (rumqttc) through the
//! bundled RMQTT's REST publish API and auto-subscriptions; the device's replies and the broker's delivery
//! reports come back through the web-hook into the command log (PostgreSQL / SQLite), RPC callers and
//! RabbitMQ consumers.

use std::time::Duration;

use base64::Engine;
use reqwest::{Method, StatusCode};
use rumqttc::{Packet, QoS};
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::*;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The production path: a command queued while the device is offline is delivered once when it connects,
/// an expired one never; online commands, RPC (reply, timeout, offline), NTP and data requests round-trip;
/// every transition reaches RabbitMQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_round_trip_through_the_broker() {
    let hub = TestHub::start_production().await;
    hub.create_product("p1").await;
    let secret = hub.register("p1", "d1").await;
    let mut consumer = EventConsumer::bind(&amqp_url(), &hub.config.rabbitmq.exchange_prefix, "p1", "").await;
    let base = "/api/v1/products/p1/devices/d1";

    // Offline: logged and queued. The same Idempotency-Key returns the same command.
    let send = |body: Value, key: Option<&str>| {
        let mut rb = hub.request(Method::POST, &format!("{base}/commands")).json(&body);
        if let Some(k) = key {
            rb = rb.header("Idempotency-Key", k);
        }
        async move {
            let resp = rb.send().await.unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let (s, queued) = send(json!({"name": "reboot", "payload": {"delay": 1}, "ttl_secs": 120}), Some("k-1")).await;
    assert_eq!(s, StatusCode::CREATED, "{queued}");
    assert_eq!(queued["state"], "queued");
    assert_eq!(queued["encoding"], "json");
    let reboot = queued["request_id"].as_str().unwrap().to_string();
    let (s, again) = send(json!({"name": "reboot", "payload": {"delay": 1}, "ttl_secs": 120}), Some("k-1")).await;
    assert_eq!((s, again["request_id"].as_str()), (StatusCode::OK, Some(reboot.as_str())), "{again}");
    let (s, other) = send(json!({"name": "reboot", "payload": {"delay": 2}}), Some("k-1")).await;
    assert_eq!(s, StatusCode::CONFLICT, "{other}");
    let (s, short) = send(json!({"name": "short", "ttl_secs": 1}), None).await;
    assert_eq!(s, StatusCode::CREATED, "{short}");
    let short = short["request_id"].as_str().unwrap().to_string();
    // Reserved names, bad payloads and unknown devices are refused naming the problem.
    let (s, bad) = send(json!({"name": "$set_ntp"}), None).await;
    assert_eq!((s, bad["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("name")), "{bad}");
    let (s, bad) = send(json!({"name": "x", "payload": "***", "encoding": "base64"}), None).await;
    assert_eq!((s, bad["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("payload")), "{bad}");
    let (s, _) = hub.call(Method::POST, "/api/v1/products/p1/devices/nope/commands", Some(json!({"name": "x"}))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, offline) = hub.call(Method::POST, &format!("{base}/rpc"), Some(json!({"name": "getTemp"}))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{offline}");
    assert!(offline["detail"].as_str().unwrap().contains("offline"), "{offline}");

    // The short command expires while the device is away and is never delivered.
    let expired = wait_state(&hub, "p1", "d1", &short, "expired").await;
    assert!(expired["sent_at"].is_null(), "{expired}");

    // The device connects (no SUBSCRIBE of its own: the broker's auto-subscription) and gets `reboot` once.
    let (client, eventloop) = must_connect(hub.mqtt_addr, "p1/d1/main", "p1/d1", &secret).await;
    let (inbox, device_task) = answering_device(client.clone(), eventloop, "d1");
    let replied = wait_state(&hub, "p1", "d1", &reboot, "replied").await;
    assert_eq!(B64.decode(replied["reply"]["payload"].as_str().unwrap()).unwrap(), b"ok:reboot");
    assert_eq!(replied["attempts"], 1);
    for stamp in ["sent_at", "replied_at"] {
        assert!(replied[stamp].as_i64().unwrap() >= replied["created_at"].as_i64().unwrap(), "{stamp}: {replied}");
    }
    let got = received(&inbox, &reboot);
    assert_eq!(got.len(), 1, "delivered once: {got:?}");
    let (topic, payload) = &got[0];
    let levels: Vec<&str> = topic.split('/').collect();
    assert_eq!(&levels[..6], ["cmd", "p1", "d1", "reboot", "plain", reboot.as_str()]);
    let expires_at_secs: i64 = levels[6].parse().unwrap();
    assert_eq!(expires_at_secs, (replied["expires_at"].as_i64().unwrap() + 999) / 1000);
    assert_eq!(payload, br#"{"delay":1}"#);
    assert!(received(&inbox, &short).is_empty(), "an expired command is never delivered");
    // RMQTT reports the delivery; it lands on the command even though the reply may have come first.
    eventually(Duration::from_secs(10), "delivery report", || async {
        let v = command(&hub, "p1", "d1", &reboot).await;
        v["delivered_at"].as_i64().map(|_| ())
    })
    .await;

    // Online: sent at once; base64 travels as base64 text with the `base64` encoding level.
    let (s, blink) =
        send(json!({"name": "blink", "payload": B64.encode([0u8, 255]), "encoding": "base64", "qos": 0}), None).await;
    assert_eq!(s, StatusCode::CREATED, "{blink}");
    // Sent before the response (the delivery report or even the reply may already be in).
    assert!(blink["sent_at"].is_i64() && blink["state"] != "queued", "an online device gets it at once: {blink}");
    let blink = blink["request_id"].as_str().unwrap().to_string();
    wait_state(&hub, "p1", "d1", &blink, "replied").await;
    let got = received(&inbox, &blink);
    assert_eq!(got.len(), 1);
    assert!(got[0].0.starts_with("cmd/p1/d1/blink/base64/"), "{}", got[0].0);
    assert_eq!(got[0].1, b"AP8=");

    // RPC: the HTTP call returns the device's reply; a silent device gives 504 naming the request.
    let (s, rpc) =
        hub.call(Method::POST, &format!("{base}/rpc"), Some(json!({"name": "getTemp", "payload": "c"}))).await;
    assert_eq!(s, StatusCode::OK, "{rpc}");
    assert_eq!(rpc["reply"]["json"], json!({"temp": 21.5}));
    let rpc_id = rpc["request_id"].as_str().unwrap();
    // The caller gets the reply while it is being committed; the log has it a moment later.
    let logged = wait_state(&hub, "p1", "d1", rpc_id, "replied").await;
    assert_eq!(logged["mode"], "rpc");
    let started = std::time::Instant::now();
    let (s, timeout) =
        hub.call(Method::POST, &format!("{base}/rpc"), Some(json!({"name": "slow", "timeout_ms": 700}))).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{timeout}");
    assert!(started.elapsed() >= Duration::from_millis(700) && started.elapsed() < Duration::from_secs(5));
    let slow_id = timeout["detail"].as_str().unwrap().split('`').nth(3).unwrap().to_string();
    wait_state(&hub, "p1", "d1", &slow_id, "expired").await;
    let (s, bad) =
        hub.call(Method::POST, &format!("{base}/rpc"), Some(json!({"name": "x", "timeout_ms": 31_000}))).await;
    assert_eq!((s, bad["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("timeout_ms")), "{bad}");

    // NTP through EMQX 5's contract: the request comes as EMQX 5's rule would post it, iothub answers through
    // the real broker API. (Over the bundled broker the same round trip is `sdk::sdk_devices_follow_time_tags_
    // shadow_and_ota`.)
    let now = iothub::clock::now_ms();
    emqx5_publish_at(&hub, "d1-main", "p1/d1", "get/p1/d1/$ntp/n1", br#"{"device_time":1234567}"#, now).await;
    eventually(Duration::from_secs(10), "$set_ntp published", || async {
        let m = hub.http.get(format!("{}/metrics", hub.base)).send().await.unwrap().text().await.unwrap();
        m.lines().any(|l| l.starts_with("iothub_internal_commands_total{name=\"$set_ntp\"} 1")).then_some(())
    })
    .await;

    // A data request goes to business systems; `$` resources never do.
    client.publish("get/p1/d1/weather/w1", QoS::AtLeastOnce, false, r#"{"city":"Lyon"}"#).await.unwrap();

    let events = consumer
        .collect_until(Duration::from_secs(20), |seen| {
            let has = |kind: &str, f: &dyn Fn(&Value) -> bool| seen.iter().any(|(k, v)| k == kind && f(v));
            has("data_request", &|v| v["resource"] == "weather")
                && has("cmd_resp", &|v| v["request_id"] == reboot.as_str())
                && has("command_state", &|v| v["request_id"] == reboot.as_str() && v["state"] == "replied")
                && has("command_state", &|v| v["request_id"] == short.as_str() && v["state"] == "expired")
        })
        .await;
    let states: Vec<&str> = events
        .iter()
        .filter(|(k, v)| k == "command_state" && v["request_id"] == reboot.as_str())
        .map(|(_, v)| v["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.first(), Some(&"queued"), "{states:?}");
    assert!(states.contains(&"sent") && states.contains(&"replied"), "{states:?}");
    assert!(events.iter().all(|(k, v)| k != "data_request" || !v["resource"].as_str().unwrap().starts_with('$')));
    let resp = events.iter().find(|(k, v)| k == "cmd_resp" && v["request_id"] == reboot.as_str()).unwrap();
    assert_eq!(B64.decode(resp.1["payload"].as_str().unwrap()).unwrap(), b"ok:reboot");

    // The log lists per device, by state.
    let (s, page) = hub.call(Method::GET, &format!("{base}/commands?state=expired"), None).await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<&str> = page["items"].as_array().unwrap().iter().map(|c| c["request_id"].as_str().unwrap()).collect();
    assert!(
        ids.contains(&short.as_str()) && ids.contains(&slow_id.as_str()) && !ids.contains(&reboot.as_str()),
        "{ids:?}"
    );

    // Reconnecting does not send a replied command again.
    assert_eq!(received(&inbox, &reboot).len(), 1);
    client.disconnect().await.unwrap();
    let _ = device_task.await;
    consumer.close().await;
    hub.stop().await;
}

/// A command with a retry policy is resent (same request id) until the device answers, and an
/// unanswered one stops after `max_attempts`; the embedded profile runs the same log on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreplied_commands_are_retried_by_policy() {
    let hub = TestHub::start_with(Db::Sqlite, |c| c.commands.sweep_ms = 200).await;
    hub.create_product("p").await;
    let secret = hub.register("p", "d").await;
    let (client, eventloop) = must_connect(hub.mqtt_addr, "p/d", "p/d", &secret).await;
    let (inbox, device_task) = answering_device(client.clone(), eventloop, "d");
    wait_online(&hub, "p", "d").await;
    let (s, slow) = hub
        .call(
            Method::POST,
            "/api/v1/products/p/devices/d/commands",
            Some(json!({"name": "slow", "retry": {"interval_secs": 1, "max_attempts": 3}})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{slow}");
    let id = slow["request_id"].as_str().unwrap().to_string();
    let done = eventually(Duration::from_secs(15), "three attempts", || async {
        let v = command(&hub, "p", "d", &id).await;
        (v["attempts"] == 3).then_some(v)
    })
    .await;
    assert_eq!(done["state"], "delivered", "{done}");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(received(&inbox, &id).len(), 3, "three sends, then no more");
    assert_eq!(command(&hub, "p", "d", &id).await["attempts"], 3);
    // A device answering (here by hand, late) still completes it.
    client.publish(format!("cmd_resp/p/d/slow/{id}/late1"), QoS::AtLeastOnce, false, "done").await.unwrap();
    wait_state(&hub, "p", "d", &id, "replied").await;
    client.disconnect().await.unwrap();
    let _ = device_task.await;
    hub.stop().await;
}

/// Two iothub instances share PostgreSQL, Redis and one broker: an RPC taken by instance B is answered by
/// a device whose reply reaches instance A (the broker's web-hook points there); B's caller gets it over
/// Redis pub/sub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_is_answered_across_instances() {
    let broker_token = format!("bt{}", uuid::Uuid::new_v4().simple());
    let a = TestHub::start_production_with(|c| c.broker.api_key = broker_token.clone()).await;
    let (prefix, exchanges) = (a.config.redis.key_prefix.clone(), a.config.rabbitmq.exchange_prefix.clone());
    let b = TestHub::start_with(Db::Sqlite, |c| {
        c.database.url = a.pg_url().unwrap().to_string();
        c.redis.url = redis_url();
        c.redis.key_prefix = prefix;
        c.rabbitmq.url = amqp_url();
        c.rabbitmq.exchange_prefix = exchanges;
        c.broker.kind = iothub::config::BrokerKind::Rmqtt;
        c.broker.api_url = format!("http://{}", a.config.broker.embedded.api_listen);
        c.broker.api_key = broker_token.clone();
        c.broker.hook_token = "unused-by-this-test-0123456789abcdef".into();
        c.auth.jwt_secret = "x".repeat(32);
        c.auth.bootstrap_admin_key = false;
    })
    .await;
    a.create_product("p").await;
    let secret = a.register("p", "d").await;
    let (client, eventloop) = must_connect(a.mqtt_addr, "p/d", "p/d", &secret).await;
    let (_inbox, device_task) = answering_device(client.clone(), eventloop, "d");
    wait_online(&a, "p", "d").await;

    // B takes the RPC with A's admin key (same database, same keys).
    let resp = b
        .http
        .post(format!("{}/api/v1/products/p/devices/d/rpc", b.base))
        .bearer_auth(&a.admin_key)
        .json(&json!({"name": "getTemp", "timeout_ms": 5000}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["reply"]["json"], json!({"temp": 21.5}));
    // Several in a row, so a reply that only a final database read found would show up as slow.
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let resp = b
            .http
            .post(format!("{}/api/v1/products/p/devices/d/rpc", b.base))
            .bearer_auth(&a.admin_key)
            .json(&json!({"name": "getTemp", "timeout_ms": 5000}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(started.elapsed() < Duration::from_secs(2), "answered over pub/sub, not at the timeout");
    }
    client.disconnect().await.unwrap();
    let _ = device_task.await;
    b.stop().await;
    a.stop().await;
}

/// M2M: devices of one product message each other through the broker (auto-subscribed inbox); a device
/// can only send as itself and only receive its own inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_message_each_other() {
    let hub = TestHub::start(Db::Sqlite).await;
    hub.create_product("p").await;
    let (sa, sb) = (hub.register("p", "a").await, hub.register("p", "b").await);
    let (ca, ea) = must_connect(hub.mqtt_addr, "p/a", "p/a", &sa).await;
    let ta = drive(ea);
    let (cb, mut eb) = must_connect(hub.mqtt_addr, "p/b", "p/b", &sb).await;
    wait_online(&hub, "p", "a").await;
    wait_online(&hub, "p", "b").await;
    ca.publish("m2m/p/b/a/m1", QoS::AtLeastOnce, false, "hello b").await.unwrap();
    let got = wait_for(&mut eb, Duration::from_secs(10), |p| matches!(p, Packet::Publish(_))).await.unwrap();
    let Packet::Publish(p) = got else { unreachable!() };
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("m2m/p/b/a/m1", &b"hello b"[..]));
    // b may not read a's inbox.
    cb.subscribe("m2m/p/a/+/+", QoS::AtLeastOnce).await.unwrap();
    let ack = wait_for(&mut eb, Duration::from_secs(10), |p| matches!(p, Packet::SubAck(_))).await.unwrap();
    let Packet::SubAck(ack) = ack else { unreachable!() };
    assert!(matches!(ack.return_codes[..], [rumqttc::SubscribeReasonCode::Failure]), "{ack:?}");
    // a may not send as b: the broker refuses and disconnects it.
    ca.publish("m2m/p/b/b/m2", QoS::AtLeastOnce, false, "spoof").await.unwrap();
    assert!(
        wait_for(&mut eb, Duration::from_secs(2), |p| matches!(p, Packet::Publish(p) if p.topic.ends_with("/m2")))
            .await
            .is_err(),
        "a spoofed m2m message reached b"
    );
    let _ = ta.await;
    cb.disconnect().await.unwrap();
    hub.stop().await;
}

both_backends!(concurrent_commands_share_group_commits, concurrent_commands_share_group_commits);
/// Concurrent callers' commands are logged in shared transactions: each caller still gets its own answer
/// (created, the command an Idempotency-Key already names, unknown device, suspended device, offline RPC),
/// nothing is lost or doubled, and an online device receives every command of the burst exactly once, in
/// the order each caller sent them.
async fn concurrent_commands_share_group_commits(db: Db) {
    let hub = TestHub::start(db).await;
    hub.create_product("p").await;
    let secret = hub.register("p", "on").await;
    hub.register("p", "off").await;
    hub.register("p", "sus").await;
    let (s, _) = hub.call(Method::POST, "/api/v1/products/p/devices/sus/suspend", None).await;
    assert!(s.is_success());
    let (client, eventloop) = must_connect(hub.mqtt_addr, "p/on", "p/on", &secret).await;
    let (inbox, _task) = answering_device(client, eventloop, "on");
    wait_online(&hub, "p", "on").await;

    let post = |device: &'static str, path: &'static str, body: Value, key: Option<&'static str>| {
        let mut rb = hub.request(Method::POST, &format!("/api/v1/products/p/devices/{device}/{path}")).json(&body);
        if let Some(k) = key {
            rb = rb.header("Idempotency-Key", k);
        }
        async move {
            let resp = rb.send().await.unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    // Five callers each send four commands one after the other to the online device, while 30 commands
    // go to the offline one, ten callers race with one Idempotency-Key, and refused ones are mixed in.
    let online = futures::future::join_all((0..5).map(|caller| async move {
        let mut ids = Vec::new();
        for n in 0..4 {
            let (s, v) = post("on", "commands", json!({"name": format!("c{caller}_{n}")}), None).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            ids.push(v["request_id"].as_str().unwrap().to_string());
        }
        ids
    }));
    let offline = futures::future::join_all(
        (0..30).map(|n| post("off", "commands", json!({"name": format!("q{n}"), "ttl_secs": 600}), None)),
    );
    let keyed = futures::future::join_all(
        (0..10).map(|_| post("off", "commands", json!({"name": "once", "ttl_secs": 600}), Some("same-key"))),
    );
    let refused = futures::future::join_all([
        post("nope", "commands", json!({"name": "x"}), None),
        post("sus", "commands", json!({"name": "x"}), None),
        post("off", "rpc", json!({"name": "x"}), None),
    ]);
    let (online, offline, keyed, refused) = tokio::join!(online, offline, keyed, refused);

    let mut queued = std::collections::HashSet::new();
    for (s, v) in &offline {
        assert_eq!((*s, v["state"].as_str()), (StatusCode::CREATED, Some("queued")), "{v}");
        queued.insert(v["request_id"].as_str().unwrap().to_string());
    }
    assert_eq!(queued.len(), 30, "thirty distinct commands");
    let created: Vec<_> = keyed.iter().filter(|(s, _)| *s == StatusCode::CREATED).collect();
    assert_eq!(created.len(), 1, "one caller creates the keyed command: {keyed:?}");
    let once = created[0].1["request_id"].as_str().unwrap();
    for (s, v) in &keyed {
        assert!(s.is_success() && v["request_id"] == once, "every other caller gets the same command: {v}");
    }
    let statuses: Vec<(StatusCode, String)> =
        refused.iter().map(|(s, v)| (*s, v["detail"].as_str().unwrap_or_default().to_string())).collect();
    assert_eq!(statuses[0].0, StatusCode::NOT_FOUND, "{statuses:?}");
    assert!(statuses[1].0 == StatusCode::CONFLICT && statuses[1].1.contains("suspended"), "{statuses:?}");
    assert!(statuses[2].0 == StatusCode::CONFLICT && statuses[2].1.contains("offline"), "{statuses:?}");
    let (_, listed) = hub.call(Method::GET, "/api/v1/products/p/devices/off/commands?limit=100", None).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 31, "30 + the keyed one, nothing doubled: {listed}");
    let (_, listed) = hub.call(Method::GET, "/api/v1/products/p/devices/sus/commands", None).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 0, "{listed}");

    // The online device got each of the 20 commands once, every caller's in its order, and each reached
    // `replied`.
    let topics = eventually(Duration::from_secs(20), "20 commands delivered", || async {
        let got = received(&inbox, "cmd/p/on/");
        (got.len() >= 20).then_some(got)
    })
    .await;
    assert_eq!(topics.len(), 20, "{topics:?}");
    for (caller, ids) in online.iter().enumerate() {
        let positions: Vec<usize> =
            ids.iter().map(|id| topics.iter().position(|(t, _)| t.contains(id.as_str())).expect("delivered")).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "caller {caller} out of order: {positions:?}");
        for id in ids {
            wait_state(&hub, "p", "on", id, "replied").await;
        }
    }
}

both_backends!(device_changing_under_a_burst_fails_no_group, device_changing_under_a_burst_fails_no_group);
/// A device suspended and resumed again and again while commands for it (and for a quiet neighbour) pour in:
/// every caller hears what happened to its own command — created, or refused because the device was
/// suspended when its group was written — and the log holds exactly the created ones. A device changing
/// between a group's write and the sorting-out of its refusals must not turn the whole group into errors
/// while its other commands stand written.
async fn device_changing_under_a_burst_fails_no_group(db: Db) {
    let hub = TestHub::start(db).await;
    hub.create_product("p").await;
    hub.register("p", "flip").await;
    hub.register("p", "calm").await;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let flipper = async {
        let mut flips = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for action in ["suspend", "resume"] {
                let (s, v) = hub.call(Method::POST, &format!("/api/v1/products/p/devices/flip/{action}"), None).await;
                assert!(s.is_success(), "{action}: {v}");
            }
            flips += 1;
        }
        flips
    };
    let burst = async {
        let answers = futures::future::join_all((0..240).map(|n| {
            let device = if n % 2 == 0 { "flip" } else { "calm" };
            let rb = hub
                .request(Method::POST, &format!("/api/v1/products/p/devices/{device}/commands"))
                .json(&json!({"name": format!("c{n}"), "ttl_secs": 600}));
            async move {
                let resp = rb.send().await.unwrap();
                (device, resp.status(), resp.json::<Value>().await.unwrap())
            }
        }))
        .await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        answers
    };
    let (flips, answers) = tokio::join!(flipper, burst);
    assert!(flips > 0);
    let mut created = std::collections::HashMap::<&str, usize>::new();
    for (device, status, body) in &answers {
        match *status {
            StatusCode::CREATED => *created.entry(device).or_default() += 1,
            StatusCode::CONFLICT if *device == "flip" => {
                let detail = body["detail"].as_str().unwrap_or_default();
                assert!(detail.contains("suspended"), "refused for its own device's state only: {body}");
            }
            other => panic!("{device}: {other} {body}"),
        }
    }
    assert_eq!(created.get("calm"), Some(&120), "the neighbour's commands all land");
    for device in ["flip", "calm"] {
        let (_, listed) =
            hub.call(Method::GET, &format!("/api/v1/products/p/devices/{device}/commands?limit=500"), None).await;
        let logged = listed["items"].as_array().unwrap().len();
        assert_eq!(logged, created.get(device).copied().unwrap_or(0), "{device}: logged = told created");
    }
    hub.stop().await;
}

both_backends!(keyed_retry_to_a_suspended_device_gets_its_command, keyed_retry_to_a_suspended_device_gets_its_command);
/// A client repeating a request with its Idempotency-Key gets the command that request created, even when
/// the device was suspended in between; a new command (another key) to the suspended device is refused.
async fn keyed_retry_to_a_suspended_device_gets_its_command(db: Db) {
    let hub = TestHub::start(db).await;
    hub.create_product("p").await;
    hub.register("p", "d").await;
    let post = |key: &'static str| {
        hub.request(Method::POST, "/api/v1/products/p/devices/d/commands")
            .header("Idempotency-Key", key)
            .json(&json!({"name": "reboot", "ttl_secs": 600}))
            .send()
    };
    let first = post("k1").await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let (s, v) = hub.call(Method::POST, "/api/v1/products/p/devices/d/suspend", None).await;
    assert!(s.is_success(), "{v}");
    let again = post("k1").await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["request_id"], first["request_id"], "{again}");
    let other = post("k2").await.unwrap();
    assert_eq!(other.status(), StatusCode::CONFLICT);
    let other: Value = other.json().await.unwrap();
    assert!(other["detail"].as_str().unwrap_or_default().contains("suspended"), "{other}");
    hub.stop().await;
}

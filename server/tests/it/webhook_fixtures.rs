//! The webhook contracts, fed with the recorded payload shapes of every broker (server/tests/fixtures/,
//! taken from EMQX 5.8 / 4.4 docs and source and from RMQTT 0.24 live): authentication, effects,
//! idempotent replays, ordering, and 503 + lossless retry when storage fails.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Executor;

use crate::both_backends;
use crate::helpers::*;

fn base64_json(v: Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(v.to_string())
}

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{path}.json", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

async fn post(hub: &TestHub, endpoint: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let resp = hub
        .http
        .post(format!("{}/broker/{endpoint}", hub.base))
        .bearer_auth(&hub.state.hook_token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn device(hub: &TestHub) -> Value {
    hub.call(Method::GET, "/api/v1/products/fixture/devices/dev1", None).await.1
}

async fn message(hub: &TestHub, id: &str) -> (StatusCode, Value) {
    hub.call(Method::GET, &format!("/api/v1/products/fixture/devices/dev1/messages/{id}"), None).await
}

async fn fixtures_apply(db: Db) {
    let hub = TestHub::start(db).await;
    hub.create_product("fixture").await;
    hub.register("fixture", "dev1").await;

    // Unauthenticated or wrong token: 401, nothing changes.
    let url = format!("{}/broker/emqx5/events", hub.base);
    let r = hub.http.post(&url).body(fixture("emqx5/client.connected")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = hub.http.post(&url).bearer_auth("wrong").body(fixture("emqx5/client.connected")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(device(&hub).await["online"], false);

    // EMQX 5: connect (twice: a replay changes nothing), publish, batch, deliveries, disconnect.
    for _ in 0..2 {
        assert_eq!(post(&hub, "emqx5/events", fixture("emqx5/client.connected")).await.0, StatusCode::NO_CONTENT);
    }
    let d = device(&hub).await;
    assert_eq!(d["online"], true, "{d}");
    assert_eq!(d["connections"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d["connections"][0]["ip_address"], "192.0.2.10");
    assert_eq!(d["connections"][0]["node"], "emqx@10.0.0.1");
    assert_eq!(d["last_seen_at"], 1_700_000_000_000i64);

    assert_eq!(post(&hub, "emqx5/events", fixture("emqx5/message.publish")).await.0, StatusCode::NO_CONTENT);
    let (s, m) = message(&hub, "m-emqx5-1").await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(m["payload"], "AJ+Slg==");
    assert_eq!(m["sent_at"], 1_700_000_001_000i64);
    assert_eq!(post(&hub, "emqx5/events", fixture("emqx5/batch")).await.0, StatusCode::NO_CONTENT);
    assert_eq!(message(&hub, "m-emqx5-2").await.1["json"], json!({"t": 21.5}));
    let (_, status) = hub.call(Method::GET, "/api/v1/products/fixture/devices/dev1/status", None).await;
    assert_eq!(status["status"], json!({"fw": "1.0"}));
    for name in ["message.delivered", "message.acked", "message.dropped"] {
        assert_eq!(post(&hub, "emqx5/events", fixture(&format!("emqx5/{name}"))).await.0, StatusCode::NO_CONTENT);
    }
    assert_eq!(post(&hub, "emqx5/events", fixture("emqx5/client.disconnected")).await.0, StatusCode::NO_CONTENT);
    let d = device(&hub).await;
    assert_eq!(d["online"], false, "{d}");
    assert_eq!(d["connections"][0]["reason"], "normal");
    // A late replay of the connect does not bring the closed session back.
    assert_eq!(post(&hub, "emqx5/events", fixture("emqx5/client.connected")).await.0, StatusCode::NO_CONTENT);
    assert_eq!(device(&hub).await["online"], false);

    // EMQX 4 web hook (Basic auth, as RMQTT also sends it): disconnect arriving before its connect.
    let basic = |path: &'static str, body: Vec<u8>| {
        hub.http
            .post(format!("{}/broker/{path}", hub.base))
            .basic_auth("iothub", Some(&hub.state.hook_token))
            .body(body)
            .send()
    };
    assert_eq!(
        basic("emqx4/webhook", fixture("emqx4/client_disconnected")).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        basic("emqx4/webhook", fixture("emqx4/client_connected")).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    let d = device(&hub).await;
    assert_eq!(d["online"], false, "the late connect belongs to a session already closed: {d}");
    assert_eq!(
        basic("emqx4/webhook", fixture("emqx4/message_publish")).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(message(&hub, "m-emqx4-1").await.0, StatusCode::OK);
    for name in ["message_delivered", "message_acked"] {
        let r = basic("emqx4/webhook", fixture(&format!("emqx4/{name}"))).await.unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "{name}");
    }

    // RMQTT: sessions keyed by peer address.
    assert_eq!(
        basic("rmqtt/webhook", fixture("rmqtt/client_connected")).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(device(&hub).await["online"], true);
    assert_eq!(
        basic("rmqtt/webhook", fixture("rmqtt/message_publish")).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        basic("rmqtt/webhook", fixture("rmqtt/message_delivered")).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        basic("rmqtt/webhook", fixture("rmqtt/client_disconnected")).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    let d = device(&hub).await;
    assert_eq!(d["online"], false, "{d}");
    let rmqtt = d["connections"].as_array().unwrap().iter().find(|c| c["client_id"] == "dev1-c").unwrap();
    assert_eq!(rmqtt["connected_at"], 1_700_000_020_000i64, "disconnect merged into its session: {d}");
    assert_eq!(rmqtt["disconnected_at"], 1_700_000_023_000i64);

    // Status reports apply in broker time; an older one arriving late is kept in history only, and of
    // two reports in the same millisecond the later arrival wins (none is dropped).
    let status = |id: &str, at: i64, fw: &str| {
        json!({"event": "message.publish", "clientid": "dev1-a", "username": "fixture/dev1",
            "topic": format!("update_status/fixture/dev1/{id}"), "payload": base64_json(json!({"fw": fw})),
            "qos": 1, "publish_received_at": at})
        .to_string()
        .into_bytes()
    };
    let current = || async { hub.call(Method::GET, "/api/v1/products/fixture/devices/dev1/status", None).await.1 };
    assert_eq!(post(&hub, "emqx5/events", status("s-new", 1_800_000_000_000, "2.0")).await.0, StatusCode::NO_CONTENT);
    assert_eq!(post(&hub, "emqx5/events", status("s-old", 1_799_000_000_000, "1.5")).await.0, StatusCode::NO_CONTENT);
    assert_eq!(current().await["status"], json!({"fw": "2.0"}), "a late older report does not win");
    assert_eq!(post(&hub, "emqx5/events", status("s-same", 1_800_000_000_000, "2.1")).await.0, StatusCode::NO_CONTENT);
    assert_eq!(current().await["status"], json!({"fw": "2.1"}), "same millisecond: the later arrival wins");

    // Malformed: 422 naming the field (a retry cannot fix it).
    let (s, p) = post(&hub, "emqx5/events", br#"[{"event":"client.connected","clientid":"x"}]"#.to_vec()).await;
    assert_eq!((s, p["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("[0].connected_at")), "{p}");
    // A publish naming another device is acknowledged but never stored.
    let spoof = json!({"event": "message.publish", "clientid": "x", "username": "fixture/other",
        "topic": "upload_data/fixture/dev1/t/spoofed", "payload": "e30=", "qos": 0, "publish_received_at": 1});
    assert_eq!(post(&hub, "emqx5/events", spoof.to_string().into_bytes()).await.0, StatusCode::NO_CONTENT);
    assert_eq!(message(&hub, "spoofed").await.0, StatusCode::NOT_FOUND);
    hub.stop().await;
}
both_backends!(webhook_fixtures_apply, fixtures_apply);

/// Storage fails: the webhook answers 503 (EMQX retries it) and releases its dedup claim, so the retry
/// stores the message — a failure never turns into a silently dropped "duplicate".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_store_answers_503_and_the_retry_is_kept() {
    let hub = TestHub::start_production().await;
    hub.create_product("fixture").await;
    hub.register("fixture", "dev1").await;
    let mut admin = sqlx::PgConnection::connect(hub.pg_url().unwrap()).await.unwrap();
    admin.execute("ALTER TABLE device_messages RENAME TO device_messages_away").await.unwrap();
    let (s, p) = post(&hub, "emqx5/events", fixture("emqx5/message.publish")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{p}");
    admin.execute("ALTER TABLE device_messages_away RENAME TO device_messages").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(post(&hub, "emqx5/events", fixture("emqx5/message.publish")).await.0, StatusCode::NO_CONTENT);
    assert_eq!(message(&hub, "m-emqx5-1").await.0, StatusCode::OK, "the retried message is stored");
    hub.stop().await;
}

use sqlx::Connection;

/// A session whose disconnect was lost, superseded by a newer session of its client id, must not come back
/// as that client's newest session when the newer one is pruned a day later.
async fn pruning_never_resurrects_a_superseded_session(db: Db) {
    let hub = TestHub::start(db).await;
    hub.create_product("fixture").await;
    hub.register("fixture", "dev1").await;
    let t0: i64 = 1_700_000_000_000;
    let day = 86_400_000;
    let connected = |client: &str, at: i64| {
        json!({"event": "client.connected", "clientid": client, "username": "fixture/dev1", "peername": "10.0.0.9:1",
            "proto_ver": 5, "keepalive": 60, "clean_start": true, "connected_at": at})
    };
    let disconnected = |client: &str, at: i64, until: i64| {
        json!({"event": "client.disconnected", "clientid": client, "username": "fixture/dev1", "peername": "10.0.0.9:1",
            "reason": "normal", "connected_at": at, "disconnected_at": until})
    };
    let events = json!([
        connected("c1", t0),                        // its disconnect never arrives
        connected("c1", t0 + 1_000),                // supersedes it...
        disconnected("c1", t0 + 1_000, t0 + 2_000), // ...and ends
    ]);
    assert_eq!(post(&hub, "emqx5/events", events.to_string().into_bytes()).await.0, StatusCode::NO_CONTENT);
    assert_eq!(device(&hub).await["online"], false);
    let later = json!([connected("c2", t0 + 2 * day), disconnected("c2", t0 + 2 * day, t0 + 2 * day + 1_000)]);
    assert_eq!(post(&hub, "emqx5/events", later.to_string().into_bytes()).await.0, StatusCode::NO_CONTENT);
    let d = device(&hub).await;
    assert_eq!(d["online"], false, "{d}");
    let clients: Vec<&str> =
        d["connections"].as_array().unwrap().iter().map(|c| c["client_id"].as_str().unwrap()).collect();
    assert_eq!(clients, ["c2"], "both day-old c1 sessions pruned: {d}");
    hub.stop().await;
}
both_backends!(superseded_sessions_are_pruned, pruning_never_resurrects_a_superseded_session);

/// A webhook that runs out of time (here: its device row locked by another session for longer than
/// `http.request_timeout_secs`) is answered 503, which EMQX 5 retries — not 408, which it drops — and the
/// repeated event applies once the database lets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_out_of_time_is_retryable() {
    use sqlx::Connection;
    let hub = TestHub::start_with(Db::Postgres, |c| c.http.request_timeout_secs = 1).await;
    hub.create_product("fixture").await;
    hub.register("fixture", "dev1").await;
    let mut blocker = sqlx::PgConnection::connect(&hub.config.database.url).await.unwrap();
    blocker.execute("BEGIN").await.unwrap();
    blocker
        .execute("SELECT 1 FROM devices WHERE product_id = 'fixture' AND device_id = 'dev1' FOR UPDATE")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (status, _) = post(&hub, "emqx5/events", fixture("emqx5/client.connected")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "after {:?}", started.elapsed());
    blocker.execute("ROLLBACK").await.unwrap();
    let (status, _) = post(&hub, "emqx5/events", fixture("emqx5/client.connected")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(device(&hub).await["online"], true);
    hub.stop().await;
}

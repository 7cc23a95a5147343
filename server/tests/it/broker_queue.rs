//! The durable broker→hub path (`rabbitmq.ingest_queue`): broker events published to RabbitMQ the way EMQX's
//! RabbitMQ action publishes them (one persistent message per rule event, the event map as JSON, publisher
//! confirms; `emqx_bridge_rabbitmq_connector.erl`) are all stored, exactly once, after an outage of every
//! iothub instance or of PostgreSQL; a message that can never be applied ends in `{queue}.dead`.
//! The EMQX side of the path is checked against `emqx-config/emqx-rabbitmq.hocon` here too.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};
use sqlx::{Connection as _, Executor, Row};

use crate::helpers::*;

/// A broker event from the fixture EMQX 5.8 renders for `message.publish` (the rule
/// `SELECT *, base64_encode(payload) AS payload`), for device `plant/dev1` and message id `m{i}`. Message
/// `i` was received by the broker 2·i seconds after the start of a ten-minute outage (a device reporting
/// every 2 s, well within its rate limit: the hub must not mistake the backlog for a flood).
fn upload(i: usize) -> Value {
    let raw = std::fs::read(format!("{}/tests/fixtures/emqx5/message.publish.json", env!("CARGO_MANIFEST_DIR")))
        .expect("fixture");
    let mut event: Value = serde_json::from_slice(&raw).unwrap();
    event["clientid"] = json!("plant/dev1");
    event["username"] = json!("plant/dev1");
    event["topic"] = json!(format!("upload_data/plant/dev1/json/m{i}"));
    event["payload"] = json!(base64_json(json!({"i": i})));
    let outage_start =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64 - 600_000;
    event["publish_received_at"] = json!(outage_start + 2_000 * i as i64);
    event
}

fn base64_json(v: Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(v.to_string())
}

/// Publishes like EMQX's RabbitMQ action: persistent (`delivery_mode = persistent`), no headers, confirms
/// awaited (`wait_for_publish_confirmations = true`).
async fn publish_as_emqx(exchange: &str, bodies: &[Vec<u8>]) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut confirms = Vec::new();
    for body in bodies {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                "iothub".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        confirms.push(confirm);
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack(), "RabbitMQ took the event");
    }
    conn.close(200, "done".into()).await.unwrap();
}

/// Messages ready in a queue (not counting those a consumer holds).
async fn ready_in(queue: &str) -> u32 {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let q = channel
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let count = q.message_count();
    conn.close(200, "done".into()).await.unwrap();
    count
}

async fn drop_queues(queue: &str) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    for name in [queue.to_string(), format!("{queue}.dead")] {
        let _ = channel.queue_delete(name.as_str().into(), Default::default()).await;
        let _ = channel.exchange_delete(name.as_str().into(), Default::default()).await;
    }
    let _ = conn.close(200, "done".into()).await;
}

/// Stored upload messages of `plant/dev1`, read from the hub's own database.
async fn stored(db: &TestDatabase) -> i64 {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let row = sqlx::query("SELECT count(*) AS n FROM device_messages").fetch_one(&mut conn).await.unwrap();
    row.get::<i64, _>("n")
}

struct Setup {
    db: TestDatabase,
    queue: String,
    exchange_prefix: String,
}

impl Setup {
    async fn new() -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Self {
            db: TestDatabase::create().await,
            queue: format!("t{tag}.ingest"),
            exchange_prefix: format!("t{tag}.events"),
        }
    }

    async fn hub(&self) -> TestHub {
        let (url, queue, prefix) = (self.db.url.clone(), self.queue.clone(), self.exchange_prefix.clone());
        TestHub::start_with(Db::Sqlite, move |c| {
            c.database.url = url;
            c.database.max_connections = 8;
            c.rabbitmq.url = amqp_url();
            c.rabbitmq.exchange_prefix = prefix;
            c.rabbitmq.ingest_queue = queue;
            c.rabbitmq.ingest_prefetch = 50;
        })
        .await
    }
}

async fn consuming(hub: &TestHub) {
    eventually(Duration::from_secs(20), "the hub consumes the broker-event queue", || async {
        let (_, body, _) = hub.readiness().await;
        let check = body["checks"].as_array()?.iter().find(|c| c["name"] == "broker_queue")?.clone();
        (check["ok"] == true).then_some(())
    })
    .await;
}

#[tokio::test]
async fn broker_events_queued_while_every_instance_is_down_are_all_stored() {
    let setup = Setup::new().await;
    let first = setup.hub().await;
    consuming(&first).await;
    first.create_product("plant").await;
    first.register("plant", "dev1").await;
    let admin_key = first.admin_key.clone();
    first.stop().await;

    // Every instance is down. The broker keeps accepting device data into the queue, plus one message no
    // instance can ever apply.
    let mut events = EventConsumer::bind(&amqp_url(), &setup.exchange_prefix, "plant", "").await;
    let bodies: Vec<Vec<u8>> = (0..300).map(|i| upload(i).to_string().into_bytes()).collect();
    publish_as_emqx(&setup.queue, &bodies).await;
    publish_as_emqx(&setup.queue, &[br#"{"event":"message.publish","clientid":"plant/dev1"}"#.to_vec()]).await;
    assert_eq!(ready_in(&setup.queue).await, 301, "the queue holds what the broker accepted");
    assert_eq!(stored(&setup.db).await, 0);

    let mut second = setup.hub().await;
    second.admin_key = admin_key;
    let seen = events
        .collect_until(Duration::from_secs(60), |seen| seen.iter().filter(|(k, _)| k == "upload_data").count() >= 300)
        .await;
    let mut ids: Vec<String> = seen
        .iter()
        .filter(|(k, _)| k == "upload_data")
        .map(|(_, e)| e["message_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 300, "every queued upload announced once");
    assert_eq!(stored(&setup.db).await, 300);
    eventually(Duration::from_secs(10), "the queue drains", || async {
        (ready_in(&setup.queue).await == 0 && ready_in(&format!("{}.dead", setup.queue)).await == 1).then_some(())
    })
    .await;
    let (_, m) = second.call(reqwest::Method::GET, "/api/v1/products/plant/devices/dev1/messages/m7", None).await;
    assert_eq!(m["json"], json!({"i": 7}), "{m}");
    assert!(events.drain(Duration::from_secs(2)).await.is_empty(), "nothing announced twice");
    events.close().await;
    second.stop().await;
    drop_queues(&setup.queue).await;
}

#[tokio::test]
async fn a_database_outage_loses_no_queued_broker_event() {
    let setup = Setup::new().await;
    let hub = setup.hub().await;
    consuming(&hub).await;
    hub.create_product("plant").await;
    hub.register("plant", "dev1").await;
    let mut events = EventConsumer::bind(&amqp_url(), &setup.exchange_prefix, "plant", "").await;

    // PostgreSQL stops accepting connections to the hub's database, and drops the ones it had.
    let name = setup.db.url.rsplit('/').next().unwrap().to_string();
    let mut admin = sqlx::PgConnection::connect(&admin_database_url()).await.unwrap();
    admin.execute(format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false").as_str()).await.unwrap();
    admin
        .execute(format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'").as_str())
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "the hub sees the database down", || async {
        let (status, _, _) = hub.readiness().await;
        (status == reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;

    let bodies: Vec<Vec<u8>> = (0..200).map(|i| upload(i).to_string().into_bytes()).collect();
    publish_as_emqx(&setup.queue, &bodies).await;
    // The events wait in RabbitMQ (ready, or held unacknowledged by the consumer retrying them) for as long
    // as the outage lasts; nothing times them out.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(events.drain(Duration::from_millis(100)).await.is_empty(), "nothing is announced while nothing is stored");

    admin.execute(format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true").as_str()).await.unwrap();
    let seen = events
        .collect_until(Duration::from_secs(90), |seen| seen.iter().filter(|(k, _)| k == "upload_data").count() >= 200)
        .await;
    let mut ids: Vec<&str> =
        seen.iter().filter(|(k, _)| k == "upload_data").map(|(_, e)| e["message_id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200, "every upload sent during the outage announced once");
    assert_eq!(stored(&setup.db).await, 200);
    eventually(Duration::from_secs(10), "the queue drains", || async {
        (ready_in(&setup.queue).await == 0).then_some(())
    })
    .await;
    assert!(events.drain(Duration::from_secs(2)).await.is_empty(), "nothing announced twice");
    events.close().await;
    hub.stop().await;
    drop_queues(&setup.queue).await;
}

/// `emqx-config/emqx-rabbitmq.hocon` against what EMQX's RabbitMQ action does with it
/// (`emqx_bridge_rabbitmq_pubsub_schema.erl`, `emqx_bridge_rabbitmq_connector.erl`, v5.8.9 / 5.9+):
/// persistent messages, confirms awaited, the whole event as JSON (empty payload template), to the exchange
/// iothub declares, from the same rules as the HTTP path, with a buffer that outlives a 10-minute outage.
#[test]
fn emqx_rabbitmq_action_matches_the_queue_iothub_consumes() {
    let root = format!("{}/../emqx-config/", env!("CARGO_MANIFEST_DIR"));
    let hocon = std::fs::read_to_string(format!("{root}emqx-rabbitmq.hocon")).unwrap();
    let http = std::fs::read_to_string(format!("{root}emqx-http.hocon")).unwrap();
    let setting = |name: &str| -> String {
        let line = hocon
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(&format!("{name} =")))
            .unwrap_or_else(|| panic!("emqx-rabbitmq.hocon sets {name}"));
        line.split_once('=').unwrap().1.trim().trim_matches('"').to_string()
    };
    assert_eq!(setting("delivery_mode"), "persistent", "non_persistent (EMQX's default) is lost on a RabbitMQ restart");
    assert_eq!(setting("wait_for_publish_confirmations"), "true");
    assert_eq!(
        setting("exchange"),
        "iothub.ingest",
        "the queue name docs/configuration.md gives rabbitmq.ingest_queue"
    );
    assert_eq!(setting("payload_template"), "", "an empty template renders the whole event map as JSON");
    assert_eq!(setting("request_ttl"), "infinity", "a RabbitMQ outage must not expire buffered events");
    let buffer: u64 = setting("max_buffer_bytes").trim_end_matches("GB").parse().unwrap();
    assert!(buffer >= 1, "the buffer per worker holds a RabbitMQ outage");

    // The same rule SQL as the HTTP path, each pointed at the RabbitMQ action.
    let sqls = |text: &str| -> Vec<String> {
        text.lines().map(str::trim).filter(|l| l.starts_with("sql =")).map(str::to_string).collect()
    };
    assert_eq!(sqls(&hocon), sqls(&http), "emqx-rabbitmq.hocon's rules select what emqx-http.hocon's do");
    let actions: Vec<&str> = hocon.lines().map(str::trim).filter(|l| l.starts_with("actions =")).collect();
    assert_eq!(actions.len(), sqls(&http).len());
    assert!(actions.iter().all(|a| *a == r#"actions = ["rabbitmq:iothub_ingest"]"#), "{actions:?}");
}

/// The consumer's own topology declaration is idempotent and refuses nothing EMQX sends: a second hub on the
/// same queue consumes alongside the first (messages are shared, none lost).
#[tokio::test]
async fn two_instances_share_the_broker_event_queue() {
    let setup = Setup::new().await;
    let a = setup.hub().await;
    let b = setup.hub().await;
    consuming(&a).await;
    consuming(&b).await;
    a.create_product("plant").await;
    a.register("plant", "dev1").await;
    let bodies: Vec<Vec<u8>> = (0..100).map(|i| upload(i).to_string().into_bytes()).collect();
    publish_as_emqx(&setup.queue, &bodies).await;
    eventually(Duration::from_secs(30), "both instances store every event", || async {
        (stored(&setup.db).await == 100).then_some(())
    })
    .await;
    a.stop().await;
    b.stop().await;
    // Consumers gone, the queue is still there (durable) for the next instance.
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            setup.queue.as_str().into(),
            "probe".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("the queue outlives its consumers");
    assert!(tokio::time::timeout(Duration::from_millis(500), consumer.next()).await.is_err(), "nothing left over");
    let _ = conn.close(200, "done".into()).await;
    drop_queues(&setup.queue).await;
}

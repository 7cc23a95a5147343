//! Built-in retention (`retention.*`): old messages, old finished commands and old OTA rollouts go, open
//! commands and recent rows stay, on both backends.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::Connection;

use crate::both_backends;
use crate::helpers::*;

const DAY_MS: i64 = 86_400_000;

/// Runs one statement on the hub's own database (to age rows the API cannot backdate).
async fn execute(hub: &TestHub, sql: &str) {
    let url = &hub.config.database.url;
    if url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(&sql.replace('?', "$1")).execute(&mut conn).await.unwrap();
    } else {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
}

/// A message as EMQX 5 reports it, received by the broker at `at`.
async fn publish_at(hub: &TestHub, message_id: &str, at: i64) {
    emqx5_publish_at(hub, "d", "p/d", &format!("upload_data/p/d/t/{message_id}"), b"{\"t\":1}", at).await;
}

async fn ids(hub: &TestHub, path: &str, field: &str) -> Vec<String> {
    let (s, page) = hub.call(Method::GET, path, None).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let mut ids: Vec<String> =
        page["items"].as_array().unwrap().iter().map(|i| i[field].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

both_backends!(
    retention_prunes_old_messages_and_finished_commands,
    retention_prunes_old_messages_and_finished_commands
);
async fn retention_prunes_old_messages_and_finished_commands(db: Db) {
    let hub = TestHub::start_with(db, |c| {
        c.retention.messages_days = 30;
        c.retention.commands_days = 30;
        c.retention.sweep_secs = 1;
    })
    .await;
    hub.create_product("p").await;
    hub.register("p", "d").await;
    let now = iothub::clock::now_ms();
    publish_at(&hub, "m-old", now - 40 * DAY_MS).await;
    publish_at(&hub, "m-edge", now - 29 * DAY_MS).await;
    publish_at(&hub, "m-new", now).await;

    // Four commands to the offline device: all queued (open); two are then finished and two made old.
    let mut created = Vec::new();
    for name in ["old_done", "old_open", "new_done", "new_open"] {
        let (s, v) = hub.call(Method::POST, "/api/v1/products/p/devices/d/commands", Some(json!({"name": name}))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        created.push((name, v["request_id"].as_str().unwrap().to_string()));
    }
    let id = |name: &str| created.iter().find(|(n, _)| *n == name).unwrap().1.clone();
    for name in ["old_done", "new_done"] {
        execute(
            &hub,
            &format!("UPDATE device_commands SET state = 'expired', expired_at = 1 WHERE request_id = '{}'", id(name)),
        )
        .await;
    }
    for name in ["old_done", "old_open"] {
        execute(
            &hub,
            &format!("UPDATE device_commands SET created_at = {} WHERE request_id = '{}'", now - 40 * DAY_MS, id(name)),
        )
        .await;
    }

    let left = eventually(Duration::from_secs(15), "old rows pruned", || async {
        let messages = ids(&hub, "/api/v1/products/p/devices/d/messages?limit=100", "message_id").await;
        let commands = ids(&hub, "/api/v1/products/p/devices/d/commands?limit=100", "request_id").await;
        (messages.len() == 2 && commands.len() == 3).then_some((messages, commands))
    })
    .await;
    assert_eq!(left.0, ["m-edge", "m-new"], "only the message past 30 days goes");
    let mut kept = vec![id("old_open"), id("new_done"), id("new_open")];
    kept.sort();
    assert_eq!(left.1, kept, "an open command stays whatever its age");

    let text = hub.http.get(format!("{}/metrics", hub.base)).send().await.unwrap().text().await.unwrap();
    let deleted = |kind: &str| {
        text.lines()
            .find(|l| l.starts_with("iothub_retention_deleted_total") && l.contains(&format!("kind=\"{kind}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    // One recorder per test process (other tests' rounds add to it): at least this test's deletions.
    assert!(deleted("messages") >= Some(1.0) && deleted("commands") >= Some(1.0), "{text}");
    hub.stop().await;
}

both_backends!(retention_prunes_old_ota_rollouts, retention_prunes_old_ota_rollouts);
async fn retention_prunes_old_ota_rollouts(db: Db) {
    let hub = TestHub::start_with(db, |c| {
        c.retention.ota_days = 30;
        c.retention.sweep_secs = 1;
    })
    .await;
    hub.create_product("p").await;
    let package = json!({"url": "https://updates.example.com/fw-2.0.0.bin", "version": "2.0.0", "size": 1024,
        "md5": "9e107d9d372bb6826bd81d3542a419d6", "type": "firmware"});
    let mut rollouts = Vec::new();
    for device in ["old", "new"] {
        hub.register("p", device).await;
        let (s, v) =
            hub.call(Method::POST, &format!("/api/v1/products/p/devices/{device}/ota"), Some(package.clone())).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        rollouts.push(v["rollout_id"].as_str().unwrap().to_string());
    }
    // Still pending (the devices never connect): an old rollout goes whatever its targets' state.
    execute(
        &hub,
        &format!(
            "UPDATE ota_rollouts SET created_at = {} WHERE id = '{}'",
            iothub::clock::now_ms() - 40 * DAY_MS,
            rollouts[0]
        ),
    )
    .await;

    eventually(Duration::from_secs(15), "the old rollout pruned", || async {
        let (s, _) = hub.call(Method::GET, &format!("/api/v1/products/p/ota-rollouts/{}", rollouts[0]), None).await;
        (s == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    let (_, mine) = hub.call(Method::GET, "/api/v1/products/p/devices/old/ota", None).await;
    assert_eq!(mine["items"], json!([]), "its target went with it");
    let (s, recent) = hub.call(Method::GET, &format!("/api/v1/products/p/ota-rollouts/{}", rollouts[1]), None).await;
    assert_eq!(s, StatusCode::OK, "{recent}");
    let (_, theirs) = hub.call(Method::GET, "/api/v1/products/p/devices/new/ota", None).await;
    assert_eq!(theirs["items"][0]["targets"][0]["state"], "pending", "{theirs}");
    hub.stop().await;
}

both_backends!(ota_prune_goes_in_batches, ota_prune_goes_in_batches);
/// The store's batches, one row at a time: an old rollout to three devices goes target by target, then the
/// emptied rollout; a recent rollout stays whole.
async fn ota_prune_goes_in_batches(db: Db) {
    use iothub::ports::retention::RetentionStore;
    let hub = TestHub::start(db).await;
    hub.create_product("p").await;
    for device in ["a", "b", "c"] {
        hub.register("p", device).await;
        let (s, v) = hub
            .call(Method::PUT, &format!("/api/v1/products/p/devices/{device}/tags"), Some(json!({"tags": ["lab"]})))
            .await;
        assert!(s.is_success(), "{v}");
    }
    let package = json!({"url": "https://updates.example.com/fw-3.0.0.bin", "version": "3.0.0", "size": 1024,
        "md5": "9e107d9d372bb6826bd81d3542a419d6", "type": "firmware"});
    let (s, old) = hub.call(Method::POST, "/api/v1/products/p/tags/lab/ota", Some(package.clone())).await;
    assert_eq!((s, old["total"].clone()), (StatusCode::CREATED, json!(3)), "{old}");
    let (s, recent) = hub.call(Method::POST, "/api/v1/products/p/devices/a/ota", Some(package)).await;
    assert_eq!(s, StatusCode::CREATED, "{recent}");
    let (old, recent) = (old["rollout_id"].as_str().unwrap(), recent["rollout_id"].as_str().unwrap());
    let now = iothub::clock::now_ms();
    execute(&hub, &format!("UPDATE ota_rollouts SET created_at = {} WHERE id = '{old}'", now - 40 * DAY_MS)).await;

    let url = &hub.config.database.url;
    let ota: Box<dyn RetentionStore> = if url.starts_with("postgres") {
        Box::new(iothub::adapters::sql::PgStore::connect(url, 2).await.unwrap())
    } else {
        Box::new(iothub::adapters::sql::SqliteStore::connect(url, 2).await.unwrap())
    };
    let mut deleted = Vec::new();
    loop {
        let n = ota.prune_rollouts(now - 30 * DAY_MS, 1).await.unwrap();
        deleted.push(n);
        if n < 1 {
            break;
        }
    }
    assert_eq!(deleted, [1, 1, 2, 0], "three targets, the last batch with the emptied rollout, then nothing");
    let (s, _) = hub.call(Method::GET, &format!("/api/v1/products/p/ota-rollouts/{old}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, kept) = hub.call(Method::GET, &format!("/api/v1/products/p/ota-rollouts/{recent}"), None).await;
    assert_eq!((s, kept["total"].clone()), (StatusCode::OK, json!(1)), "{kept}");
    hub.stop().await;
}

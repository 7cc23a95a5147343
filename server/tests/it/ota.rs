//! OTA rollouts over real MQTT: one `$ota_upgrade` per device of a tag, progress per target, success only on
//! the device's status with the new version.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Value};

use crate::helpers::*;

/// OTA: a tag rollout logs one `$ota_upgrade` per device; progress reports (over real MQTT) move each
/// target, 100 % is only "installed", and only the device's status with the new version is success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ota_rollouts_follow_each_device_to_success() {
    let hub = TestHub::start_production().await;
    hub.create_product("p").await;
    let mut secrets = std::collections::HashMap::new();
    for d in ["d1", "d2", "d3"] {
        secrets.insert(d, hub.register("p", d).await);
    }
    for d in ["d1", "d2"] {
        hub.call(Method::PUT, &format!("/api/v1/products/p/devices/{d}/tags"), Some(json!({"tags": ["lab"]}))).await;
    }
    let mut consumer = EventConsumer::bind(&amqp_url(), &hub.config.rabbitmq.exchange_prefix, "p", "").await;
    let (c1, e1) = must_connect(hub.mqtt_addr, "p/d1", "p/d1", &secrets["d1"]).await;
    let t1 = drive(e1);
    let (c2, e2) = must_connect(hub.mqtt_addr, "p/d2", "p/d2", &secrets["d2"]).await;
    let t2 = drive(e2);
    wait_online(&hub, "p", "d1").await;
    wait_online(&hub, "p", "d2").await;

    let package = json!({"url": "https://updates.example.com/fw-1.2.0.bin", "version": "1.2.0", "size": 524288,
        "md5": "9e107d9d372bb6826bd81d3542a419d6", "type": "firmware"});
    let mut bad = package.clone();
    bad["md5"] = json!("nope");
    let (s, v) = hub.call(Method::POST, "/api/v1/products/p/tags/lab/ota", Some(bad)).await;
    assert_eq!((s, v["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("md5")), "{v}");
    let (s, rollout) = hub.call(Method::POST, "/api/v1/products/p/tags/lab/ota", Some(package.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{rollout}");
    assert_eq!((rollout["total"].clone(), rollout["tag"].clone()), (json!(2), json!("lab")));
    let id = rollout["rollout_id"].as_str().unwrap().to_string();
    // Each target's `$ota_upgrade` is a logged command (request id = rollout id), sent to online devices (and,
    // since the bundled broker reports deliveries of `$` topics, soon `delivered`).
    let cmd = eventually(Duration::from_secs(15), "OTA command sent", || async {
        let v = command(&hub, "p", "d1", &id).await;
        matches!(v["state"].as_str(), Some("sent" | "delivered")).then_some(v)
    })
    .await;
    assert!(cmd["sent_at"].is_i64(), "{cmd}");
    assert_eq!(cmd["name"], "$ota_upgrade");
    assert_eq!(cmd["payload"]["version"], "1.2.0");

    let report = |c: &AsyncClient, d: &str, id: &str, body: Value| {
        let (c, topic) = (c.clone(), format!("update_ota_status/p/{d}/{id}"));
        async move { c.publish(topic, QoS::AtLeastOnce, false, body.to_string()).await.unwrap() }
    };
    report(&c1, "d1", "o1", json!({"type": "firmware", "version": "1.2.0", "progress": 50})).await;
    report(&c2, "d2", "o1", json!({"type": "firmware", "version": "1.2.0", "progress": -2, "desc": "md5 mismatch"}))
        .await;
    let url = format!("/api/v1/products/p/ota-rollouts/{id}");
    let states = |v: &Value| -> Vec<(String, String)> {
        v["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["device_id"].as_str().unwrap().into(), t["state"].as_str().unwrap().into()))
            .collect()
    };
    let v = eventually(Duration::from_secs(10), "progress", || async {
        let (_, v) = hub.call(Method::GET, &url, None).await;
        (states(&v) == [("d1".into(), "in_progress".into()), ("d2".into(), "failed".into())]).then_some(v)
    })
    .await;
    assert_eq!(v["targets"][0]["progress"], 50);
    assert_eq!(v["targets"][1]["error"], "checksum: md5 mismatch");
    report(&c1, "d1", "o2", json!({"type": "firmware", "version": "1.2.0", "progress": 100})).await;
    eventually(Duration::from_secs(10), "installed", || async {
        let (_, v) = hub.call(Method::GET, &url, None).await;
        (v["targets"][0]["state"] == "installed").then_some(())
    })
    .await;
    // Only the device's own status with the new version counts as success.
    c1.publish("update_status/p/d1/s1", QoS::AtLeastOnce, false, r#"{"firmware_version":"1.1.0"}"#).await.unwrap();
    c1.publish("update_status/p/d1/s2", QoS::AtLeastOnce, false, r#"{"firmware_version":"1.2.0"}"#).await.unwrap();
    let v = eventually(Duration::from_secs(10), "succeeded", || async {
        let (_, v) = hub.call(Method::GET, &url, None).await;
        (v["succeeded"] == 1).then_some(v)
    })
    .await;
    assert_eq!((v["failed"].clone(), v["targets"][0]["state"].clone()), (json!(1), json!("succeeded")), "{v}");
    // A late progress report does not undo success.
    report(&c1, "d1", "o3", json!({"type": "firmware", "version": "1.2.0", "progress": 10})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, v) = hub.call(Method::GET, &url, None).await;
    assert_eq!(v["targets"][0]["state"], "succeeded");

    // A single device (offline): the upgrade waits in the command log; the device's view lists it.
    let (s, single) = hub.call(Method::POST, "/api/v1/products/p/devices/d3/ota", Some(package)).await;
    assert_eq!((s, single["total"].clone()), (StatusCode::CREATED, json!(1)), "{single}");
    let single_id = single["rollout_id"].as_str().unwrap();
    assert_eq!(command(&hub, "p", "d3", single_id).await["state"], "queued");
    let (_, mine) = hub.call(Method::GET, "/api/v1/products/p/devices/d3/ota", None).await;
    assert_eq!(mine["items"][0]["rollout_id"], single_id);
    assert_eq!(mine["items"][0]["targets"][0]["state"], "pending");

    let events = consumer
        .collect_until(Duration::from_secs(15), |seen| seen.iter().filter(|(k, _)| k == "ota_progress").count() >= 4)
        .await;
    assert!(events.iter().any(|(k, v)| k == "ota_progress" && v["report"]["progress"] == -2), "{events:?}");
    for c in [c1, c2] {
        c.disconnect().await.unwrap();
    }
    let _ = tokio::join!(t1, t2);
    consumer.close().await;
    hub.stop().await;
}

//! Tags through the real components: versions under concurrent updates, listing by tag, tag-wide commands
//! reaching online devices on the tag topic and offline ones on connect, and the paged per-device view.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use rumqttc::{Event, Packet, QoS};
use serde_json::{json, Value};
use std::sync::Arc;

use crate::helpers::*;

/// Tags: versions increment atomically under concurrent updates; devices are listed by tag; a tag command
/// reaches the online devices on the tag topic, an offline one when it connects, and the request shows who
/// replied and who stayed silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_commands_track_each_device() {
    let hub = TestHub::start_production().await;
    hub.create_product("p").await;
    let mut secrets = std::collections::HashMap::new();
    for d in ["d1", "d2", "d3", "other"] {
        secrets.insert(d, hub.register("p", d).await);
    }
    let tags_of = |d: &str| format!("/api/v1/products/p/devices/{d}/tags");
    let (s, v) = hub.call(Method::PUT, &tags_of("d1"), Some(json!({"tags": ["floor-3", "lab", "floor-3"]}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"tags": ["floor-3", "lab"], "tags_version": 1}));
    let (s, v) = hub.call(Method::PUT, &tags_of("d1"), Some(json!({"tags": ["a/b"]}))).await;
    assert_eq!((s, v["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("tags[0]")), "{v}");
    // Concurrent updates: every one gets its own version, none is lost.
    let d2_tags = tags_of("d2");
    let updates = (0..10).map(|_| hub.call(Method::PUT, &d2_tags, Some(json!({"tags": ["floor-3"]}))));
    let mut versions: Vec<i64> = futures::future::join_all(updates)
        .await
        .into_iter()
        .map(|(_, v)| v["tags_version"].as_i64().unwrap())
        .collect();
    versions.sort();
    assert_eq!(versions, (1..=10).collect::<Vec<_>>());
    hub.call(Method::PUT, &tags_of("d3"), Some(json!({"tags": ["floor-3"]}))).await;
    let (_, d2) = hub.call(Method::GET, "/api/v1/products/p/devices/d2", None).await;
    assert_eq!((d2["tags"].clone(), d2["tags_version"].clone()), (json!(["floor-3"]), json!(10)), "{d2}");
    let (_, listed) = hub.call(Method::GET, "/api/v1/products/p/devices?tag=floor-3", None).await;
    let ids: Vec<&str> = listed["items"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["d1", "d2", "d3"]);

    // d1 answers, d2 listens but stays silent, d3 is offline. Devices subscribe to their tag topics
    // themselves (the SDK does this from its stored tags).
    let (c1, e1) = must_connect(hub.mqtt_addr, "p/d1", "p/d1", &secrets["d1"]).await;
    c1.subscribe("tags/p/floor-3/cmd/+/+/+/#", QoS::AtLeastOnce).await.unwrap();
    let (inbox1, t1) = answering_device(c1.clone(), e1, "d1");
    let (c2, mut e2) = must_connect(hub.mqtt_addr, "p/d2", "p/d2", &secrets["d2"]).await;
    c2.subscribe("tags/p/floor-3/cmd/+/+/+/#", QoS::AtLeastOnce).await.unwrap();
    wait_for(&mut e2, Duration::from_secs(5), |p| matches!(p, Packet::SubAck(_))).await.unwrap();
    let silent_inbox: Inbox = Arc::default();
    let silent_seen = silent_inbox.clone();
    let t2 = tokio::spawn(async move {
        while let Ok(ev) = e2.poll().await {
            match ev {
                Event::Incoming(Packet::Publish(p)) => {
                    silent_seen.lock().unwrap().push((p.topic.clone(), p.payload.to_vec()))
                }
                Event::Outgoing(rumqttc::Outgoing::Disconnect) => break,
                _ => {}
            }
        }
    });
    wait_online(&hub, "p", "d1").await;
    wait_online(&hub, "p", "d2").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // d1's SUBSCRIBE is in

    let (s, sent) = hub
        .call(Method::POST, "/api/v1/products/p/tags/floor-3/commands", Some(json!({"name": "reboot", "ttl_secs": 60})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{sent}");
    assert_eq!(sent["total"], 3);
    let id = sent["request_id"].as_str().unwrap().to_string();
    let by_device = |v: &Value| -> std::collections::HashMap<String, String> {
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["device_id"].as_str().unwrap().to_string(), c["state"].as_str().unwrap().to_string()))
            .collect()
    };
    assert_eq!(by_device(&sent)["d3"], "queued", "{sent}");
    let status = eventually(Duration::from_secs(15), "d1's reply", || async {
        let (_, v) = hub.call(Method::GET, &format!("/api/v1/products/p/tag-commands/{id}"), None).await;
        (v["replied"] == 1).then_some(v)
    })
    .await;
    assert_eq!(status["pending"], 2, "{status}");
    assert_eq!(received(&inbox1, &id).len(), 1);
    assert!(received(&inbox1, &id)[0].0.starts_with("tags/p/floor-3/cmd/reboot/plain/"));
    assert_eq!(received(&silent_inbox, &id).len(), 1, "the silent device got it too");

    // d3 comes online: it gets the command on its own command topic and answers.
    let (c3, e3) = must_connect(hub.mqtt_addr, "p/d3", "p/d3", &secrets["d3"]).await;
    let (inbox3, t3) = answering_device(c3.clone(), e3, "d3");
    let status = eventually(Duration::from_secs(15), "d3's reply", || async {
        let (_, v) = hub.call(Method::GET, &format!("/api/v1/products/p/tag-commands/{id}"), None).await;
        (v["replied"] == 2).then_some(v)
    })
    .await;
    let states = by_device(&status);
    assert_eq!(
        (states["d1"].as_str(), states["d2"].as_str(), states["d3"].as_str()),
        ("replied", "sent", "replied"),
        "{status}"
    );
    assert_eq!(status["pending"], 1);
    assert!(received(&inbox3, &id)[0].0.starts_with("cmd/p/d3/reboot/plain/"));
    let (s, _) = hub.call(Method::GET, "/api/v1/products/p/tag-commands/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    for c in [c1, c2, c3] {
        c.disconnect().await.unwrap();
    }
    let _ = tokio::join!(t1, t2, t3);
    hub.stop().await;
}

/// A tag command may target at most `commands.max_tag_targets` devices (checked before anything is
/// written), and the per-device lists of tag commands and OTA rollouts come in pages whose counts always
/// cover every device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_commands_are_capped_and_targets_paged() {
    let hub = TestHub::start_with(Db::Sqlite, |c| c.commands.max_tag_targets = 5).await;
    hub.create_product("p").await;
    for i in 0..6 {
        let d = format!("d{i}");
        hub.register("p", &d).await;
        let tags = if i < 5 { json!({"tags": ["five", "six"]}) } else { json!({"tags": ["six"]}) };
        let (s, v) = hub.call(Method::PUT, &format!("/api/v1/products/p/devices/{d}/tags"), Some(tags)).await;
        assert!(s.is_success(), "{v}");
    }
    let (s, v) = hub.call(Method::POST, "/api/v1/products/p/tags/six/commands", Some(json!({"name": "reboot"}))).await;
    assert_eq!((s, v["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("tag")), "{v}");
    let (_, listed) = hub.call(Method::GET, "/api/v1/products/p/devices/d0/commands", None).await;
    assert_eq!(listed["items"], json!([]), "nothing written for a refused tag command");

    let (s, sent) =
        hub.call(Method::POST, "/api/v1/products/p/tags/five/commands", Some(json!({"name": "reboot"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{sent}");
    let request_id = sent["request_id"].as_str().unwrap();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = match &cursor {
            Some(c) => format!("/api/v1/products/p/tag-commands/{request_id}?limit=2&cursor={c}"),
            None => format!("/api/v1/products/p/tag-commands/{request_id}?limit=2"),
        };
        let (s, v) = hub.call(Method::GET, &page, None).await;
        assert_eq!((s, v["total"].as_u64()), (StatusCode::OK, Some(5)), "{v}");
        let devices = v["devices"].as_array().unwrap();
        assert!(devices.len() <= 2, "{v}");
        seen.extend(devices.iter().map(|d| d["device_id"].as_str().unwrap().to_string()));
        match v["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ["d0", "d1", "d2", "d3", "d4"]);
    let (s, v) = hub.call(Method::GET, &format!("/api/v1/products/p/tag-commands/{request_id}?limit=0"), None).await;
    assert_eq!((s, v["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("limit")), "{v}");

    let package = json!({"url": "https://updates.example.com/fw-1.2.0.bin", "version": "1.2.0", "size": 524288,
        "md5": "9e107d9d372bb6826bd81d3542a419d6", "type": "firmware"});
    let (s, rollout) = hub.call(Method::POST, "/api/v1/products/p/tags/six/ota", Some(package)).await;
    assert_eq!(s, StatusCode::CREATED, "{rollout}");
    let id = rollout["rollout_id"].as_str().unwrap();
    let (_, first) = hub.call(Method::GET, &format!("/api/v1/products/p/ota-rollouts/{id}?limit=4"), None).await;
    assert_eq!((first["total"].as_u64(), first["targets"].as_array().unwrap().len()), (Some(6), 4), "{first}");
    let next = first["next_cursor"].as_str().unwrap();
    let (_, rest) =
        hub.call(Method::GET, &format!("/api/v1/products/p/ota-rollouts/{id}?limit=4&cursor={next}"), None).await;
    let rest: Vec<&str> =
        rest["targets"].as_array().unwrap().iter().map(|t| t["device_id"].as_str().unwrap()).collect();
    assert_eq!((rest, first.get("next_cursor").is_some()), (vec!["d4", "d5"], true));
    hub.stop().await;
}

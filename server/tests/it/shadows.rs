//! Device shadows: optimistic locking through the API, device reports and acknowledgements over EMQX 5's
//! event contract, stale device messages, and every version announced on RabbitMQ.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

/// Posts one EMQX 5 `message.publish` event to iothub, as EMQX's rule would: the reference protocol's `$`
/// topics tested through EMQX 5's contract (the SDK tests carry them over the bundled broker).
async fn emqx5_publish(hub: &TestHub, username: &str, topic: &str, payload: &[u8]) {
    emqx5_publish_at(hub, username, username, topic, payload, iothub::clock::now_ms()).await;
}

/// Shadow: optimistic locking (exactly one of concurrent writers of a version wins), device reports and
/// acknowledgements applied with version checks, stale device messages change nothing, every version
/// announced on RabbitMQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_updates_are_versioned() {
    let hub = TestHub::start_production().await;
    hub.create_product("p").await;
    hub.register("p", "d").await;
    let mut consumer = EventConsumer::bind(&amqp_url(), &hub.config.rabbitmq.exchange_prefix, "p", "").await;
    let url = "/api/v1/products/p/devices/d/shadow";
    let (s, v) = hub.call(Method::GET, url, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["version"].clone(), v["delta"].clone()), (json!(0), json!({})));
    let (s, v) =
        hub.call(Method::PUT, url, Some(json!({"state": {"desired": {"led": "on", "rate": 5}}, "version": 0}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 1);
    assert_eq!(v["delta"], json!({"led": "on", "rate": 5}));
    let (s, v) = hub.call(Method::PUT, url, Some(json!({"state": {"desired": {"led": "off"}}, "version": 0}))).await;
    assert_eq!(s, StatusCode::CONFLICT, "a stale version is refused: {v}");

    // Eight writers read version 1 and write at once: exactly one wins.
    let writes =
        (0..8).map(|i| hub.call(Method::PUT, url, Some(json!({"state": {"desired": {"rate": i}}, "version": 1}))));
    let statuses: Vec<StatusCode> = futures::future::join_all(writes).await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::CONFLICT).count(), 7, "{statuses:?}");
    let (_, v) = hub.call(Method::GET, url, None).await;
    assert_eq!(v["version"], 2);

    // The device reports against the current version; a stale report changes nothing.
    emqx5_publish(
        &hub,
        "p/d",
        "upload_data/p/d/$shadow_reported/s1",
        br#"{"state":{"reported":{"led":"off","temp":20}},"version":2}"#,
    )
    .await;
    let v = eventually(Duration::from_secs(10), "reported applied", || async {
        let (_, v) = hub.call(Method::GET, url, None).await;
        (v["version"] == 3).then_some(v)
    })
    .await;
    assert_eq!(v["state"]["reported"], json!({"led": "off", "temp": 20}));
    assert_eq!(v["delta"]["led"], "on");
    assert!(v["metadata"]["reported"]["temp"]["timestamp"].is_i64(), "{v}");
    emqx5_publish(
        &hub,
        "p/d",
        "upload_data/p/d/$shadow_reported/s2",
        br#"{"state":{"reported":{"temp":99}},"version":2}"#,
    )
    .await;
    // The device applied the desired state of version 3: it becomes reported, nothing is desired.
    emqx5_publish(&hub, "p/d", "upload_data/p/d/$shadow_updated/s3", br#"{"state":{"desired":null},"version":3}"#)
        .await;
    let v = eventually(Duration::from_secs(10), "desired acknowledged", || async {
        let (_, v) = hub.call(Method::GET, url, None).await;
        (v["version"] == 4).then_some(v)
    })
    .await;
    assert_eq!(v["state"]["desired"], json!({}));
    assert_eq!(v["delta"], json!({}));
    assert_eq!(v["state"]["reported"]["led"], "on");
    assert_eq!(v["state"]["reported"]["temp"], 20, "the stale report was not applied: {v}");

    let events = consumer
        .collect_until(Duration::from_secs(15), |seen| seen.iter().filter(|(k, _)| k == "shadow").count() >= 4)
        .await;
    let versions: Vec<(i64, String)> = events
        .iter()
        .filter(|(k, _)| k == "shadow")
        .map(|(_, v)| (v["version"].as_i64().unwrap(), v["source"].as_str().unwrap().to_string()))
        .collect();
    let mut sorted = versions.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [(1, "api".into()), (2, "api".into()), (3, "device_reported".into()), (4, "device_updated".into())],
        "{versions:?}"
    );
    let (s, _) = hub.call(Method::GET, "/api/v1/products/p/devices/nope/shadow", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    consumer.close().await;
    hub.stop().await;
}

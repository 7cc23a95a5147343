//! Devices against the real bundled broker (RMQTT), which asks iothub over HTTP for every decision.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use rumqttc::{Packet, QoS, SubscribeReasonCode};
use serde_json::json;

use crate::both_backends;
use crate::helpers::{must_be_refused, must_connect, wait_for, Db, TestHub};

both_backends!(device_connects_only_with_its_triple, device_connects_only_with_its_triple);
async fn device_connects_only_with_its_triple(db: Db) {
    let hub = TestHub::start(db).await;
    hub.create_product("p1").await;
    let secret = hub.register("p1", "d1").await;
    let other = hub.register("p1", "d2").await;
    let mqtt = hub.mqtt_addr;

    must_connect(mqtt, "p1/d1", "p1/d1", &secret).await;
    must_be_refused(mqtt, "p1/d1", "p1/d1", "wrong").await;
    must_be_refused(mqtt, "p1/d1", "p1/d1", &other).await;
    must_be_refused(mqtt, "p1/nobody", "p1/nobody", &secret).await;
    must_be_refused(mqtt, "x", "anonymous", "").await;

    // Suspended: refused; resumed: accepted again.
    let (s, _) = hub.call(Method::POST, "/api/v1/products/p1/devices/d1/suspend", None).await;
    assert_eq!(s, StatusCode::OK);
    must_be_refused(mqtt, "p1/d1", "p1/d1", &secret).await;
    hub.call(Method::POST, "/api/v1/products/p1/devices/d1/resume", None).await;
    must_connect(mqtt, "p1/d1/b", "p1/d1", &secret).await;

    // Deleted: refused.
    hub.call(Method::DELETE, "/api/v1/products/p1/devices/d1", None).await;
    must_be_refused(mqtt, "p1/d1/c", "p1/d1", &secret).await;
    hub.stop().await;
}

both_backends!(device_acl_is_enforced, device_acl_is_enforced);
async fn device_acl_is_enforced(db: Db) {
    let hub = TestHub::start(db).await;
    hub.create_product("p1").await;
    let s1 = hub.register("p1", "d1").await;
    let s2 = hub.register("p1", "d2").await;
    let mqtt = hub.mqtt_addr;

    // Allowed subscriptions are granted, foreign ones refused (SUBACK failure).
    let (c1, mut e1) = must_connect(mqtt, "p1/d1", "p1/d1", &s1).await;
    c1.subscribe("m2m/p1/d1/+/+", QoS::AtLeastOnce).await.unwrap();
    let ack = wait_for(&mut e1, Duration::from_secs(5), |p| matches!(p, Packet::SubAck(_))).await.unwrap();
    let Packet::SubAck(ack) = ack else { unreachable!() };
    assert!(matches!(ack.return_codes[0], SubscribeReasonCode::Success(_)), "{ack:?}");
    c1.subscribe("m2m/p1/d2/+/+", QoS::AtLeastOnce).await.unwrap();
    let ack = wait_for(&mut e1, Duration::from_secs(5), |p| matches!(p, Packet::SubAck(_))).await.unwrap();
    let Packet::SubAck(ack) = ack else { unreachable!() };
    assert_eq!(ack.return_codes[0], SubscribeReasonCode::Failure, "another device's inbox");
    c1.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    let ack = wait_for(&mut e1, Duration::from_secs(5), |p| matches!(p, Packet::SubAck(_))).await.unwrap();
    let Packet::SubAck(ack) = ack else { unreachable!() };
    assert_eq!(ack.return_codes[0], SubscribeReasonCode::Failure, "wildcard over everything");

    // d2 messages d1 through m2m (allowed: sender is itself) and d1 receives it with the sender id.
    let (c2, mut e2) = must_connect(mqtt, "p1/d2", "p1/d2", &s2).await;
    let pump = tokio::spawn(async move { wait_for(&mut e2, Duration::from_secs(3), |_| false).await.map(|_| ()) });
    c2.publish("m2m/p1/d1/d2/msg1", QoS::AtLeastOnce, false, "hello").await.unwrap();
    let got = wait_for(&mut e1, Duration::from_secs(5), |p| matches!(p, Packet::Publish(_))).await.unwrap();
    let Packet::Publish(msg) = got else { unreachable!() };
    assert_eq!(msg.topic, "m2m/p1/d1/d2/msg1");
    assert_eq!(&msg.payload[..], b"hello");
    assert_eq!(pump.await.unwrap(), Err("timeout".into()), "d2 stayed connected after an allowed publish");

    // Own upstream topic: fine. Another device's topic: the broker disconnects the publisher.
    c1.publish("upload_data/p1/d1/temp/m1", QoS::AtLeastOnce, false, "21.5").await.unwrap();
    let r = wait_for(&mut e1, Duration::from_secs(2), |p| matches!(p, Packet::PubAck(_))).await;
    assert!(r.is_ok(), "allowed publish acknowledged: {r:?}");
    c1.publish("upload_data/p1/d2/temp/m2", QoS::AtLeastOnce, false, "spoof").await.unwrap();
    let r = wait_for(&mut e1, Duration::from_secs(5), |_| false).await;
    assert!(r.as_ref().is_err_and(|e| e.starts_with("connection closed")), "spoofing publisher disconnected: {r:?}");
    hub.stop().await;
}

both_backends!(suspend_kicks_live_connection, suspend_kicks_live_connection);
async fn suspend_kicks_live_connection(db: Db) {
    let hub = TestHub::start(db).await;
    hub.create_product("p1").await;
    let secret = hub.register("p1", "d1").await;
    let (_c, mut e) = must_connect(hub.mqtt_addr, "p1/d1", "p1/d1", &secret).await;
    // Keep the connection serviced while the API call runs.
    let watcher = tokio::spawn(async move { wait_for(&mut e, Duration::from_secs(10), |_| false).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, b) = hub.call(Method::POST, "/api/v1/products/p1/devices/d1/suspend", None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["connections_kicked"], 1, "{b}");
    let r = watcher.await.unwrap();
    assert!(r.as_ref().is_err_and(|e| e.starts_with("connection closed")), "live connection kicked: {r:?}");
    must_be_refused(hub.mqtt_addr, "p1/d1", "p1/d1", &secret).await;

    // Deleting kicks too.
    let s2 = hub.register("p1", "d2").await;
    let (_c2, mut e2) = must_connect(hub.mqtt_addr, "p1/d2", "p1/d2", &s2).await;
    let watcher = tokio::spawn(async move { wait_for(&mut e2, Duration::from_secs(10), |_| false).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, b) = hub.call(Method::DELETE, "/api/v1/products/p1/devices/d2", None).await;
    assert_eq!((s, b["connections_kicked"].as_u64()), (StatusCode::OK, Some(1)), "{b}");
    assert!(watcher.await.unwrap().is_err_and(|e| e.starts_with("connection closed")));
    hub.stop().await;
}

both_backends!(secret_rotation_overlaps, secret_rotation_overlaps);
async fn secret_rotation_overlaps(db: Db) {
    let hub = TestHub::start(db).await;
    hub.create_product("p1").await;
    let old = hub.register("p1", "d1").await;
    let (s, b) = hub
        .call(Method::POST, "/api/v1/products/p1/devices/d1/rotate-secret", Some(json!({"overlap_seconds": 60})))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let new = b["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    must_connect(hub.mqtt_addr, "p1/d1/a", "p1/d1", &old).await;
    must_connect(hub.mqtt_addr, "p1/d1/b", "p1/d1", &new).await;

    // No overlap (a leaked secret): old secrets stop at once and live connections are kicked.
    let (_c, mut e) = must_connect(hub.mqtt_addr, "p1/d1/live", "p1/d1", &new).await;
    let watcher = tokio::spawn(async move { wait_for(&mut e, Duration::from_secs(10), |_| false).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, b) = hub
        .call(Method::POST, "/api/v1/products/p1/devices/d1/rotate-secret", Some(json!({"overlap_seconds": 0})))
        .await;
    assert!(b["connections_kicked"].as_u64().unwrap() >= 1, "{b}");
    assert!(watcher.await.unwrap().is_err_and(|e| e.starts_with("connection closed")));
    let newest = b["secret"].as_str().unwrap().to_string();
    must_be_refused(hub.mqtt_addr, "p1/d1/c", "p1/d1", &new).await;
    must_be_refused(hub.mqtt_addr, "p1/d1/d", "p1/d1", &old).await;
    must_connect(hub.mqtt_addr, "p1/d1/e", "p1/d1", &newest).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_clients_get_exactly_their_acl() {
    let hub = TestHub::start(Db::Sqlite).await;
    let (s, b) = hub
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"username": "ops.console", "ttl_seconds": 60, "acl": [
                {"permission": "allow", "action": "subscribe", "topic": "upload_data/#"},
                {"permission": "allow", "action": "publish", "topic": "ops/announce"}
            ]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let token = b["token"].as_str().unwrap().to_string();
    let (c, mut e) = must_connect(hub.mqtt_addr, "ops.console", "ops.console", &token).await;
    c.subscribe("upload_data/#", QoS::AtMostOnce).await.unwrap();
    let Packet::SubAck(ack) =
        wait_for(&mut e, Duration::from_secs(5), |p| matches!(p, Packet::SubAck(_))).await.unwrap()
    else {
        unreachable!()
    };
    assert!(matches!(ack.return_codes[0], SubscribeReasonCode::Success(_)));
    c.subscribe("cmd/#", QoS::AtMostOnce).await.unwrap();
    let Packet::SubAck(ack) =
        wait_for(&mut e, Duration::from_secs(5), |p| matches!(p, Packet::SubAck(_))).await.unwrap()
    else {
        unreachable!()
    };
    assert_eq!(ack.return_codes[0], SubscribeReasonCode::Failure);

    must_be_refused(hub.mqtt_addr, "someone.else", "someone.else", &token).await;
    // A token never takes a device's (or another client's) session: it connects with its own client id only.
    must_be_refused(hub.mqtt_addr, "p1/d1", "ops.console", &token).await;
    must_be_refused(hub.mqtt_addr, "ops.console/second", "ops.console", &token).await;
    must_be_refused(hub.mqtt_addr, "ops.console", "ops.console", "not-a-token").await;

    let (s, b) = hub.call(Method::POST, "/api/v1/tokens", Some(json!({"username": "p1/d1"}))).await;
    assert_eq!(
        (s, b["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("username")),
        "device identities cannot be minted"
    );
    let (s, b) = hub.call(Method::POST, "/api/v1/tokens", Some(json!({"username": "thermo"}))).await;
    assert_eq!(
        (s, b["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("username")),
        "a product-shaped username would inherit the product's auto-subscriptions"
    );
    let (s, b) = hub.call(Method::POST, "/api/v1/tokens", Some(json!({"username": "svc.x", "ttl_seconds": 0}))).await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("ttl_seconds")));
    hub.stop().await;
}

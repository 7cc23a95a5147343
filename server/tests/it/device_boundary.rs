//! The device boundary, attacked the way a device holding valid credentials would: with a stock MQTT client
//! against the real bundled broker (RMQTT), whose plugins ask iothub for every decision.
//!
//! Each test here reproduced a leak before the identity rules (protocol/src/identity.rs) existed: a username
//! with an RMQTT placeholder (`p/d4%A`) was `p/d4` at CONNECT and `p/d41` when its subscription to d41's
//! commands was checked; and any device could pick a victim's client id and inherit (or keep kicking) its
//! session. docs/architecture.md ("Threat model") lists which test proves which line.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use rumqttc::QoS;
use serde_json::json;

use crate::both_backends;
use crate::helpers::*;

/// Placeholders of RMQTT's auth-http (`%u %c %a %P %r %A %t`), others brokers or templates use, and EMQX's.
const PLACEHOLDERS: &[&str] =
    &["%u", "%c", "%A", "%a", "%p", "%P", "%r", "%C", "%d", "%t", "%i", "${username}", "${clientid}"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholder_identities_are_refused_at_connect() {
    let hub = TestHub::start(Db::Sqlite).await;
    hub.create_product("p").await;
    let s4 = hub.register("p", "d4").await;
    hub.register("p", "d41").await;
    hub.register("p", "d42").await;
    let mqtt = hub.mqtt_addr;
    for placeholder in PLACEHOLDERS {
        let username = format!("p/d4{placeholder}");
        must_be_refused(mqtt, &username, &username, &s4).await;
        must_be_refused(mqtt, "p/d4", &username, &s4).await;
        must_be_refused(mqtt, &format!("p/d4/{placeholder}"), "p/d4", &s4).await;
        // The product level too (`p%A/d4` would become product `p1`'s device at ACL time).
        let product_level = format!("p{placeholder}/d4");
        must_be_refused(mqtt, &product_level, &product_level, &s4).await;
    }

    // The reproduction of the report, with mosquitto's own client: never a CONNACK, never d41's commands.
    let out = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &mqtt.port().to_string(), "-V", "mqttv311", "-i", "p/d4%A", "-u", "p/d4%A"])
        .args(["-P", &s4, "-t", "cmd/p/d41/+/+/+/#", "-C", "1", "-W", "5"])
        .output()
        .await
        .expect("mosquitto_sub (Debian's mosquitto-clients, installed by scripts/test.sh)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mosquitto_sub got through: {stderr}");
    assert!(stderr.contains("not authori"), "refused at CONNECT: {stderr}");

    // The device itself, with its own identity, is unaffected.
    must_connect(mqtt, "p/d4", "p/d4", &s4).await;
    hub.stop().await;
}

both_backends!(no_device_takes_over_another_devices_session, no_device_takes_over_another_devices_session);
async fn no_device_takes_over_another_devices_session(db: Db) {
    let hub = TestHub::start(db).await;
    hub.create_product("p1").await;
    hub.create_product("p2").await;
    let victim_secret = hub.register("p1", "d1").await;
    let same_product = hub.register("p1", "d2").await;
    let other_product = hub.register("p2", "d1").await;
    let mqtt = hub.mqtt_addr;

    // The victim connects as the reference SDK does: client id `{p}/{d}`, persistent session.
    let (client, eventloop, _) = mqtt_connect_session(mqtt, "p1/d1", "p1/d1", &victim_secret, false).await.unwrap();
    let (inbox, victim) = answering_device(client, eventloop, "d1");
    wait_online(&hub, "p1", "d1").await;

    for (username, secret) in [("p1/d2", &same_product), ("p2/d1", &other_product)] {
        for clean in [false, true] {
            let attempt = mqtt_connect_session(mqtt, "p1/d1", username, secret, clean).await;
            let why = attempt.err().unwrap_or_else(|| panic!("{username} (clean {clean}) took p1/d1's session"));
            assert!(!why.contains("timeout"), "{username}: no answer from the broker ({why})");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!victim.is_finished(), "the victim was disconnected");

    // The victim still gets (and answers) its commands; nobody else does.
    let (s, v) =
        hub.call(Method::POST, "/api/v1/products/p1/devices/d1/commands", Some(json!({"name": "reboot"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let request_id = v["request_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(15), "the victim's reply", || async {
        let (_, c) =
            hub.call(Method::GET, &format!("/api/v1/products/p1/devices/d1/commands/{request_id}"), None).await;
        (c["state"] == "replied").then_some(())
    })
    .await;
    assert!(inbox.lock().unwrap().iter().any(|(topic, _)| topic.contains(&request_id)));
    victim.abort();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_sdk_client_ids_resume_their_own_session() {
    let hub = TestHub::start(Db::Sqlite).await;
    hub.create_product("p1").await;
    let secret = hub.register("p1", "d1").await;
    let mqtt = hub.mqtt_addr;

    let (client, eventloop, present) = mqtt_connect_session(mqtt, "p1/d1", "p1/d1", &secret, false).await.unwrap();
    assert!(!present, "a first connect has no session to resume");
    let driver = drive(eventloop);
    client.subscribe("tags/p1/t1/cmd/+/+/+/#", QoS::AtLeastOnce).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.disconnect().await.unwrap();
    let _ = driver.await;
    let (_c, _e, present) = mqtt_connect_session(mqtt, "p1/d1", "p1/d1", &secret, false).await.unwrap();
    assert!(present, "the device resumes its own persistent session");
    // A second connection of the same device, as the reference SDK names it.
    let (_c2, _e2, _) = mqtt_connect_session(mqtt, "p1/d1/backup", "p1/d1", &secret, true).await.unwrap();
    hub.stop().await;
}

async fn wait_online(hub: &TestHub, p: &str, d: &str) {
    eventually(Duration::from_secs(10), "device online", || async {
        let (_, v) = hub.call(Method::GET, &format!("/api/v1/products/{p}/devices/{d}"), None).await;
        (v["online"] == true).then_some(())
    })
    .await;
}

/// Devices connect with `mqtts` on the embedded default, as the reference SDK does: mosquitto's own client,
/// verifying the broker's generated certificate against the file iothub wrote, publishes data that is
/// stored; a client trusting another CA, or speaking plain MQTT to the TLS port, gets nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_connect_over_tls_with_a_verified_certificate() {
    let hub = TestHub::start(Db::Sqlite).await;
    hub.create_product("p1").await;
    let secret = hub.register("p1", "d1").await;
    let mqtts = hub.mqtts_addr.expect("the embedded default has an MQTTS listener");
    let cafile = hub.config.data_dir.join("tls/broker-cert.pem");
    assert!(cafile.exists(), "the generated certificate is written to the data directory");

    let publish = |cafile: std::path::PathBuf, port: u16| {
        let secret = secret.clone();
        async move {
            tokio::process::Command::new("mosquitto_pub")
                .args(["-h", "localhost", "-p", &port.to_string(), "--cafile"])
                .arg(cafile)
                .args(["-i", "p1/d1", "-u", "p1/d1", "-P", &secret, "-q", "1"])
                .args(["-t", "upload_data/p1/d1/temp/tls-1", "-m", "21.5"])
                .output()
                .await
                .expect("mosquitto_pub (Debian's mosquitto-clients, installed by scripts/test.sh)")
        }
    };
    let out = publish(cafile.clone(), mqtts.port()).await;
    assert!(out.status.success(), "mosquitto_pub over TLS: {}", String::from_utf8_lossy(&out.stderr));
    eventually(Duration::from_secs(10), "the message sent over TLS stored", || async {
        let (_, v) = hub.call(Method::GET, "/api/v1/products/p1/devices/d1/messages", None).await;
        v["items"].as_array().is_some_and(|items| items.iter().any(|m| m["message_id"] == "tls-1")).then_some(())
    })
    .await;

    // Another CA: the certificate does not verify, nothing is sent.
    let other = tempfile::tempdir().unwrap();
    let other_ca = other.path().join("other.pem");
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(&other_ca, stranger.cert.pem()).unwrap();
    let out = publish(other_ca, mqtts.port()).await;
    assert!(!out.status.success(), "a certificate from another CA was accepted");
    // Plain MQTT to the TLS port is no MQTT connection either.
    must_be_refused_or_dropped(mqtts, "p1/d1", "p1/d1", &secret).await;
    hub.stop().await;
}

async fn must_be_refused_or_dropped(addr: std::net::SocketAddr, client_id: &str, username: &str, password: &str) {
    assert!(mqtt_connect(addr, client_id, username, password).await.is_err(), "plain MQTT on the TLS port");
}

/// An external RMQTT configured with emqx-config/'s RMQTT files has no identity gate: rmqtt-auth-http
/// fills its placeholders one after another, so iothub sees `p/d4%A` as `p/d4` at CONNECT and cannot refuse
/// it. The attacker still reaches nothing of d41's or d42's: its subscriptions and plain publishes are
/// decided in the broker from the ACL iothub returned for the authenticated `p/d4`, the acl hook never
/// grants a device a subscription or a plain publish (nor a token anything), and the connect event, which
/// carries the raw username, gets the intruder kicked at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_rmqtt_without_the_gate_still_keeps_devices_apart() {
    let (hub, broker, _api) = hub_with_external_rmqtt(Db::Sqlite, false, None).await;
    let mqtt = broker.mqtt_addr();
    hub.create_product("p").await;
    let s4 = hub.register("p", "d4").await;
    let s41 = hub.register("p", "d41").await;
    hub.register("p", "d42").await;

    // The victim d41, listening for its commands.
    let (victim, victim_loop) = must_connect(mqtt, "p/d41", "p/d41", &s41).await;
    let (victim_inbox, _victim_task) = answering_device(victim, victim_loop, "d41");

    // Without the gate the CONNECT passes (this is what the bundled broker's gate prevents), but nothing
    // beyond d4's own grants is reachable, and the intruder is disconnected by iothub within moments.
    let (attacker, mut attacker_loop) = must_connect(mqtt, "p/d4%A", "p/d4%A", &s4).await;
    for filter in ["cmd/p/d41/+/+/+/#", "$share/g/cmd/p/d41/+/+/+/#", "cmd/p/+/+/+/+/#", "m2m/p/d41/+/+"] {
        assert!(subscription_refused(&attacker, &mut attacker_loop, filter).await, "{filter} granted");
    }
    let _ = attacker.publish("upload_data/p/d42/temp/spoof", QoS::AtLeastOnce, false, "-40").await;
    let r = wait_for(&mut attacker_loop, Duration::from_secs(10), |_| false).await;
    assert!(r.as_ref().is_err_and(|e| e.starts_with("connection closed")), "the intruder is gone: {r:?}");
    let (_, messages) = hub.call(Method::GET, "/api/v1/products/p/devices/d42/messages", None).await;
    assert_eq!(messages["items"], json!([]), "nothing stored under d42");

    // One that only waits is kicked too, because its connect event names it as it is.
    let (_idle, mut idle_loop) = must_connect(mqtt, "p/d4%A/idle", "p/d4%A", &s4).await;
    let r = wait_for(&mut idle_loop, Duration::from_secs(10), |_| false).await;
    assert!(r.as_ref().is_err_and(|e| e.starts_with("connection closed")), "the idle intruder is kicked: {r:?}");

    let (s, v) = hub.call(Method::POST, "/api/v1/products/p/devices/d41/commands", Some(json!({"name": "open"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let request_id = v["request_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "d41 gets its command", || async {
        victim_inbox.lock().unwrap().iter().any(|(t, _)| t.contains(&request_id)).then_some(())
    })
    .await;

    // Token clients: `svc.a%A` holding svc.a's token must not borrow svc.a1's grant (stored when svc.a1
    // connected), which the acl hook would find under the rewritten username.
    let hub_ref = &hub;
    let mint = |username: &'static str, topic: &'static str| async move {
        let (s, v) = hub_ref
            .call(
                Method::POST,
                "/api/v1/tokens",
                Some(json!({"username": username, "acl": [{"permission": "allow", "action": "all", "topic": topic}]})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["token"].as_str().unwrap().to_string()
    };
    let a1 = mint("svc.a1", "cmd/#").await;
    let _svc_a1 = must_connect(mqtt, "svc.a1", "svc.a1", &a1).await;
    let a = mint("svc.a", "ops/#").await;
    let (token_attacker, mut token_loop) = must_connect(mqtt, "svc.a%A", "svc.a%A", &a).await;
    assert!(
        subscription_refused(&token_attacker, &mut token_loop, "cmd/p/d41/+/+/+/#").await,
        "svc.a1's grant borrowed"
    );
    broker.stop().await;
    hub.stop().await;
}

/// Subscribes and reports whether the broker refused: SUBACK failure, or the connection closed first.
async fn subscription_refused(client: &rumqttc::AsyncClient, eventloop: &mut rumqttc::EventLoop, filter: &str) -> bool {
    if client.subscribe(filter, QoS::AtLeastOnce).await.is_err() {
        return true;
    }
    match wait_for(eventloop, Duration::from_secs(5), |p| matches!(p, rumqttc::Packet::SubAck(_))).await {
        Ok(rumqttc::Packet::SubAck(ack)) => !matches!(ack.return_codes[0], rumqttc::SubscribeReasonCode::Success(_)),
        Ok(_) => unreachable!(),
        Err(e) => e.starts_with("connection closed"),
    }
}

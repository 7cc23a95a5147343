//! The receive path without a broker: what a device does with each message iothub may send, including
//! the races and the garbage.

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::json;

use crate::clock::Clock;
use crate::device::{on_publish, test_link};
use crate::events::Event;
use crate::store::StateStore;

const NOW_MS: i64 = 1_700_000_000_000;

fn fixed_clock(ms: i64) -> Clock {
    Clock::from_source(Arc::new(move || ms))
}

fn commands(events: &[Event]) -> Vec<String> {
    events.iter().filter_map(|e| if let Event::Command(c) = e { Some(c.request_id.clone()) } else { None }).collect()
}

#[tokio::test]
async fn a_command_is_delivered_once_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let link = test_link(fixed_clock(NOW_MS), StateStore::open(dir.path(), "p", "d").unwrap());
    assert_eq!(commands(&on_publish(&link, "cmd/p/d/reboot/plain/r1", b"now")), ["r1"]);
    assert!(on_publish(&link, "cmd/p/d/reboot/plain/r1", b"now").is_empty(), "redelivery suppressed");
    drop(link);
    let restarted = test_link(fixed_clock(NOW_MS), StateStore::open(dir.path(), "p", "d").unwrap());
    assert!(on_publish(&restarted, "cmd/p/d/reboot/plain/r1", b"now").is_empty(), "remembered on disk");
    assert_eq!(commands(&on_publish(&restarted, "rpc/p/d/getTemp/plain/r2", b"")), ["r2"]);
}

#[tokio::test]
async fn expiry_is_judged_by_the_corrected_clock() {
    // The device's clock is 10 minutes fast; the command expires one minute from iothub's now.
    let clock = fixed_clock(NOW_MS + 600_000);
    let link = test_link(clock.clone(), StateStore::in_memory());
    let topic = format!("cmd/p/d/reboot/plain/r1/{}", NOW_MS / 1000 + 60);
    assert!(on_publish(&link, &topic, b"").is_empty(), "uncorrected, a fresh command looks expired");
    // `$set_ntp`: iothub received at its now and answered 2 ms later; 40 ms each way.
    let device_time = NOW_MS + 600_000 - 42;
    let ntp = json!({"device_time": device_time, "iothub_recv": NOW_MS - 20, "iothub_send": NOW_MS - 18});
    let events = on_publish(&link, "cmd/p/d/$set_ntp/plain/n1", ntp.to_string().as_bytes());
    assert!(matches!(events[..], [Event::TimeSynced { offset_ms }] if (-600_020..=-599_980).contains(&offset_ms)));
    assert_eq!(commands(&on_publish(&link, &topic, b"")), ["r1"]);
    let expired = format!("cmd/p/d/reboot/plain/r3/{}", NOW_MS / 1000 - 1);
    assert!(on_publish(&link, &expired, b"").is_empty());
}

#[tokio::test]
async fn base64_payloads_are_decoded_and_bad_ones_dropped() {
    let link = test_link(fixed_clock(NOW_MS), StateStore::in_memory());
    let events = on_publish(&link, "cmd/p/d/blob/base64/r1", b"AAEC/w==");
    let Event::Command(c) = &events[0] else { panic!("{events:?}") };
    assert_eq!(c.payload, [0, 1, 2, 255]);
    assert!(on_publish(&link, "cmd/p/d/blob/base64/r2", b"not base64!").is_empty());
}

#[tokio::test]
async fn tags_follow_newer_pushes_only() {
    let dir = tempfile::tempdir().unwrap();
    let link = test_link(fixed_clock(NOW_MS), StateStore::open(dir.path(), "p", "d").unwrap());
    let push = |tags: serde_json::Value, v: i64| json!({"tags": tags, "tags_version": v}).to_string();
    let events = on_publish(&link, "cmd/p/d/$set_tags/plain/t1", push(json!(["lab", "floor-3"]), 2).as_bytes());
    assert!(matches!(&events[..], [Event::TagsChanged { tags, version: 2 }] if tags == &["floor-3", "lab"]));
    assert!(on_publish(&link, "cmd/p/d/$set_tags/plain/t2", push(json!(["old"]), 1).as_bytes()).is_empty());
    drop(link);
    let store = StateStore::open(dir.path(), "p", "d").unwrap();
    assert_eq!((store.state().tags.clone(), store.state().tags_version), (vec!["floor-3".into(), "lab".into()], 2));
    let link = test_link(fixed_clock(NOW_MS), store);
    let events = on_publish(&link, "tags/p/lab/cmd/reboot/plain/r1", b"");
    let Event::Command(c) = &events[0] else { panic!("{events:?}") };
    assert_eq!(c.tag.as_deref(), Some("lab"));
}

#[tokio::test]
async fn shadow_versions_are_persisted_and_changes_surface() {
    let dir = tempfile::tempdir().unwrap();
    let link = test_link(fixed_clock(NOW_MS), StateStore::open(dir.path(), "p", "d").unwrap());
    let doc = json!({"state": {"desired": {"led": "on"}, "reported": {}}, "version": 4, "delta": {"led": "on"}});
    let events = on_publish(&link, "cmd/p/d/$update_shadow/plain/s1", doc.to_string().as_bytes());
    let Event::ShadowDesired(desired) = &events[0] else { panic!("{events:?}") };
    assert_eq!((desired.version, desired.delta.get("led")), (4, Some(&json!("on"))));
    let stale = json!({"state": {}, "version": 3, "delta": {"led": "off"}});
    assert!(on_publish(&link, "cmd/p/d/$update_shadow/plain/s2", stale.to_string().as_bytes()).is_empty());
    drop(events);
    drop(link);
    assert_eq!(StateStore::open(dir.path(), "p", "d").unwrap().state().shadow_version, 4);
}

#[tokio::test]
async fn ota_upgrades_are_delivered_once_with_their_package() {
    let link = test_link(fixed_clock(NOW_MS), StateStore::in_memory());
    let body = json!({"url": "https://x/fw.bin", "version": "1.2.0", "size": 10, "md5": "abc", "type": "firmware", "rollout_id": "r1"});
    let topic = format!("cmd/p/d/$ota_upgrade/plain/r1/{}", NOW_MS / 1000 + 3600);
    let events = on_publish(&link, &topic, body.to_string().as_bytes());
    let Event::OtaUpgrade(up) = &events[0] else { panic!("{events:?}") };
    assert_eq!((up.version.as_str(), up.kind.as_str(), up.size), ("1.2.0", "firmware", 10));
    assert_eq!(up.success_status(), json!({"firmware_version": "1.2.0"}));
    assert!(on_publish(&link, &topic, body.to_string().as_bytes()).is_empty());
}

#[tokio::test]
async fn messages_for_someone_else_or_outside_the_grammar_are_ignored() {
    let link = test_link(fixed_clock(NOW_MS), StateStore::in_memory());
    for topic in [
        "cmd/p/other/x/plain/r1",
        "cmd/q/d/x/plain/r1",
        "m2m/p/other/d/m1",
        "upload_data/p/d/x/m1",
        "cmd/p/d/$nope/plain/r1",
        "tags/p/lab/cmd/$set_ntp/plain/r9",
    ] {
        assert!(on_publish(&link, topic, b"{}").is_empty(), "{topic}");
    }
    let events = on_publish(&link, "m2m/p/d/peer/m1", b"hi");
    assert!(matches!(&events[..], [Event::Message(m)] if m.sender == "peer" && m.payload == b"hi"));
    assert!(on_publish(&link, "m2m/p/d/peer/m1", b"hi").is_empty(), "duplicate suppressed");
}

/// Found by the fuzzer (sdk/fuzz): an OTA upgrade whose `expiresAt` is absurdly large overflowed the dedup
/// bookkeeping.
#[tokio::test]
async fn absurd_expiries_neither_panic_nor_expire() {
    let link = test_link(fixed_clock(NOW_MS), StateStore::in_memory());
    let body = json!({"url": "u", "version": "1", "type": "firmware"}).to_string();
    for expiry in ["999999999999999999", "18446744073709551615"] {
        let events = on_publish(&link, &format!("cmd/p/d/$ota_upgrade/plain/o-{expiry}/{expiry}"), body.as_bytes());
        assert!(matches!(&events[..], [Event::OtaUpgrade(_)]), "{expiry}: {events:?}");
        let events = on_publish(&link, &format!("cmd/p/d/reboot/plain/c-{expiry}/{expiry}"), b"");
        assert_eq!(commands(&events).len(), 1, "{expiry}");
    }
}

proptest! {
    /// Whatever arrives — any topic near the grammar, any bytes — the receive path neither panics nor lets
    /// a `$` command through to the application.
    #[test]
    fn the_receive_path_survives_anything(
        topic in "(cmd|rpc|tags|m2m|x)/[pd$/+#a-z0-9_.-]{0,40}",
        payload in prop::collection::vec(any::<u8>(), 0..64),
        json_payload in "\\{\"[a-z_]{1,12}\":(-?[0-9]{1,20}|\"[a-z]{0,5}\"|null|\\[\\]|\\{\\})\\}",
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let link = test_link(fixed_clock(NOW_MS), StateStore::in_memory());
            for body in [payload.as_slice(), json_payload.as_bytes()] {
                for event in on_publish(&link, &topic, body) {
                    if let Event::Command(c) = event {
                        assert!(!c.name.starts_with('$'));
                    }
                }
            }
        });
    }
}

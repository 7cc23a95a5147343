//! Topic grammar and ACL decisions on arbitrary input: never panic, and never grant a device anything
//! outside its own product (publish) or outside its own topics (subscribe).
#![no_main]

use iothub::topics::{device_may, filter_permits, is_valid_filter, parse_upstream, Action};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Every topic the upstream grammar accepts is one its speaker may publish (grammar and ACL agree).
    if let Ok(upstream) = parse_upstream(text) {
        let (product, device) = upstream.speaker();
        assert!(device_may(product, device, Action::Publish, text), "parsed but not allowed: {text}");
    }
    let mut parts = text.splitn(3, '\n');
    let (Some(first), Some(second), Some(topic)) = (parts.next(), parts.next(), parts.next()) else { return };
    for action in [Action::Publish, Action::Subscribe] {
        let _ = filter_permits(first, action, topic);
        let _ = is_valid_filter(topic);
        // Devices with well-formed ids, as the registry guarantees.
        if iothub::ids::validate_id(first).is_err() || iothub::ids::validate_id(second).is_err() {
            continue;
        }
        if device_may(first, second, action, topic) {
            let levels: Vec<&str> = topic.split('/').collect();
            assert!(levels.len() >= 3, "granted a topic without product/device levels: {topic}");
            assert_eq!(levels[1], first, "granted another product's topic: {topic}");
            match action {
                Action::Publish => {
                    assert!(!topic.contains(['+', '#']), "granted a publish to a wildcard: {topic}");
                    // The sender's own id is in the device position (m2m: the sender position).
                    let own = if levels[0] == "m2m" { levels[3] } else { levels[2] };
                    assert_eq!(own, second, "granted publishing as another device: {topic}");
                }
                Action::Subscribe => {
                    if levels[0] != "tags" {
                        assert_eq!(levels[2], second, "granted another device's inbox: {topic}");
                    }
                }
            }
        }
    }
});

//! The identity checks (username, client id) together with the ACL decision iothub makes for them, on
//! arbitrary input: never panic; an accepted identity carries nothing a broker plugin could reinterpret and
//! its client id belongs to that username alone; and what the accepted device is then granted (shared
//! subscriptions decided on their real filter, as EMQX does) stays inside its own topics.
#![no_main]

use iothub::identity::{check_identity, client_id_is_bound, Principal};
use iothub::topics::{device_may, shared_subscription_filter, Action};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.splitn(4, '\n');
    let (Some(username), Some(client_id), Some(action), Some(topic)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let Ok(principal) = check_identity(username, client_id) else { return };
    for s in [username, client_id] {
        assert!(!s.contains(['%', '$', '{', '}', '+', '#']), "template or topic syntax accepted: {s:?}");
        assert!(s.bytes().all(|b| b.is_ascii_graphic()), "non-printable identity accepted: {s:?}");
    }
    assert!(client_id.starts_with(username), "client id {client_id:?} not derived from {username:?}");
    // The client id names this username only: any other username that claims it is refused.
    for other in [&username[..username.len() - 1], &format!("{username}x"), client_id] {
        if other != username {
            assert!(!client_id_is_bound(other, client_id) || check_identity(other, client_id).is_err(),
                "{client_id:?} is bound to both {username:?} and {other:?}");
        }
    }
    let Principal::Device(device) = principal else { return };
    let action = if action.len() % 2 == 0 { Action::Publish } else { Action::Subscribe };
    let decided = match action {
        Action::Subscribe => shared_subscription_filter(topic).unwrap_or(topic),
        Action::Publish => topic,
    };
    if device_may(device.product.as_str(), device.device.as_str(), action, decided) {
        let levels: Vec<&str> = decided.split('/').collect();
        assert_eq!(levels.get(1).copied(), Some(device.product.as_str()), "another product's topic: {decided}");
        match action {
            Action::Publish => {
                let own = if levels[0] == "m2m" { levels[3] } else { levels[2] };
                assert_eq!(own, device.device.as_str(), "publishing as another device: {decided}");
            }
            Action::Subscribe if levels[0] != "tags" => {
                assert_eq!(levels[2], device.device.as_str(), "another device's inbox: {decided}");
            }
            Action::Subscribe => {}
        }
    }
});

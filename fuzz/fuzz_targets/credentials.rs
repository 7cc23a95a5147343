//! Credential parsers on arbitrary input: broker usernames and API keys never panic, and whatever they
//! accept round-trips exactly (no normalisation that could alias two identities).
#![no_main]

use iothub::ids::DeviceRef;
use iothub::secrets::{parse_api_key, API_KEY_PREFIX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(device) = DeviceRef::from_broker_username(text) {
        assert_eq!(device.broker_username(), text);
    }
    if let Some((id, secret)) = parse_api_key(text) {
        assert_eq!(format!("{API_KEY_PREFIX}{id}_{secret}"), text);
    }
});

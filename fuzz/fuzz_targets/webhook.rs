//! Broker webhook bodies (EMQX 5, EMQX 4, RMQTT) on arbitrary input: parsing never panics; it yields
//! events or a validation error naming a field.
#![no_main]

use iothub::api::broker_events::{parse_events, Dialect};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for dialect in [Dialect::Emqx5, Dialect::Emqx4, Dialect::Rmqtt] {
        if let Err(e) = parse_events(dialect, data) {
            assert!(matches!(e, iothub::error::Error::Validation { .. }), "{e:?}");
        }
    }
});

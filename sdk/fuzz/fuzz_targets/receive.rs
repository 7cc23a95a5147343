//! Everything a device can receive from the network, through the SDK's whole receive path: topic grammar,
//! payload decoding (base64, JSON of the internal protocol), dedup, tags, shadow and OTA handling. Nothing
//! may panic, and no internal `$` command may reach the application.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    // First line: the topic; the rest: the payload.
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let Ok(topic) = std::str::from_utf8(&data[..split]) else { return };
    let payload = data.get(split + 1..).unwrap_or_default();
    runtime().block_on(async {
        iothub_device::__fuzz_receive(topic, payload);
    });
});

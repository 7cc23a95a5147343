//! iothub's device protocol, shared by the server (`iothub`) and the device SDK (`iothub-device`) so the
//! two can never disagree: which ids are valid ([`ids`]), which MQTT identities exist ([`identity`]), and every MQTT topic a device publishes or
//! receives ([`topics`]), wire-compatible with devices built for the reference IotHub.

pub mod identity;
pub mod ids;
pub mod topics;

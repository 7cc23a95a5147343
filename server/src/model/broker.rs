//! Data of the `broker` port (ports/broker.rs): plain types, no storage or transport.

/// One message iothub publishes to devices through the broker's REST API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    /// MQTT 5 message expiry, so a broker holding the message for an offline session drops it in time.
    pub expiry_secs: Option<u32>,
}

/// What the broker said about a publish it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// EMQX 5 `200`: delivered to at least one subscriber.
    Delivered,
    /// EMQX 5 `202` reason 16: nobody subscribes to the topic (device offline or not subscribed).
    NoSubscribers,
    /// EMQX 4 / RMQTT: accepted; these brokers never say whether a subscriber matched.
    Accepted,
}

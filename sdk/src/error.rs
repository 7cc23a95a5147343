//! The SDK's one error type. Bad input from the network never becomes an error the application must handle
//! (it is logged and dropped); errors are for what the application asked and could not get.

/// Everything an SDK call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work (e.g. an id outside iothub's id rules).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A name or id given to an SDK call is not valid on the wire.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The broker refused the connection (wrong credentials, suspended device, ...).
    #[error("the broker refused the connection: {0}")]
    Refused(String),
    /// The first connection did not succeed in time.
    #[error("could not connect: {0}")]
    Connect(String),
    /// No answer in time (e.g. `sync_time` without `$set_ntp`).
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The device was closed; no more messages can be sent.
    #[error("the device connection is closed")]
    Closed,
    /// The local state file could not be read or written.
    #[error("device state store {path}: {source}")]
    Store { path: String, source: std::io::Error },
    /// A payload could not be encoded.
    #[error("payload: {0}")]
    Payload(#[from] serde_json::Error),
}

impl From<rumqttc::ClientError> for Error {
    fn from(_: rumqttc::ClientError) -> Self {
        // The request channel is closed only when the event loop task ended.
        Error::Closed
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

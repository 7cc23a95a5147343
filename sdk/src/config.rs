//! How a device connects: its triple, the broker address, TLS, keepalive, reconnect backoff and where its
//! state file lives.

use std::path::PathBuf;
use std::time::Duration;

use crate::clock::Clock;
use crate::error::{Error, Result};

/// TLS settings for the broker connection (requires the `tls` feature, on by default).
#[derive(Debug, Clone)]
pub struct Tls {
    /// PEM CA certificate(s) the broker's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// Optional client certificate and key (PEM) for mutual TLS.
    pub client_auth: Option<(Vec<u8>, Vec<u8>)>,
}

/// Everything [`crate::Device::connect`] needs. Start from [`DeviceConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub product_id: String,
    pub device_id: String,
    /// The secret iothub returned when the device was registered.
    pub secret: String,
    pub host: String,
    pub port: u16,
    pub tls: Option<Tls>,
    /// Appended to the MQTT client id (`{product_id}/{device_id}` or `{product_id}/{device_id}/{suffix}`, the
    /// reference IotHub SDK's ids), e.g. to tell two processes of one device apart in the connection list.
    /// Brokers key sessions by client id alone, so iothub lets a device use only client ids derived from its
    /// own identity: no other device can take over, kick or inherit its session. The suffix uses the id
    /// alphabet `[A-Za-z0-9_-]{1,64}`.
    pub client_id_suffix: Option<String>,
    pub keep_alive: Duration,
    /// First reconnect delay; doubles per failed attempt up to `reconnect_max`, with full jitter so a fleet
    /// does not reconnect in lockstep after a broker restart.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long [`crate::Device::connect`] waits for the first CONNACK.
    pub connect_timeout: Duration,
    /// Directory of the persistent state file (dedup ids, tags, shadow version). `None`: memory only.
    pub state_dir: Option<PathBuf>,
    /// How long a request id is remembered when its command has no expiry.
    pub dedup_ttl: Duration,
    /// Events waiting for the application past which a warning is logged (they are never dropped, and the
    /// connection never waits for the application).
    pub event_capacity: usize,
    /// The device's clock (replace it to simulate skew).
    pub clock: Clock,
}

impl DeviceConfig {
    pub fn new(
        product_id: impl Into<String>,
        device_id: impl Into<String>,
        secret: impl Into<String>,
        host: impl Into<String>,
        port: u16,
    ) -> Self {
        Self {
            product_id: product_id.into(),
            device_id: device_id.into(),
            secret: secret.into(),
            host: host.into(),
            port,
            tls: None,
            client_id_suffix: None,
            keep_alive: Duration::from_secs(60),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            state_dir: None,
            dedup_ttl: Duration::from_secs(24 * 3600),
            event_capacity: 1024,
            clock: Clock::system(),
        }
    }

    /// The broker username iothub expects: `{product_id}/{device_id}`.
    pub fn username(&self) -> String {
        format!("{}/{}", self.product_id, self.device_id)
    }

    pub fn client_id(&self) -> String {
        match &self.client_id_suffix {
            Some(suffix) => format!("{}/{suffix}", self.username()),
            None => self.username(),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        for (field, id) in [("product_id", &self.product_id), ("device_id", &self.device_id)] {
            iothub_protocol::ids::validate_id(id).map_err(|e| Error::Config(format!("{field}: {e}")))?;
        }
        if let Some(suffix) = &self.client_id_suffix {
            iothub_protocol::ids::validate_id(suffix).map_err(|e| Error::Config(format!("client_id_suffix: {e}")))?;
        }
        if self.secret.is_empty() {
            return Err(Error::Config("secret must not be empty".into()));
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return Err(Error::Config("reconnect_min must be > 0 and <= reconnect_max".into()));
        }
        if self.keep_alive < Duration::from_secs(1) {
            return Err(Error::Config("keep_alive must be at least 1 s".into()));
        }
        #[cfg(not(feature = "tls"))]
        if self.tls.is_some() {
            return Err(Error::Config("TLS needs the `tls` feature of iothub-device".into()));
        }
        Ok(())
    }
}

/// The rustls client configuration for `tls`, with the ring provider (explicitly: a process may link several).
#[cfg(feature = "tls")]
pub(crate) fn rustls_config(tls: &Tls) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: &dyn std::fmt::Display| Error::Config(format!("tls.{what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&tls.ca_pem) {
        roots.add(cert.map_err(|e| bad("ca_pem", &e))?).map_err(|e| bad("ca_pem", &e))?;
    }
    if roots.is_empty() {
        return Err(Error::Config("tls.ca_pem holds no PEM certificate".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", &e))?
        .with_root_certificates(roots);
    let config = match &tls.client_auth {
        Some((cert_pem, key_pem)) => {
            let certs = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad("client_auth certificate", &e))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad("client_auth key", &e))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| bad("client_auth", &e))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(std::sync::Arc::new(config))
}

/// Exponential backoff with full jitter: a random delay in `[min, min(max, min·2^attempt)]`.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, attempt: 0 }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        use rand::Rng;
        let ceiling = self.min.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        rand::thread_rng().gen_range(self.min..=ceiling.max(self.min))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..10 {
            let d = b.next_delay();
            let ceiling = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_secs(2));
            assert!(d >= Duration::from_millis(100) && d <= ceiling, "{attempt}: {d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn ids_are_checked() {
        let ok = DeviceConfig::new("p", "d", "s", "localhost", 1883);
        assert!(ok.validate().is_ok());
        assert_eq!((ok.username(), ok.client_id()), ("p/d".to_string(), "p/d".to_string()));
        let second = DeviceConfig { client_id_suffix: Some("backup".into()), ..ok.clone() };
        assert_eq!(second.client_id(), "p/d/backup");
        assert!(iothub_protocol::identity::check_identity(&second.username(), &second.client_id()).is_ok());
        let spaced = DeviceConfig { client_id_suffix: Some("a b".into()), ..ok.clone() };
        assert!(matches!(spaced.validate(), Err(Error::Config(m)) if m.starts_with("client_id_suffix")));
        let bad = DeviceConfig::new("p/x", "d", "s", "localhost", 1883);
        assert!(matches!(bad.validate(), Err(Error::Config(m)) if m.starts_with("product_id")));
    }
}

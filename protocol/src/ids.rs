//! Identifier rules for products and devices.
//!
//! Product and device ids become MQTT topic levels and the broker username `{product}/{device}`, so anything
//! that could inject topic structure (`/`, `+`, `#`, `$`, NUL, whitespace, non-ASCII) must never get in. This
//! module is the single place that decides what a valid id is; every entry point (REST, broker hooks, CLI)
//! parses through it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest id we accept. Keeps topics and usernames well under broker limits.
pub const MAX_ID_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_ID_LEN} characters")]
    TooLong,
    #[error("may only contain ASCII letters, digits, '_' and '-' (found {0:?})")]
    InvalidChar(char),
}

/// Checks the shared id alphabet `[A-Za-z0-9_-]{1,64}`.
pub fn validate_id(raw: &str) -> Result<(), IdError> {
    if raw.is_empty() {
        return Err(IdError::Empty);
    }
    if let Some(bad) = raw.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(IdError::InvalidChar(bad));
    }
    if raw.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    Ok(())
}

macro_rules! id_type {
    ($name:ident) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(raw: impl Into<String>) -> Result<Self, IdError> {
                let raw = raw.into();
                validate_id(&raw)?;
                Ok(Self(raw))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(raw: String) -> Result<Self, IdError> {
                Self::parse(raw)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(ProductId);
id_type!(DeviceId);

/// The broker username of a device: `{ProductId}/{DeviceId}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceRef {
    pub product: ProductId,
    pub device: DeviceId,
}

impl DeviceRef {
    pub fn new(product: ProductId, device: DeviceId) -> Self {
        Self { product, device }
    }

    pub fn broker_username(&self) -> String {
        format!("{}/{}", self.product, self.device)
    }

    /// Parses a broker username. Anything that is not exactly two valid ids joined by one `/` is `None`.
    pub fn from_broker_username(username: &str) -> Option<Self> {
        let (p, d) = username.split_once('/')?;
        Some(Self { product: ProductId::parse(p).ok()?, device: DeviceId::parse(d).ok()? })
    }
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.product, self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_topic_structure() {
        for bad in ["a/b", "a+", "#", "$sys", "a\0b", "é", "a b", ""] {
            assert!(validate_id(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(validate_id(&"a".repeat(64)).is_ok());
        assert_eq!(validate_id(&"a".repeat(65)), Err(IdError::TooLong));
    }

    proptest! {
        #[test]
        fn valid_ids_never_contain_topic_metacharacters(s in "\\PC{0,80}") {
            if validate_id(&s).is_ok() {
                prop_assert!(!s.contains(['/', '+', '#', '$', '\0']));
                prop_assert!(s.is_ascii() && !s.is_empty() && s.len() <= MAX_ID_LEN);
            }
        }

        #[test]
        fn broker_username_roundtrips(p in "[A-Za-z0-9_-]{1,64}", d in "[A-Za-z0-9_-]{1,64}") {
            let r = DeviceRef::new(ProductId::parse(p).unwrap(), DeviceId::parse(d).unwrap());
            prop_assert_eq!(DeviceRef::from_broker_username(&r.broker_username()), Some(r));
        }

        #[test]
        fn username_parser_never_panics(s in "\\PC{0,150}") {
            let _ = DeviceRef::from_broker_username(&s);
        }
    }
}

//! Generation and verification of every secret iothub issues: device secrets and business API keys.
//!
//! Device secrets are 192 random bits, so a fast salted hash is enough: brute force is hopeless at that
//! entropy, while a slow KDF would cap broker connect storms (every CONNECT is a verification). We use the
//! one scheme EMQX 5's built-in PostgreSQL authenticator can check itself, `sha256` with the salt as prefix:
//! `hex_lower(sha256(salt ++ secret))`, where `salt` is stored as a hex string and used as raw bytes. Plain
//! secrets exist only in the response that creates them and are never logged (their `Debug` is redacted).

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A secret in clear text, on its way to the one caller who may see it.
#[derive(Clone, serde::Serialize)]
#[serde(transparent)]
pub struct PlainSecret(String);

impl PlainSecret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PlainSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlainSecret(<redacted>)")
    }
}

/// What is stored for a device secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretHash {
    pub salt: String,
    pub hash: String,
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    buf
}

/// The EMQX `sha256` + `salt_position = prefix` hash.
pub fn emqx_sha256_prefix(salt: &str, secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(secret.as_bytes());
    hex::encode(h.finalize())
}

/// A fresh device secret and its stored form.
pub fn new_device_secret() -> (PlainSecret, SecretHash) {
    let secret = URL_SAFE_NO_PAD.encode(random_bytes::<24>());
    let salt = hex::encode(random_bytes::<16>());
    let hash = emqx_sha256_prefix(&salt, &secret);
    (PlainSecret(secret), SecretHash { salt, hash })
}

/// Constant-time check of a presented secret against a stored hash.
pub fn verify_device_secret(stored: &SecretHash, presented: &str) -> bool {
    let computed = emqx_sha256_prefix(&stored.salt, presented);
    computed.as_bytes().ct_eq(stored.hash.as_bytes()).into()
}

/// Prefix that makes API keys recognisable to secret scanners.
pub const API_KEY_PREFIX: &str = "ihk_";

/// A new API key: `ihk_{id}_{secret}`. The id locates the row; only sha256(secret) is stored.
pub fn new_api_key(id: &str) -> (PlainSecret, String) {
    let secret = URL_SAFE_NO_PAD.encode(random_bytes::<32>());
    let hash = sha256_hex(&secret);
    (PlainSecret(format!("{API_KEY_PREFIX}{id}_{secret}")), hash)
}

pub fn sha256_hex(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

/// Splits a presented API key into (id, secret). Ids are simple hex/alnum, secrets base64url.
pub fn parse_api_key(presented: &str) -> Option<(&str, &str)> {
    let rest = presented.strip_prefix(API_KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let ok = |s: &str| {
        !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (ok(id) && ok(secret) && !id.contains('_')).then_some((id, secret))
}

pub fn verify_api_key(stored_hash: &str, secret: &str) -> bool {
    sha256_hex(secret).as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

/// A random token for internal shared secrets (broker hook token, JWT signing key when none is configured).
pub fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

/// Writes a file readable by its owner only (0600, also when it already existed).
pub fn write_private(path: &std::path::Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = anyhow::Context::with_context(opts.open(path), || format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        // `mode` only applies to new files; an existing file is tightened too.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(content.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_emqx_check_vector() {
        // EMQX's published vector is sha256("secret" ++ "salt"); with salt first that is salt="secret".
        assert_eq!(
            emqx_sha256_prefix("secret", "salt"),
            "f84fa2149dbb62ed4e0cf1f550d2949b33a6513d3a7707e08502511c79ccb0ee"
        );
        assert_eq!(
            emqx_sha256_prefix("salt", "secret"),
            "bede90386d450cea8b77b822f8887065e4e5abf132c2f9dccfcc7fbd4cba5e35"
        );
    }

    #[test]
    fn device_secret_roundtrip() {
        let (plain, stored) = new_device_secret();
        assert!(plain.expose().len() >= 32, "at least 128 bits");
        assert!(verify_device_secret(&stored, plain.expose()));
        assert!(!verify_device_secret(&stored, "wrong"));
        assert_eq!(format!("{plain:?}"), "PlainSecret(<redacted>)");
    }

    #[test]
    fn api_key_roundtrip() {
        let (key, hash) = new_api_key("abc123");
        let (id, secret) = parse_api_key(key.expose()).unwrap();
        assert_eq!(id, "abc123");
        assert!(verify_api_key(&hash, secret));
        assert!(!verify_api_key(&hash, "nope"));
    }

    proptest! {
        #[test]
        fn api_key_parser_never_panics(s in "\\PC{0,200}") {
            let _ = parse_api_key(&s);
        }
    }
}

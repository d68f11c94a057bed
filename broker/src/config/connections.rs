//! The validated table of connections and API keys the broker serves. It is
//! immutable: a reload builds a new one and swaps it in whole.

use super::file::{FileConfig, FileConnection};
use anyhow::{bail, Context};
use gitproxy_shared::secret::{ct_eq, redact_url, sha256_hex};
use gitproxy_shared::upstream::{ProxySettings, Upstream, UpstreamConfig};
use gitproxy_shared::Secret;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// How a connection reaches GitLab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Through the customer's agent.
    Agent,
    /// The broker calls GitLab itself.
    Direct,
}

impl Mode {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Agent => "agent",
            Mode::Direct => "direct",
        }
    }
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// `[a-z0-9-]{1,63}`.
    pub id: String,
    /// Mode.
    pub mode: Mode,
    /// GitLab base URL.
    pub gitlab_url: Url,
    /// The URL GitLab writes into Link/Location headers, when different.
    pub external_url: Option<Url>,
    /// Token injected when the caller sends no credentials.
    pub token: Option<Secret>,
    /// SHA-256 (hex) of the accessKey.
    pub access_key_sha256: Option<String>,
    /// The GitLab client of a direct connection.
    pub upstream: Option<Upstream>,
}

/// Every connection and the API keys.
#[derive(Debug, Default, Clone)]
pub struct ConnectionSet {
    by_id: HashMap<String, Arc<Connection>>,
    api_keys_sha256: Vec<String>,
}

/// Whether `id` is a valid connection id.
pub fn valid_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn valid_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl ConnectionSet {
    /// Validates the file's connections. `base_dir` resolves relative `token_file`s.
    pub fn from_file(
        file: &FileConfig,
        base_dir: Option<&Path>,
        extra_ca_pem: &[u8],
    ) -> anyhow::Result<Self> {
        let mut set = ConnectionSet::default();
        for (i, k) in file.api_keys_sha256.iter().enumerate() {
            let k = k.trim().to_ascii_lowercase();
            if !valid_sha256_hex(&k) {
                bail!("api_keys_sha256[{i}] is not a hex SHA-256 (64 hex characters); gitproxy-broker keygen prints one");
            }
            set.api_keys_sha256.push(k);
        }
        for c in &file.connections {
            let conn = build(c, base_dir, extra_ca_pem)
                .with_context(|| format!("connection {:?}", c.id))?;
            if set.by_id.insert(conn.id.clone(), Arc::new(conn)).is_some() {
                bail!("connection id {:?} appears twice", c.id);
            }
        }
        Ok(set)
    }

    /// The connection with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Connection>> {
        self.by_id.get(id).cloned()
    }

    /// Every connection, sorted by id.
    pub fn all(&self) -> Vec<Arc<Connection>> {
        let mut v: Vec<_> = self.by_id.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The agent-mode connection whose accessKey this is. Every stored hash
    /// is compared in constant time, so timing tells nothing about keys.
    pub fn find_by_access_key(&self, key: &str) -> Option<Arc<Connection>> {
        let hash = sha256_hex(key.as_bytes());
        let mut found = None;
        for c in self.by_id.values() {
            if let Some(h) = &c.access_key_sha256 {
                if ct_eq(h.as_bytes(), hash.as_bytes()) && c.mode == Mode::Agent {
                    found = Some(c.clone());
                }
            }
        }
        found
    }

    /// True when no API key is configured (callers need none).
    pub fn api_keys_empty(&self) -> bool {
        self.api_keys_sha256.is_empty()
    }

    /// Checks a caller's `X-Gitproxy-Key`.
    pub fn api_key_ok(&self, presented: Option<&[u8]>) -> bool {
        if self.api_keys_sha256.is_empty() {
            return true;
        }
        let Some(p) = presented else { return false };
        let hash = sha256_hex(p);
        self.api_keys_sha256
            .iter()
            .fold(false, |ok, k| ok | ct_eq(k.as_bytes(), hash.as_bytes()))
    }
}

fn build(
    c: &FileConnection,
    base_dir: Option<&Path>,
    extra_ca_pem: &[u8],
) -> anyhow::Result<Connection> {
    if !valid_id(&c.id) {
        bail!("id must match [a-z0-9-]{{1,63}}");
    }
    let mode = match c.mode.as_str() {
        "agent" => Mode::Agent,
        "direct" => Mode::Direct,
        other => bail!("mode {other:?} must be \"agent\" or \"direct\""),
    };
    let gitlab_url = parse_url(&c.gitlab_url, "gitlab_url")?;
    let external_url = c
        .external_url
        .as_deref()
        .map(|u| parse_url(u, "external_url"))
        .transpose()?;
    let token = match (&c.token, &c.token_file) {
        (Some(_), Some(_)) => bail!("set token or token_file, not both"),
        (Some(t), None) => Some(t.clone()),
        (None, Some(f)) => {
            let path = match base_dir {
                Some(d) if f.is_relative() => d.join(f),
                _ => f.clone(),
            };
            let t = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read token_file {}", path.display()))?;
            Some(Secret::new(t.trim().to_string()))
        }
        (None, None) => None,
    };
    let access_key_sha256 = c
        .access_key_sha256
        .as_ref()
        .map(|h| h.trim().to_ascii_lowercase());
    if let Some(h) = &access_key_sha256 {
        if !valid_sha256_hex(h) {
            bail!("access_key_sha256 is not a hex SHA-256; gitproxy-broker keygen prints one");
        }
    }
    if mode == Mode::Agent && access_key_sha256.is_none() {
        bail!(
            "agent mode needs access_key_sha256 (gitproxy-broker keygen prints a key and its hash)"
        );
    }
    let upstream = match mode {
        Mode::Direct => Some(
            Upstream::new(UpstreamConfig {
                base_url: gitlab_url.clone(),
                extra_ca_pem: extra_ca_pem.to_vec(),
                proxy: ProxySettings::from_env(),
                connect_timeout: Duration::from_secs(10),
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        Mode::Agent => None,
    };
    Ok(Connection {
        id: c.id.clone(),
        mode,
        gitlab_url,
        external_url,
        token,
        access_key_sha256,
        upstream,
    })
}

fn parse_url(s: &str, what: &str) -> anyhow::Result<Url> {
    let u = Url::parse(s).map_err(|_| anyhow::anyhow!("{what} {} is not a URL", redact_url(s)))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        bail!(
            "{what} {} must be an http:// or https:// URL",
            redact_url(s)
        );
    }
    if !u.username().is_empty() || u.password().is_some() || u.query().is_some() {
        bail!("{what} must carry no credentials and no query");
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: &str, mode: &str, key: Option<&str>) -> FileConnection {
        FileConnection {
            id: id.into(),
            mode: mode.into(),
            gitlab_url: "https://gitlab.example".into(),
            external_url: None,
            token: None,
            token_file: None,
            access_key_sha256: key.map(|k| sha256_hex(k.as_bytes())),
        }
    }

    #[test]
    fn finds_agents_by_key_and_checks_api_keys() {
        let file = FileConfig {
            connections: vec![
                conn("acme", "agent", Some("k1")),
                conn("beta", "direct", None),
            ],
            api_keys_sha256: vec![sha256_hex(b"api")],
            ..FileConfig::default()
        };
        let set = ConnectionSet::from_file(&file, None, b"").unwrap();
        assert_eq!(set.find_by_access_key("k1").unwrap().id, "acme");
        assert!(set.find_by_access_key("k2").is_none());
        assert!(set.api_key_ok(Some(b"api")));
        assert!(!set.api_key_ok(Some(b"nope")));
        assert!(!set.api_key_ok(None));
    }

    #[test]
    fn rejects_bad_connections() {
        for c in [
            conn("Bad_Id", "agent", Some("k")),
            conn("a", "tunnel", Some("k")),
            conn("a", "agent", None),
        ] {
            let file = FileConfig {
                connections: vec![c],
                ..FileConfig::default()
            };
            assert!(ConnectionSet::from_file(&file, None, b"").is_err());
        }
        let file = FileConfig {
            connections: vec![conn("a", "direct", None), conn("a", "direct", None)],
            ..FileConfig::default()
        };
        assert!(ConnectionSet::from_file(&file, None, b"").is_err());
    }
}

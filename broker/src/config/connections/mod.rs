//! The validated table of connections and API keys the broker serves. It is
//! immutable: a reload builds a new one and swaps it in whole.

use super::file::{FileConfig, FileConnection};
use crate::store::StoredConnection;
use anyhow::{bail, Context};
use gitproxy_shared::gitlab_url::parse_gitlab_url;
use gitproxy_shared::policy::Policy;
use gitproxy_shared::secret::{ct_eq, sha256_hex};
use gitproxy_shared::upstream::{ProxySettings, Upstream, UpstreamConfig};
use gitproxy_shared::Secret;
use std::collections::{BTreeMap, HashMap};
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

/// Where a connection's settings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The config file only.
    File,
    /// The API only.
    Api,
    /// The config file, with fields overridden through the API.
    FileAndApi,
}

impl Source {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Api => "api",
            Source::FileAndApi => "file+api",
        }
    }
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// Where its settings come from.
    pub source: Source,
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
    /// Agent-mode connections by the hex SHA-256 of their accessKey, built
    /// once the set is complete: an agent's key is found in O(1), not by
    /// comparing it with every connection's (a replica holds thousands).
    by_key_sha256: HashMap<String, Arc<Connection>>,
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
    /// Validates the file's connections. `base_dir` resolves relative
    /// `token_file`s; `extra_ca_pem` and `policy` go to direct-mode clients.
    pub fn from_file(
        file: &FileConfig,
        base_dir: Option<&Path>,
        extra_ca_pem: &[u8],
        policy: &Policy,
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
            let conn = build(c, base_dir, extra_ca_pem, policy, Source::File)
                .with_context(|| format!("connection {:?}", c.id))?;
            if set.by_id.insert(conn.id.clone(), Arc::new(conn)).is_some() {
                bail!("connection id {:?} appears twice", c.id);
            }
        }
        set.check_unique_access_keys()?;
        set.index_access_keys();
        Ok(set)
    }

    /// One accessKey opens one connection: two connections with the same
    /// hash would let one tenant's agent receive another tenant's traffic
    /// and token.
    fn check_unique_access_keys(&self) -> anyhow::Result<()> {
        let mut owner: HashMap<&str, &str> = HashMap::new();
        let mut all: Vec<&Arc<Connection>> = self.by_id.values().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        for c in all {
            let Some(h) = c.access_key_sha256.as_deref() else {
                continue;
            };
            if let Some(first) = owner.insert(h, c.id.as_str()) {
                bail!(
                    "connections {first:?} and {:?} have the same access_key_sha256: every connection needs its own accessKey (gitproxy-broker keygen, or POST /v1/connections/{{id}}/access-key)",
                    c.id
                );
            }
        }
        Ok(())
    }

    /// Fills [`Self::by_key_sha256`] (after [`Self::check_unique_access_keys`]).
    fn index_access_keys(&mut self) {
        self.by_key_sha256 = self
            .by_id
            .values()
            .filter(|c| c.mode == Mode::Agent)
            .filter_map(|c| Some((c.access_key_sha256.clone()?, c.clone())))
            .collect();
    }

    /// The file's connections merged with the API store's: a field set
    /// through the API overrides the file's field of the same connection id,
    /// fields left out keep the file's values, ids only in the store are
    /// added, and a tombstone (`deleted`) hides the file's connection.
    /// Agent-mode connections made through the API may have no accessKey yet
    /// (no agent can connect until `POST .../access-key`).
    pub fn from_sources(
        file: &FileConfig,
        base_dir: Option<&Path>,
        api: &BTreeMap<String, StoredConnection>,
        extra_ca_pem: &[u8],
        policy: &Policy,
    ) -> anyhow::Result<Self> {
        let mut merged = FileConfig {
            api_keys_sha256: file.api_keys_sha256.clone(),
            ..FileConfig::default()
        };
        let mut sources = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for c in &file.connections {
            if !seen.insert(c.id.clone()) {
                bail!("connection id {:?} appears twice in the config file", c.id);
            }
            match api.get(&c.id) {
                Some(o) if o.deleted => {}
                Some(o) => {
                    merged.connections.push(overlay(c.clone(), o));
                    sources.push(Source::FileAndApi);
                }
                None => {
                    merged.connections.push(c.clone());
                    sources.push(Source::File);
                }
            }
        }
        for (id, o) in api {
            if o.deleted || seen.contains(id) {
                continue;
            }
            let (Some(mode), Some(gitlab_url)) = (&o.mode, &o.gitlab_url) else {
                bail!("connection {id:?} made through the API lacks mode or gitlab_url");
            };
            let base = FileConnection {
                id: id.clone(),
                mode: mode.clone(),
                gitlab_url: gitlab_url.clone(),
                external_url: None,
                token: None,
                token_file: None,
                access_key_sha256: None,
            };
            merged.connections.push(overlay(base, o));
            sources.push(Source::Api);
        }
        let mut set = ConnectionSet::from_file(
            &FileConfig {
                connections: Vec::new(),
                ..merged.clone()
            },
            base_dir,
            extra_ca_pem,
            policy,
        )?;
        for (c, source) in merged.connections.iter().zip(sources) {
            let conn = build(c, base_dir, extra_ca_pem, policy, source)
                .with_context(|| format!("connection {:?}", c.id))?;
            set.by_id.insert(conn.id.clone(), Arc::new(conn));
        }
        set.check_unique_access_keys()?;
        set.index_access_keys();
        Ok(set)
    }

    /// Paths of the `token_file`s the file's connections read (watched for
    /// changes along with the file).
    pub fn token_files(file: &FileConfig, base_dir: Option<&Path>) -> Vec<std::path::PathBuf> {
        file.connections
            .iter()
            .filter_map(|c| c.token_file.as_ref())
            .map(|f| match base_dir {
                Some(d) if f.is_relative() => d.join(f),
                _ => f.clone(),
            })
            .collect()
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

    /// The agent-mode connection whose accessKey this is, found by the key's
    /// SHA-256: a map lookup's timing can tell at most something about a
    /// digest, nothing about the key or another tenant's stored hash
    /// preimage; the final comparison is constant-time.
    pub fn find_by_access_key(&self, key: &str) -> Option<Arc<Connection>> {
        let hash = sha256_hex(key.as_bytes());
        let c = self.by_key_sha256.get(&hash)?;
        let h = c.access_key_sha256.as_deref()?;
        ct_eq(h.as_bytes(), hash.as_bytes()).then(|| c.clone())
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

/// The file's connection with the API's fields laid over it.
fn overlay(mut c: FileConnection, o: &StoredConnection) -> FileConnection {
    if let Some(m) = &o.mode {
        c.mode = m.clone();
    }
    if let Some(u) = &o.gitlab_url {
        c.gitlab_url = u.clone();
    }
    if let Some(u) = &o.external_url {
        c.external_url = (!u.is_empty()).then(|| u.clone());
    }
    if let Some(t) = &o.token {
        c.token = Some(t.clone());
        c.token_file = None;
    }
    if let Some(h) = &o.access_key_sha256 {
        c.access_key_sha256 = Some(h.clone());
    }
    c
}

/// Validates the fields of one connection as a PUT would set them, without
/// building anything (for early 400 answers).
pub fn validate_fields(
    mode: Option<&str>,
    gitlab_url: Option<&str>,
    external_url: Option<&str>,
) -> anyhow::Result<()> {
    if let Some(m) = mode {
        if m != "agent" && m != "direct" {
            bail!("mode {m:?} must be \"agent\" or \"direct\"");
        }
    }
    if let Some(u) = gitlab_url {
        parse_url(u, "gitlab_url")?;
    }
    if let Some(u) = external_url.filter(|u| !u.is_empty()) {
        parse_url(u, "external_url")?;
    }
    Ok(())
}

fn build(
    c: &FileConnection,
    base_dir: Option<&Path>,
    extra_ca_pem: &[u8],
    policy: &Policy,
    source: Source,
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
    if mode == Mode::Agent && access_key_sha256.is_none() && source == Source::File {
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
                policy: policy.clone(),
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        Mode::Agent => None,
    };
    Ok(Connection {
        source,
        id: c.id.clone(),
        mode,
        gitlab_url,
        external_url,
        token,
        access_key_sha256,
        upstream,
    })
}

/// Every GitLab URL (file and API, `gitlab_url` and `external_url`) goes
/// through the one validator of `gitproxy_shared::gitlab_url`.
fn parse_url(s: &str, what: &str) -> anyhow::Result<Url> {
    parse_gitlab_url(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

#[cfg(test)]
mod tests;

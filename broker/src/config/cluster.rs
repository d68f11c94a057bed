//! Settings of cluster mode (several broker replicas sharing Redis), read
//! from `--redis-url` and its companions. Without `--redis-url` there is no
//! cluster: one process, state in memory and `--data-dir`.

use anyhow::{bail, Context};
use gitproxy_shared::secret::redact_url;
use gitproxy_shared::Secret;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The shortest `--registry-ttl`: Redis expires keys with second
/// granularity, and a refresh every third of it must not fire more often
/// than once a second.
pub const MIN_REGISTRY_TTL: Duration = Duration::from_secs(3);

/// Length of the key that encrypts tokens at rest in Redis.
pub const STORE_KEY_BYTES: usize = 32;

/// The validated cluster settings.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// `redis://` or `rediss://` URL, without a password.
    pub redis_url: url::Url,
    /// Redis password (`GITPROXY_REDIS_PASSWORD_FILE`).
    pub redis_password: Option<Secret>,
    /// Where this replica listens for the other replicas.
    pub peer_listen: SocketAddr,
    /// The address (host:port) other replicas dial to reach this one.
    pub peer_advertise: String,
    /// The shared secret replicas prove to each other.
    pub peer_secret: Secret,
    /// The key encrypting GitLab tokens stored in Redis (32 bytes).
    pub store_key: Secret,
    /// This replica's name in the registry (unique per process start).
    pub replica_id: String,
    /// Whether front-door answers name the replica that served them
    /// (`X-Gitproxy-Replica`).
    pub replica_header: bool,
    /// Lifetime of this replica's registry key without a refresh.
    pub registry_ttl: Duration,
}

/// What the command line says about cluster mode.
#[derive(Debug, Clone, Default)]
pub struct ClusterArgs {
    /// `--redis-url`.
    pub redis_url: Option<String>,
    /// `GITPROXY_REDIS_PASSWORD_FILE`.
    pub redis_password_file: Option<PathBuf>,
    /// `--peer-listen`.
    pub peer_listen: Option<String>,
    /// `--peer-advertise`.
    pub peer_advertise: Option<String>,
    /// `GITPROXY_PEER_SECRET_FILE`.
    pub peer_secret_file: Option<PathBuf>,
    /// `GITPROXY_STORE_KEY_FILE`.
    pub store_key_file: Option<PathBuf>,
    /// `--replica-id`.
    pub replica_id: Option<String>,
    /// `--replica-header`.
    pub replica_header: bool,
    /// `--registry-ttl` (zero in `Default`: the default is clap's).
    pub registry_ttl: Duration,
}

fn read_secret_file(path: &Path, what: &str) -> anyhow::Result<String> {
    let v = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    let v = v.trim().to_string();
    if v.is_empty() {
        bail!("{what} {} is empty", path.display());
    }
    Ok(v)
}

/// The store key file holds 32 bytes as 64 hex characters or as base64.
fn parse_store_key(text: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine;
    let bytes = if text.len() == 2 * STORE_KEY_BYTES && text.bytes().all(|b| b.is_ascii_hexdigit())
    {
        hex::decode(text).ok()
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()
            .or_else(|| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(text)
                    .ok()
            })
    };
    match bytes {
        Some(b) if b.len() == STORE_KEY_BYTES => Ok(b),
        _ => bail!(
            "GITPROXY_STORE_KEY_FILE must hold {STORE_KEY_BYTES} random bytes as 64 hex characters or base64 (e.g. `head -c 32 /dev/urandom | base64`)"
        ),
    }
}

/// A default replica id: the host name (the pod name in Kubernetes) and a
/// random suffix, so a restarted process never inherits the registry
/// entries of its previous life.
fn default_replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "broker".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(48)
        .collect();
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

fn valid_replica_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl ClusterSettings {
    /// Validates the cluster flags; `None` when `--redis-url` is not set (and
    /// then no other cluster flag may be set either).
    pub fn load(a: ClusterArgs) -> anyhow::Result<Option<Self>> {
        let Some(raw) = a.redis_url.filter(|u| !u.trim().is_empty()) else {
            if a.peer_listen.is_some() || a.peer_advertise.is_some() {
                bail!("--peer-listen and --peer-advertise are for cluster mode: set --redis-url (GITPROXY_REDIS_URL) too");
            }
            return Ok(None);
        };
        let bad = || {
            anyhow::anyhow!(
                "--redis-url {} must be a redis:// or rediss:// URL (the password goes in GITPROXY_REDIS_PASSWORD_FILE)",
                redact_url(&raw)
            )
        };
        let mut redis_url = url::Url::parse(raw.trim()).map_err(|_| bad())?;
        if !matches!(redis_url.scheme(), "redis" | "rediss") || redis_url.host_str().is_none() {
            return Err(bad());
        }
        let file_password = a
            .redis_password_file
            .as_deref()
            .map(|p| read_secret_file(p, "GITPROXY_REDIS_PASSWORD_FILE"))
            .transpose()?;
        let url_password = redis_url.password().map(|p| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        });
        let redis_password = match (file_password, url_password) {
            (Some(_), Some(_)) => bail!(
                "the Redis password is both in --redis-url and in GITPROXY_REDIS_PASSWORD_FILE: keep it in the file only"
            ),
            (Some(p), None) | (None, Some(p)) => Some(Secret::new(p)),
            (None, None) => None,
        };
        // The URL is logged and shown: it never carries the password.
        let _ = redis_url.set_password(None);
        let peer_listen_raw = a
            .peer_listen
            .context("cluster mode needs --peer-listen (GITPROXY_PEER_LISTEN): where the other replicas reach this one, e.g. 0.0.0.0:8444")?;
        let peer_listen: SocketAddr = peer_listen_raw.parse().with_context(|| {
            format!("--peer-listen {peer_listen_raw:?} is not an address like 0.0.0.0:8444")
        })?;
        let peer_advertise = match a.peer_advertise.filter(|s| !s.trim().is_empty()) {
            Some(s) => s.trim().to_string(),
            None if !peer_listen.ip().is_unspecified() => peer_listen.to_string(),
            None => bail!(
                "--peer-listen {peer_listen} is a wildcard address: set --peer-advertise (GITPROXY_PEER_ADVERTISE) to the host:port other replicas dial (in Kubernetes, the pod IP)"
            ),
        };
        if peer_advertise.contains('/') || !peer_advertise.contains(':') {
            bail!("--peer-advertise {peer_advertise:?} must be host:port");
        }
        let peer_secret = a
            .peer_secret_file
            .as_deref()
            .map(|p| read_secret_file(p, "GITPROXY_PEER_SECRET_FILE"))
            .transpose()?
            .context("cluster mode needs GITPROXY_PEER_SECRET_FILE: the secret replicas prove to each other (the peer listener serves nobody else)")?;
        if peer_secret.len() < 16 {
            bail!("GITPROXY_PEER_SECRET_FILE must hold at least 16 characters (gitproxy-broker keygen prints a good one)");
        }
        let store_key = a
            .store_key_file
            .as_deref()
            .map(|p| read_secret_file(p, "GITPROXY_STORE_KEY_FILE"))
            .transpose()?
            .context("cluster mode needs GITPROXY_STORE_KEY_FILE: the key that encrypts GitLab tokens stored in Redis (`head -c 32 /dev/urandom | base64`)")?;
        let store_key = parse_store_key(&store_key)?;
        let replica_id = match a.replica_id.filter(|s| !s.is_empty()) {
            Some(id) if valid_replica_id(&id) => id,
            Some(_) => bail!("--replica-id must be 1 to 64 letters, digits, '-', '.' or '_'"),
            None => default_replica_id(),
        };
        if a.registry_ttl < MIN_REGISTRY_TTL || a.registry_ttl.subsec_nanos() != 0 {
            bail!(
                "--registry-ttl must be a whole number of seconds, at least {}s",
                MIN_REGISTRY_TTL.as_secs()
            );
        }
        Ok(Some(ClusterSettings {
            redis_url,
            redis_password,
            peer_listen,
            peer_advertise,
            peer_secret: Secret::new(peer_secret),
            store_key: Secret::new(hex::encode(store_key)),
            replica_id,
            replica_header: a.replica_header,
            registry_ttl: a.registry_ttl,
        }))
    }

    /// The store key's 32 bytes.
    pub fn store_key_bytes(&self) -> Vec<u8> {
        hex::decode(self.store_key.expose()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> ClusterArgs {
        std::fs::write(dir.join("peer"), "peer-secret-0123456789abcdef\n").unwrap();
        std::fs::write(dir.join("key"), hex::encode([7u8; 32])).unwrap();
        ClusterArgs {
            redis_url: Some("redis://127.0.0.1:6379/0".into()),
            peer_listen: Some("127.0.0.1:8444".into()),
            peer_secret_file: Some(dir.join("peer")),
            store_key_file: Some(dir.join("key")),
            registry_ttl: Duration::from_secs(30),
            ..ClusterArgs::default()
        }
    }

    #[test]
    fn off_without_redis_and_complete_with_it() {
        assert!(ClusterSettings::load(ClusterArgs::default())
            .unwrap()
            .is_none());
        let dir = tempfile::tempdir().unwrap();
        let s = ClusterSettings::load(files(dir.path())).unwrap().unwrap();
        assert_eq!(s.peer_advertise, "127.0.0.1:8444");
        assert_eq!(s.store_key_bytes(), vec![7u8; 32]);
        assert!(valid_replica_id(&s.replica_id), "{}", s.replica_id);
    }

    #[test]
    fn refuses_incomplete_or_leaky_settings() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = files(dir.path());
        a.redis_url = Some("redis://:hunter2-pass@127.0.0.1:6379".into());
        let s = ClusterSettings::load(a).unwrap().unwrap();
        assert!(!s.redis_url.as_str().contains("hunter2"));
        assert_eq!(s.redis_password.unwrap().expose(), "hunter2-pass");
        let mut a = files(dir.path());
        a.redis_url = Some("http://127.0.0.1:6379".into());
        assert!(ClusterSettings::load(a).is_err());
        let mut a = files(dir.path());
        a.peer_listen = Some("0.0.0.0:8444".into());
        assert!(ClusterSettings::load(a).is_err());
        let mut a = files(dir.path());
        a.peer_secret_file = None;
        assert!(ClusterSettings::load(a).is_err());
        let mut a = files(dir.path());
        std::fs::write(dir.path().join("short"), "abc").unwrap();
        a.store_key_file = Some(dir.path().join("short"));
        let e = ClusterSettings::load(a).unwrap_err().to_string();
        assert!(!e.contains("abc"), "{e}");
        let mut a = files(dir.path());
        a.registry_ttl = Duration::from_secs(2);
        assert!(ClusterSettings::load(a).is_err());
        let mut a = files(dir.path());
        a.registry_ttl = Duration::from_millis(3500);
        assert!(ClusterSettings::load(a).is_err());
        let mut a = files(dir.path());
        a.registry_ttl = Duration::from_secs(3);
        assert!(ClusterSettings::load(a).is_ok());
        assert!(ClusterSettings::load(ClusterArgs {
            peer_listen: Some("127.0.0.1:1".into()),
            ..ClusterArgs::default()
        })
        .is_err());
    }
}

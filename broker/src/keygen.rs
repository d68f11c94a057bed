//! Random keys (accessKeys, API keys) and the SHA-256 the broker stores.

use base64::Engine;
use rand::RngCore;

/// A fresh key (32 random bytes, URL-safe base64, `gpk_` prefix) and its hex SHA-256.
pub fn generate() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!(
        "gpk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = gitproxy_shared::secret::sha256_hex(key.as_bytes());
    (key, hash)
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_unique_and_hashed() {
        let (a, ha) = super::generate();
        let (b, _) = super::generate();
        assert_ne!(a, b);
        assert_eq!(ha.len(), 64);
        assert_eq!(ha, gitproxy_shared::secret::sha256_hex(a.as_bytes()));
    }
}

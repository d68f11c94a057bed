//! Tokens sealed for storage in Redis: ChaCha20-Poly1305 (`ring::aead`, the
//! crate rustls already brings) with the 32-byte key of
//! `GITPROXY_STORE_KEY_FILE`, a fresh random 96-bit nonce per value, and the
//! connection id as associated data, so a sealed token copied onto another
//! connection does not open.
//!
//! A sealed value is `v1:` followed by the standard base64 of
//! `nonce (12 bytes) || ciphertext || tag (16 bytes)`. Errors never carry
//! the value, sealed or not.

use base64::Engine;
use gitproxy_shared::Secret;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// Prefix of a sealed value (the format's version).
const PREFIX: &str = "v1:";
/// Domain of the associated data: a token of connection `id` is sealed with
/// `TOKEN_AAD || id`.
const TOKEN_AAD: &[u8] = b"gitproxy/store/token\0";
/// Domain of the key check value (see [`StoreKey::key_check`]).
const KEY_CHECK_AAD: &[u8] = b"gitproxy/store/key-check\0";
/// What the key check value seals.
const KEY_CHECK_PLAIN: &[u8] = b"gitproxy store key check";

/// Why a value could not be sealed or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The key file's content is not a 32-byte key.
    #[error("GITPROXY_STORE_KEY_FILE does not hold a 32-byte key")]
    BadKey,
    /// The value is not in the sealed format (truncated, not base64, an
    /// unknown version).
    #[error("not a sealed value")]
    Malformed,
    /// Authentication failed: another key, another connection id, or an
    /// altered value.
    #[error("does not decrypt")]
    Rejected,
    /// The system's random generator failed.
    #[error("the system random generator failed")]
    Random,
}

/// The store key, ready to seal and open.
pub struct StoreKey {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(***)")
    }
}

fn aad(domain: &[u8], id: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(domain.len() + id.len());
    v.extend_from_slice(domain);
    v.extend_from_slice(id.as_bytes());
    v
}

impl StoreKey {
    /// The key from its 32 bytes.
    pub fn new(bytes: &[u8]) -> Result<StoreKey, CryptoError> {
        if bytes.len() != CHACHA20_POLY1305.key_len() {
            return Err(CryptoError::BadKey);
        }
        let unbound =
            UnboundKey::new(&CHACHA20_POLY1305, bytes).map_err(|_| CryptoError::BadKey)?;
        Ok(StoreKey {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        })
    }

    fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<String, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let mut buf = Vec::with_capacity(NONCE_LEN + plain.len() + CHACHA20_POLY1305.tag_len());
        buf.extend_from_slice(&nonce);
        let mut in_out = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut in_out,
            )
            .map_err(|_| CryptoError::Random)?;
        buf.extend_from_slice(&in_out);
        Ok(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(buf)
        ))
    }

    fn open(&self, aad: &[u8], sealed: &str) -> Result<Vec<u8>, CryptoError> {
        let b64 = sealed.strip_prefix(PREFIX).ok_or(CryptoError::Malformed)?;
        let mut buf = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| CryptoError::Malformed)?;
        if buf.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return Err(CryptoError::Malformed);
        }
        let nonce = Nonce::try_assume_unique_for_key(&buf[..NONCE_LEN])
            .map_err(|_| CryptoError::Malformed)?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf[NONCE_LEN..])
            .map_err(|_| CryptoError::Rejected)?;
        Ok(plain.to_vec())
    }

    /// Seals the GitLab token of connection `id`.
    pub fn seal_token(&self, id: &str, token: &Secret) -> Result<String, CryptoError> {
        self.seal(&aad(TOKEN_AAD, id), token.expose().as_bytes())
    }

    /// Opens a token sealed for connection `id`.
    pub fn open_token(&self, id: &str, sealed: &str) -> Result<Secret, CryptoError> {
        let plain = self.open(&aad(TOKEN_AAD, id), sealed)?;
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| CryptoError::Malformed)
    }

    /// A sealed constant stored next to the tokens: a replica whose key
    /// cannot open it has another key than the one the store was written
    /// with, which is found before it reads (or writes) any token.
    pub fn key_check(&self) -> Result<String, CryptoError> {
        self.seal(KEY_CHECK_AAD, KEY_CHECK_PLAIN)
    }

    /// Whether `sealed` is a key check made with this key.
    pub fn verify_key_check(&self, sealed: &str) -> Result<(), CryptoError> {
        match self.open(KEY_CHECK_AAD, sealed)? {
            p if p == KEY_CHECK_PLAIN => Ok(()),
            _ => Err(CryptoError::Rejected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> StoreKey {
        StoreKey::new(&[b; 32]).unwrap()
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let k = key(1);
        let t = Secret::new("glpat-secret-token");
        let a = k.seal_token("acme", &t).unwrap();
        let b = k.seal_token("acme", &t).unwrap();
        assert_ne!(a, b, "a fresh nonce per value");
        assert!(a.starts_with(PREFIX));
        assert!(!a.contains("glpat"));
        assert_eq!(k.open_token("acme", &a).unwrap(), t);
        assert_eq!(k.open_token("acme", &b).unwrap(), t);
    }

    #[test]
    fn tampered_values_are_rejected() {
        let k = key(1);
        let sealed = k.seal_token("acme", &Secret::new("glpat-x")).unwrap();
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(&sealed[PREFIX.len()..])
            .unwrap();
        for i in 0..raw.len() {
            raw[i] ^= 0x01;
            let t = format!(
                "{PREFIX}{}",
                base64::engine::general_purpose::STANDARD.encode(&raw)
            );
            assert_eq!(
                k.open_token("acme", &t),
                Err(CryptoError::Rejected),
                "byte {i}"
            );
            raw[i] ^= 0x01;
        }
        let truncated = &sealed[..sealed.len() - 8];
        assert!(k.open_token("acme", truncated).is_err());
        assert_eq!(k.open_token("acme", "v1:"), Err(CryptoError::Malformed));
        assert_eq!(k.open_token("acme", "glpat-x"), Err(CryptoError::Malformed));
        assert_eq!(k.open_token("acme", "v1:!!!"), Err(CryptoError::Malformed));
    }

    #[test]
    fn wrong_key_and_wrong_connection_are_rejected() {
        let sealed = key(1).seal_token("acme", &Secret::new("glpat-x")).unwrap();
        assert_eq!(
            key(2).open_token("acme", &sealed),
            Err(CryptoError::Rejected)
        );
        assert_eq!(
            key(1).open_token("other", &sealed),
            Err(CryptoError::Rejected)
        );
        // Nor is a token a key check, or the other way round.
        assert_eq!(key(1).verify_key_check(&sealed), Err(CryptoError::Rejected));
        let check = key(1).key_check().unwrap();
        assert_eq!(key(1).verify_key_check(&check), Ok(()));
        assert_eq!(key(2).verify_key_check(&check), Err(CryptoError::Rejected));
        assert_eq!(key(1).open_token("", &check), Err(CryptoError::Rejected));
    }

    #[test]
    fn errors_never_show_the_value() {
        let sealed = key(1).seal_token("acme", &Secret::new("glpat-x")).unwrap();
        let e = key(2).open_token("acme", &sealed).unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(
            !text.contains("glpat") && !text.contains(&sealed[3..20]),
            "{text}"
        );
        assert!(StoreKey::new(&[0u8; 16]).is_err());
        assert!(!format!("{:?}", key(1)).contains('1'));
    }

    proptest! {
        #[test]
        fn prop_seal_open_round_trip(
            k in proptest::array::uniform32(any::<u8>()),
            id in "[a-z0-9-]{1,63}",
            token in "\\PC{0,200}",
        ) {
            let key = StoreKey::new(&k).unwrap();
            let sealed = key.seal_token(&id, &Secret::new(token.clone())).unwrap();
            prop_assert!(token.len() < 8 || !sealed.contains(&token));
            let opened = key.open_token(&id, &sealed).unwrap();
            prop_assert_eq!(opened.expose(), token.as_str());
            let other = format!("{id}x");
            prop_assert_eq!(key.open_token(&other, &sealed), Err(CryptoError::Rejected));
        }
    }
}

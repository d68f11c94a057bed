use super::*;

#[test]
fn acks_parse_strictly() {
    assert_eq!(
        Ack::parse(b"r1 42"),
        Some(Ack {
            replica: "r1".into(),
            version: 42
        })
    );
    assert_eq!(Ack::parse(b"r1"), None);
    assert_eq!(Ack::parse(b" 42"), None);
    assert_eq!(Ack::parse(b"r1 x"), None);
    assert_eq!(Ack::parse(&[0xff, b' ', b'1']), None);
    assert_eq!(Ack::parse(format!("{} 1", "r".repeat(65)).as_bytes()), None);
}

#[test]
fn sealed_connections_hold_no_token_in_clear() {
    let key = StoreKey::new(&[3u8; 32]).unwrap();
    // Made at run time: no token-shaped literal in the source.
    let token = format!("testpat-in-clear-{:016x}", rand::random::<u64>());
    let c = StoredConnection {
        mode: Some("direct".into()),
        gitlab_url: Some("https://gitlab.example".into()),
        token: Some(gitproxy_shared::Secret::new(&token)),
        ..Default::default()
    };
    let sealed = key.seal_token("acme", c.token.as_ref().unwrap()).unwrap();
    let s = SealedConnection {
        token_sealed: Some(sealed),
        ..Default::default()
    };
    let json = serde_json::to_string(&s).unwrap();
    assert!(!json.contains("testpat"), "{json}");
    let back: SealedConnection = serde_json::from_str(&json).unwrap();
    assert_eq!(
        key.open_token("acme", back.token_sealed.as_deref().unwrap())
            .unwrap()
            .expose(),
        token
    );
}

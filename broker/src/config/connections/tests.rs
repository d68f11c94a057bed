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
    let set = ConnectionSet::from_file(&file, None, b"", &Policy::default()).unwrap();
    assert_eq!(set.find_by_access_key("k1").unwrap().id, "acme");
    assert!(set.find_by_access_key("k2").is_none());
    assert!(set.api_key_ok(Some(b"api")));
    assert!(!set.api_key_ok(Some(b"nope")));
    assert!(!set.api_key_ok(None));
}

#[test]
fn finds_each_of_many_agents_by_key_and_no_direct_connection() {
    let mut connections: Vec<_> = (0..1000)
        .map(|i| conn(&format!("c{i}"), "agent", Some(&format!("key-{i}"))))
        .collect();
    connections.push(conn("direct-one", "direct", Some("direct-key")));
    let file = FileConfig {
        connections,
        ..FileConfig::default()
    };
    let set = ConnectionSet::from_file(&file, None, b"", &Policy::default()).unwrap();
    for i in [0, 1, 517, 999] {
        assert_eq!(
            set.find_by_access_key(&format!("key-{i}")).unwrap().id,
            format!("c{i}")
        );
    }
    assert!(set.find_by_access_key("direct-key").is_none());
    assert!(set.find_by_access_key("key-1000").is_none());
}

#[test]
fn refuses_a_shared_access_key() {
    let file = FileConfig {
        connections: vec![
            conn("acme", "agent", Some("same")),
            conn("beta", "agent", Some("same")),
        ],
        ..FileConfig::default()
    };
    let e = ConnectionSet::from_file(&file, None, b"", &Policy::default()).unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("same access_key_sha256"), "{text}");
    assert!(!text.contains(&sha256_hex(b"same")), "{text}");
    // The file's hash reused by an API-made connection: refused too.
    let file = FileConfig {
        connections: vec![conn("acme", "agent", Some("same"))],
        ..FileConfig::default()
    };
    let mut api = BTreeMap::new();
    api.insert(
        "beta".to_string(),
        StoredConnection {
            mode: Some("agent".into()),
            gitlab_url: Some("https://gitlab.example".into()),
            access_key_sha256: Some(sha256_hex(b"same")),
            ..StoredConnection::default()
        },
    );
    assert!(ConnectionSet::from_sources(&file, None, &api, b"", &Policy::default()).is_err());
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
        assert!(ConnectionSet::from_file(&file, None, b"", &Policy::default()).is_err());
    }
    let file = FileConfig {
        connections: vec![conn("a", "direct", None), conn("a", "direct", None)],
        ..FileConfig::default()
    };
    assert!(ConnectionSet::from_file(&file, None, b"", &Policy::default()).is_err());
}

/// GitLab URLs that would let a request escape the policy (or carry
/// secrets) are refused, naming the field, never echoing userinfo.
#[test]
fn refuses_hostile_gitlab_urls() {
    let bad = [
        "https://gitlab.example/#",
        "https://gitlab.example/base#x",
        "https://gitlab.example/?",
        "https://gitlab.example/?a=b",
        "https://user:s3cret@gitlab.example",
        "https://gitlab.example/a/../admin",
        "https://gitlab.example/a/%2e%2E/admin",
        "https://gitlab.example/./api",
        "https://gitlab.example\\admin",
        "https://gitlab.example/a b",
        "https://gitlab.example/a\tb",
        "http:///gitlab.example",
        "http:gitlab.example",
        "ftp://gitlab.example",
    ];
    for url in bad {
        let mut c = conn("a", "direct", None);
        c.gitlab_url = url.into();
        let file = FileConfig {
            connections: vec![c],
            ..FileConfig::default()
        };
        let e = format!(
            "{:#}",
            ConnectionSet::from_file(&file, None, b"", &Policy::default()).expect_err(url)
        );
        assert!(e.contains("gitlab_url"), "{url}: {e}");
        assert!(!e.contains("s3cret"), "{url}: {e}");
        let e = format!(
            "{:#}",
            validate_fields(None, Some(url), None).expect_err(url)
        );
        assert!(
            e.contains("gitlab_url") && !e.contains("s3cret"),
            "{url}: {e}"
        );
        let e = format!(
            "{:#}",
            validate_fields(None, None, Some(url)).expect_err(url)
        );
        assert!(
            e.contains("external_url") && !e.contains("s3cret"),
            "{url}: {e}"
        );
    }
    for url in [
        "https://gitlab.example",
        "https://gitlab.example/",
        "http://127.0.0.1:8080/gitlab",
        "https://[::1]:8443/gitlab/",
    ] {
        assert!(
            validate_fields(Some("direct"), Some(url), Some(url)).is_ok(),
            "{url}"
        );
    }
}

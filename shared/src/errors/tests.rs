use super::*;

#[test]
fn codes_round_trip_and_have_statuses() {
    for c in ErrorCode::ALL {
        assert_eq!(ErrorCode::parse(c.as_str()), c);
        assert!((400..600).contains(&c.http_status()));
    }
    assert_eq!(ErrorCode::parse("something-new"), ErrorCode::Internal);
}

#[test]
fn json_shape() {
    let e = GitproxyError::new(ErrorCode::AgentNotConnected, "no agent");
    let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
    assert_eq!(v["error"], "agent_not_connected");
    assert_eq!(v["message"], "no agent");
    assert!(v["hint"].as_str().unwrap().contains("gitproxy-agent"));
}

#[test]
fn unknown_ca_names_custom_ca_cert() {
    let err = std::io::Error::other(rustls::Error::InvalidCertificate(
        rustls::CertificateError::UnknownIssuer,
    ));
    let e = classify_upstream(
        &err,
        &Route {
            gitlab_host: "gitlab.corp".into(),
            proxy: None,
        },
    );
    assert_eq!(e.error, ErrorCode::UpstreamTls);
    assert!(e.message.contains("unknown authority"));
    assert!(e.hint.contains("customCaCert"));
}

#[test]
fn the_proxy_certificate_is_not_called_gitlab_s() {
    let route = Route {
        gitlab_host: "gitlab.corp".into(),
        proxy: Some("https://proxy.corp:3129".into()),
    };
    let unknown = ProxyTlsError(Box::new(std::io::Error::other(
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
    )));
    let e = classify_upstream(&unknown, &route);
    assert_eq!(e.error, ErrorCode::ProxyError);
    assert!(e.message.contains("unknown authority"), "{e}");
    assert!(e.message.contains("https://proxy.corp:3129"), "{e}");
    assert!(!e.message.contains("GitLab at"), "{e}");
    assert!(
        e.hint.contains("customCaCert") && e.hint.contains("proxy"),
        "{}",
        e.hint
    );
    let name = ProxyTlsError(Box::new(std::io::Error::other(
        rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName),
    )));
    let e = classify_upstream(&name, &route);
    assert_eq!(e.error, ErrorCode::ProxyError);
    assert!(e.hint.contains("proxy.httpsProxy"), "{}", e.hint);
    // Not TLS at all on the proxy's port.
    let garbage = ProxyTlsError(Box::new(std::io::Error::other(
        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
    )));
    let e = classify_upstream(&garbage, &route);
    assert_eq!(e.error, ErrorCode::ProxyError);
    assert!(e.hint.contains("TLS port"), "{}", e.hint);
}

#[test]
fn refused_tunnel_names_no_proxy() {
    let err = std::io::Error::other("unsuccessful tunnel");
    let route = Route {
        gitlab_host: "gitlab.corp:443".into(),
        proxy: Some("http://proxy:3128".into()),
    };
    let e = classify_upstream(&err, &route);
    assert_eq!(e.error, ErrorCode::ProxyError);
    assert!(e.hint.contains("proxy.noProxy") && e.hint.contains("gitlab.corp"));
}

#[test]
fn refused_connection_is_unreachable() {
    let err = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    let e = classify_upstream(
        &err,
        &Route {
            gitlab_host: "127.0.0.1:1".into(),
            proxy: None,
        },
    );
    assert_eq!(e.error, ErrorCode::UpstreamUnreachable);
}

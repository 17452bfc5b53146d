#!/usr/bin/env python3
"""Checks of deploy/kubernetes, run by deploy/test.

  manifests.py check           render every overlay (and the components) with `kubectl kustomize`,
                               validate the output against the Kubernetes schemas, check that its parts
                               fit together, then start the Herald binary with exactly the environment
                               and arguments each overlay gives its container and use it as a client
                               and a backend would.
  manifests.py pod-env         prints the single overlay's pod environment (KEY=VALUE lines).
  manifests.py service-links   the same start, with the variables Kubernetes injects for the rendered
                               Services as if enableServiceLinks were on (HERALD_SERVICE_HOST, …).

Environment: TEST_HERALD_BIN (the binary), DEPLOY_KUBECTL (kubectl with kustomize), DEPLOY_REDIS_SERVER.
Only loopback addresses are used; every process started here is stopped by its PID.
"""

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
HERALD = os.environ.get("TEST_HERALD_BIN", "target/debug/herald")
KUBECTL = os.environ.get("DEPLOY_KUBECTL", "kubectl")
REDIS_SERVER = os.environ.get("DEPLOY_REDIS_SERVER", "redis-server")
# What the redis overlay's Secret names as its engine before the test points it at its own Redis.
PLACEHOLDER_ENGINE = "redis+sentinel://:not-a-real-password@redis-sentinel:26379/mymaster"
# Kubernetes versions the rendered objects are validated against: the oldest with the preStop sleep
# action on by default, and the newest the installed schemas know.
VERSIONS = ["1.30.0", "1.37.0"]

failures = []
passed = []


def check(condition, what):
    print(f"  {'ok  ' if condition else 'FAIL'} {what}")
    (passed if condition else failures).append(what)
    return condition


# --- rendering -------------------------------------------------------------------------------------------


def prepare_tree(tmp):
    """A copy of deploy/kubernetes with keys.env written by make-keys, as a user does before applying,
    plus two overlays of the test's own that add the optional components."""
    tree = Path(tmp) / "kubernetes"
    shutil.copytree(KUSTOMIZE_DIR, tree, ignore=shutil.ignore_patterns("keys.env"))
    make_keys = tree / "make-keys"
    for overlay, extra in [("single", []), ("redis", ["--engine", PLACEHOLDER_ENGINE])]:
        keys = subprocess.run([str(make_keys), *extra], check=True, capture_output=True, text=True).stdout
        (tree / "overlays" / overlay / "keys.env").write_text(keys)
    variants = {
        "redis+monitoring": ("../overlays/redis", ["../components/monitoring"]),
        "single+prestop-exec": ("../overlays/single", ["../components/prestop-exec"]),
    }
    for name, (resource, components) in variants.items():
        d = tree / "variants" / name
        d.mkdir(parents=True)
        (d / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": ["../" + resource],
                    "components": ["../" + c for c in components],
                }
            )
        )
    return tree, {
        "single": tree / "overlays" / "single",
        "redis": tree / "overlays" / "redis",
        **{name: tree / "variants" / name for name in variants},
    }


def render(path):
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"kubectl kustomize {path} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind):
    found = by_kind(docs, kind)
    if len(found) != 1:
        raise SystemExit(f"expected one {kind}, found {len(found)}")
    return found[0]


# --- validation ------------------------------------------------------------------------------------------


def validate(name, docs, versions):
    import kubernetes_validate

    for version in versions:
        problems = []
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # no schema ships for CRDs: checked by check_monitoring
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except Exception as error:  # ValidationError and friends: report, do not stop
                problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {str(error).splitlines()[0]}")
        check(not problems, f"{name}: {len(docs)} objects valid against Kubernetes {version} (strict)")
        for problem in problems:
            print(f"       {problem}")


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_of(docs):
    deployment = one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def config_values(docs):
    """The environment a pod of this rendering gets from its ConfigMap and Secret (envFrom order)."""
    _, container = container_of(docs)
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == name]
            env.update(cm.get("data", {}))
        elif "secretRef" in source:
            name = source["secretRef"]["name"]
            (secret,) = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == name]
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
            env.update(secret.get("stringData", {}))
    return env


def check_structure(name, docs):
    deployment, container = container_of(docs)
    pod = deployment["spec"]["template"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    env = config_values(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    check(matches(deployment["spec"]["selector"]["matchLabels"], pod_labels), f"{name}: Deployment selects its pods")
    service = one(docs, "Service")
    check(matches(service["spec"]["selector"], pod_labels), f"{name}: Service selects the pods")
    check(all(p["targetPort"] in ports for p in service["spec"]["ports"]), f"{name}: Service targets a named port")
    pdb = one(docs, "PodDisruptionBudget")
    check(matches(pdb["spec"]["selector"]["matchLabels"], pod_labels), f"{name}: PodDisruptionBudget selects the pods")
    check(pdb["spec"].get("maxUnavailable") == 1, f"{name}: PodDisruptionBudget lets a drain take one pod")

    probes = {k: container.get(k, {}).get("httpGet", {}) for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    check(probes["livenessProbe"].get("path") == "/healthz", f"{name}: liveness is /healthz")
    check(probes["startupProbe"].get("path") == "/healthz", f"{name}: startup probe is /healthz")
    check(probes["readinessProbe"].get("path") == "/readyz", f"{name}: readiness is /readyz")
    check(all(p.get("port") in ports for p in probes.values()), f"{name}: probes use the container's named port")
    listen_port = int(env.get("HERALD_LISTEN", ":0").rsplit(":", 1)[1])
    check(listen_port == ports.get("http"), f"{name}: HERALD_LISTEN's port {listen_port} is the containerPort")

    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        pause = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop.get("exec", {}).get("command", [])
        pause = int(command[-1]) if command and command[0].endswith("sleep") else None
    check(pause is not None and pause > 0, f"{name}: preStop pauses ({pause} s) before SIGTERM")
    grace = int(env.get("HERALD_SHUTDOWN_GRACE_SECS", 10))
    drain = int(env.get("HERALD_DRAIN_WINDOW_MS", 3000)) / 1000
    total = pod.get("terminationGracePeriodSeconds", 30)
    check(
        total > (pause or 0) + grace + drain,
        f"{name}: terminationGracePeriodSeconds {total} > preStop {pause} + shutdown_grace_secs {grace}"
        f" + drain window {drain:g}",
    )

    check(pod.get("enableServiceLinks") is False, f"{name}: enableServiceLinks is off (no HERALD_<SERVICE>_* variables)")
    check(pod.get("automountServiceAccountToken") is False, f"{name}: no service account token mounted")
    sc = container.get("securityContext", {})
    check(
        sc.get("runAsNonRoot") is True or pod.get("securityContext", {}).get("runAsNonRoot") is True,
        f"{name}: runAsNonRoot",
    )
    check(sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: every capability dropped")
    check(sc.get("allowPrivilegeEscalation") is False, f"{name}: no privilege escalation")
    user = pod.get("securityContext", {}).get("runAsUser")
    dockerfile_user = re.search(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    check(dockerfile_user and user == int(dockerfile_user.group(1)), f"{name}: runAsUser {user} is the image's USER")
    resources = container.get("resources", {})
    check(
        resources.get("requests", {}).get("cpu") and resources.get("requests", {}).get("memory"),
        f"{name}: CPU and memory requested",
    )
    check(resources.get("limits", {}).get("memory"), f"{name}: memory limited")

    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    if name.startswith("single"):
        check(deployment["spec"].get("replicas") == 1, f"{name}: exactly one replica")
        check(deployment["spec"].get("strategy", {}).get("type") == "Recreate", f"{name}: Recreate (never two embedded engines)")
        check(not hpas, f"{name}: no autoscaler")
        check(env.get("HERALD_ENGINE") == "memory", f"{name}: embedded engine")
    else:
        check("replicas" not in deployment["spec"], f"{name}: replicas left to the autoscaler")
        check(len(hpas) == 1, f"{name}: one autoscaler")
        if hpas:
            target = hpas[0]["spec"]["scaleTargetRef"]
            check(
                target["kind"] == "Deployment" and target["name"] == deployment["metadata"]["name"],
                f"{name}: the autoscaler scales the Deployment",
            )
            check(hpas[0]["spec"]["minReplicas"] >= 2, f"{name}: at least two replicas")
        check(env.get("HERALD_ENGINE", "").startswith("redis"), f"{name}: Redis engine from the Secret")
    if "monitoring" in name:
        check_monitoring(name, docs, service)


def check_monitoring(name, docs, service):
    monitor = one(docs, "ServiceMonitor")
    check(matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]), f"{name}: ServiceMonitor selects the Service")
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    check(
        all(e.get("port") in service_ports and e.get("path") == "/metrics" for e in monitor["spec"]["endpoints"]),
        f"{name}: ServiceMonitor scrapes /metrics on a Service port",
    )
    rule = one(docs, "PrometheusRule")
    source = yaml.safe_load((ROOT / "ops" / "prometheus" / "herald-alerts.yml").read_text())
    check(rule["spec"]["groups"] == source["groups"], f"{name}: PrometheusRule = ops/prometheus/herald-alerts.yml")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    check(alerts and all(r.get("alert") and r.get("expr") for r in alerts), f"{name}: {len(alerts)} alerts with expressions")


# --- running Herald as the manifest does ---------------------------------------------------------------


def image_env():
    """ENV lines of the Dockerfile's last stage: the container starts with them, the manifest's env over."""
    stages = re.split(r"^FROM\s", (ROOT / "Dockerfile").read_text(), flags=re.M)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for key, value in re.findall(r"^ENV\s+(\w+)=(\S+)", stages[-1], re.M):
        env[key] = value
    return env


def pod_env(docs, pod_name):
    """The container's environment as the kubelet builds it: image ENV, then envFrom sources in order,
    then env entries (fieldRefs resolved for a pod of this name), then what every pod gets."""
    _, container = container_of(docs)
    env = image_env()
    env.update(config_values(docs))
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[entry["name"]] = pod_name
        else:
            raise SystemExit(f"the test cannot resolve env entry {entry}")
    env.update({
        "HOSTNAME": pod_name,
        # Always injected, even with enableServiceLinks off (the API server's Service).
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        "KUBERNETES_SERVICE_PORT_HTTPS": "443",
        "KUBERNETES_PORT": "tcp://10.0.0.1:443",
        "KUBERNETES_PORT_443_TCP": "tcp://10.0.0.1:443",
        "KUBERNETES_PORT_443_TCP_ADDR": "10.0.0.1",
        "KUBERNETES_PORT_443_TCP_PORT": "443",
        "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
    })
    return env


def service_link_env(docs):
    """What enableServiceLinks: true would add for each rendered Service (Kubernetes' docker-link style
    variables: upper case, '-' -> '_'), with made-up cluster IPs."""
    env = {}
    for index, service in enumerate(by_kind(docs, "Service")):
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        ip = f"10.0.0.{index + 10}"
        ports = service["spec"]["ports"]
        env[f"{prefix}_SERVICE_HOST"] = ip
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for p in ports:
            if p.get("name"):
                env[f"{prefix}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
            proto = p.get("protocol", "TCP")
            base = f"{prefix}_PORT_{p['port']}_{proto}"
            env[base] = f"{proto.lower()}://{ip}:{p['port']}"
            env[f"{base}_PROTO"] = proto.lower()
            env[f"{base}_PORT"] = str(p["port"])
            env[f"{base}_ADDR"] = ip
        env[f"{prefix}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"
    return env


def command_line(docs):
    """The container's argv with the image's ENTRYPOINT replaced by the binary under test."""
    _, container = container_of(docs)
    if "command" in container:
        raise SystemExit("the manifest overrides the image's command: the test knows only the entrypoint")
    return [HERALD, *container.get("args", [])]


class Processes:
    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.running = []

    def start(self, name, argv, env=None):
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=self.workdir)
        proc.name, proc.log = name, self.workdir / f"{name}.log"
        self.running.append(proc)
        return proc

    def stop_all(self):
        for proc in self.running:
            if proc.poll() is None:
                proc.kill()  # our own child, by PID
                proc.wait()
        self.running = []

    def log_tail(self, proc, lines=15):
        return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_herald(procs, name, argv, env, timeout=40):
    """Starts Herald and returns (proc, 'host:port') once it printed the address it bound."""
    proc = procs.start(name, argv, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break  # exited
        try:
            return proc, json.loads(line)["listening"]
        except (ValueError, KeyError):
            continue
    proc.wait(timeout=5) if proc.poll() is None else None
    return proc, None


def get(address, path, headers=None, timeout=5):
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def wait_ready(address, seconds=15):
    deadline = time.monotonic() + seconds
    status, body = None, ""
    while time.monotonic() < deadline:
        try:
            status, body = get(address, "/readyz")
            if status == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    return status, body


def hs256_token(secret, sub):
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": sub, "exp": int(time.time()) + 300}).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def api_secret(env):
    first = env["HERALD_API_KEYS"].split(",")[0]
    return first.split("=", 1)[1] if "=" in first else first


def deliver(name, subscriber, publisher, env, logs=None):
    """A browser subscribes to user:42 with a token signed by the Secret's HS256 key on `subscriber`; a
    backend publishes with the Secret's API key on `publisher`; the event must arrive."""
    token = hs256_token(env["HERALD_JWT_HS256_SECRET"], "42")
    host, port = subscriber.rsplit(":", 1)
    stream = http.client.HTTPConnection(host, int(port), timeout=10)
    stream.request("GET", "/v1/sse?channel=user:42", headers={"Authorization": f"Bearer {token}"})
    response = stream.getresponse()
    if not check(response.status == 200, f"{name}: SSE subscription with a client token ({response.status})"):
        return
    try:
        while b"herald.connected" not in response.fp.readline():
            pass
        nonce = os.urandom(8).hex()
        host, port = publisher.rsplit(":", 1)
        body = json.dumps(
            {"channel": "user:42", "event": "deploy.test", "data": {"nonce": nonce}, "idempotency_key": nonce}
        )
        # A 503 not_durable (the replica did not acknowledge within redis.replication_timeout_ms, which
        # a loaded CI machine can cause) is retried with the same idempotency key, as the docs tell
        # backends to.
        for _attempt in range(3):
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request(
                "POST",
                "/v1/publish",
                body=body,
                headers={"Authorization": f"Bearer {api_secret(env)}", "Content-Type": "application/json"},
            )
            answer = conn.getresponse()
            answer_body = answer.read().decode(errors="replace")
            conn.close()
            if not (answer.status == 503 and "not_durable" in answer_body):
                break
        if not check(answer.status == 200, f"{name}: publish with the Secret's API key ({answer.status} {answer_body[:300]})"):
            print(logs() if logs else "")
            return
        deadline = time.monotonic() + 10
        got = False
        while time.monotonic() < deadline and not got:
            got = nonce.encode() in response.fp.readline()
        where = "across nodes" if subscriber != publisher else "on the node"
        check(got, f"{name}: the publication reached the subscriber {where}")
    except (OSError, http.client.HTTPException) as error:
        check(False, f"{name}: delivery failed: {error}")
    finally:
        stream.close()


def open_stream(address, env):
    """An SSE client of user:42 (token from the Secret's HS256 key), read up to its herald.connected."""
    host, port = address.rsplit(":", 1)
    stream = http.client.HTTPConnection(host, int(port), timeout=15)
    token = hs256_token(env["HERALD_JWT_HS256_SECRET"], "42")
    stream.request("GET", "/v1/sse?channel=user:42", headers={"Authorization": f"Bearer {token}"})
    response = stream.getresponse()
    while response.status == 200 and b"herald.connected" not in response.fp.readline():
        pass
    return stream, response


def stop_gracefully(name, proc, address, docs):
    """SIGTERM as the kubelet sends it after preStop, with a client connected: the client must be told
    to reconnect (`: closed shutting_down`) within the drain window, and Herald must exit 0 within
    shutdown_grace_secs."""
    env = config_values(docs)
    grace = int(env.get("HERALD_SHUTDOWN_GRACE_SECS", 10))
    drain = int(env.get("HERALD_DRAIN_WINDOW_MS", 3000)) / 1000
    stream, response = open_stream(address, env)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    told, told_after = False, None
    try:
        while True:
            line = response.fp.readline()
            if not line:
                break
            if b"closed shutting_down" in line:
                told, told_after = True, time.monotonic() - started
    except (OSError, http.client.HTTPException):
        pass
    finally:
        stream.close()
    check(
        told and told_after <= drain + 1,
        f"{name}: on SIGTERM the connected client is told to reconnect"
        + (f" after {told_after:.1f} s (drain window {drain:g} s)" if told else ""),
    )
    try:
        code = proc.wait(timeout=grace + 5)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - started
    check(code == 0 and took <= grace + 1, f"{name}: then exits with status {code} after {took:.1f} s (grace {grace} s)")


def start_redis(procs, workdir):
    """A primary and one replica (the redis overlay acknowledges a publication once a replica has it),
    nothing on disk, on free loopback ports."""
    ports = []
    for role in ("primary", "replica"):
        port = free_port()
        data = Path(workdir) / f"redis-{role}"
        data.mkdir()
        argv = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(data), "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        if role == "replica":
            argv += ["--replicaof", "127.0.0.1", str(ports[0])]
        procs.start(f"redis-{role}", argv)
        ports.append(port)
    # The primary counts the replica for WAIT only once it is online on the primary's side (after its
    # first acknowledgement, up to a second after the replica itself says its link is up): wait until
    # a write on the primary is acknowledged by it.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", ports[0]), timeout=2) as s:
                s.sendall(b"SET herald-deploy-test 1\r\nWAIT 1 200\r\n")
                answer = b""
                while answer.count(b"\r\n") < 2:
                    answer += s.recv(4096)
                if answer.endswith(b":1\r\n"):
                    s.sendall(b"DEL herald-deploy-test\r\n")
                    s.recv(4096)
                    return ports[0]
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the test's Redis replica did not come online on its primary")


def run_overlay(name, docs, workdir, extra_env=None, nodes=1):
    """Starts `nodes` Herald processes with the overlay's environment and arguments. The only changes:
    HERALD_LISTEN on a free loopback port instead of 0.0.0.0:8080, and for Redis the test's own Redis
    instead of the Secret's URL. Returns the processes' addresses, or None."""
    procs = Processes(workdir)
    try:
        overrides = {"HERALD_LISTEN": "127.0.0.1:0"}
        if not name.startswith("single"):
            overrides["HERALD_ENGINE"] = f"redis://127.0.0.1:{start_redis(procs, workdir)}/0"
        addresses, env = [], {}
        for n in range(nodes):
            pod = f"herald-5d8f7c9b4-{'abcde'[n]}{n}x2q"
            env = {**pod_env(docs, pod), **(extra_env or {}), **overrides}
            proc, address = start_herald(procs, f"{name}-{pod}", command_line(docs), env)
            if not check(address is not None, f"{name}: {pod} starts with the manifest's environment and arguments"):
                print(f"       exit status {proc.poll()}; its log ends:\n" + procs.log_tail(proc))
                return None
            for path in ("/healthz", "/readyz"):
                status, body = get(address, path) if path == "/healthz" else wait_ready(address)
                check(status == 200, f"{name}: {pod} {path} answers {status} {body.strip()[:80]}")
            addresses.append((proc, address))
        if extra_env is None:
            deliver(name, addresses[0][1], addresses[-1][1], env, lambda: procs.log_tail(addresses[-1][0]))
            stop_gracefully(name, addresses[0][0], addresses[0][1], docs)
        return [a for _, a in addresses]
    finally:
        procs.stop_all()


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "check"
    if not Path(HERALD).is_file():
        raise SystemExit(f"no Herald binary at {HERALD} (set TEST_HERALD_BIN)")
    with tempfile.TemporaryDirectory(prefix="herald-deploy-") as tmp:
        _, paths = prepare_tree(tmp)
        rendered = {name: render(path) for name, path in paths.items()}
        if mode == "check":
            print("rendering and schemas")
            for name, docs in rendered.items():
                versions = ["1.29.0", *VERSIONS] if "prestop-exec" in name else VERSIONS
                validate(name, docs, versions)
            print("how the objects fit together")
            for name, docs in rendered.items():
                check_structure(name, docs)
            print("Herald started as the manifests start it")
            run_overlay("single", rendered["single"], tmp)
            run_overlay("redis", rendered["redis"], tmp, nodes=2)
        elif mode == "service-links":
            print("Herald with the variables of enableServiceLinks (Kubernetes' default)")
            for name in ("single", "redis"):
                links = service_link_env(rendered[name])
                print(f"  {name}: adding {' '.join(sorted(links))}")
                addresses = run_overlay(name, rendered[name], tmp, extra_env=links)
                if addresses is None:
                    print("       Herald refuses unknown HERALD_* variables; the pods set enableServiceLinks: false,"
                          " and Herald is to warn about such variables instead (see deploy/README.md)")
        elif mode == "pod-env":
            # The single overlay's pod environment without what the image sets itself, for podman.
            docs = rendered["single"]
            own = image_env()
            for key, value in sorted(pod_env(docs, "herald-5d8f7c9b4-a0x2q").items()):
                if own.get(key) != value:
                    print(f"{key}={value}")
            return 0
        else:
            raise SystemExit(f"unknown mode {mode}")
    print(f"{mode}: {len(passed)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

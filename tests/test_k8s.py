"""The Kubernetes manifests (deploy/k8s): kustomize renders them, the API's schemas accept them,
and they hold what a deployment needs: probes that work over mutual TLS, the TLS Secrets mounted
where the configs look, the GPU, the edge nodes, the metrics port and its scrape annotations.

kustomize is kubectl's (`kubectl kustomize`); kubernetes-validate (the dev extra) carries the
API schemas, offline.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2

from apdispatch.ap.config import load_config
from apdispatch.ap.server import AccessPoint
from apdispatch.cli import build_parser
from apdispatch.common.logs import make_logger
from apdispatch.tools.certs import make_certs

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SITE = "factory-1"
NAMESPACE = f"apdispatch-{SITE}"
# The oldest and the newest Kubernetes the validator knows of that we claim.
KUBE_VERSIONS = ("1.30.0", "1.37.0")
TLS_DIR = "/etc/apdispatch/tls"
PROBE = "/etc/apdispatch/probe/probe.py"
# What `apdispatch certs --hosts` gets for the overlay's namespace (deploy/k8s/README.md).
HOSTS = [
    "apdispatch-ap",
    f"apdispatch-ap.{NAMESPACE}.svc",
    f"*.apdispatch-edge.{NAMESPACE}.svc",
    f"*.apdispatch-cloud.{NAMESPACE}.svc",
]

Doc = dict[str, Any]


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is needed to render the manifests (`kubectl kustomize`)")
        pytest.skip("kubectl is not installed")
    return kubectl


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/k8s with the overlay's certificates made, as its README says."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("certs", "__pycache__"))
    make_certs(root / "overlays" / "edge-site" / "certs", HOSTS)
    return root


def _render(kubectl: str, path: Path) -> str:
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, Path]:
    """``kubectl kustomize`` of the base and of the overlay, each in a file."""
    kubectl = _kubectl()
    out = {}
    for name, path in (("base", tree / "base"), ("overlay", tree / "overlays" / "edge-site")):
        out[name] = tree / f"{name}.yaml"
        out[name].write_text(_render(kubectl, path))
    return out


def _docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(docs: list[Doc], kind: str, prefix: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, f"{kind} {prefix}: {len(found)} found"
    return found[0]


def _container(workload: Doc, name: str) -> Doc:
    spec = workload["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def _validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, "--no-warn", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


# -- rendering and the API's schemas ------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("which", ["base", "overlay"])
def test_every_rendered_document_passes_strict_validation(
    rendered: dict[str, Path], which: str, version: str
) -> None:
    docs = _docs(rendered[which])
    done = _validate(rendered[which], version)
    assert done.returncode == 0, done.stdout + done.stderr
    # One "passed" line per document: none was skipped as an unknown kind.
    assert done.stdout.count(" passed ") == len(docs), done.stdout


def test_strict_validation_refuses_a_misspelt_field(rendered: dict[str, Path], tmp_path: Path) -> None:
    docs = _docs(rendered["base"])
    ap = _one(docs, "Deployment", "apdispatch-ap")
    ap["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(ap))
    done = _validate(bad, KUBE_VERSIONS[0])
    assert done.returncode != 0 and "readinessProbes" in done.stdout + done.stderr


# -- the AP --------------------------------------------------------------------


def _config_toml(docs: list[Doc]) -> str:
    return str(_one(docs, "ConfigMap", "apdispatch-ap-config")["data"]["ap.toml"])


def _mounts(container: Doc) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def _volume(workload: Doc, name: str) -> Doc:
    return next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == name)


def test_the_ap_is_one_deployment_behind_its_service_with_metrics(rendered: dict[str, Path]) -> None:
    docs = _docs(rendered["base"])
    ap = _one(docs, "Deployment", "apdispatch-ap")
    assert ap["spec"]["replicas"] == 1  # the registry lives in the AP's memory
    container = _container(ap, "ap")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9100}
    annotations = ap["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    assert annotations["prometheus.io/path"] == "/metrics"

    args = build_parser().parse_args(container["command"][1:])
    assert args.command == "serve" and args.metrics_port == ports["metrics"]
    service = _one(docs, "Service", "apdispatch-ap")
    assert service["spec"]["selector"] == ap["spec"]["selector"]["matchLabels"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "grpc": (50051, "grpc"),
        "metrics": (9100, "metrics"),
    }


def test_the_ap_config_turns_mutual_tls_on_from_the_mounted_secret(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    docs = _docs(rendered["base"])
    ap = _one(docs, "Deployment", "apdispatch-ap")
    container = _container(ap, "ap")
    mounts = _mounts(container)
    config_path = container["command"][container["command"].index("--config") + 1]
    assert mounts[config_path] == "config"
    assert (
        _volume(ap, "config")["configMap"]["name"]
        == _one(docs, "ConfigMap", "apdispatch-ap-config")["metadata"]["name"]
    )
    assert mounts[TLS_DIR] == "tls"
    assert _volume(ap, "tls")["secret"]["secretName"] == "apdispatch-ap-tls"

    # The real config loader accepts the ConfigMap (no unknown key, every check passed).
    toml = tmp_path / "ap.toml"
    toml.write_text(_config_toml(docs))
    config = load_config(toml)
    assert (config.tls_cert, config.tls_key, config.tls_ca) == (
        f"{TLS_DIR}/tls.crt",
        f"{TLS_DIR}/tls.key",
        f"{TLS_DIR}/ca.crt",
    )
    assert config.listen.endswith(":50051")


def test_the_ap_probes_are_grpc_health_checks_over_mutual_tls(rendered: dict[str, Path]) -> None:
    docs = _docs(rendered["base"])
    ap = _one(docs, "Deployment", "apdispatch-ap")
    container = _container(ap, "ap")
    assert _mounts(container)[str(Path(PROBE).parent)] == "probe"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[kind]["exec"]["command"]
        assert command[:2] == ["python", PROBE], kind
        assert command[command.index("--address") + 1] == "localhost:50051"
    readiness = container["readinessProbe"]["exec"]["command"]
    assert readiness[readiness.index("--service") + 1] == "apdispatch.v1.Dispatcher"


# -- the workers ---------------------------------------------------------------


def _worker_argv(
    docs: list[Doc], workload: Doc, tmp_path: Path, pod_ip: str = "10.1.2.3", namespace: str = "ns"
) -> list[str]:
    """The worker's argv as bash makes it in the pod: its script run with the pod's environment
    and a stand-in `apdispatch` on PATH that writes what it was given."""
    container = _container(workload, "worker")
    assert container["command"] == ["/bin/bash", "-c"]
    env = {
        "PATH": f"{tmp_path}:/usr/bin:/bin",
        "POD_IP": pod_ip,
        "POD_NAME": "pod-x",
        "POD_NAMESPACE": namespace,
    }
    for source in container["envFrom"]:
        config_map = _one(docs, "ConfigMap", source["configMapRef"]["name"])
        env.update(config_map["data"])
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:  # the downward API: only these, filled above
            assert var["valueFrom"]["fieldRef"]["fieldPath"] in (
                "metadata.name",
                "metadata.namespace",
                "status.podIP",
            )
    stand_in = tmp_path / "apdispatch"
    out = tmp_path / "argv.json"
    stand_in.write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(out)!r}, 'w'))\n"
    )
    stand_in.chmod(0o755)
    done = subprocess.run(["/bin/bash", "-c", *container["args"]], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return list(json.loads(out.read_text()))


def _check_worker(docs: list[Doc], workload: Doc, kind: str, tmp_path: Path) -> Any:
    argv = _worker_argv(docs, workload, tmp_path)
    args = build_parser().parse_args(argv)  # every flag is one the CLI knows
    assert argv[:2] == ["worker", kind]
    # The AP through its Service, by the name in the AP's certificate.
    service = _one(docs, "Service", "apdispatch-ap")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert args.ap == f"{service['metadata']['name']}:{grpc_port}"
    # Advertised: the pod's DNS name under the worker's headless Service, matching a SAN wildcard.
    headless = _one(docs, "Service", workload["metadata"]["name"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert headless["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
    assert args.advertise == f"10-1-2-3.{headless['metadata']['name']}.ns.svc:8001"
    assert args.worker_id == "pod-x"
    # Mutual TLS from the mounted Secret.
    container = _container(workload, "worker")
    assert _mounts(container)[TLS_DIR] == "tls"
    # (The overlay's generated Secret adds a hash to the name.)
    assert _volume(workload, "tls")["secret"]["secretName"].startswith("apdispatch-worker-tls")
    assert (args.tls_cert, args.tls_key, args.tls_ca) == (
        f"{TLS_DIR}/tls.crt",
        f"{TLS_DIR}/tls.key",
        f"{TLS_DIR}/ca.crt",
    )
    # The zoo: built by an init container into the volume the worker reads.
    init = _container(workload, "models")
    assert init["command"][:3] == ["apdispatch", "models", "build"]
    out = Path(init["command"][init["command"].index("--out") + 1])
    # Below the volume, not its mount point: the build renames a sibling folder into --out.
    assert _mounts(init)[str(out.parent)] == "models"
    assert args.models == out and _mounts(container)[str(out.parent)] == "models"
    # Probes (OIP ServerReady over mutual TLS) and metrics.
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["python", PROBE] and "--oip" in command
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(args.metrics_port)
    return args


def test_edge_workers_are_a_daemonset_on_edge_nodes(rendered: dict[str, Path], tmp_path: Path) -> None:
    docs = _docs(rendered["base"])
    edge = _one(docs, "DaemonSet", "apdispatch-edge")
    assert edge["spec"]["template"]["spec"]["nodeSelector"] == {"node-role.kubernetes.io/edge": ""}
    args = _check_worker(docs, edge, "edge", tmp_path)
    assert args.cluster == "edge"
    assert _container(edge, "worker")["image"].startswith("apdispatch-edge:")


def test_the_cloud_worker_asks_for_a_gpu(rendered: dict[str, Path], tmp_path: Path) -> None:
    docs = _docs(rendered["base"])
    cloud = _one(docs, "Deployment", "apdispatch-cloud")
    container = _container(cloud, "worker")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = _check_worker(docs, cloud, "cloud", tmp_path)
    assert args.device == "cuda"
    assert container["image"].startswith("apdispatch-cloud:")


# -- the edge-site overlay -----------------------------------------------------


def test_the_overlay_places_one_site(rendered: dict[str, Path], tmp_path: Path) -> None:
    docs = _docs(rendered["overlay"])
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["apdispatch.io/site"] == SITE
    assert _one(docs, "Namespace", NAMESPACE)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    edge = _one(docs, "DaemonSet", "apdispatch-edge")
    assert edge["spec"]["template"]["spec"]["nodeSelector"] == {
        "node-role.kubernetes.io/edge": "",
        "apdispatch.io/site": SITE,
    }
    assert _check_worker(docs, edge, "edge", tmp_path).cluster == SITE
    assert _one(docs, "Deployment", "apdispatch-cloud")["spec"]["replicas"] == 2
    for workload in (edge, _one(docs, "Deployment", "apdispatch-ap")):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert container["image"].endswith(":0.1.0")


def test_the_overlay_generates_the_tls_secrets_the_pods_mount(rendered: dict[str, Path]) -> None:
    docs = _docs(rendered["overlay"])
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for workload, prefix in (
        (_one(docs, "Deployment", "apdispatch-ap"), "apdispatch-ap-tls-"),
        (_one(docs, "DaemonSet", "apdispatch-edge"), "apdispatch-worker-tls-"),
        (_one(docs, "Deployment", "apdispatch-cloud"), "apdispatch-worker-tls-"),
    ):
        name = _volume(workload, "tls")["secret"]["secretName"]
        # The hashed name of the generated Secret: new certificates roll the pods.
        assert name.startswith(prefix) and name in secrets
        assert secrets[name]["type"] == "kubernetes.io/tls"
        assert set(secrets[name]["data"]) == {"tls.crt", "tls.key", "ca.crt"}


# -- the probe, against real servers -----------------------------------------------


def _secret_dir(root: Path, paths: dict[str, Path], who: str) -> Path:
    """The files of a kubernetes.io/tls Secret with ca.crt, as mounted in a pod."""
    folder = root / who
    folder.mkdir()
    shutil.copy(paths[who], folder / "tls.crt")
    shutil.copy(paths[f"{who}-key"], folder / "tls.key")
    shutil.copy(paths["ca"], folder / "ca.crt")
    return folder


async def _ap_reaches(address: str, ap_tls: Path, name: str) -> bool:
    """Whether the AP's credentials (its certificate, the CA) accept the worker at ``address`` as
    ``name``: the check the AP makes when it dials the name a worker advertised."""
    credentials = grpc.ssl_channel_credentials(
        (ap_tls / "ca.crt").read_bytes(), (ap_tls / "tls.key").read_bytes(), (ap_tls / "tls.crt").read_bytes()
    )
    from apdispatch.common.protocol import oip_pb2, oip_pb2_grpc

    options = [("grpc.ssl_target_name_override", name)]
    async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
        stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            return bool((await stub.ServerReady(oip_pb2.ServerReadyRequest(), timeout=5)).ready)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return False


async def _probe(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(K8S / "base" / "probe.py"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


@pytest.fixture
async def site(
    tmp_path: Path, rendered: dict[str, Path]
) -> AsyncIterator[tuple[AccessPoint, dict[str, Path]]]:
    """The AP run from the rendered ConfigMap, its Secret's files where the pod would have them."""
    paths = make_certs(tmp_path / "certs", HOSTS)
    secrets = {who: _secret_dir(tmp_path, paths, who) for who in ("ap", "worker")}
    toml = tmp_path / "ap.toml"
    toml.write_text(_config_toml(_docs(rendered["base"])).replace(TLS_DIR, str(secrets["ap"])))
    ap = AccessPoint(load_config(toml, listen="127.0.0.1:0", log_level="warning"), make_logger("warning"))
    await ap.start()
    try:
        yield ap, secrets
    finally:
        await ap.stop(grace_s=0.1)


async def test_the_probe_passes_a_serving_ap_over_mutual_tls(
    site: tuple[AccessPoint, dict[str, Path]],
) -> None:
    ap, secrets = site
    port = ap.address.rsplit(":", 1)[1]
    address = f"localhost:{port}"  # as in the pod: a name in the AP's certificate
    for service in ("", "apdispatch.v1.Dispatcher"):
        code, out = await _probe("--address", address, "--tls-dir", str(secrets["ap"]), "--service", service)
        assert code == 0 and "SERVING" in out, out
    # Without the pod's certificate the AP does not answer: the probe fails, it does not pass.
    code, out = await _probe("--address", address, "--plaintext")
    assert code == 1, out
    code, out = await _probe("--address", address, "--tls-dir", str(secrets["ap"]), "--service", "no.Such")
    assert code == 1 and "NOT_FOUND" in out, out


async def test_the_probe_fails_a_draining_ap(site: tuple[AccessPoint, dict[str, Path]]) -> None:
    ap, secrets = site
    address = f"localhost:{ap.address.rsplit(':', 1)[1]}"
    await ap.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # a drain's first step
    code, out = await _probe("--address", address, "--tls-dir", str(secrets["ap"]))
    assert code == 1 and "NOT_SERVING" in out, out


async def test_a_worker_registers_over_mutual_tls_and_its_probe_passes(
    site: tuple[AccessPoint, dict[str, Path]], rendered: dict[str, Path], models_dir: Path, tmp_path: Path
) -> None:
    """A worker with the overlay's certificate: it registers, its probe passes, and the AP's
    mutual TLS accepts it under the name the pod advertises (and under no other worker's)."""
    from apdispatch.common.manifest import load_manifest
    from workers.config import WorkerConfig
    from workers.server import Worker

    ap, secrets = site
    worker_tls = secrets["worker"]
    variant = next(v for v in load_manifest(models_dir).variants if v.runtime == "onnx")
    worker = Worker(
        WorkerConfig(
            kind="edge",
            listen="127.0.0.1:0",
            models=models_dir,
            variants=(variant.name,),
            ap=f"localhost:{ap.address.rsplit(':', 1)[1]}",
            worker_id="edge-pod",
            tls_cert=str(worker_tls / "tls.crt"),
            tls_key=str(worker_tls / "tls.key"),
            tls_ca=str(worker_tls / "ca.crt"),
        ),
        make_logger("warning"),
    )
    await worker.start()
    try:
        assert worker.registrar is not None
        await asyncio.wait_for(worker.registrar.registered.wait(), 30)
        address = f"localhost:{worker.address.rsplit(':', 1)[1]}"
        code, out = await _probe("--address", address, "--tls-dir", str(worker_tls), "--oip")
        assert code == 0 and "ready=True" in out, out

        docs = _docs(rendered["overlay"])
        edge = _one(docs, "DaemonSet", "apdispatch-edge")
        advertised = (
            build_parser().parse_args(_worker_argv(docs, edge, tmp_path, namespace=NAMESPACE)).advertise
        )
        assert await _ap_reaches(worker.address, secrets["ap"], advertised.rsplit(":", 1)[0])
        other = advertised.replace("apdispatch-edge", "apdispatch-other")
        assert not await _ap_reaches(worker.address, secrets["ap"], other.rsplit(":", 1)[0])
    finally:
        await worker.stop(0.5)

"""``apdispatch compose``: a docker-compose file that runs a scenario's topology in containers.

One image per role (``docker/{ap,edge,cloud}.Dockerfile``); services:

- ``models``: one shot, builds the model zoo into the named volume ``models``;
- ``ap``: the access point (policy from ``$POLICY``), healthy once every
  worker of the scenario has registered;
- one service per worker, named by its worker id, started with the same
  flags as ``apdispatch demo`` starts it (``apdispatch.tools.topology``), serving on
  port 8001 of its container and announcing its service name to the AP;
- ``load``: ``apdispatch load`` with the scenario against ``ap:50051``,
  writing its report to ``./build/compose/load.json``.

The text is generated without a YAML library (an edge device's install has
none): structure in block style, every leaf written as JSON, which YAML reads
as is. ``--check`` compares the committed file with what would be written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from apdispatch.ap.config import APConfig
from apdispatch.common.manifest import MANIFEST_NAME, Manifest, load_manifest
from apdispatch.scenario import Scenario, ScenarioError, load_scenario
from apdispatch.tools.topology import CLOUD, EDGE, WorkerSpec, build_topology

AP_PORT = 50051
WORKER_PORT = 8001  # the Open Inference Protocol's usual gRPC port
PROMETHEUS_PORT = 9090
# /metrics of the AP and of every worker: the targets of deploy/prometheus/prometheus.yml.
METRICS_PORT = 9100
# The `models` volume's mount point, and the zoo in a folder below it: the zoo
# build swaps a finished folder into place, which a mount point cannot be.
MODELS_VOLUME = "/models"
MODELS_DIR = "/models/zoo"
CERTS_DIR = "/certs"
# The AP's own default, so that `docker compose up` behaves as `apdispatch serve`.
DEFAULT_POLICY = APConfig().policy
RESULTS_DIR = "build/compose"  # under the build context, like the demo's build/demo
DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# Mounted from the source tree: Prometheus's scrape configuration and Grafana's provisioning.
PROMETHEUS_CONFIG = "deploy/prometheus/prometheus.yml"
GRAFANA_PROVISIONING = "deploy/grafana/provisioning"
GRAFANA_DASHBOARDS = "deploy/grafana/dashboards"
# No Grafana package in Debian: the service takes the upstream image where a
# registry is reachable, and runs only with `--profile grafana`.
GRAFANA_IMAGE = "grafana/grafana-oss:11.3.0"

_DOCKERFILE = {
    "ap": "docker/ap.Dockerfile",
    EDGE: "docker/edge.Dockerfile",
    CLOUD: "docker/cloud.Dockerfile",
    "prometheus": "docker/prometheus.Dockerfile",
}
# Roles whose image installs torch: they take the CPU build's wheel source.
_TORCH_ROLES = ("ap", CLOUD)

# Each party's certificate from `apdispatch certs` (the `certs` service); mutual
# TLS: every caller shows one. Each worker has its own (worker-ID.pem), so
# that none can take over another's worker id.
_TLS = {
    "ap": ["--tls-cert", f"{CERTS_DIR}/ap.pem", "--tls-key", f"{CERTS_DIR}/ap-key.pem"],
    "load": ["--ca", f"{CERTS_DIR}/ca.pem", "--cert", f"{CERTS_DIR}/client.pem"],
}
_TLS["ap"] += ["--tls-ca", f"{CERTS_DIR}/ca.pem"]
_TLS["load"] += ["--key", f"{CERTS_DIR}/client-key.pem"]


def _worker_tls(worker_id: str) -> list[str]:
    cert = f"{CERTS_DIR}/worker-{worker_id}"
    return ["--tls-cert", f"{cert}.pem", "--tls-key", f"{cert}-key.pem", "--tls-ca", f"{CERTS_DIR}/ca.pem"]


def _build(role: str, context: str) -> dict[str, Any]:
    # Every service of a role names the same build and image tag: it is built
    # once, and `docker compose up` never tries to pull it. The host network
    # lets a build reach a wheel folder served on the host's loopback
    # (docker/build.sh serves the CPU torch wheel so).
    args = {"BASE_IMAGE": f"${{BASE_IMAGE:-{DEFAULT_BASE_IMAGE}}}"}
    if role in _TORCH_ROLES:
        # `-` rather than `:-`: an empty TORCH_INDEX_URL turns the index off.
        args["TORCH_INDEX_URL"] = f"${{TORCH_INDEX_URL-{CPU_TORCH_INDEX}}}"
        args["TORCH_FIND_LINKS"] = "${TORCH_FIND_LINKS:-}"
    return {
        "build": {"context": context, "dockerfile": _DOCKERFILE[role], "network": "host", "args": args},
        "image": f"apdispatch-{role}:latest",
    }


def _healthcheck(expected: int, tls: bool) -> dict[str, Any]:
    # Healthy once every worker of the scenario is registered, so that the
    # load starts against the whole topology.
    # An AP that is not up yet is unhealthy, not a traceback in the health log.
    if tls:
        # Listing workers is an operator's call under mutual TLS.
        channel = [
            "read = lambda name: open(f'" + CERTS_DIR + "/{name}.pem', 'rb').read()",
            "creds = grpc.ssl_channel_credentials(read('ca'), read('operator-key'), read('operator'))",
            f"channel = grpc.secure_channel('localhost:{AP_PORT}', creds)",
        ]
    else:
        channel = [f"channel = grpc.insecure_channel('localhost:{AP_PORT}')"]
    probe = "\n".join(
        [
            "import sys, grpc",
            "from apdispatch.common.protocol import dispatcher_pb2 as pb, dispatcher_pb2_grpc as rpc",
            *channel,
            "stub = rpc.RegistryStub(channel)",
            "try:",
            "    n = len(stub.ListWorkers(pb.ListWorkersRequest(), timeout=2).workers)",
            "except grpc.RpcError:",
            "    n = 0",
            f"sys.exit(0 if n >= {expected} else 1)",
        ]
    )
    return {
        "test": ["CMD", "python", "-c", probe],
        "interval": "2s",
        "timeout": "5s",
        "retries": 90,
        "start_period": "5s",
    }


def worker_command(spec: WorkerSpec, tls: bool) -> list[str]:
    return [
        "apdispatch",
        *spec.argv(
            listen=f"0.0.0.0:{WORKER_PORT}",
            models=MODELS_DIR,
            ap=f"ap:{AP_PORT}",
            advertise=f"{spec.worker_id}:{WORKER_PORT}",
            device="auto" if spec.kind == CLOUD else None,
        ),
        "--metrics-port",
        str(METRICS_PORT),
        *(_worker_tls(spec.worker_id) if tls else []),
    ]


def worker_service(spec: WorkerSpec, context: str) -> dict[str, Any]:
    return {
        **_build(spec.kind, context),
        "init": True,
        "command": worker_command(spec, tls=True),
        "volumes": [f"models:{MODELS_VOLUME}:ro", f"certs:{CERTS_DIR}:ro"],
        "depends_on": {
            "models": {"condition": "service_completed_successfully"},
            "certs": {"condition": "service_completed_successfully"},
            "ap": {"condition": "service_started"},
        },
        "labels": {
            "apdispatch.cluster": spec.cluster,
            "apdispatch.device": spec.device,
            "apdispatch.kind": spec.kind,
        },
    }


def ap_command(tls: bool) -> list[str]:
    return [
        "apdispatch",
        "serve",
        "--listen",
        f"0.0.0.0:{AP_PORT}",
        "--policy",
        f"${{POLICY:-{DEFAULT_POLICY}}}",
        "--metrics-port",
        str(METRICS_PORT),
        *(_TLS["ap"] if tls else []),
    ]


def load_command(scenario: Scenario, tls: bool) -> list[str]:
    return [
        "apdispatch",
        "load",
        "/scenario.toml",
        "--ap",
        f"ap:{AP_PORT}",
        "--models",
        MODELS_DIR,
        # The scenario compressed in time, load levels kept (`make compose-demo`).
        "--duration",
        f"${{DURATION_S:-{scenario.duration_s:g}}}",
        "--json",
        "/results/load.json",
        "--no-progress",
        *(_TLS["load"] if tls else []),
    ]


# Services that are not workers; a worker id may not take their names.
FIXED_SERVICES = ("models", "certs", "ap", "load", "prometheus", "grafana")


def compose_document(
    scenario: Scenario,
    scenario_path: str,
    context: str,
    manifest: Manifest | None = None,
) -> dict[str, Any]:
    """The compose file as a dict. Paths are relative to the compose file's folder."""
    specs = build_topology(scenario, manifest)
    for spec in specs:
        if spec.worker_id in FIXED_SERVICES:
            raise ScenarioError(f"worker id {spec.worker_id!r} clashes with a service name")
    workers = ",".join(s.worker_id for s in specs)
    services: dict[str, Any] = {
        "models": {
            **_build("ap", context),
            "command": ["apdispatch", "models", "build", "--out", MODELS_DIR],
            "volumes": [f"models:{MODELS_VOLUME}"],
        },
        "certs": {
            **_build("ap", context),
            # A development CA, the AP's certificate for the name `ap`, one per worker
            # for its service name.
            "command": ["apdispatch", "certs", "--out", CERTS_DIR, "--hosts", "ap", "--workers", workers],
            "volumes": [f"certs:{CERTS_DIR}"],
        },
        "ap": {
            **_build("ap", context),
            "init": True,
            "command": ap_command(tls=True),
            "ports": [f"${{AP_HOST_PORT:-{AP_PORT}}}:{AP_PORT}"],
            "volumes": [f"certs:{CERTS_DIR}:ro"],
            "depends_on": {"certs": {"condition": "service_completed_successfully"}},
            "healthcheck": _healthcheck(len(specs), tls=True),
        },
    }
    for spec in specs:
        services[spec.worker_id] = worker_service(spec, context)
    services["load"] = {
        **_build("ap", context),
        "init": True,
        "command": load_command(scenario, tls=True),
        "volumes": [
            f"models:{MODELS_VOLUME}:ro",
            f"certs:{CERTS_DIR}:ro",
            f"{scenario_path}:/scenario.toml:ro",
            f"{_join(context, RESULTS_DIR)}:/results",
        ],
        "depends_on": {"ap": {"condition": "service_healthy"}},
    }
    services["prometheus"] = {
        **_build("prometheus", context),
        "ports": [f"${{PROMETHEUS_HOST_PORT:-{PROMETHEUS_PORT}}}:{PROMETHEUS_PORT}"],
        "volumes": [f"{_join(context, PROMETHEUS_CONFIG)}:/etc/prometheus/prometheus.yml:ro"],
        "depends_on": {"ap": {"condition": "service_started"}},
    }
    services["grafana"] = {
        "image": GRAFANA_IMAGE,
        "profiles": ["grafana"],
        "ports": ["${GRAFANA_HOST_PORT:-3000}:3000"],
        "volumes": [
            f"{_join(context, GRAFANA_PROVISIONING)}:/etc/grafana/provisioning:ro",
            f"{_join(context, GRAFANA_DASHBOARDS)}:/var/lib/grafana/dashboards:ro",
        ],
        "depends_on": {"prometheus": {"condition": "service_started"}},
    }
    return {
        "services": services,
        "volumes": {"models": {}, "certs": {}},
    }


def plaintext_document(scenario: Scenario, manifest: Manifest | None = None) -> dict[str, Any]:
    """The override that turns TLS off: the same commands without their TLS flags."""
    specs = build_topology(scenario, manifest)
    services: dict[str, Any] = {
        "ap": {"command": ap_command(tls=False), "healthcheck": _healthcheck(len(specs), tls=False)},
    }
    for spec in specs:
        services[spec.worker_id] = {"command": worker_command(spec, tls=False)}
    services["load"] = {"command": load_command(scenario, tls=False)}
    return {"services": services}


def _dot(path: str) -> str:
    """A relative path spelled as compose wants a bind mount's source (``./`` in front)."""
    path = os.path.normpath(path)
    return path if path.startswith((".", "/")) else f"./{path}"


def _join(base: str, path: str) -> str:
    return _dot(os.path.join(base, path))


def _emit(value: Any, indent: int) -> Iterator[str]:
    """Block-style YAML for mappings; JSON (valid YAML) for lists and scalars."""
    pad = "  " * indent
    for key, item in value.items():
        if isinstance(item, dict) and item:
            yield f"{pad}{key}:"
            yield from _emit(item, indent + 1)
        else:
            yield f"{pad}{key}: {json.dumps(item)}"


def plaintext_path(out: Path) -> Path:
    """The plaintext override written beside ``out``: docker-compose.plaintext.yml."""
    return out.with_name(f"{out.stem}.plaintext{out.suffix}")


def render(
    scenario: Scenario,
    scenario_path: str,
    context: str = ".",
    manifest: Manifest | None = None,
    source: str | None = None,
    override: str = "docker-compose.plaintext.yml",
) -> str:
    """The file's text; ``source`` is the scenario as named in the header's command."""
    doc = compose_document(scenario, scenario_path, context, manifest)
    workers = [s for s in doc["services"] if s not in FIXED_SERVICES]
    header = [
        f"# Generated by `apdispatch compose {source or scenario_path}`: edit the scenario, not this file.",
        f"# Scenario {scenario.name!r}: workers {', '.join(workers)}.",
        "# `docker-compose up` makes certificates, builds the zoo, starts the AP, the workers and",
        "# Prometheus, then runs the scenario's load once (in $DURATION_S seconds if set); the",
        f"# report lands in {_join(context, RESULTS_DIR)}/load.json. `make compose-demo` does it per policy.",
        f"# The AP's policy is $POLICY (default {DEFAULT_POLICY}), e.g. `POLICY=p2c docker-compose up`.",
        "# Mutual TLS between every container (the `certs` service); plaintext for development:",
        f"# `docker-compose -f {Path(override).with_name('docker-compose.yml').name} -f {override} up`.",
        "# Grafana (upstream image, provisioned from deploy/grafana) runs with `--profile grafana`.",
        "# Slow devices and far clusters are emulated (--slowdown, --link-delay-ms), as in",
        "# `apdispatch demo`.",
    ]
    return "\n".join([*header, *_emit(doc, 0)]) + "\n"


def render_plaintext(scenario: Scenario, manifest: Manifest | None = None, source: str = "") -> str:
    header = [
        f"# Generated by `apdispatch compose {source}`: edit the scenario, not this file.",
        "# Development override: the same services in plaintext, no TLS flags (the certificates",
        "# are still made, and unused).",
    ]
    return "\n".join([*header, *_emit(plaintext_document(scenario, manifest), 0)]) + "\n"


def _manifest_if_built() -> Manifest | None:
    """The local model manifest, used only to validate variant names."""
    root = Path(os.environ.get("APDISPATCH_MODELS", "build/models"))
    if (root / MANIFEST_NAME).is_file():
        return load_manifest(root)
    return None


def _repo_root() -> Path:
    """The build context: the source tree this package runs from, else the working folder."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else Path.cwd().resolve()


def main(args: argparse.Namespace) -> int:
    """Write ``--out`` and its plaintext override beside it; ``--check`` compares instead."""
    out: Path = args.out
    override = plaintext_path(out)
    try:
        scenario = load_scenario(args.scenario)
        # Paths in the file are relative to its folder, as compose reads them.
        # The header names the scenario relative to the source tree, so that
        # the text does not depend on the folder the command ran from.
        base = out.resolve().parent
        root = _repo_root()
        source = Path(args.scenario).resolve()
        scenario_path = _dot(os.path.relpath(source, base))
        context = os.path.relpath(root, base)
        shown = os.path.relpath(source, root)
        manifest = _manifest_if_built()
        texts = {
            out: render(scenario, scenario_path, context, manifest, shown, override.name),
            override: render_plaintext(scenario, manifest, shown),
        }
    except (OSError, ScenarioError) as exc:
        print(f"apdispatch compose: {exc}", file=sys.stderr)
        return 2
    if args.check:
        stale = [
            path for path, text in texts.items() if (path.read_text() if path.is_file() else None) != text
        ]
        for path in stale:
            print(
                f"apdispatch compose: {path} is out of date with {args.scenario}; "
                f"run `apdispatch compose {args.scenario} --out {out}`",
                file=sys.stderr,
            )
        if stale:
            return 1
        print(f"{out} and {override.name} are up to date")
        return 0
    for path, text in texts.items():
        path.write_text(text)
        print(f"wrote {path} ({len(text.splitlines())} lines)")
    return 0


def demo_table(reports: dict[str, dict[str, Any]]) -> str:
    """`make demo`'s table (and its lines against the best static policy) for load
    reports by policy: what `make compose-demo` prints after its runs."""
    from apdispatch.tools.demo import against_best_static, format_table, summary_row

    rows = [summary_row(policy, report) for policy, report in reports.items()]
    return "\n".join([format_table(rows), *against_best_static(rows)])


if __name__ == "__main__":
    # python -m apdispatch.tools.compose POLICY=REPORT.json ...: the table of those runs.
    pairs = [arg.split("=", 1) for arg in sys.argv[1:]]
    print(demo_table({policy: json.loads(Path(path).read_text()) for policy, path in pairs}))

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
MODELS_DIR = "/models"
# The AP's own default, so that `docker compose up` behaves as `apdispatch serve`.
DEFAULT_POLICY = APConfig().policy
RESULTS_DIR = "build/compose"  # under the build context, like the demo's build/demo

_DOCKERFILE = {"ap": "docker/ap.Dockerfile", EDGE: "docker/edge.Dockerfile", CLOUD: "docker/cloud.Dockerfile"}


def _build(role: str, context: str) -> dict[str, Any]:
    # Every service of a role names the same build and image tag: BuildKit
    # builds it once, and `docker compose up` never tries to pull it.
    return {
        "build": {"context": context, "dockerfile": _DOCKERFILE[role]},
        "image": f"apdispatch-{role}:latest",
    }


def _healthcheck(expected: int) -> dict[str, Any]:
    # Healthy once every worker of the scenario is registered, so that the
    # load starts against the whole topology.
    # An AP that is not up yet is unhealthy, not a traceback in the health log.
    probe = "\n".join(
        [
            "import sys, grpc",
            "from apdispatch.common.protocol import dispatcher_pb2 as pb, dispatcher_pb2_grpc as rpc",
            f"stub = rpc.RegistryStub(grpc.insecure_channel('localhost:{AP_PORT}'))",
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
        "retries": 60,
        "start_period": "5s",
    }


def worker_service(spec: WorkerSpec, context: str) -> dict[str, Any]:
    command = [
        "apdispatch",
        *spec.argv(
            listen=f"0.0.0.0:{WORKER_PORT}",
            models=MODELS_DIR,
            ap=f"ap:{AP_PORT}",
            advertise=f"{spec.worker_id}:{WORKER_PORT}",
            device="auto" if spec.kind == CLOUD else None,
        ),
    ]
    return {
        **_build(spec.kind, context),
        "init": True,
        "command": command,
        "volumes": [f"models:{MODELS_DIR}:ro"],
        "depends_on": {
            "models": {"condition": "service_completed_successfully"},
            "ap": {"condition": "service_started"},
        },
        "labels": {
            "apdispatch.cluster": spec.cluster,
            "apdispatch.device": spec.device,
            "apdispatch.kind": spec.kind,
        },
    }


def compose_document(
    scenario: Scenario,
    scenario_path: str,
    context: str,
    manifest: Manifest | None = None,
) -> dict[str, Any]:
    """The compose file as a dict. Paths are relative to the compose file's folder."""
    specs = build_topology(scenario, manifest)
    services: dict[str, Any] = {
        "models": {
            **_build("ap", context),
            "command": ["apdispatch", "models", "build", "--out", MODELS_DIR],
            "volumes": [f"models:{MODELS_DIR}"],
        },
        "ap": {
            **_build("ap", context),
            "init": True,
            "command": [
                "apdispatch",
                "serve",
                "--listen",
                f"0.0.0.0:{AP_PORT}",
                "--policy",
                f"${{POLICY:-{DEFAULT_POLICY}}}",
            ],
            "ports": [f"{AP_PORT}:{AP_PORT}"],
            "healthcheck": _healthcheck(len(specs)),
        },
    }
    for spec in specs:
        if spec.worker_id in services or spec.worker_id == "load":
            raise ScenarioError(f"worker id {spec.worker_id!r} clashes with a service name")
        services[spec.worker_id] = worker_service(spec, context)
    services["load"] = {
        **_build("ap", context),
        "init": True,
        "command": [
            "apdispatch",
            "load",
            "/scenario.toml",
            "--ap",
            f"ap:{AP_PORT}",
            "--models",
            MODELS_DIR,
            "--json",
            "/results/load.json",
            "--no-progress",
        ],
        "volumes": [
            f"models:{MODELS_DIR}:ro",
            f"{scenario_path}:/scenario.toml:ro",
            f"{_join(context, RESULTS_DIR)}:/results",
        ],
        "depends_on": {"ap": {"condition": "service_healthy"}},
    }
    return {
        "name": f"apdispatch-{scenario.name}",
        "services": services,
        "volumes": {"models": {}},
    }


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


def render(
    scenario: Scenario,
    scenario_path: str,
    context: str = ".",
    manifest: Manifest | None = None,
    source: str | None = None,
) -> str:
    """The file's text; ``source`` is the scenario as named in the header's command."""
    doc = compose_document(scenario, scenario_path, context, manifest)
    workers = [s for s in doc["services"] if s not in ("models", "ap", "load")]
    header = [
        f"# Generated by `apdispatch compose {source or scenario_path}`: edit the scenario, not this file.",
        f"# Scenario {scenario.name!r}: workers {', '.join(workers)}.",
        "# `docker compose up` builds the zoo, starts the AP and the workers, then runs the",
        f"# scenario's load once; the report lands in {_join(context, RESULTS_DIR)}/load.json.",
        f"# The AP's policy is $POLICY (default {DEFAULT_POLICY}), e.g. `POLICY=p2c docker compose up`.",
        "# Slow devices and far clusters are emulated (--slowdown, --link-delay-ms), as in",
        "# `apdispatch demo`.",
    ]
    return "\n".join([*header, *_emit(doc, 0)]) + "\n"


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
    out: Path = args.out
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
        text = render(scenario, scenario_path, context, _manifest_if_built(), shown)
    except (OSError, ScenarioError) as exc:
        print(f"apdispatch compose: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = out.read_text() if out.is_file() else None
        if current != text:
            print(
                f"apdispatch compose: {out} is out of date with {args.scenario}; "
                f"run `apdispatch compose {args.scenario} --out {out}`",
                file=sys.stderr,
            )
            return 1
        print(f"{out} is up to date")
        return 0
    out.write_text(text)
    print(f"wrote {out} ({len(text.splitlines())} lines)")
    return 0

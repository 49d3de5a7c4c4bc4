"""The committed docker-compose.yml: up to date, well formed, same topology as the demo."""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from apdispatch.cli import build_parser
from apdispatch.scenario import load_scenario
from apdispatch.tools import compose
from apdispatch.tools.topology import CLOUD, build_topology

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "scenarios" / "small-edge-cloud.toml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILES = {role: ROOT / "docker" / f"{role}.Dockerfile" for role in ("ap", "edge", "cloud")}


def _args(out: Path, check: bool) -> argparse.Namespace:
    return argparse.Namespace(scenario=SHIPPED, out=out, check=check)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def _expand(word: str) -> str:
    """Compose's ``${VAR:-default}``, with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", word)


def test_committed_file_is_up_to_date() -> None:
    assert compose.main(_args(COMPOSE_FILE, check=True)) == 0, (
        "run: apdispatch compose scenarios/small-edge-cloud.toml --out docker-compose.yml"
    )


def test_check_catches_drift(tmp_path: Path) -> None:
    out = tmp_path / "docker-compose.yml"
    assert compose.main(_args(out, check=True)) == 1  # missing
    assert compose.main(_args(out, check=False)) == 0
    assert compose.main(_args(out, check=True)) == 0
    out.write_text(out.read_text().replace("--slots", "--slot"))
    assert compose.main(_args(out, check=True)) == 1


def test_generation_does_not_depend_on_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert compose.main(_args(COMPOSE_FILE, check=True)) == 0


def test_one_service_per_worker_plus_ap_models_load(doc: dict[str, Any]) -> None:
    specs = build_topology(load_scenario(SHIPPED))
    assert set(doc["services"]) == {"models", "ap", "load", *(s.worker_id for s in specs)}
    assert "models" in doc["volumes"]


def test_every_command_parses_with_the_cli(doc: dict[str, Any]) -> None:
    parser = build_parser()
    for name, service in doc["services"].items():
        command = [_expand(w) for w in service["command"]]
        assert command[0] == "apdispatch", name
        parser.parse_args(command[1:])  # exits (SystemExit) on a flag it does not know


def test_workers_run_the_demo_topology(doc: dict[str, Any]) -> None:
    parser = build_parser()
    for spec in build_topology(load_scenario(SHIPPED)):
        service = doc["services"][spec.worker_id]
        args = parser.parse_args(service["command"][1:])
        assert (args.command, args.kind) == ("worker", spec.kind)
        assert args.variants.split(",") == list(spec.variants)
        assert args.cluster == spec.cluster and args.worker_id == spec.worker_id
        assert args.slots == spec.slots
        assert args.slowdown == pytest.approx(spec.slowdown, rel=1e-5)
        assert args.link_delay_ms == pytest.approx(spec.link_delay_ms)
        # Addressed by service name: the AP's, and its own for the AP to call back.
        assert args.ap == f"ap:{compose.AP_PORT}"
        assert args.advertise.split(":")[0] == spec.worker_id
        assert args.advertise.split(":")[1] == args.listen.split(":")[1]
        assert str(args.models) == compose.MODELS_DIR
        assert f"models:{compose.MODELS_DIR}:ro" in service["volumes"]
        assert service["depends_on"]["models"]["condition"] == "service_completed_successfully"
        assert service["build"]["dockerfile"] == f"docker/{spec.kind}.Dockerfile"
        if spec.kind == CLOUD:
            assert args.max_batch_size == spec.max_batch_size


def test_models_ap_and_load_services(doc: dict[str, Any]) -> None:
    parser = build_parser()
    services = doc["services"]
    models = parser.parse_args(services["models"]["command"][1:])
    assert (models.command, models.action, str(models.out)) == ("models", "build", "/models")
    assert services["models"]["volumes"] == ["models:/models"]  # the only writer
    ap = parser.parse_args([_expand(w) for w in services["ap"]["command"][1:]])
    assert ap.command == "serve" and ap.listen.endswith(f":{compose.AP_PORT}")
    load = parser.parse_args(services["load"]["command"][1:])
    assert load.command == "load" and load.ap == f"ap:{compose.AP_PORT}"
    assert services["load"]["depends_on"]["ap"]["condition"] == "service_healthy"
    scenario_mount = next(v for v in services["load"]["volumes"] if v.endswith(":/scenario.toml:ro"))
    assert (ROOT / scenario_mount.split(":")[0]).resolve() == SHIPPED.resolve()
    assert str(load.scenario) == "/scenario.toml"


def _run_lines(dockerfile: Path) -> list[str]:
    """The RUN instructions, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


def _pip_installs(dockerfile: Path) -> list[list[str]]:
    installs = []
    for run in _run_lines(dockerfile):
        for part in re.split(r"&&|;", run):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


@pytest.mark.parametrize("role", ["ap", "edge", "cloud"])
def test_images_pin_with_the_constraints(role: str) -> None:
    installs = _pip_installs(DOCKERFILES[role])
    assert installs, f"{role}: no pip install"
    for words in installs:
        assert "-c" in words and words[words.index("-c") + 1] == "constraints.txt"


def test_edge_image_installs_no_torch() -> None:
    text = DOCKERFILES["edge"].read_text()
    installs = _pip_installs(DOCKERFILES["edge"])
    targets = [w for words in installs for w in words if not w.startswith("-") and w != "constraints.txt"]
    assert targets == [".[edge]"]
    assert "torch" not in " ".join(_run_lines(DOCKERFILES["edge"])).replace("pip show torch", "")
    assert "extra-index-url" not in text
    # And the edge extra, with the core, names no torch.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["edge"]]
    assert not [r for r in requirements if re.match(r"torch\b|apdispatch\[", r)]


def test_edge_dependencies_do_not_pull_torch() -> None:
    # The installed distributions' own requirements, followed transitively.
    from importlib import metadata

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [
        Requirement(r).name for r in [*project["dependencies"], *project["optional-dependencies"]["edge"]]
    ]
    seen: set[str] = set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for raw in requires:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    assert "torch" not in seen, "the edge install would pull torch"


def test_cloud_and_ap_images_install_their_extras() -> None:
    cloud = [w for words in _pip_installs(DOCKERFILES["cloud"]) for w in words]
    ap = [w for words in _pip_installs(DOCKERFILES["ap"]) for w in words]
    assert _extras(cloud) >= {"cloud"}
    assert _extras(ap) >= {"ap", "zoo"}


def _extras(words: list[str]) -> set[str]:
    return {e for w in words if w.startswith(".[") for e in w[2:-1].split(",")}


def test_ap_healthcheck_probe_fails_quietly_without_an_ap(doc: dict[str, Any]) -> None:
    import socket
    import subprocess
    import sys

    test = doc["services"]["ap"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    probe = test[3].replace(f"localhost:{compose.AP_PORT}", f"localhost:{port}")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr

"""The committed docker-compose.yml: up to date, well formed, same topology as the demo."""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from apdispatch.cli import build_parser
from apdispatch.scenario import load_scenario
from apdispatch.tools import compose
from apdispatch.tools.processes import free_port
from apdispatch.tools.topology import CLOUD, build_topology

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "scenarios" / "demo.toml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PLAINTEXT_FILE = ROOT / "docker-compose.plaintext.yml"
DOCKERFILES = {role: ROOT / "docker" / f"{role}.Dockerfile" for role in ("ap", "edge", "cloud")}


def _args(out: Path, check: bool) -> argparse.Namespace:
    return argparse.Namespace(scenario=SHIPPED, out=out, check=check)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def plaintext() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(PLAINTEXT_FILE.read_text())
    return loaded


def _expand(word: str) -> str:
    """Compose's ``${VAR:-default}``, with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", word)


def test_committed_file_is_up_to_date() -> None:
    assert compose.main(_args(COMPOSE_FILE, check=True)) == 0, (
        "run: apdispatch compose scenarios/demo.toml --out docker-compose.yml"
    )


def test_check_catches_drift(tmp_path: Path) -> None:
    out = tmp_path / "docker-compose.yml"
    assert compose.main(_args(out, check=True)) == 1  # missing
    assert compose.main(_args(out, check=False)) == 0
    assert compose.main(_args(out, check=True)) == 0
    out.write_text(out.read_text().replace("--slots", "--slot"))
    assert compose.main(_args(out, check=True)) == 1
    assert compose.main(_args(out, check=False)) == 0
    override = compose.plaintext_path(out)
    override.write_text(override.read_text().replace("--slots", "--slot"))
    assert compose.main(_args(out, check=True)) == 1  # the override is checked too


def test_generation_does_not_depend_on_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert compose.main(_args(COMPOSE_FILE, check=True)) == 0


def test_one_service_per_worker_plus_the_fixed_ones(doc: dict[str, Any]) -> None:
    specs = build_topology(load_scenario(SHIPPED))
    assert set(doc["services"]) == {*compose.FIXED_SERVICES, *(s.worker_id for s in specs)}
    assert set(doc["volumes"]) == {"models", "certs"}


def _commands(services: dict[str, Any]) -> dict[str, list[str]]:
    """Every service's apdispatch command, ``${VAR:-default}`` expanded."""
    return {
        name: [_expand(w) for w in service["command"]]
        for name, service in services.items()
        if service.get("command", [None])[0] == "apdispatch"
    }


def test_every_command_parses_with_the_cli(doc: dict[str, Any], plaintext: dict[str, Any]) -> None:
    parser = build_parser()
    commands = _commands(doc["services"])
    assert set(doc["services"]) - set(commands) == {"prometheus", "grafana"}
    for command in [*commands.values(), *_commands(plaintext["services"]).values()]:
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
        assert f"models:{compose.MODELS_VOLUME}:ro" in service["volumes"]
        assert compose.MODELS_DIR.startswith(f"{compose.MODELS_VOLUME}/")
        assert f"certs:{compose.CERTS_DIR}:ro" in service["volumes"]
        assert service["depends_on"]["models"]["condition"] == "service_completed_successfully"
        assert service["build"]["dockerfile"] == f"docker/{spec.kind}.Dockerfile"
        if spec.kind == CLOUD:
            assert args.max_batch_size == spec.max_batch_size


def test_models_ap_and_load_services(doc: dict[str, Any]) -> None:
    parser = build_parser()
    services = doc["services"]
    models = parser.parse_args(services["models"]["command"][1:])
    assert (models.command, models.action, str(models.out)) == ("models", "build", compose.MODELS_DIR)
    assert services["models"]["volumes"] == [f"models:{compose.MODELS_VOLUME}"]  # the only writer
    ap = parser.parse_args([_expand(w) for w in services["ap"]["command"][1:]])
    assert ap.command == "serve" and ap.listen.endswith(f":{compose.AP_PORT}")
    load = parser.parse_args([_expand(w) for w in services["load"]["command"][1:]])
    assert load.command == "load" and load.ap == f"ap:{compose.AP_PORT}"
    assert load.duration == load_scenario(SHIPPED).duration_s  # DURATION_S unset: the whole scenario
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
    assert targets == [".[edge]", "."]  # the dependencies, then the package alone (--no-deps)
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
    assert _extras(ap) >= {"ap", "zoo", "compile"}
    # The AP image builds the decision's hot path as C extensions once the package is installed.
    assert "apdispatch compile" in DOCKERFILES["ap"].read_text()


def test_every_image_takes_its_base_as_a_build_argument(doc: dict[str, Any]) -> None:
    for path in [*DOCKERFILES.values(), ROOT / "docker" / "prometheus.Dockerfile"]:
        lines = path.read_text().splitlines()
        assert "FROM ${BASE_IMAGE}" in lines, path.name
    for name, service in doc["services"].items():
        if "build" in service:
            assert service["build"]["args"]["BASE_IMAGE"].startswith("${BASE_IMAGE:-"), name
            assert (ROOT / service["build"]["dockerfile"]).is_file()


def _extras(words: list[str]) -> set[str]:
    return {e for w in words if w.startswith(".[") for e in w[2:-1].split(",")}


# --- TLS between the containers --------------------------------------------------


def _flags(command: list[str]) -> set[str]:
    return {w for w in command if w.startswith("--")}


def test_every_party_speaks_mutual_tls_by_default(doc: dict[str, Any]) -> None:
    parser = build_parser()
    commands = _commands(doc["services"])
    ap = parser.parse_args(commands["ap"][1:])
    assert (ap.tls_cert, ap.tls_key, ap.tls_ca) == ("/certs/ap.pem", "/certs/ap-key.pem", "/certs/ca.pem")
    for spec in build_topology(load_scenario(SHIPPED)):
        w = parser.parse_args(commands[spec.worker_id][1:])
        assert (w.tls_cert, w.tls_key, w.tls_ca) == (
            f"/certs/worker-{spec.worker_id}.pem",  # an identity of its own
            f"/certs/worker-{spec.worker_id}-key.pem",
            "/certs/ca.pem",
        )
    load = parser.parse_args(commands["load"][1:])
    assert (load.ca, load.cert, load.key) == ("/certs/ca.pem", "/certs/client.pem", "/certs/client-key.pem")
    for name in ("ap", "load", *(s.worker_id for s in build_topology(load_scenario(SHIPPED)))):
        assert doc["services"][name]["depends_on"].get("certs", {"condition": "-"})["condition"] in (
            "service_completed_successfully",
            "-",  # the load waits for a healthy AP, which waited for the certificates
        )
        assert f"certs:{compose.CERTS_DIR}:ro" in doc["services"][name]["volumes"]


def test_the_plaintext_override_drops_only_the_tls_flags(
    doc: dict[str, Any], plaintext: dict[str, Any]
) -> None:
    tls_flags = {"--tls-cert", "--tls-key", "--tls-ca", "--ca", "--cert", "--key"}
    secure, plain = _commands(doc["services"]), _commands(plaintext["services"])
    assert set(plain) == {"ap", "load", *(s.worker_id for s in build_topology(load_scenario(SHIPPED)))}
    for name, command in plain.items():
        assert not _flags(command) & tls_flags, name
        assert _flags(secure[name]) - _flags(command) <= tls_flags
        assert _flags(secure[name]) & tls_flags, name
    assert "insecure_channel" in plaintext["services"]["ap"]["healthcheck"]["test"][3]


def test_the_certificates_name_every_address_dialled(doc: dict[str, Any], tmp_path: Path) -> None:
    from cryptography import x509

    from apdispatch.tools.certs import make_certs

    parser = build_parser()
    commands = _commands(doc["services"])
    certs = parser.parse_args(commands["certs"][1:])
    assert str(certs.out) == compose.CERTS_DIR
    paths = make_certs(tmp_path, certs.hosts.split(","), workers=certs.workers.split(","))
    # Who is dialled by which name, and shows which certificate there.
    dialled = {"ap": "ap"}
    for spec in build_topology(load_scenario(SHIPPED)):
        args = parser.parse_args(commands[spec.worker_id][1:])
        assert Path(args.tls_cert).name in {p.name for p in paths.values()}
        dialled[args.advertise.split(":")[0]] = Path(args.tls_cert).stem
    for host, who in dialled.items():
        cert = x509.load_pem_x509_certificate(paths[who].read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host in names.get_values_for_type(x509.DNSName), (host, who)


# --- the AP's health check -------------------------------------------------------


def _probe(doc: dict[str, Any], port: int, certs_dir: Path | None, expected: int | None = None) -> str:
    test = doc["services"]["ap"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    probe: str = test[3].replace(f"localhost:{compose.AP_PORT}", f"localhost:{port}")
    if certs_dir is not None:
        probe = probe.replace(f"'{compose.CERTS_DIR}/", f"'{certs_dir}/")
    if expected is not None:
        probe = re.sub(r"n >= \d+", f"n >= {expected}", probe)
    return probe


def _run_probe(probe: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)


def _free_port() -> int:
    return free_port()  # nobody listens here


@pytest.mark.parametrize("override", [False, True], ids=["tls", "plaintext"])
def test_ap_healthcheck_probe_fails_quietly_without_an_ap(
    doc: dict[str, Any], plaintext: dict[str, Any], override: bool, tmp_path: Path
) -> None:
    from apdispatch.tools.certs import make_certs

    make_certs(tmp_path)
    probe = _probe(plaintext if override else doc, _free_port(), tmp_path)
    result = _run_probe(probe)
    assert result.returncode == 1 and "Traceback" not in result.stderr


async def test_ap_healthcheck_probe_lists_workers_as_the_operator(
    doc: dict[str, Any], tmp_path: Path
) -> None:
    # Against a real AP with mutual TLS: the probe's operator certificate may list
    # workers (none here, so a probe that wants one stays unhealthy).
    from apdispatch.ap.config import APConfig
    from apdispatch.ap.server import AccessPoint
    from apdispatch.common.logs import make_logger
    from apdispatch.tools.certs import make_certs

    paths = make_certs(tmp_path)
    config = APConfig(
        listen="127.0.0.1:0",
        log_level="warning",
        tls_cert=str(paths["ap"]),
        tls_key=str(paths["ap-key"]),
        tls_ca=str(paths["ca"]),
    )
    ap = AccessPoint(config, make_logger("warning"))
    await ap.start()
    try:
        healthy = await asyncio.to_thread(
            _run_probe, _probe(doc, int(ap.address.rsplit(":", 1)[1]), tmp_path, expected=0)
        )
        waiting = await asyncio.to_thread(
            _run_probe, _probe(doc, int(ap.address.rsplit(":", 1)[1]), tmp_path, expected=1)
        )
    finally:
        await ap.stop(grace_s=0.1)
    assert healthy.returncode == 0, healthy.stderr
    assert waiting.returncode == 1 and "Traceback" not in waiting.stderr


def test_the_demo_table_is_make_demos(tmp_path: Path) -> None:
    report = {
        "sent": 10,
        "ok": 7,
        "late": 1,
        "inaccurate": 0,
        "rejected": 1,
        "failed": 1,
        "latency_ms": {"p50": 3.0},
    }
    table = compose.demo_table({"fastest": report, "learned": {**report, "ok": 8, "late": 0}})
    cells = [[c.strip() for c in line.split("|")] for line in table.splitlines()]
    assert cells[0][:3] == ["policy", "sent", "ok"]
    assert cells[2][0] == "fastest" and cells[2][cells[0].index("success %")] == "70.0"
    lines = table.splitlines()
    assert lines[-1].startswith("learned: 80.0 %, +10.0 points against the best static policy (fastest")


def test_prometheus_scrapes_every_service_on_its_metrics_port(doc: dict[str, Any]) -> None:
    parser = build_parser()
    volume = doc["services"]["prometheus"]["volumes"][0]
    config = yaml.safe_load((ROOT / volume.split(":")[0]).read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    served = set()
    for name, command in _commands(doc["services"]).items():
        if command[1] in ("serve", "worker"):
            served.add(f"{name}:{parser.parse_args(command[1:]).metrics_port}")
    assert targets == served


async def test_the_load_services_tls_flags_reach_a_mutual_tls_ap(
    doc: dict[str, Any], tmp_path: Path, models_dir: Path
) -> None:
    # The load command's own flags, its files taken from a fresh development CA,
    # against a real AP with mutual TLS. No worker: the AP answers every request
    # that it knows no such task, which it can only say over the connection.
    from apdispatch.ap.config import APConfig
    from apdispatch.ap.server import AccessPoint
    from apdispatch.common.logs import make_logger
    from apdispatch.tools.certs import make_certs
    from apdispatch.tools.loadgen.run import run_load

    make_certs(tmp_path)
    command = [w.replace(f"{compose.CERTS_DIR}/", f"{tmp_path}/") for w in _commands(doc["services"])["load"]]
    load = build_parser().parse_args(command[1:])
    certs = {"tls_cert": f"{tmp_path}/ap.pem", "tls_key": f"{tmp_path}/ap-key.pem", "tls_ca": load.ca}
    ap = AccessPoint(APConfig(listen="127.0.0.1:0", log_level="warning", **certs), make_logger("warning"))
    await ap.start()
    try:
        port = ap.address.rsplit(":", 1)[1]
        report = await run_load(
            load_scenario(SHIPPED),
            f"localhost:{port}",  # a name the AP's certificate carries
            models_dir,
            duration_s=1.0,
            ca=load.ca,
            cert=load.cert,
            key=load.key,
        )
    finally:
        await ap.stop(grace_s=0.1)
    assert report.sent > 0 and report.counts_add_up
    assert sum(report.errors.values()) == report.sent
    assert all("unknown task" in error for error in report.errors), report.errors

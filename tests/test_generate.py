"""Generated scenarios: seeded, valid, feasible, and runnable by the simulator and the CLI."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from apdispatch.common.manifest import Manifest, load_manifest
from apdispatch.policies import make_policy
from apdispatch.scenario import load_scenario, parse_scenario
from apdispatch.sim.arrivals import plan_arrivals
from apdispatch.sim.generate import MAX_QPS, generate, generated_scenario, scenario_toml
from apdispatch.sim.model import build_model
from apdispatch.sim.results import simulate

SEEDS = range(40)


@pytest.fixture(scope="module")
def manifest(models_dir: Path) -> Manifest:
    return load_manifest(models_dir)


def test_same_seed_same_scenario_other_seed_other(manifest: Manifest) -> None:
    assert generate(3, manifest) == generate(3, manifest)
    assert generate(3, manifest) != generate(4, manifest)


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_toml_reads_back_as_the_same_scenario(manifest: Manifest, seed: int, tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(scenario_toml(generate(seed, manifest)))
    from_file = load_scenario(path)
    assert from_file.apps == generated_scenario(seed, manifest).apps
    assert from_file.clusters == generated_scenario(seed, manifest).clusters
    assert parse_scenario(tomllib.loads(path.read_text())) == generated_scenario(seed, manifest)


def test_every_app_has_a_target_that_could_meet_its_sla(manifest: Manifest) -> None:
    for seed in SEEDS:
        scenario = generated_scenario(seed, manifest)
        model = build_model(scenario, manifest)
        for app in scenario.apps:
            best = min(
                (
                    w.rtt_ms + v.service_ms(w.device.speed)
                    for w in model.workers
                    for v in w.variants
                    if v.task == app.task and v.accuracy >= app.min_accuracy
                ),
                default=None,
            )
            assert best is not None, (seed, app)
            assert best < app.deadline_ms, (seed, app, best)


def test_draws_cover_the_space(manifest: Manifest) -> None:
    docs = [generate(seed, manifest) for seed in SEEDS]
    clusters = {len(d["clusters"]) for d in docs}
    apps = {len(d["apps"]) for d in docs}
    assert min(clusters) <= 2 and max(clusters) >= 5
    assert min(apps) == 2 and max(apps) == 6
    assert {d["pattern"] for d in docs} == {"constant", "steps-up", "down-up", "bursts", "walk"}
    assert any(all(c["kind"] == "edge" for c in d["clusters"]) for d in docs)
    for d in docs:
        schedule = d["arrivals"]["schedule"]
        peak_streams = max(s["clients_per_min"] for s in schedule) / 60.0 * d["arrivals"]["stream_mean_s"]
        per_stream = max(a["rate_qps"] for a in d["apps"])
        assert peak_streams * min(a["rate_qps"] for a in d["apps"]) <= MAX_QPS * 1.01
        assert peak_streams * per_stream > 0


def test_a_generated_scenario_runs_in_the_simulator(manifest: Manifest) -> None:
    scenario = generated_scenario(5, manifest, duration_s=30.0)
    model = build_model(scenario, manifest)
    arrivals = plan_arrivals(scenario, 5)
    result = simulate(model, make_policy("fastest"), arrivals)
    assert result.total == len(arrivals.times_ms) > 0
    assert result.counts["ok"] > 0


def test_cli_writes_files_the_simulator_reads(models_dir: Path, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "apdispatch.cli"]
    args = ["--seeds", "11-12", "--duration", "20", "--out", str(tmp_path), "--models", str(models_dir)]
    run = subprocess.run(
        [*cli, "generate", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    written = sorted(tmp_path.glob("*.toml"))
    assert [p.name for p in written] == ["generated-11.toml", "generated-12.toml"]
    assert run.stdout.split() == [str(p) for p in written]
    sim = subprocess.run(
        [*cli, "sim", str(written[0]), "--policies", "fastest", "--no-bound", "--models", str(models_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "fastest" in sim.stdout
    bad = subprocess.run(
        [*cli, "generate", "--seeds", "x", "--out", str(tmp_path), "--models", str(models_dir)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--seeds" in bad.stderr

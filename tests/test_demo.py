"""``apdispatch demo``: policy names, the table, and a real run end to end on loopback."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from apdispatch.common.binomial import lower_bound
from apdispatch.common.manifest import Manifest, load_manifest
from apdispatch.policies import STATIC_POLICIES, resolve_policies
from apdispatch.scenario import load_scenario
from apdispatch.sim.calibration import Calibration
from apdispatch.sim.engine import OUTCOMES
from apdispatch.sim.results import PolicyResult, SimReport
from apdispatch.tools import demo, demo_plot, fidelity
from apdispatch.tools.topology import WorkerSpec

ROOT = Path(__file__).resolve().parents[1]


def test_static_expands_to_every_static_policy() -> None:
    assert resolve_policies("static") == list(STATIC_POLICIES)
    assert len(STATIC_POLICIES) == 7
    assert resolve_policies("closest, p2c,closest") == ["closest", "p2c"]
    assert resolve_policies("learned,all")[:2] == ["learned", "random"]


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"^--policies: unknown policy 'nearest'.*round-robin.*p2c"):
        resolve_policies("closest,nearest")
    with pytest.raises(ValueError, match=r"^--policies: no policy given"):
        resolve_policies(" , ")


def test_table_columns() -> None:
    report = {
        "sent": 10,
        "ok": 6,
        "late": 1,
        "inaccurate": 0,
        "rejected": 2,
        "failed": 1,
        "latency_ms": {"p50": 3.25, "p99": 41.0},
        # Measured from labels: (0.9 * 6 + 0.5 * 2) / 8 = 0.8; the worst app is 10 points below its floor.
        "per_app": {
            "a": {"accuracy": {"n": 6, "top1": 0.9, "min_accuracy": 0.85}},
            "b": {"accuracy": {"n": 2, "top1": 0.5, "min_accuracy": 0.6}},
            "c": {"accuracy": {"n": 0, "top1": None, "min_accuracy": 0.99}},
        },
    }
    row = demo.summary_row("closest", report)
    assert row["success_pct"] == pytest.approx(60.0)
    assert row["accuracy_pct"] == pytest.approx(80.0) and row["above_floor_pts"] == pytest.approx(-10.0)
    lines = demo.format_table([row, {**row, "policy": "most-accurate", "p50_ms": None}]).splitlines()
    assert [c.strip() for c in lines[0].split("|")] == [
        "policy",
        "sent",
        "ok",
        "late",
        "inaccurate",
        "rejected",
        "failed",
        "success %",
        "p50 ms",
        "p99 ms",
        "accuracy %",
        "worst app - floor",
    ]
    assert [c.strip() for c in lines[2].split("|")] == [
        "closest",
        "10",
        "6",
        "1",
        "0",
        "2",
        "1",
        "60.0",
        "3.2",
        "41.0",
        "80.0",
        "-10.0",
    ]
    assert lines[3].split("|")[-4].strip() == "-"


def _row(policy: str, ok: int, sent: int = 100) -> dict[str, object]:
    counts = {"sent": sent, "ok": ok, "late": sent - ok, "inaccurate": 0, "rejected": 0, "failed": 0}
    return demo.summary_row(policy, {**counts, "latency_ms": {"p50": 1.0, "p99": 2.0}})


def test_learned_against_the_best_static_policy() -> None:
    rows = [_row("fastest", 84), _row("learned", 95), _row("least-loaded", 86), _row("aset", 80)]
    assert demo.against_best_static(rows) == [
        "learned: 95.0 %, +9.0 points against the best static policy (least-loaded, 86.0 %)",
        "aset: 80.0 %, -6.0 points against the best static policy (least-loaded, 86.0 %)",
    ]
    # Nothing to compare: only static policies, or none.
    assert demo.against_best_static(rows[:1]) == []
    assert demo.against_best_static([_row("learned", 95)]) == []


def test_fidelity_columns() -> None:
    rows = [_row("fastest", 90), _row("learned", 97), _row("closest", 50)]
    demo.add_fidelity(rows, fidelity.DEFAULT, {"fastest": 100.0, "learned": 99.5})
    demo.add_fidelity(rows, fidelity.FITTED, {"fastest": 88.25, "learned": 97.0})
    assert rows[0]["sim_gap"] == pytest.approx(-10.0) and rows[0]["fit_gap"] == pytest.approx(1.75)
    lines = demo.format_table(rows).splitlines()
    header = [c.strip() for c in lines[0].split("|")]
    assert header[-4:] == ["sim %", "live - sim", "sim fit %", "live - fit"]
    assert [c.strip() for c in lines[2].split("|")][-4:] == ["100.0", "-10.0", "88.2", "+1.8"]
    assert [c.strip() for c in lines[3].split("|")][-4:] == ["99.5", "-2.5", "97.0", "+0.0"]
    # A policy the simulator did not run shows dashes, not a made-up gap.
    assert [c.strip() for c in lines[4].split("|")][-4:] == ["-", "-", "-", "-"]
    # Without --fidelity the table is what it was.
    assert "sim %" not in demo.format_table([_row("fastest", 90)])


def _sim_report(tables: dict[str, list[list[list[int]]]], window_s: float = 2.0) -> SimReport:
    report = SimReport(
        scenario="s",
        seed=1,
        duration_s=6.0,
        window_s=window_s,
        app_names=("a", "b"),
        arrivals_per_window=np.zeros((3, 2), dtype=np.int64),
    )
    for name, table in tables.items():
        report.results[name] = PolicyResult(
            policy=name,
            table=np.asarray(table, dtype=np.int64),
            energy_j=0.0,
            latency_p50_ms=None,
            latency_p99_ms=None,
            dispatched={},
        )
    return report


def test_fidelity_gaps_and_json() -> None:
    def counts(ok: int, late: int = 0, rejected: int = 0) -> list[int]:
        row = [0] * len(OUTCOMES)
        row[OUTCOMES.index("ok")], row[OUTCOMES.index("late")] = ok, late
        row[OUTCOMES.index("rejected")] = rejected
        return row

    # (apps, windows, outcomes): app a and app b, three windows of 2 s.
    report = _sim_report(
        {
            "fastest": [
                [counts(4), counts(3, late=1), counts(0)],
                [counts(2), counts(0, rejected=2), counts(0)],
            ],
            "learned": [[counts(4), counts(4), counts(0)], [counts(2), counts(2), counts(0)]],
        }
    )
    run = fidelity.compare(
        fidelity.FITTED, "fitted", Calibration(12.0, 0.5), {"fastest": 70.0, "learned": 95.0}, report
    )
    # fastest: 9 ok of 12 = 75 %; learned: 12 of 12.
    assert run.sim_pct == pytest.approx({"fastest": 75.0, "learned": 100.0})
    assert run.gap_pts == pytest.approx({"fastest": -5.0, "learned": -5.0})
    assert run.mean_abs_gap == pytest.approx(5.0)
    doc = fidelity.to_json([run], None)["fitted"]
    assert doc["calibration"] == {"scale": 12.0, "overhead_ms": 0.5, "source": "fitted"}
    assert doc["policies"]["fastest"]["timeline"] == {"window_s": 2.0, "ok": [6, 3, 0], "total": [6, 6, 0]}
    t, pct = demo_plot.sim_series(doc["policies"]["fastest"]["timeline"])
    assert t.tolist() == [1.0, 3.0, 5.0]
    assert pct[:2].tolist() == [100.0, 50.0] and math.isnan(pct[2])


def _second(t: int, sent: int, ok: int, rejected: int = 0) -> dict[str, int]:
    late = sent - ok - rejected
    return {
        "t_s": t,
        "sent": sent,
        "ok": ok,
        "late": late,
        "inaccurate": 0,
        "rejected": rejected,
        "failed": 0,
    }


def test_plot_series_from_the_live_timeline() -> None:
    timeline = [
        _second(0, 4, 4),
        _second(1, 6, 3, rejected=2),
        _second(2, 0, 0),
        _second(3, 0, 0),
        _second(4, 5, 1),
    ]
    t, pct = demo_plot.live_series(timeline, 2)
    assert t.tolist() == [1.0, 3.0, 5.0]
    # 7 ok of 10 outcomes; an empty window is a gap, not 0 %; 1 of 5.
    assert pct[0] == pytest.approx(70.0) and math.isnan(pct[1]) and pct[2] == pytest.approx(20.0)
    t, qps = demo_plot.offered_series(timeline, 2)
    assert qps.tolist() == [5.0, 0.0, 5.0]  # the last window is 1 s long
    assert [demo_plot.window_s(d) for d in (4, 20, 40, 120)] == [1, 1, 2, 6]


def test_plot_file(tmp_path: Path) -> None:
    timeline = [_second(t, 10, 10 - t) for t in range(4)]
    doc = {
        "scenario": "s",
        "seed": 1,
        "duration_s": 4.0,
        "policies": {
            name: {"report": {"timeline": timeline}, "summary": {"success_pct": 85.0}}
            for name in ("fastest", "learned")
        },
    }
    path = demo_plot.plot_success(doc, tmp_path / "sub" / "success.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_legend_ranks_policies_best_first() -> None:
    policies = {
        name: {"summary": {"success_pct": pct}}
        for name, pct in (("random", 70.0), ("fastest", 84.6), ("p2c", 70.0), ("learned", 94.8))
    }
    assert demo_plot.legend_order(policies) == ["learned", "fastest", "random", "p2c"]


def _fit_topology(
    models: Path, edge_slowdown: float, cloud_slowdown: float
) -> tuple[Manifest, float, float, WorkerSpec, WorkerSpec]:
    """The zoo, the batch-1 latencies of digits-small and digits-large, an edge worker serving
    the first and a cloud worker serving the second."""
    manifest = load_manifest(models)
    small = manifest.variant("digits-small").latency_ms_batch1
    large = manifest.variant("digits-large").latency_ms_batch1
    edge = WorkerSpec("edge-1", "edge", "edge", "box", ("digits-small",), 1, edge_slowdown, 2.0)
    cloud = WorkerSpec("cloud-1", "cloud", "cloud", "gpu", ("digits-large",), 2, cloud_slowdown, 40.0, 4, 2.0)
    return manifest, small, large, edge, cloud


def test_fit_pools_every_policy(models_dir: Path) -> None:
    manifest, small, large, edge, cloud = _fit_topology(models_dir, 50.0, 0.5)

    def live(latency: float, speed: float) -> float:  # what a 10x machine with 0.25 ms per call shows
        return 10.0 * latency / speed + 0.25

    edge_ms = live(small, 1 / 50)
    reports = [
        {"compute_ms": {"edge/edge-1/digits-small": {"n": 3, "mean": edge_ms - 1.0}}},
        {
            "compute_ms": {
                "edge/edge-1/digits-small": {"n": 1, "mean": edge_ms + 3.0},
                # A slowdown below 1 runs at this machine's speed: it cannot be emulated faster.
                "cloud/cloud-1/digits-large": {"n": 5, "mean": live(large, 1.0)},
                "cloud/gone-1/digits-large": {"n": 7, "mean": 99.0},  # not a worker of this run
            }
        },
        {},
    ]
    assert fidelity.pool_compute(reports)["edge/edge-1/digits-small"] == (4, pytest.approx(edge_ms))
    fit = fidelity.fit_live(reports, [edge, cloud], manifest)
    assert fit is not None and fit.replies == 9
    assert fit.calibration.scale == pytest.approx(10.0) and fit.calibration.overhead_ms == pytest.approx(0.25)
    assert set(fit.targets) == {"edge/edge-1/digits-small", "cloud/cloud-1/digits-large"}
    assert fit.targets["edge/edge-1/digits-small"]["manifest_ms"] == pytest.approx(small * 50, abs=1e-4)
    assert fidelity.fit_live([{}], [edge], manifest) is None


def test_fit_never_fails_on_a_falling_line(models_dir: Path) -> None:
    manifest, small, large, edge, cloud = _fit_topology(models_dir, 4.0, 1.0)
    # More compute per manifest millisecond on the small side: a least-squares line would fall.
    reports = [
        {
            "compute_ms": {
                "edge/edge-1/digits-small": {"n": 2, "mean": 30.0 * small * 4},
                "cloud/cloud-1/digits-large": {"n": 2, "mean": 2.0 * large},
            }
        }
    ]
    assert (small * 4 < large) == (30.0 * small * 4 > 2.0 * large)  # the premise: x up, y down
    fit = fidelity.fit_live(reports, [edge, cloud], manifest)
    assert fit is not None and fit.calibration.scale > 0 and fit.calibration.overhead_ms == 0.0


def test_edge_contention_needs_slack_spent(models_dir: Path) -> None:
    """The live contention scenario: AR fits only at the edge, and with the edge as slow as it is
    live (--calibration 13), spending slack (learned) beats sending everything fastest."""
    scenario = load_scenario(ROOT / "scenarios/edge-contention.toml")
    specs = demo.plan_workers(scenario, models_dir)
    assert [(s.worker_id, s.slowdown) for s in specs] == [
        ("cell-1", 100.0),
        ("street-1", 100.0),
        ("cloud-1", 1.0),
    ]
    manifest = load_manifest(models_dir)
    ar = scenario.app("ar-overlay")
    cloud_rtt = next(c.rtt_ms for c in scenario.clusters if c.name == "cloud")
    assert cloud_rtt >= ar.deadline_ms
    edge = {v for s in specs if s.kind == "edge" for v in s.variants}
    assert [
        v
        for v in sorted(edge)
        if manifest.variant(v).task == "digits" and manifest.variant(v).accuracy >= ar.min_accuracy
    ] == ["digits-small"]
    runs = fidelity.run_fidelity(
        scenario.scaled(30.0), models_dir, {"fastest": 0.0, "learned": 0.0}, 5, Calibration(13.0), None, 2.0
    )
    pct = runs[0].sim_pct
    # With the wait for a slot predicted from when it frees (queue_model "work"), 98.3 and 99.9 %.
    assert pct["fastest"] < 99.0 and pct["learned"] > pct["fastest"] + 1.0, pct


def test_make_demo_runs_learned_beside_the_static_policies_on_the_demo_scenario(models_dir: Path) -> None:
    """`make demo`'s default run: the demo scenario, every static policy and `learned`."""
    makefile = (ROOT / "Makefile").read_text()
    scenario_path = re.search(r"^SCENARIO \?= (\S+)$", makefile, re.MULTILINE)
    recipe = re.search(r"^demo:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert scenario_path is not None and recipe is not None
    assert scenario_path.group(1) == "scenarios/demo.toml"
    policies = re.search(r"--policies (\S+)", recipe.group(1))
    assert policies is not None
    assert resolve_policies(policies.group(1)) == [*STATIC_POLICIES, "learned"]
    demo.plan_workers(load_scenario(ROOT / scenario_path.group(1)), models_dir)


def test_demo_scenario_needs_slack_spent(models_dir: Path) -> None:
    """The demo scenario: AR fits only at the edge, the slack apps fit in the cloud, and in the
    simulator, whose service times the live workers hold (the reference profile), `learned`
    beats every static policy."""
    scenario = load_scenario(ROOT / "scenarios/demo.toml")
    specs = demo.plan_workers(scenario, models_dir)
    manifest = load_manifest(models_dir)
    cloud_rtt = next(c.rtt_ms for c in scenario.clusters if c.name == "cloud")
    ar = scenario.app("ar-overlay")
    assert cloud_rtt >= ar.deadline_ms
    edge = {v for s in specs if s.kind == "edge" for v in s.variants}
    assert [
        v
        for v in sorted(edge)
        if manifest.variant(v).task == "digits" and manifest.variant(v).accuracy >= ar.min_accuracy
    ] == ["digits-small"]
    cloud = {v for s in specs if s.kind == "cloud" for v in s.variants}
    for app in scenario.apps:
        if app.name != ar.name:
            # A quarter of the deadline or more left after the round trip: the cloud has time for it.
            assert app.deadline_ms - cloud_rtt >= app.deadline_ms / 4, app.name
            assert any(
                manifest.variant(v).task == app.task and manifest.variant(v).accuracy >= app.min_accuracy
                for v in cloud
            ), app.name
    names = [*STATIC_POLICIES, "learned"]
    runs = fidelity.run_fidelity(
        scenario, models_dir, dict.fromkeys(names, 0.0), scenario.seed, None, None, 1.0
    )
    pct = runs[0].sim_pct
    best_static = max(pct[p] for p in STATIC_POLICIES)
    assert pct["learned"] > best_static + 3.0, pct


def _tiny_scenario(models: Path, path: Path) -> Path:
    """One edge worker a few ms away and one cloud worker 40 ms away; one tight-deadline app
    whose accuracy floor the best edge variant meets: closest serves it, most-accurate sends
    it to the cloud, past the deadline."""
    manifest = load_manifest(models)
    digits = [v for v in manifest.variants if v.task == "digits"]
    edge = sorted((v for v in digits if v.runtime == "onnx"), key=lambda v: v.accuracy)
    cloud = [v for v in digits if v.runtime == "torch"]
    assert edge and cloud, "the zoo needs onnx and torch digits variants"
    floor = min(edge[-1].accuracy, max(v.accuracy for v in cloud)) - 0.001
    path.write_text(f"""
name = "tiny"
duration_s = 30
seed = 3

[[apps]]
name = "ar"
task = "digits"
deadline_ms = 25.0
min_accuracy = {floor:.4f}
rate_qps = 10.0

[devices.box]
speed = 0.5
slots = 2

[devices.gpu]
slots = 2
max_batch_size = 4
max_wait_ms = 2.0

[[clusters]]
name = "edge"
rtt_ms = 2.0
workers = [ {{ device = "box", variants = [{", ".join(f'"{v.name}"' for v in edge)}] }} ]

[[clusters]]
name = "cloud"
kind = "cloud"
rtt_ms = 40.0
workers = [ {{ device = "gpu", variants = ["{cloud[0].name}"] }} ]

[arrivals]
schedule = [ {{ at_s = 0, clients_per_min = 40 }} ]
stream_mean_s = 60.0
""")
    return path


@pytest.mark.timeout(150)
def test_demo_end_to_end(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models = models_dir
    scenario = _tiny_scenario(models, tmp_path / "tiny.toml")
    monkeypatch.chdir(tmp_path)  # the run folder, build/demo/<stamp>, lands here
    out = tmp_path / "demo.json"
    plot = tmp_path / "plots" / "success.png"
    policies = ["closest", "most-accurate", "learned"]
    args = argparse.Namespace(
        scenario=scenario,
        models=models,
        policies=",".join(policies),
        duration=4.0,
        json=out,
        seed=5,
        plot=plot,
        fidelity=True,
        calibration=None,
    )
    assert demo.main(args) == 0
    printed = capsys.readouterr().out

    doc = json.loads(out.read_text())
    assert list(doc["policies"]) == policies
    assert doc["duration_s"] == 4.0 and doc["seed"] == 5
    run_dir = tmp_path / doc["run_dir"]
    assert json.loads((run_dir / "report.json").read_text()) == doc
    assert {p.name for p in run_dir.glob("*.log")} >= {
        "edge-1.log",
        "cloud-1.log",
        "ap-1-closest.log",
        "ap-2-most-accurate.log",
        "ap-3-learned.log",
    }
    sent = set()
    for policy, result in doc["policies"].items():
        report = result["report"]
        counts = [report[k] for k in demo.OUTCOMES]
        assert report["sent"] > 0 and sum(counts) == report["sent"], policy
        assert report["counts_add_up"]
        assert result["ap_exit_code"] == 0
        sent.add(report["sent"])
        # The table shows the same numbers, and the simulator's beside them.
        row = next(line for line in printed.splitlines() if line.startswith(f"{policy} "))
        cells = [c.strip() for c in row.split("|")]
        assert cells[1:7] == [str(report["sent"]), *(str(c) for c in counts)]
        sim = doc["fidelity"]["default"]["policies"][policy]
        live = result["summary"]["success_pct"]
        assert sim["gap_pts"] == pytest.approx(live - sim["sim_pct"], abs=0.01)
        assert cells[12:14] == [f"{sim['sim_pct']:.1f}", f"{sim['gap_pts']:+.1f}"]
        # Every answer checked against its sample's label, per app and per variant.
        summary = result["summary"]
        for app, block in report["per_app"].items():
            accuracy = block["accuracy"]
            assert accuracy["min_accuracy"] > 0 and accuracy["n"] <= block["ok"] + block["late"], app
        judged = sum(b["accuracy"]["n"] for b in report["per_app"].values())
        assert judged == sum(v["n"] for v in report["variant_accuracy"].values())
        # Every ok answer carries its outputs (a reply cut off at its deadline carries none).
        assert judged >= report["ok"]
        for variant, measured in report["variant_accuracy"].items():
            # The manifest's held-out figure lies within the measured one's 99.9 % interval.
            n, right = measured["n"], round(measured["top1"] * measured["n"])
            assert lower_bound(right, n, 0.999) <= measured["manifest"], variant
            assert 1.0 - lower_bound(n - right, n, 0.999) >= measured["manifest"], variant
            assert measured["lower95"] <= measured["top1"]
        assert cells[10] == ("-" if not judged else f"{summary['accuracy_pct']:.1f}")
    assert len(sent) == 1  # the same seed offers the same load to every policy
    closest = doc["policies"]["closest"]["report"]
    accurate = doc["policies"]["most-accurate"]["report"]
    learned = doc["policies"]["learned"]["report"]
    # 40 ms to the cloud cannot meet a 25 ms deadline; 2 ms to the edge can.
    assert closest["ok"] > accurate["ok"] and learned["ok"] > accurate["ok"]
    assert accurate["late"] > 0
    # Sim fidelity: the manifest's calibration, and one fitted to the replies' compute_ms.
    assert doc["fidelity"]["default"]["calibration"]["source"] == "manifest"
    assert set(doc["fidelity"]["fitted"]["policies"]) == set(policies)
    assert doc["fidelity"]["fit"]["replies"] > 0
    assert "sim %" in printed and "live - fit" in printed and "mean |live - sim|" in printed
    assert (run_dir / demo.PLOT_NAME).stat().st_size > 0 and plot.stat().st_size > 0
    assert re.search(r"logs and report\.json in .*build/demo/", printed)
    # Nothing left running: every child named the AP's address on its command line.
    assert _processes_naming(closest["ap"]) == []


def _processes_naming(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if text.encode() in args:
            found.append(b" ".join(args).decode(errors="replace"))
    return found

"""Several seeds per scenario: intervals, paired gaps, the CLI and the evaluation table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apdispatch.scenario import load_scenario
from apdispatch.sim import seeds as multi
from apdispatch.sim.engine import OUTCOMES
from apdispatch.sim.evaluate import load_pattern, trained_on
from apdispatch.sim.results import PolicyResult, SimReport

ROOT = Path(__file__).parent.parent
HELD_OUT = sorted((ROOT / "scenarios" / "held-out").glob("*.toml"))


def _result(name: str, ok: int, late: int, rejected: int) -> PolicyResult:
    table = np.zeros((1, 1, len(OUTCOMES)), dtype=np.int64)
    table[0, 0, OUTCOMES.index("ok")] = ok
    table[0, 0, OUTCOMES.index("late")] = late
    table[0, 0, OUTCOMES.index("rejected")] = rejected
    return PolicyResult(name, table, energy_j=1000.0, latency_p50_ms=None, latency_p99_ms=None, dispatched={})


def _report(seed: int, bound: float, **results: tuple[int, int, int]) -> SimReport:
    report = SimReport(
        scenario="s",
        seed=seed,
        duration_s=10.0,
        window_s=10.0,
        app_names=("a",),
        arrivals_per_window=np.array([[100]]),
        upper_bound=bound,
    )
    for name, (ok, late, rejected) in results.items():
        report.results[name] = _result(name, ok, late, rejected)
    return report


@pytest.mark.unit
def test_parse_seeds() -> None:
    assert multi.parse_seeds("3", 7) == [7, 8, 9]
    assert multi.parse_seeds("7-9", 0) == [7, 8, 9]
    assert multi.parse_seeds("1,5,2", 0) == [1, 5, 2]
    for bad in ("0", "x", "3,3", "5-4"):
        with pytest.raises(ValueError, match="--seeds"):
            multi.parse_seeds(bad, 0)


@pytest.mark.unit
def test_ci95_by_hand() -> None:
    # values 1, 2, 3: sd 1, n 3, t(0.975, 2) = 4.302653 -> 4.302653 / sqrt(3)
    assert multi.ci95([1.0, 2.0, 3.0]) == pytest.approx(4.302653 / 3**0.5, rel=1e-6)
    assert multi.ci95([5.0]) is None
    assert multi.ci95([2.0, 2.0]) == 0.0


@pytest.mark.unit
def test_paired_gap_to_the_best_static_policy() -> None:
    # fastest: 80, 70 %; least-loaded: 75, 74 % (mean 74.5 < 75): fastest is the best static.
    # learned: 90, 71 % -> gaps +10, +1 points; wins 2.
    reports = [
        _report(1, 0.95, fastest=(80, 10, 10), **{"least-loaded": (75, 25, 0), "learned": (90, 0, 10)}),
        _report(2, 0.85, fastest=(70, 0, 30), **{"least-loaded": (74, 26, 0), "learned": (71, 0, 29)}),
    ]
    summaries = multi.summarize(reports)
    assert multi.best_static(summaries) == "fastest"
    gap = multi.gaps(summaries)["learned"]
    assert gap.vs == "fastest" and gap.per_seed == pytest.approx([10.0, 1.0])
    assert gap.mean == pytest.approx(5.5) and gap.wins == 2
    assert gap.ci95 == pytest.approx(12.706205 * np.std([10.0, 1.0], ddof=1) / 2**0.5, rel=1e-6)
    doc = multi.to_json(reports)
    assert doc["best_static"] == "fastest" and doc["seeds"] == [1, 2]
    assert doc["upper_bound"]["success_ratio"] == pytest.approx(0.9)
    assert doc["policies"]["learned"]["ok"] == 161 and doc["policies"]["learned"]["total"] == 200
    assert doc["policies"]["learned"]["success_ratio"] == pytest.approx(0.805)
    assert doc["gaps"]["learned"]["wins"] == 2
    text = multi.format_table(reports)
    assert "fastest (best static)" in text and "learned - fastest: 5.50 ±" in text


@pytest.mark.unit
def test_held_out_scenarios_vary_topology_slas_and_arrivals() -> None:
    scenarios = [load_scenario(p) for p in HELD_OUT]
    trained = trained_on()
    assert len(scenarios) >= 5 and not trained & {p.name for p in HELD_OUT}
    assert len({len(s.clusters) for s in scenarios}) >= 3  # topologies
    assert len({tuple(a.deadline_ms for a in s.apps) for s in scenarios}) == len(scenarios)  # SLAs
    assert {load_pattern(s) for s in scenarios} == {"constant", "dynamic"}
    assert max(max(c.jitter_ms for c in s.clusters) for s in scenarios) >= 10.0  # a noisy network


def test_sim_seeds_cli_and_evaluate(tmp_path: Path, models_dir: Path) -> None:
    from apdispatch.cli import main

    scenario = ROOT / "scenarios" / "held-out" / "two-nodes.toml"
    out = tmp_path / "multi.json"
    argv = ["sim", str(scenario), "--policies", "fastest,learned", "--seeds", "2", "--jobs", "2"]
    assert main([*argv, "--duration", "20", "--json", str(out), "--models", str(models_dir)]) == 0
    doc = json.loads(out.read_text())
    assert doc["seeds"] == [7, 8] and doc["best_static"] == "fastest"
    assert len(doc["policies"]["learned"]["success_per_seed"]) == 2
    assert 0.0 < doc["upper_bound"]["success_ratio"] <= 1.0
    # The same seeds in one process give the same figures: seeds are independent of the pool.
    one = tmp_path / "one.json"
    argv[-1] = "1"
    assert main([*argv, "--duration", "20", "--json", str(one), "--models", str(models_dir)]) == 0
    assert json.loads(one.read_text())["policies"] == doc["policies"]

    ev = tmp_path / "ev"
    argv = ["evaluate", str(scenario), "--policies", "fastest,learned", "--seeds", "2", "--duration", "20"]
    assert main([*argv, "--out", str(ev), "--models", str(models_dir), "--no-plot"]) == 0
    table = (ev / "table.md").read_text()
    assert "[two-nodes]" in table and "| dynamic |" in table
    row = json.loads((ev / "two-nodes.json").read_text())
    assert row["policies"] == doc["policies"] and row["command"].startswith("apdispatch sim ")


def test_evaluate_writes_under_build_unless_told(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from apdispatch.cli import main

    # A trial run in a checkout must not overwrite the published tables in docs/.
    monkeypatch.chdir(tmp_path)
    scenario = ROOT / "scenarios" / "demo.toml"
    argv = ["evaluate", str(scenario), "--policies", "fastest", "--seeds", "1", "--duration", "4"]
    assert main([*argv, "--models", str(models_dir), "--no-plot"]) == 0
    assert (tmp_path / "build" / "evaluation" / "demo.json").exists()
    assert not (tmp_path / "docs").exists()


def test_checkpoint_is_one_seed_only(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from apdispatch.cli import main

    scenario = ROOT / "scenarios" / "held-out" / "two-nodes.toml"
    argv = ["sim", str(scenario), "--seeds", "2", "--checkpoint", str(tmp_path / "ck")]
    assert main([*argv, "--models", str(models_dir)]) == 2
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.unit
def test_standing_counts_ahead_level_and_behind() -> None:
    from apdispatch.sim.evaluate import standing

    def doc(per_seed: list[float], ci95: float | None) -> dict[str, object]:
        mean = sum(per_seed) / len(per_seed)
        return {"gaps": {"learned": {"mean": mean, "ci95": ci95, "per_seed": per_seed}}}

    docs = [
        doc([1.0, 2.0], 0.5),  # ahead
        doc([0.0, 0.0], 0.0),  # level: equal on every seed
        doc([-0.01, 0.0], 0.02),  # behind, within its interval
        doc([-3.0, -2.0], 1.0),  # behind at the 95 % level
        doc([1.0, -1.0], 2.0),  # even on average
        {"gaps": {}},  # no learned policy run: not counted
    ]
    assert standing(docs) == (
        "`learned` against the best static policy, of 5 scenarios: ahead on 1, level on 1 "
        "(equal on every seed), behind on 2 (1 of them at the 95 % level), even on average on 1"
    )


@pytest.mark.unit
def test_bound_gap_is_the_mean_distance_to_the_bound_in_points() -> None:
    from apdispatch.sim.evaluate import bound_gap

    def doc(name: str, bound: float | None, learned: float) -> dict[str, object]:
        return {
            "scenario": name,
            "upper_bound": None if bound is None else {"success_ratio": bound},
            "policies": {"learned": {"success_ratio": learned}},
        }

    # 2 and 6 points below the bound: 4 on average; "c" has no bound and is left out.
    docs = [doc("a", 1.0, 0.98), doc("b", 0.9, 0.84), doc("c", None, 0.5)]
    assert bound_gap(docs) == (
        "`learned` against the upper bound, of 2 scenarios: 4.00 points below it on average, 6.00 at most (b)"
    )
    assert "no scenario" in bound_gap([doc("c", None, 0.5)])

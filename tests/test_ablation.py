"""``apdispatch ablate``: the layers of the learned policy, paired seed by seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apdispatch.cli import main as cli_main
from apdispatch.sim.ablation import LAYERS, ablate, paired

REPO = Path(__file__).resolve().parents[1]


def test_paired_gaps_by_hand() -> None:
    g = paired([0.90, 0.80], [0.85, 0.82])
    # Per seed +5 and -2 points; mean 1.5; sd sqrt(((3.5)^2 + (3.5)^2) / 1) = 4.9497;
    # 95 % half-width t(0.975, 1) * sd / sqrt(2) = 12.7062 * 3.5 = 44.4717.
    assert g["per_seed"] == [pytest.approx(5.0), pytest.approx(-2.0)]
    assert g["mean"] == pytest.approx(1.5)
    assert g["ci95"] == pytest.approx(44.4717, abs=1e-3)
    assert (g["wins"], g["losses"]) == (1, 1)
    assert paired([0.5], [0.4])["ci95"] is None  # one seed: no interval


def test_each_step_compares_a_layer_with_the_one_below() -> None:
    per_seed = {
        "fastest": [0.70, 0.72],
        "least-loaded": [0.75, 0.73],
        "slack": [0.80, 0.80],
        "slack-guarded": [0.85, 0.84],
        "learned-frozen": [0.85, 0.84],
        "learned-stopped": [0.80, 0.83],
        "learned": [0.86, 0.86],
    }
    doc = {
        "policies": {
            name: {"success_ratio": sum(v) / len(v), "success_per_seed": v} for name, v in per_seed.items()
        }
    }
    out = ablate(doc, ["fastest", "least-loaded"])
    assert out["best_static"] == "least-loaded"
    steps = out["steps"]
    assert steps["the guards"]["per_seed"] == [pytest.approx(5.0), pytest.approx(4.0)]
    assert steps["the network"]["per_seed"] == [0.0, 0.0] and steps["the network"]["wins"] == 0
    assert steps["the network's updates"]["mean"] == pytest.approx(1.5)
    assert steps["learning after the first minute"]["per_seed"] == [pytest.approx(6.0), pytest.approx(3.0)]
    assert steps["`learned` over the best static"]["per_seed"] == [pytest.approx(11.0), pytest.approx(13.0)]


def test_ablate_command_writes_the_table_and_names_a_bad_static(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = str(REPO / "scenarios" / "demo.toml")
    assert cli_main(["ablate", scenario, "--statics", "fastest,nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    args = ["ablate", scenario, "--seeds", "2", "--duration", "4", "--statics", "fastest"]
    assert cli_main([*args, "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "demo.json").read_text())
    assert set(doc["policies"]) == {"fastest", *LAYERS}
    assert doc["ablation"]["best_static"] == "fastest" and len(doc["ablation"]["steps"]) == 6
    assert doc["command"].startswith("apdispatch ablate ") and "--duration 4" in doc["command"]
    assert doc["stop_learning_s"] == 60.0 and "--stop-learning-s" not in doc["command"]
    table = (tmp_path / "table.md").read_text()
    assert "| [demo](" in table and "learning after the first minute" in table
    # A shorter warm-up is kept in the report and its command.
    assert cli_main([*args, "--stop-learning-s", "2", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "demo.json").read_text())
    assert doc["stop_learning_s"] == 2.0 and "--stop-learning-s 2" in doc["command"]


def test_ablate_writes_under_build_unless_told(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trial run in a checkout must not overwrite the published tables in docs/.
    monkeypatch.chdir(tmp_path)
    scenario = str(REPO / "scenarios" / "demo.toml")
    args = ["ablate", scenario, "--seeds", "1", "--duration", "4", "--statics", "fastest"]
    assert cli_main([*args, "--models", str(models_dir)]) == 0
    assert (tmp_path / "build" / "ablation" / "demo.json").exists()
    assert not (tmp_path / "docs").exists()

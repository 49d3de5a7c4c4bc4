"""The model zoo: real artifacts, built once per session (see ``models_dir`` in conftest.py)."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from apdispatch.common.binomial import lower_bound
from apdispatch.common.confidence import CalibrationConfig, acceptance_for, top_probability
from apdispatch.common.manifest import MANIFEST_NAME, Manifest, Variant, load_manifest
from workers.zoo.build import SAMPLES_PER_TASK, build_zoo, format_table, zoo_fingerprint

REQUIRED = {
    "digits": {"digits-tiny": "onnx", "digits-small": "onnx", "digits-large": "torch"},
    "shapes": {"shapes-tiny": "onnx", "shapes-small": "onnx", "shapes-large": "torch"},
}


@pytest.fixture(scope="module")
def manifest(models_dir: Path) -> Manifest:
    return load_manifest(models_dir)


def load_samples(root: Path, task: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(root / "samples" / f"{task}.npz") as npz:
        return npz["x"], npz["y"]


def assert_close_to_manifest(variant: Variant, accuracy: float, n: int) -> None:
    # The samples are a subset of the held-out split the manifest was measured on:
    # allow four binomial standard deviations.
    p = variant.accuracy
    tolerance = 4 * math.sqrt(p * (1 - p) / n) + 1 / n
    assert abs(accuracy - p) <= tolerance, (variant.name, accuracy, p, tolerance)


# --- the manifest -------------------------------------------------------------------------------


def test_manifest_describes_every_variant(models_dir: Path, manifest: Manifest) -> None:
    assert manifest.fingerprint
    for task, names in REQUIRED.items():
        for name, runtime in names.items():
            v = manifest.variant(name)
            assert (v.task, v.runtime) == (task, runtime)
    for v in manifest.variants:
        assert (models_dir / v.file).is_file(), v.file
        assert v.file.endswith(".onnx" if v.runtime == "onnx" else ".pt")
        assert 0.0 < v.accuracy <= 1.0
        assert v.params > 0 and v.flops > 0
        # Measured when the zoo was built: how they compare depends on the machine's load then.
        assert v.latency_ms_batch1 > 0.0 and v.latency_ms_batch8 > 0.0, v.name
        (inp,) = v.inputs
        (out,) = v.outputs
        assert (inp.name, inp.datatype, inp.shape[0]) == ("input", "FP32", -1)
        assert (out.name, out.datatype, out.shape[0]) == ("logits", "FP32", -1)
        assert all(d > 0 for d in (*inp.shape[1:], *out.shape[1:]))
        assert bool(v.arch) == (v.runtime == "torch"), v.name
    # One signature per task.
    for task in manifest.tasks():
        of_task = [v for v in manifest.variants if v.task == task]
        assert len({(v.inputs, v.outputs) for v in of_task}) == 1, task


@pytest.mark.parametrize("task", sorted(REQUIRED))
def test_bigger_variants_are_clearly_better(manifest: Manifest, task: str) -> None:
    of_task = [v for v in manifest.variants if v.task == task]
    assert len(of_task) >= 3
    best = max(of_task, key=lambda v: v.accuracy)
    worst = min(of_task, key=lambda v: v.accuracy)
    assert best.accuracy - worst.accuracy >= 0.05, (best, worst)
    assert best.flops >= 20 * worst.flops, (best.flops, worst.flops)
    # The ladder is monotone: more compute (and more parameters), more accuracy.
    by_cost = sorted(of_task, key=lambda v: v.flops)
    assert [v.accuracy for v in by_cost] == sorted(v.accuracy for v in of_task)
    assert [v.params for v in by_cost] == sorted(v.params for v in of_task)


def test_samples_are_model_inputs(models_dir: Path, manifest: Manifest) -> None:
    for task in REQUIRED:
        x, y = load_samples(models_dir, task)
        spec = next(v for v in manifest.variants if v.task == task)
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (SAMPLES_PER_TASK, *spec.inputs[0].shape[1:])
        assert y.shape == (SAMPLES_PER_TASK,)
        assert y.min() >= 0 and y.max() < spec.outputs[0].shape[1]
        # Every class is there, and the inputs are images in [0, 1].
        assert len(np.unique(y)) == spec.outputs[0].shape[1]
        assert x.min() >= 0.0 and x.max() <= 1.0


def test_table_lists_every_variant(manifest: Manifest) -> None:
    table = format_table(manifest)
    for v in manifest.variants:
        assert v.name in table


# --- the variants run, and score what the manifest says -----------------------------------------


def test_onnx_variants_reproduce_their_accuracy(models_dir: Path, manifest: Manifest) -> None:
    import onnxruntime as ort

    onnx_variants = [v for v in manifest.variants if v.runtime == "onnx"]
    assert onnx_variants
    for v in onnx_variants:
        session = ort.InferenceSession(str(manifest.path(v)), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["input"]
        assert [o.name for o in session.get_outputs()] == ["logits"]
        x, y = load_samples(models_dir, v.task)
        for batch in (1, 8):  # the batch dimension is dynamic
            (logits,) = session.run(["logits"], {"input": x[:batch]})
            assert logits.shape == (batch, v.outputs[0].shape[1])
            assert logits.dtype == np.float32
        (logits,) = session.run(["logits"], {"input": x})
        assert_close_to_manifest(v, float(np.mean(logits.argmax(axis=1) == y)), len(y))


def test_torch_variants_rebuild_from_their_arch(models_dir: Path, manifest: Manifest) -> None:
    import torch

    from workers.zoo.architectures import build_network

    torch_variants = [v for v in manifest.variants if v.runtime == "torch"]
    assert {v.task for v in torch_variants} == set(REQUIRED)
    for v in torch_variants:
        net = build_network(v.arch)
        net.load_state_dict(torch.load(manifest.path(v), weights_only=True))
        net.eval()
        x, y = load_samples(models_dir, v.task)
        with torch.inference_mode():
            logits = net(torch.from_numpy(x))
        assert_close_to_manifest(v, float((logits.argmax(dim=1).numpy() == y).mean()), len(y))


def test_manifest_module_needs_no_runtime() -> None:
    # Edge devices read the manifest without torch; nothing should drag it in.
    code = (
        "import sys, apdispatch.common.manifest, workers.zoo.build; "
        "heavy = {'torch', 'onnxruntime', 'sklearn'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- cache, atomicity, determinism (on the quick profile: same code, less training) -------------


def file_states(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def weight_hashes(manifest: Manifest) -> dict[str, str]:
    return {v.name: hashlib.sha256(manifest.path(v).read_bytes()).hexdigest() for v in manifest.variants}


def kill_mid_build(out: Path) -> None:
    """Start a build in another process and kill it while it trains."""
    code = (
        "import sys; from pathlib import Path; from workers.zoo.build import build_zoo; "
        "build_zoo(Path(sys.argv[1]), quick=True)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stderr=subprocess.DEVNULL)
    try:
        # Generous: the child imports torch first, tens of seconds on a loaded machine.
        deadline = time.monotonic() + 300
        while not list(out.parent.glob(f".{out.name}.building-*")):
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)
    finally:
        proc.kill()
        proc.wait()


def test_builds_are_cached_atomic_and_deterministic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = build_zoo(tmp_path / "a", seed=0, quick=True)

    # A killed build leaves no zoo behind, and the next build cleans up after it.
    out_b = tmp_path / "b"
    kill_mid_build(out_b)
    assert not (out_b / MANIFEST_NAME).exists()
    b = build_zoo(out_b, seed=0, quick=True)
    assert not list(tmp_path.glob(".b.*"))

    # Same seed, same sources: same accuracies, byte-identical weights, same samples.
    assert [v.accuracy for v in a.variants] == [v.accuracy for v in b.variants]
    assert weight_hashes(a) == weight_hashes(b)
    for task in a.tasks():
        for xa, xb in zip(load_samples(a.root, task), load_samples(b.root, task), strict=True):
            np.testing.assert_array_equal(xa, xb)

    # A second build with the same fingerprint builds nothing and touches nothing.
    before = file_states(a.root)
    capsys.readouterr()
    again = build_zoo(tmp_path / "a", seed=0, quick=True)
    assert "up to date" in capsys.readouterr().err
    assert again.fingerprint == a.fingerprint
    assert file_states(a.root) == before

    # --force rebuilds (new files), with the same result.
    forced = build_zoo(tmp_path / "a", seed=0, force=True, quick=True)
    assert file_states(a.root) != before
    assert weight_hashes(forced) == weight_hashes(a)


def test_fingerprint_depends_on_seed_and_profile() -> None:
    prints = {zoo_fingerprint(0), zoo_fingerprint(1), zoo_fingerprint(0, "quick")}
    assert len(prints) == 3
    assert zoo_fingerprint(0) == zoo_fingerprint(0)


def test_refuses_to_replace_a_folder_that_is_not_a_zoo(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_zoo(tmp_path, quick=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# --- acceptance thresholds: calibrated on held-out samples, checked on the published ones --------


def _logits(models_dir: Path, variant: Variant, x: np.ndarray) -> np.ndarray:
    if variant.runtime == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(models_dir / variant.file), providers=["CPUExecutionProvider"])
        (out,) = session.run(["logits"], {"input": x})
        return np.asarray(out)
    import torch

    from workers.zoo.architectures import build_network

    model = build_network(variant.arch)
    model.load_state_dict(torch.load(models_dir / variant.file, weights_only=True))
    model.eval()
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_acceptance_thresholds_hold_on_samples_not_used_for_calibration(
    models_dir: Path, manifest: Manifest
) -> None:
    assert manifest.calibration == CalibrationConfig()
    for v in manifest.variants:
        assert v.acceptance, v.name
        floors = [a.floor for a in v.acceptance]
        assert floors == sorted(floors)
        assert all(0 < a.coverage <= 1 and a.accuracy >= a.floor for a in v.acceptance)
        # The published samples were left out of the calibration: each threshold is checked on them.
        x, y = load_samples(models_dir, v.task)
        logits = _logits(models_dir, v, x)
        confidence = top_probability(logits)
        right = logits.argmax(axis=1) == y
        for a in v.acceptance:
            accepted = confidence >= a.threshold
            n, k = int(accepted.sum()), int(right[accepted].sum())
            # What clears the threshold is not clearly less accurate than the floor (99.9 % upper bound).
            assert n > 0 and 1.0 - lower_bound(n - k, n, 0.999) >= a.floor, (v.name, a, n, k)
            assert abs(n / len(y) - a.coverage) < 0.15, (v.name, a, n)
    # A light variant below a floor on average still serves that floor's confident inputs.
    tiny = manifest.variant("digits-tiny")
    assert tiny.accuracy < 0.88
    entry = acceptance_for(tiny.acceptance, 0.88)
    assert entry is not None and entry.coverage >= 0.3
    assert acceptance_for(tiny.acceptance, 0.999) is None

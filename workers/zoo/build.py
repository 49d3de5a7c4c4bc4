"""``apdispatch models build``: train, export, profile and describe the model zoo.

For every task (see ``data.py``) it trains three variants of very different
cost with PyTorch: ``<task>-tiny`` and ``<task>-small`` are exported to ONNX for
the edge workers, ``<task>-large`` stays a PyTorch state_dict for the cloud
worker (rebuilt from its ``arch`` config, see ``architectures.py``). Each
variant's accuracy is measured on held-out data with the runtime that will
serve it, and its latency is timed on this machine. ``DIR/manifest.json``
describes them all and ``DIR/samples/<task>.npz`` holds real held-out inputs
for load generators and tests.

The build is seeded and deterministic (same seed and sources: same accuracies
and byte-identical weight files), cached by a fingerprint of its sources,
seed and library versions, and atomic: it builds into a temporary folder
beside ``DIR`` and renames it into place, so that a killed build never leaves
a half-written zoo behind.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apdispatch.common import binomial as binomial_module
from apdispatch.common import confidence as confidence_module
from apdispatch.common import manifest as manifest_module
from apdispatch.common.confidence import CalibrationConfig, calibrate, top_probability
from apdispatch.common.manifest import (
    MANIFEST_NAME,
    Manifest,
    TensorSpec,
    Variant,
    load_manifest,
    write_manifest,
)
from workers.zoo.data import (
    TASKS,
    DataSize,
    FloatArray,
    TaskData,
    make_task,
    sample_indices,
    sample_split,
)

if TYPE_CHECKING:
    from torch import nn

# torch, onnxruntime and scikit-learn are imported inside the functions that use
# them: a cache hit must return at once, without paying seconds of imports.

SAMPLES_PER_TASK = 512
# Acceptance thresholds are calibrated on the held-out samples that are not
# published (``samples/<task>.npz``): the published ones check them.
CALIBRATION = CalibrationConfig()
# Training uses a fixed thread count: CPU kernels split their reductions by
# thread, so a different count gives (slightly) different weights. One thread:
# on a small machine shared with other jobs, OpenMP's spinning threads make two
# threads up to tens of times slower than one, instead of twice as fast.
TRAIN_THREADS = 1
BATCH_SIZE = 128
# Exported models must give the same logits as torch up to float rounding.
ONNX_ATOL = 1e-4
ZOO_SOURCES = ("architectures.py", "build.py", "data.py", "manifest.py", "confidence.py", "binomial.py")
FINGERPRINT_PACKAGES = ("torch", "onnxscript", "onnxruntime", "numpy", "scikit-learn")


@dataclass(frozen=True, slots=True)
class VariantSpec:
    """How to make one variant; ``arch`` lacks the task's input shape and class count."""

    name: str
    task: str
    runtime: str  # "onnx" (edge) or "torch" (cloud)
    arch: dict[str, Any]
    epochs: int
    lr: float = 3e-3
    weight_decay: float = 1e-4


# Sizes chosen for a clear, monotone cost/accuracy ladder on each task: parameters,
# FLOPs and held-out accuracy all grow from tiny to large (seed 0: digits 78 / 91 /
# 95.5 %, shapes 78.5 / 90 / 96 %; other seeds within about a point).
VARIANTS: tuple[VariantSpec, ...] = (
    # A one-hidden-layer MLP: no translation invariance, so shifted digits hurt it.
    VariantSpec("digits-tiny", "digits", "onnx", {"kind": "mlp", "hidden": [24]}, epochs=40),
    VariantSpec(
        "digits-small",
        "digits",
        "onnx",
        {"kind": "cnn", "stages": [8, 16], "convs_per_stage": 1, "head": 32},
        epochs=20,
    ),
    VariantSpec(
        "digits-large",
        "digits",
        "torch",
        {"kind": "cnn", "stages": [16, 32], "convs_per_stage": 2, "head": 64, "dropout": 0.3},
        epochs=10,
    ),
    # Rotated shapes defeat an MLP of any cheap size (~50 %): the tiny one is a thin CNN.
    VariantSpec(
        "shapes-tiny",
        "shapes",
        "onnx",
        {"kind": "cnn", "stages": [4, 8], "convs_per_stage": 1, "head": 24},
        epochs=10,
    ),
    VariantSpec(
        "shapes-small",
        "shapes",
        "onnx",
        {"kind": "cnn", "stages": [8, 16, 32], "convs_per_stage": 1, "head": 0},
        epochs=10,
    ),
    VariantSpec(
        "shapes-large",
        "shapes",
        "torch",
        {"kind": "cnn", "stages": [16, 32], "convs_per_stage": 2, "head": 64, "dropout": 0.1},
        epochs=8,
    ),
)


@dataclass(frozen=True, slots=True)
class Profile:
    """How hard to train. ``quick`` keeps every step but trains on a fraction of the
    data for a fraction of the epochs: its models are worse, yet it exercises the
    whole build (and its determinism) in seconds, for tests."""

    name: str
    data: DataSize = field(default_factory=DataSize)
    epoch_fraction: float = 1.0
    warmup_runs: int = 50
    timed_runs: int = 300


PROFILES = {
    "full": Profile("full"),
    "quick": Profile(
        "quick",
        data=DataSize(digits_train_copies=1, digits_test_copies=2, shapes_train=1500, shapes_test=1024),
        epoch_fraction=0.2,
        warmup_runs=5,
        timed_runs=20,
    ),
}


def _log(message: str) -> None:
    print(f"[zoo] {message}", file=sys.stderr, flush=True)


# --- entry points -------------------------------------------------------------------------------


def build_zoo(out: Path, seed: int = 0, force: bool = False, *, quick: bool = False) -> Manifest:
    """Build the zoo into ``out`` (or return the cached one) and return its manifest."""
    out = Path(out)
    profile = PROFILES["quick" if quick else "full"]
    fingerprint = zoo_fingerprint(seed, profile.name)
    if not force:
        cached = _cached(out, fingerprint)
        if cached is not None:
            _log(f"{out}: up to date (fingerprint {fingerprint[:12]}), nothing to do")
            return cached
    _check_replaceable(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out)}{os.getpid()}-", dir=out.parent))
    started = time.perf_counter()
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the zoo is meant to be read by others
        variants = _build_into(tmp, seed, profile)
        write_manifest(
            Manifest(root=tmp, variants=variants, seed=seed, fingerprint=fingerprint, calibration=CALIBRATION)
        )
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"{out}: built {len(variants)} variants in {time.perf_counter() - started:.1f} s")
    return load_manifest(out)


def main(args: argparse.Namespace) -> int:
    manifest = build_zoo(Path(args.out), seed=int(args.seed), force=bool(args.force))
    print(format_table(manifest))
    return 0


def format_table(manifest: Manifest) -> str:
    header = ("variant", "runtime", "accuracy", "params", "MFLOPs", "ms@b1", "ms@b8", "file")
    rows = [
        (
            v.name,
            v.runtime,
            f"{100 * v.accuracy:.1f}%",
            f"{v.params:,}",
            f"{v.flops / 1e6:.3f}",
            f"{v.latency_ms_batch1:.3f}",
            f"{v.latency_ms_batch8:.3f}",
            v.file,
        )
        for v in manifest.variants
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    # Names left-aligned, numbers right-aligned.
    left = {0, 1, len(header) - 1}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [f"model zoo {manifest.root} (seed {manifest.seed})", line(header)]
    lines.append("  ".join("-" * w for w in widths))
    lines += [line(r) for r in rows]
    return "\n".join(lines)


# --- cache and atomic replacement ---------------------------------------------------------------


def zoo_fingerprint(seed: int, profile: str = "full") -> str:
    """Hash of everything the zoo's bytes depend on: sources, seed, profile, library versions."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    sources = {name: here / name for name in ZOO_SOURCES}
    sources["manifest.py"] = Path(manifest_module.__file__).resolve()
    # The acceptance thresholds: the calibration and its bound.
    sources["confidence.py"] = Path(confidence_module.__file__).resolve()
    sources["binomial.py"] = Path(binomial_module.__file__).resolve()
    for name in sorted(sources, key=lambda n: ZOO_SOURCES.index(n)):
        h.update(name.encode() + b"\0" + sources[name].read_bytes() + b"\0")
    h.update(f"seed={seed}\0profile={profile}\0".encode())
    for package in FINGERPRINT_PACKAGES:
        # Read from the installed metadata: no need to import (slow) torch for this.
        h.update(f"{package}={importlib.metadata.version(package)}\0".encode())
    return h.hexdigest()


def _cached(out: Path, fingerprint: str) -> Manifest | None:
    try:
        manifest = load_manifest(out)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest.fingerprint != fingerprint:
        return None
    files = [out / v.file for v in manifest.variants]
    files += [out / "samples" / f"{task}.npz" for task in manifest.tasks()]
    return manifest if all(f.is_file() for f in files) else None


def _check_replaceable(out: Path) -> None:
    """Only ever replace a zoo (or an empty folder): never wipe a folder of other things."""
    if out.exists() and (not out.is_dir() or (not (out / MANIFEST_NAME).is_file() and any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not a model zoo; refusing to replace it")


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.building-"


def _old_prefix(out: Path) -> str:
    return f".{out.name}.old-"


def _remove_abandoned_builds(out: Path) -> None:
    """Temporary folders left by killed builds (their process is gone)."""
    for prefix in (_tmp_prefix(out), _old_prefix(out)):
        for path in out.parent.glob(prefix + "*"):
            pid = path.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_into_place(tmp: Path, out: Path) -> None:
    # Two renames: at no moment does ``out`` hold a mix of old and new files.
    old: Path | None = None
    if out.exists():
        old = out.with_name(f"{_old_prefix(out)}{os.getpid()}-{time.monotonic_ns()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- the build itself ---------------------------------------------------------------------------


@contextlib.contextmanager
def _deterministic_torch() -> Iterator[None]:
    """Deterministic kernels and a fixed thread count, restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _build_into(root: Path, seed: int, profile: Profile) -> tuple[Variant, ...]:
    (root / "samples").mkdir()
    variants: list[Variant] = []
    with _deterministic_torch():
        for task in TASKS:
            t0 = time.perf_counter()
            data = make_task(task, seed, profile.data)
            _log(
                f"{task}: {len(data.x_train)} train / {len(data.x_test)} held-out samples "
                f"of shape {data.input_shape} ({time.perf_counter() - t0:.1f} s)"
            )
            x, y = sample_split(data, SAMPLES_PER_TASK, seed)
            np.savez(root / "samples" / f"{task}.npz", x=x, y=y)
            held_back = np.ones(len(data.x_test), dtype=bool)
            held_back[sample_indices(data, SAMPLES_PER_TASK, seed)] = False
            for spec in VARIANTS:
                if spec.task == task:
                    variants.append(_make_variant(root, spec, data, seed, profile, held_back))
    return tuple(variants)


def _make_variant(
    root: Path, spec: VariantSpec, data: TaskData, seed: int, profile: Profile, calibration: np.ndarray
) -> Variant:
    """``calibration``: which held-out samples the acceptance thresholds are calibrated on."""
    import torch

    from workers.zoo.architectures import build_network, count_flops, count_params

    arch = {**spec.arch, "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    # Every variant gets its own seed, so that changing one never changes another.
    variant_seed = zlib.crc32(f"{seed}:{spec.name}".encode())
    torch.manual_seed(variant_seed)
    model = build_network(arch)
    epochs = max(1, round(spec.epochs * profile.epoch_fraction))

    t0 = time.perf_counter()
    _train(model, data, epochs, spec, variant_seed)
    model.eval()
    train_s = time.perf_counter() - t0

    if spec.runtime == "onnx":
        file = f"{spec.name}.onnx"
        _export_onnx(model, data, root / file)
        logits = _onnx_logits(root / file, data.x_test)
        lat1, lat8 = _onnx_latency(root / file, data.x_test, profile)
        arch_field: dict[str, Any] = {}
    elif spec.runtime == "torch":
        file = f"{spec.name}.pt"
        torch.save(model.state_dict(), root / file)
        logits = _torch_logits(model, data.x_test)
        lat1, lat8 = _torch_latency(model, data.x_test, profile)
        arch_field = arch
    else:
        raise ValueError(f"{spec.name}: unknown runtime {spec.runtime!r}")
    correct = np.argmax(logits, axis=1) == data.y_test
    accuracy = float(np.mean(correct))
    acceptance = calibrate(top_probability(logits[calibration]), correct[calibration], CALIBRATION)

    variant = Variant(
        name=spec.name,
        task=spec.task,
        runtime=spec.runtime,
        file=file,
        accuracy=round(accuracy, 4),
        params=count_params(model),
        flops=count_flops(model, data.input_shape),
        latency_ms_batch1=round(lat1, 4),
        latency_ms_batch8=round(lat8, 4),
        inputs=(TensorSpec("input", "FP32", (-1, *data.input_shape)),),
        outputs=(TensorSpec("logits", "FP32", (-1, data.num_classes)),),
        arch=arch_field,
        acceptance=acceptance,
    )
    _log(
        f"{spec.name}: {100 * variant.accuracy:.1f}% held-out, {variant.params:,} params, "
        f"{variant.flops:,} FLOPs, {lat1:.3f} / {lat8:.3f} ms at batch 1 / 8 "
        f"(trained {epochs} epochs in {train_s:.1f} s)"
    )
    return variant


def _train(model: nn.Module, data: TaskData, epochs: int, spec: VariantSpec, seed: int) -> None:
    import torch
    from torch import nn

    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = -(-len(x) // BATCH_SIZE)
    # One-cycle: a short warm-up then annealing; converges in few epochs, no tuning per model.
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.lr, total_steps=epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=shuffle)
        for start in range(0, len(x), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            schedule.step()


def _torch_logits(model: nn.Module, x: FloatArray) -> FloatArray:
    import torch

    with torch.inference_mode():
        logits = torch.cat([model(torch.from_numpy(b)) for b in _batches(x, 512)])
    out: FloatArray = logits.numpy()
    return out


def _batches(x: FloatArray, size: int) -> list[FloatArray]:
    return [x[i : i + size] for i in range(0, len(x), size)]


# --- ONNX ---------------------------------------------------------------------------------------


def _export_onnx(model: nn.Module, data: TaskData, path: Path) -> None:
    """Export with the torch.export-based exporter (torch's default and supported path),
    then check in ONNX Runtime that the file gives torch's logits at several batch sizes."""
    import torch

    example = torch.from_numpy(data.x_test[:2])
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "torch.export"):
        # Its progress prints and deprecation chatter are noise in a build log.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
    session = _onnx_session(path)
    for n in (1, 8, 64):
        x = data.x_test[:n]
        (got,) = session.run(["logits"], {"input": x})
        with torch.inference_mode():
            want = model(torch.from_numpy(x)).numpy()
        if got.shape != want.shape or not np.allclose(got, want, atol=ONNX_ATOL, rtol=1e-4):
            worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("nan")
            raise RuntimeError(f"{path.name}: ONNX logits differ from torch (max diff {worst})")


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _onnx_session(path: Path) -> Any:
    import onnxruntime as ort

    # One thread, sequential: what one slot of an edge worker gets.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_logits(path: Path, x: FloatArray) -> FloatArray:
    session = _onnx_session(path)
    return np.concatenate([session.run(["logits"], {"input": b})[0] for b in _batches(x, 512)])


def _onnx_latency(path: Path, x: FloatArray, profile: Profile) -> tuple[float, float]:
    session = _onnx_session(path)

    def run(batch: FloatArray) -> None:
        session.run(["logits"], {"input": batch})

    return _median_ms(run, x[:1], profile), _median_ms(run, x[:8], profile)


def _torch_latency(model: nn.Module, x: FloatArray, profile: Profile) -> tuple[float, float]:
    import torch

    # One thread, like one ONNX slot: the cloud worker's own speed-up comes from batching.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            b1, b8 = torch.from_numpy(x[:1].copy()), torch.from_numpy(x[:8].copy())
            return _median_ms(model, b1, profile), _median_ms(model, b8, profile)
    finally:
        torch.set_num_threads(threads)


def _median_ms(fn: Any, batch: Any, profile: Profile) -> float:
    """Median wall time of one call, after warm-up (allocators, caches, lazy init)."""
    for _ in range(profile.warmup_runs):
        fn(batch)
    times = []
    for _ in range(profile.timed_runs):
        t0 = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))

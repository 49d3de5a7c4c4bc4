"""The model zoo's manifest: what variants exist and what they cost.

Read by every role, so it imports neither torch nor onnxruntime.
``DIR/manifest.json`` looks like::

    {"version": 1, "seed": 0, "fingerprint": "...",
     "variants": [{"name": "digits-tiny", "task": "digits", "runtime": "onnx",
                   "file": "digits-tiny.onnx", "accuracy": 0.81, "params": 2410,
                   "flops": 4820, "latency_ms_batch1": 0.03, "latency_ms_batch8": 0.05,
                   "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                   "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
                   "arch": {...},
                   "acceptance": [{"floor": 0.9, "threshold": 0.93, "coverage": 0.62,
                                   "accuracy": 0.97}, ...]}],
     "calibration": {"level": 0.95, "thresholds": 20, ...}}

``arch`` (torch variants only) is the JSON config the cloud worker rebuilds the
network from before loading its state_dict: no pickled objects anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apdispatch.common.confidence import Acceptance, CalibrationConfig
from apdispatch.common.tensors import TensorSpec

__all__ = [
    "MANIFEST_NAME",
    "MEASURED_BATCH",
    "Manifest",
    "TensorSpec",
    "Variant",
    "batch_latency_ms",
    "load_manifest",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
MEASURED_BATCH = 8  # the manifest's second latency figure is for this batch size


def batch_latency_ms(latency_ms_batch1: float, latency_ms_batch8: float, batch: int) -> float:
    """One execution of ``batch`` requests, linear between the batch-1 and batch-8 figures."""
    slope = (latency_ms_batch8 - latency_ms_batch1) / (MEASURED_BATCH - 1)
    return latency_ms_batch1 + slope * (batch - 1)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    task: str
    runtime: str  # "onnx" (edge) or "torch" (cloud)
    file: str  # relative to the manifest's folder
    accuracy: float  # on held-out data, in [0, 1]
    params: int
    flops: int  # multiply-accumulates x2 for one sample
    latency_ms_batch1: float  # measured on the build machine
    latency_ms_batch8: float
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    arch: dict[str, Any] = field(default_factory=dict)
    # Per accuracy floor, the confidence above which its answers reach it (calibrated
    # on held-out samples at build time; empty for a variant that is not a classifier).
    acceptance: tuple[Acceptance, ...] = ()

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Variant:
        return cls(
            name=raw["name"],
            task=raw["task"],
            runtime=raw["runtime"],
            file=raw["file"],
            accuracy=float(raw["accuracy"]),
            params=int(raw["params"]),
            flops=int(raw.get("flops", 0)),
            latency_ms_batch1=float(raw["latency_ms_batch1"]),
            latency_ms_batch8=float(raw["latency_ms_batch8"]),
            inputs=tuple(TensorSpec.from_json(t) for t in raw["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in raw["outputs"]),
            arch=dict(raw.get("arch", {})),
            acceptance=tuple(Acceptance.from_json(a) for a in raw.get("acceptance", ())),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "runtime": self.runtime,
            "file": self.file,
            "accuracy": self.accuracy,
            "params": self.params,
            "flops": self.flops,
            "latency_ms_batch1": self.latency_ms_batch1,
            "latency_ms_batch8": self.latency_ms_batch8,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "arch": self.arch,
            "acceptance": [a.to_json() for a in self.acceptance],
        }


@dataclass(frozen=True, slots=True)
class Manifest:
    root: Path
    variants: tuple[Variant, ...]
    seed: int = 0
    fingerprint: str = ""
    calibration: CalibrationConfig | None = None  # how the acceptance tables were calibrated

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants)
        raise KeyError(f"unknown variant {name!r} (known: {known})")

    def path(self, variant: Variant) -> Path:
        return self.root / variant.file

    def tasks(self) -> list[str]:
        return sorted({v.task for v in self.variants})


def load_manifest(root: Path | str) -> Manifest:
    root = Path(root)
    raw = json.loads((root / MANIFEST_NAME).read_text())
    return Manifest(
        root=root,
        variants=tuple(Variant.from_json(v) for v in raw["variants"]),
        seed=int(raw.get("seed", 0)),
        fingerprint=str(raw.get("fingerprint", "")),
        calibration=CalibrationConfig.from_json(raw["calibration"]) if "calibration" in raw else None,
    )


def write_manifest(manifest: Manifest) -> Path:
    path = manifest.root / MANIFEST_NAME
    doc = {
        "version": 1,
        "seed": manifest.seed,
        "fingerprint": manifest.fingerprint,
        **({} if manifest.calibration is None else {"calibration": manifest.calibration.to_json()}),
        "variants": [v.to_json() for v in manifest.variants],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path

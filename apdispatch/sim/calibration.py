"""From the model zoo's measured latencies to service times on simulated devices.

Where a variant's cost comes from, in order:

1. the scenario's ``[variants.NAME]`` table (``latency_ms``, optionally
   ``latency_ms_batch8``): taken as they are, "one request alone on a
   speed-1.0 device";
2. otherwise the zoo variant's ``latency_ms_batch1`` and ``latency_ms_batch8``
   from a latency profile (``apdispatch.sim.profile``: the shipped reference
   by default, the manifest's measured figures with ``--latencies measured``),
   passed through a :class:`Calibration`.

Either profile holds tight-loop timings of the bare model on a build
machine (microseconds for the zoo's small networks). The live topology
(``apdispatch.tools.topology``) makes a worker on a device of speed ``s`` < 1
hold its slot for the profile's figure divided by ``s``, which is this
module's service time at scale 1 with no overhead; where that is shorter than
the real call (the hop into the slot's thread and the model), the real call
sets it. Hence the calibrated service time of a manifest variant at batch
``b`` on a device of speed ``s``::

    service_ms = scale * latency_ms(b) / s + overhead_ms

``scale`` absorbs a machine that runs the models slower (or faster) than the
one the profile was timed on, or a live topology emulated by slowdown alone
(``--latencies measured``), where every call costs what it really took times
``1 / s``; ``overhead_ms`` is the fixed cost per execution. The default,
:data:`MANIFEST`, takes the profile's figures as they are (scale 1, no
overhead). The live-vs-sim fidelity study fits both numbers from the
``compute_ms`` of live replies with :func:`fit_calibration`.

Batch sizes in between are interpolated linearly between the batch-1 and the
batch-8 figures (and extrapolated beyond 8).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from apdispatch.common.manifest import MEASURED_BATCH, batch_latency_ms
from apdispatch.scenario import ScenarioError

__all__ = [
    "MANIFEST",
    "MEASURED_BATCH",
    "Calibration",
    "batch_latency_ms",
    "fit_calibration",
    "parse_calibration",
]


@dataclass(frozen=True, slots=True)
class Calibration:
    """``service_ms = scale * latency_ms(batch) / speed + overhead_ms`` for manifest variants."""

    scale: float = 1.0
    overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        if not self.scale > 0 or self.overhead_ms < 0:
            raise ValueError(f"calibration: scale must be > 0 and overhead_ms >= 0, got {self}")


MANIFEST = Calibration()


def fit_calibration(samples: Iterable[tuple[float, float, float]]) -> Calibration:
    """Least-squares ``scale`` and ``overhead_ms`` from live observations.

    Each sample is ``(manifest_latency_ms, speed, observed_compute_ms)``: the
    manifest's figure for the batch the worker ran, the speed of the device the
    worker emulated (``1 / slowdown``), and the ``compute_ms`` its reply
    carried. Fits ``observed = scale * manifest / speed + overhead``; with all
    samples at one point the overhead is taken as 0.
    """
    rows = np.array([(m / s, c) for m, s, c in samples], dtype=np.float64)
    if rows.size == 0:
        raise ValueError("fit_calibration: no samples")
    x, y = rows[:, 0], rows[:, 1]
    if np.ptp(x) <= 1e-12 * max(1.0, float(np.abs(x).max())):
        return Calibration(scale=float(y.mean() / x.mean()), overhead_ms=0.0)
    slope, intercept = np.polyfit(x, y, 1)
    if intercept < 0:
        # A negative fixed cost is noise: refit through the origin.
        return Calibration(scale=float((x @ y) / (x @ x)), overhead_ms=0.0)
    return Calibration(scale=float(slope), overhead_ms=float(intercept))


def parse_calibration(text: str | None) -> Calibration:
    if text is None:
        return MANIFEST
    try:
        parts = [float(p) for p in text.split(",")]
        if len(parts) not in (1, 2):
            raise ValueError
        return Calibration(scale=parts[0], overhead_ms=parts[1] if len(parts) == 2 else 0.0)
    except ValueError:
        raise ScenarioError(
            f"--calibration: expected SCALE[,OVERHEAD_MS] (scale > 0), got {text!r}"
        ) from None

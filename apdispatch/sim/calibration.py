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
machine (microseconds for the zoo's small networks). A live worker holds its
slot for longer than that: ``Slots.execute`` multiplies the measured compute by
the emulated slowdown and adds the hop into the slot's thread, which the
slowdown does not multiply. Hence the calibrated service time of a manifest
variant at batch ``b`` on a device of speed ``s``::

    service_ms = scale * latency_ms(b) / s + overhead_ms

``scale`` absorbs a machine that runs the models slower (or faster) than the
one the profile was timed on; ``overhead_ms`` is the fixed cost per
execution. The default, :data:`MANIFEST`, takes the profile's figures as they
are (scale 1, no overhead), which matches what ``apdispatch worker`` measures for the zoo's models at
warm-up, on an idle machine, to within a few microseconds. Under load the
live figure is much larger: ``apdispatch demo scenarios/small-edge-cloud.toml
--duration 20`` on a 2-core machine (AP, four workers and the load generator
sharing it) is reproduced within 2 points of success ratio for six of the
seven static policies (``p2c``: 3.7) by ``Calibration(scale=12)``
(``--calibration 12``), and not by scale 1 (``closest``: 100 % instead of
92 %). The live-vs-sim fidelity study fits both numbers from the
``compute_ms`` of live replies with :func:`fit_calibration`.

Batch sizes in between are interpolated linearly between the batch-1 and the
batch-8 figures (and extrapolated beyond 8).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from apdispatch.scenario import ScenarioError

MEASURED_BATCH = 8  # the manifest's second latency figure is for this batch size


@dataclass(frozen=True, slots=True)
class Calibration:
    """``service_ms = scale * latency_ms(batch) / speed + overhead_ms`` for manifest variants."""

    scale: float = 1.0
    overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        if not self.scale > 0 or self.overhead_ms < 0:
            raise ValueError(f"calibration: scale must be > 0 and overhead_ms >= 0, got {self}")


MANIFEST = Calibration()


def batch_latency_ms(latency_ms_batch1: float, latency_ms_batch8: float, batch: int) -> float:
    """One execution of ``batch`` requests, linear between the batch-1 and batch-8 figures."""
    slope = (latency_ms_batch8 - latency_ms_batch1) / (MEASURED_BATCH - 1)
    return latency_ms_batch1 + slope * (batch - 1)


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

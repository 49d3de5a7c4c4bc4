"""Where the simulator takes the zoo's variant latencies from: a latency profile.

``apdispatch models build`` times every variant on the machine that builds
the zoo and writes the figures into ``manifest.json``; a busy machine writes
figures twice as large, and every simulated result moves with them. So the
simulator reads the zoo's latencies from a profile instead:

- ``reference`` (the default): ``reference_profile.toml``, shipped inside
  this package, the same figures on every machine;
- ``measured``: the manifest's own, as the build timed them;
- a path to a TOML file in the reference profile's format::

      [variants.digits-tiny]
      latency_ms_batch1 = 0.005
      latency_ms_batch8 = 0.006

Only latencies come from a profile: accuracies and tensor specs are the
manifest's (a seeded build reproduces them), and a scenario's
``[variants.NAME]`` table still wins over both. A ``Calibration``
(``--calibration``) scales whichever latencies the profile gave.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from apdispatch.common.manifest import Manifest
from apdispatch.scenario import ScenarioError

REFERENCE = "reference"
MEASURED = "measured"
REFERENCE_FILE = "reference_profile.toml"


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    """Per variant, (ms at batch 1, ms at batch 8); ``variants`` None keeps the manifest's own."""

    name: str  # "reference", "measured" or the file it was read from
    variants: Mapping[str, tuple[float, float]] | None

    def apply(self, manifest: Manifest) -> Manifest:
        """The manifest with every variant's latencies taken from this profile."""
        if self.variants is None:
            return manifest
        missing = [v.name for v in manifest.variants if v.name not in self.variants]
        if missing:
            raise ScenarioError(
                f"latency profile {self.name}: no latencies for {', '.join(missing)} of the zoo in "
                f"{manifest.root} (add them to the profile, or use --latencies measured)"
            )
        return dataclasses.replace(
            manifest,
            variants=tuple(
                dataclasses.replace(
                    v, latency_ms_batch1=self.variants[v.name][0], latency_ms_batch8=self.variants[v.name][1]
                )
                for v in manifest.variants
            ),
        )


MEASURED_PROFILE = LatencyProfile(MEASURED, None)


def parse_profile(text: str, name: str) -> LatencyProfile:
    """A profile from TOML text; errors name the key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"latency profile {name}: {exc}") from None
    tables = doc.get("variants")
    if not isinstance(tables, dict) or not tables:
        raise ScenarioError(f"latency profile {name}: expected [variants.NAME] tables")
    variants: dict[str, tuple[float, float]] = {}
    for variant, table in tables.items():
        where = f"latency profile {name}: variants.{variant}"
        if not isinstance(table, dict) or set(table) != {"latency_ms_batch1", "latency_ms_batch8"}:
            raise ScenarioError(f"{where}: expected exactly latency_ms_batch1 and latency_ms_batch8")
        b1, b8 = table["latency_ms_batch1"], table["latency_ms_batch8"]
        if not all(isinstance(x, int | float) and math.isfinite(x) and x > 0 for x in (b1, b8)):
            raise ScenarioError(f"{where}: latencies must be finite numbers > 0, got {b1!r}, {b8!r}")
        variants[variant] = (float(b1), float(b8))
    return LatencyProfile(name, variants)


@functools.cache
def reference_profile() -> LatencyProfile:
    """The profile shipped with the package (``apdispatch/sim/reference_profile.toml``)."""
    text = resources.files("apdispatch.sim").joinpath(REFERENCE_FILE).read_text(encoding="utf-8")
    return parse_profile(text, REFERENCE)


def load_profile(path: Path) -> LatencyProfile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"--latencies: cannot read {path}: {exc.strerror or exc}") from None
    return parse_profile(text, str(path))


def parse_latencies(text: str | None) -> LatencyProfile:
    """``--latencies``: ``reference`` (also for None), ``measured`` or a profile file's path."""
    if text is None or text == REFERENCE:
        return reference_profile()
    if text == MEASURED:
        return MEASURED_PROFILE
    return load_profile(Path(text))


__all__ = [
    "MEASURED",
    "MEASURED_PROFILE",
    "REFERENCE",
    "LatencyProfile",
    "load_profile",
    "parse_latencies",
    "parse_profile",
    "reference_profile",
]

"""Every threshold of a learned decision's guards, in one typed config.

Saved in a learned policy's checkpoint (``guards`` in its JSON), overridden
from the AP's TOML (``[guards]``) and from ``--guard KEY=VALUE`` on
``apdispatch serve`` and ``apdispatch sim``. The defaults are the values the
shipped checkpoint was trained and evaluated with; docs/operations.md has
the table, and docs/experiments.md the scenarios behind each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class GuardConfig:
    # Safety margin (``Margins``): a target's replies come ``mean + spread sd``
    # later than predicted; ``margin_alpha`` is one reply's weight in the mean.
    spread: float = 1.0
    margin_alpha: float = 0.05
    # Risk guard: a wider margin, ``mean + risk_spread sd``, the sd widened by
    # Student's t for a target known from fewer than ``small_sample_max`` replies.
    risk_spread: float = 2.0
    small_sample_max: int = 400
    # Reservations: a worker is kept for other apps when they press on it by
    # ``load`` (a share of its capacity) or more; arrival rates decay over
    # ``tau_s``; dependencies are refreshed every ``refresh_s``, and a decision
    # recomputes pressures itself only when they are ``stale_s`` old;
    # ``typical_alpha`` weighs a refresh in a target's typical prediction.
    load: float = 0.05
    tau_s: float = 10.0
    refresh_s: float = 0.2
    stale_s: float = 1.0
    typical_alpha: float = 0.2
    # An app presses in full once it misses its SLA on ``misses`` of its
    # requests (an average with weight ``miss_alpha`` per outcome, about its
    # last 300); state is kept for at most ``max_apps`` apps.
    misses: float = 0.01
    miss_alpha: float = 0.003
    max_apps: int = 1000
    # Calm guard: while no app needs room, take the soonest predicted of what is open.
    calm: bool = True
    # Cascade guard: when the router offers cascades (a light variant first, an accurate one
    # for its unsure answers) and one is open, only cascades stay open.
    prefer_cascade: bool = True
    # Unsafe guard: when no open candidate is within its safety margin, only the soonest predicted.
    unsafe: bool = True

    def validate(self) -> GuardConfig:
        positive = ("spread", "risk_spread", "tau_s", "refresh_s", "stale_s", "misses")
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        for name in ("margin_alpha", "typical_alpha", "miss_alpha"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name}: must be in (0, 1], got {value!r}")
        if not (math.isfinite(self.load) and self.load >= 0):
            raise ValueError(f"load: must be a finite number >= 0, got {self.load!r}")
        if self.small_sample_max < 3:
            raise ValueError(f"small_sample_max: must be >= 3, got {self.small_sample_max!r}")
        if self.max_apps < 1:
            raise ValueError(f"max_apps: must be >= 1, got {self.max_apps!r}")
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> GuardConfig:
        """A copy with ``overrides`` applied, each a field and of its type (a ValueError names a bad one)."""
        types = {f.name: f.default for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in types:
                raise ValueError(f"{key}: not a guard setting (known: {', '.join(types)})")
            default = types[key]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{key}: must be true or false, got {value!r}")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{key}: must be an integer, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key}: must be a number, got {value!r}")
            else:
                value = float(value)
            changes[key] = value
        return replace(self, **changes).validate()

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> GuardConfig:
        return cls().with_overrides(data or {})


def parse_guard_overrides(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (the ``--guard`` flag) as typed overrides; ValueError names the bad one."""
    out: dict[str, Any] = {}
    defaults = {f.name: f.default for f in fields(GuardConfig)}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise ValueError(f"--guard {item!r}: expected KEY=VALUE, KEY one of {', '.join(defaults)}")
        default = defaults[key]
        raw = raw.strip()
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false"):
                    raise ValueError(raw)
                out[key] = raw.lower() == "true"
            elif isinstance(default, int):
                out[key] = int(raw)
            else:
                out[key] = float(raw)
        except ValueError:
            raise ValueError(f"--guard {item!r}: {key} takes a {type(default).__name__}") from None
    GuardConfig().with_overrides(out)
    return out

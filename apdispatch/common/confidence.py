"""A classifier's confidence in its answer, and the thresholds at which its answers can be trusted.

Workers put the top softmax probability of every answer in its reply (the
``confidence`` parameter); whatever accepts or escalates an answer reads the
same number. A variant is a classifier when its one output is ``logits``,
FP32, of shape (batch, classes) with two classes or more.

At zoo build time, ``calibrate`` finds per accuracy floor the lowest
confidence threshold whose accepted answers reach the floor on held-out
samples (by a binomial lower bound); the manifest stores the table
(``Variant.acceptance``), and ``acceptance_for`` reads an app's entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from apdispatch.common.binomial import lower_bound
from apdispatch.common.tensors import TensorSpec

LOGITS = "logits"
PARAMETER = "confidence"  # the reply parameter (double): the lowest of the request's rows


def is_classifier(outputs: Sequence[TensorSpec]) -> bool:
    """Whether a variant with these output specs answers with one row of class logits per input row."""
    if len(outputs) != 1:
        return False
    out = outputs[0]
    return out.name == LOGITS and out.datatype == "FP32" and len(out.shape) == 2 and out.shape[1] >= 2


def top_probability(logits: np.ndarray) -> np.ndarray:
    """Per row of ``logits`` (batch, classes), the largest softmax probability, in (1 / classes, 1].

    Computed as 1 / sum(exp(z - max z)): no division per class, and no overflow
    for any finite logits.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"logits: expected (batch, classes), got shape {z.shape}")
    shifted = z - z.max(axis=1, keepdims=True)
    result: np.ndarray = 1.0 / np.exp(shifted).sum(axis=1)
    return result


def answer_confidence(logits: np.ndarray) -> float:
    """A request's confidence: the top probability of its least confident row (``PARAMETER``)."""
    return float(top_probability(logits).min())


@dataclass(frozen=True, slots=True)
class Acceptance:
    """Answers of a variant whose confidence is at least ``threshold`` reach ``floor`` (at the stated level).

    Calibrated on held-out samples: of them, a share ``coverage`` clears the
    threshold, and their accuracy, ``accuracy`` measured, is at least ``floor``
    by a one-sided Clopper-Pearson bound. The rest (1 - ``coverage``) would be
    escalated.
    """

    floor: float
    threshold: float
    coverage: float
    accuracy: float

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Acceptance:
        return cls(*(float(raw[k]) for k in ("floor", "threshold", "coverage", "accuracy")))


@dataclass(frozen=True, slots=True)
class CalibrationConfig:
    """How acceptance thresholds are calibrated at zoo build time (saved in the manifest).

    ``thresholds`` candidate thresholds, the confidence's quantiles at 0,
    1 / thresholds, ...; each is tested at ``level`` with a Bonferroni share of
    the error (1 - level) / thresholds, so that the one chosen, the lowest that
    passes, holds at ``level`` whichever it is. Floors from ``floor_min`` to
    ``floor_max`` every ``floor_step``; an app's floor reads the next one up.
    """

    level: float = 0.95
    thresholds: int = 20
    floor_min: float = 0.50
    floor_max: float = 0.99
    floor_step: float = 0.01

    def floors(self) -> list[float]:
        count = round((self.floor_max - self.floor_min) / self.floor_step) + 1
        return [round(self.floor_min + i * self.floor_step, 6) for i in range(count)]

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CalibrationConfig:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def calibrate(
    confidence: np.ndarray, correct: np.ndarray, config: CalibrationConfig | None = None
) -> tuple[Acceptance, ...]:
    """Per floor of ``config``, the lowest candidate threshold whose accepted answers reach it, if any.

    ``confidence``: each held-out sample's top probability; ``correct``: whether
    the variant's answer to it was right.
    """
    config = config or CalibrationConfig()
    conf = np.asarray(confidence, dtype=np.float64)
    right = np.asarray(correct, dtype=bool)
    if conf.shape != right.shape or conf.ndim != 1 or len(conf) == 0:
        raise ValueError(
            f"confidence and correct: expected two equal 1-d arrays, got {conf.shape} and {right.shape}"
        )
    candidates = np.unique(np.quantile(conf, np.arange(config.thresholds) / config.thresholds))
    # Per candidate threshold, from the lowest: accepted count, right among them, and the bound.
    level = 1.0 - (1.0 - config.level) / config.thresholds
    tested = []
    for t in candidates:
        accepted = conf >= t
        n = int(accepted.sum())
        k = int(right[accepted].sum())
        tested.append((float(t), n / len(conf), k / n, lower_bound(k, n, level)))
    out = []
    for floor in config.floors():
        passing = [row for row in tested if row[3] >= floor]
        if passing:
            t, coverage, accuracy, _ = passing[0]  # the lowest threshold: the most answers kept
            out.append(Acceptance(floor, round(t, 6), round(coverage, 6), round(accuracy, 6)))
    return tuple(out)


def acceptance_for(table: tuple[Acceptance, ...], min_accuracy: float) -> Acceptance | None:
    """The entry of ``table`` for an app whose floor is ``min_accuracy``: the lowest floor at or above it."""
    for entry in table:
        if entry.floor >= min_accuracy - 1e-9:
            return entry
    return None

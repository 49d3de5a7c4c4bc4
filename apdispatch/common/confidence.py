"""A classifier's confidence in its answer: the top softmax probability of each row of logits.

Workers put it in every classification reply (the ``confidence`` parameter);
whatever accepts or escalates an answer on it reads the same number. A
variant is a classifier when its one output is ``logits``, FP32, of shape
(batch, classes) with two classes or more.
"""

from __future__ import annotations

import numpy as np

from apdispatch.common.manifest import Variant

LOGITS = "logits"
PARAMETER = "confidence"  # the reply parameter (double): the lowest of the request's rows


def is_classifier(variant: Variant) -> bool:
    """Whether ``variant`` answers with one row of class logits per input row."""
    if len(variant.outputs) != 1:
        return False
    out = variant.outputs[0]
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

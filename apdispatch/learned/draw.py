"""The chooser's last step: one of the open candidates from their logits.

``sample`` draws candidate i with probability softmax(logits)_i (the actor's
policy while it explores); ``greedy`` takes the highest logit, the first of
equals. Both work on plain floats: for the few dozen logits of a decision a
loop beats a chain of numpy calls on tiny arrays, and it compiles with the
rest of the hot path (``apdispatch.learned.native``).
"""

from __future__ import annotations

from math import exp


def sample(logits: list[float], u: float) -> int:
    """The index that ``u`` (uniform in [0, 1)) picks with probability softmax(``logits``).

    The inverse of the distribution function, walked in order: the first i
    where u * sum(w) < w_0 + ... + w_i, with w = exp(logits - max).
    """
    top = max(logits)
    weights = [exp(v - top) for v in logits]
    total = 0.0
    for w in weights:
        total += w
    left = u * total
    last = len(weights) - 1
    for i in range(last):
        left -= weights[i]
        if left < 0.0:
            return i
    return last


def greedy(logits: list[float]) -> int:
    """The index of the highest logit; the first of equals."""
    return logits.index(max(logits))

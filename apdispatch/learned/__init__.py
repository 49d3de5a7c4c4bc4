"""Learned routing policies: ``aset``, ``actor-critic`` and ``learned`` (the shipped default).

- ``aset`` (ASET): every time window, an agent picks which static policy
  dispatches the next window.
- ``actor-critic`` (ECSRL): picks the target of each request from per-candidate
  features, with an actor and a critic.
- ``learned``: what the project ships, from ``checkpoints/learned.pt``: an
  actor-critic pre-trained in the simulator (``apdispatch train``), that keeps
  learning online.

Every one of them decides on a numpy snapshot of its parameters and learns in
the background: the actor-critic kinds in a learner process of their own
(``process.py``), ASET in a thread (``learner.py``); in the simulator and in
training, inline, so that a seeded run is reproducible. The decision path
never touches torch. Its hot path (the guards, the features, the
reservations) runs compiled when built and current (``native.py``).
"""

from __future__ import annotations

from apdispatch.learned import native

# Before any module of the hot path is imported: which of its forms loads.
NATIVE: native.NativeStatus = native.install()

# Names only: importing this package must not import torch (the AP and the
# simulator with a static policy never load it); the policies are built by
# ``apdispatch.learned.factory``.
LEARNED_POLICIES: tuple[str, ...] = ("aset", "actor-critic", "learned")
# Rules over the same guards and margins (``slack.py``): no network, no checkpoint.
RULE_POLICIES: tuple[str, ...] = ("slack", "slack-guarded")

"""The learned policies' names, importable without torch."""

from __future__ import annotations

LEARNED_POLICIES: tuple[str, ...] = ("aset", "actor-critic", "learned")

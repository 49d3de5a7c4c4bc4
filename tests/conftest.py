"""Fixtures shared by the whole test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built model zoo, built at most once per session.

    ``APDISPATCH_MODELS`` points at a prebuilt zoo (``make test`` builds
    ``build/models`` first); without it, the zoo is built into a temporary folder.
    """
    from apdispatch.common.manifest import MANIFEST_NAME
    from workers.zoo.build import build_zoo

    prebuilt = os.environ.get("APDISPATCH_MODELS")
    if prebuilt:
        root = Path(prebuilt).resolve()
        if not (root / MANIFEST_NAME).is_file():
            build_zoo(root)
        return root
    root = tmp_path_factory.mktemp("models")
    build_zoo(root)
    return root

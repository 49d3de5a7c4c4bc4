"""The decision's hot path as C extensions (mypyc), when they are built and current; else the sources.

``apdispatch compile`` (``make compile``) builds an extension of each module
in ``HOT_PATH`` beside its source, with one shared library (``GROUP``), and
records each source's sha256 in ``RECORD``. Python imports an extension in
preference to a source of the same name; ``install`` steps in, before any of
them is imported, when the extensions must not be used:

- ``APDISPATCH_INTERPRETED=1`` in the environment asks for the sources;
- a source differs from what was compiled: the extension would run old code.

Both paths decide alike: ``tests/test_native.py`` checks that a simulation
gives the same figures, to the bit, either way.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

# In import order: each after what it imports.
HOT_PATH: tuple[str, ...] = (
    "apdispatch.learned.features",
    "apdispatch.learned.reserve",
    "apdispatch.learned.guards",
    "apdispatch.learned.draw",
)
GROUP = "apdispatch.learned.hot"  # the shared library: apdispatch/learned/hot__mypyc.<suffix>
RECORD = "compiled.json"  # beside the sources: {module: sha256 of the source compiled}
INTERPRETED_ENV = "APDISPATCH_INTERPRETED"
PACKAGE = "apdispatch.learned"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class NativeStatus:
    compiled: bool  # the extensions are what the hot path imports
    reason: str  # why, in a few words (logged by the AP, printed by the decision bench)


def source_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    return package_dir / f"{module.rsplit('.', 1)[1]}.py"


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extension_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The extension Python would import for ``module`` (its last part, in ``package_dir``), if any."""
    stem = module.rsplit(".", 1)[1]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = package_dir / f"{stem}{suffix}"
        if path.exists():
            return path
    return None


def extensions(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Every extension module in ``package_dir``: a build's, or one left by an older build."""
    return sorted(
        p for p in package_dir.iterdir() if p.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    )


def built(package_dir: Path = PACKAGE_DIR) -> bool:
    """Whether any extension lies beside the sources."""
    return bool(extensions(package_dir))


def status(
    package_dir: Path = PACKAGE_DIR,
    environ: Mapping[str, str] = os.environ,
    modules: Sequence[str] = HOT_PATH,
) -> NativeStatus:
    """Whether the hot path's extensions may be imported, and why (not)."""
    found = extensions(package_dir)
    if not found:
        return NativeStatus(False, "not compiled (apdispatch compile)")
    if environ.get(INTERPRETED_ENV, "") not in ("", "0"):
        return NativeStatus(False, f"{INTERPRETED_ENV}={environ[INTERPRETED_ENV]}")
    expected = [extension_path(m, package_dir) for m in (*modules, f"{GROUP}__mypyc")]
    missing = [m for m, p in zip((*modules, f"{GROUP}__mypyc"), expected, strict=True) if p is None]
    if missing:
        return NativeStatus(False, f"incomplete build, missing {', '.join(missing)} (apdispatch compile)")
    strays = [p.name for p in found if p not in expected]
    if strays:
        return NativeStatus(False, f"extensions of no build: {', '.join(strays)} (apdispatch compile)")
    try:
        record = json.loads((package_dir / RECORD).read_text())
    except (OSError, ValueError):
        return NativeStatus(False, f"no readable {RECORD} (apdispatch compile)")
    stale = [m for m in modules if record.get(m) != source_digest(source_path(m, package_dir))]
    if stale:
        names = ", ".join(source_path(m, package_dir).name for m in stale)
        return NativeStatus(False, f"stale: {names} changed since compiled (apdispatch compile)")
    return NativeStatus(True, "compiled (mypyc)")


class SourceFinder:
    """Imports the package's modules from their sources, whatever extensions lie beside them."""

    def __init__(self, package: str = PACKAGE, package_dir: Path = PACKAGE_DIR) -> None:
        self.prefix = package + "."
        self.package_dir = package_dir

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not name.startswith(self.prefix) or "." in name[len(self.prefix) :]:
            return None
        source = source_path(name, self.package_dir)
        if not source.exists():
            return None
        return importlib.util.spec_from_file_location(name, source)


def install(environ: Mapping[str, str] = os.environ) -> NativeStatus:
    """Decide, once per process and before the hot path is imported, which of its forms loads."""
    current = status(environ=environ)
    if not current.compiled and built() and not any(isinstance(f, SourceFinder) for f in sys.meta_path):
        # Every module of the package from its source: an extension of any of them may be stale.
        sys.meta_path.insert(0, SourceFinder())
    return current

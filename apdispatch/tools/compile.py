"""``apdispatch compile``: build the decision's hot path as C extensions with mypyc.

The extensions land beside their sources, in the installed package (an
editable install: the checkout), with ``native.RECORD``; ``native.status``
then lets Python import them. Nothing is built when the current build
matches the sources. Needs mypy (the ``dev`` extra), a C compiler and
Python's headers; without them the AP runs the same code interpreted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from apdispatch.learned import native


def build(package_dir: Path = native.PACKAGE_DIR, quiet: bool = True) -> None:
    """Compile ``native.HOT_PATH`` in place and record the sources compiled."""
    from mypyc.build import mypycify
    from setuptools import Distribution

    root = package_dir.parent.parent  # the folder holding the top-level package
    top = package_dir.relative_to(root).parts[0]
    digests = {m: native.source_digest(native.source_path(m, package_dir)) for m in native.HOT_PATH}
    remove(package_dir)  # an older build's extension of a module no longer compiled would shadow its source
    with tempfile.TemporaryDirectory(prefix="apdispatch-mypyc-") as work:
        # A copy of the package's sources, alone in a folder: in site-packages, mypy would take
        # every neighbour of the package (mypy_extensions.py...) for a module of the project.
        src = Path(work, "src")
        shutil.copytree(root / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pt"))
        paths = [str(native.source_path(m, package_dir).relative_to(root)) for m in native.HOT_PATH]
        # The project's mypy settings: an installed package has no pyproject.toml beside it.
        flags = [
            "--ignore-missing-imports",
            "--check-untyped-defs",
            "--follow-imports=silent",
            f"--cache-dir={os.path.join(work, 'mypy')}",
        ]
        with contextlib.chdir(src):
            extensions = mypycify(
                [*flags, *paths], group_name=native.GROUP, target_dir=os.path.join(work, "c"), opt_level="3"
            )
            # A bare Distribution: setup() would read a pyproject.toml in the folder as well.
            dist = Distribution({"name": "apdispatch-hot-path", "ext_modules": extensions})
            dist.verbose = not quiet
            command = dist.get_command_obj("build_ext")
            command.inplace = True
            command.build_temp = os.path.join(work, "temp")
            command.build_lib = os.path.join(work, "lib")
            dist.run_command("build_ext")
        for built in native.extensions(src / package_dir.relative_to(root)):
            shutil.copy2(built, package_dir / built.name)
    (package_dir / native.RECORD).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


def remove(package_dir: Path = native.PACKAGE_DIR) -> list[Path]:
    """Delete every extension in the package and the record: the hot path runs from its sources again."""
    gone = native.extensions(package_dir)
    for path in gone:
        path.unlink()
    record = package_dir / native.RECORD
    if record.exists():
        record.unlink()
        gone.append(record)
    return gone


def missing_toolchain() -> str:
    """What the build lacks on this machine ("" when nothing): mypyc, a C compiler, Python's headers."""
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc (pip install 'apdispatch[compile]')"
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(compiler.split()[0]) is None:
        return f"C compiler ({compiler.split()[0]})"
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        return "Python.h (Python's development headers)"
    return ""


def main(args: argparse.Namespace) -> int:
    if args.clean:
        for path in remove():
            print(f"removed {path}")
        return 0
    current = native.status(environ={})
    if current.compiled and not args.force:
        print(f"hot path: {current.reason}, up to date")
        return 0
    lacking = missing_toolchain()
    if lacking:
        print(f"cannot compile the hot path: no {lacking}; hot path: {current.reason}", file=sys.stderr)
        return 0 if args.if_possible else 1
    try:
        build(quiet=not args.verbose)
    except (ImportError, SystemExit, OSError) as error:
        # setuptools reports a missing compiler or header as SystemExit.
        print(f"cannot compile the hot path ({error}); it runs interpreted", file=sys.stderr)
        return 1
    after = native.status(environ={})
    print(f"hot path: {after.reason}: {', '.join(native.HOT_PATH)}")
    return 0 if after.compiled else 1

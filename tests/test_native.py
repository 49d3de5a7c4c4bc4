"""The hot path's two forms: which one loads (hand cases), and that both decide alike (a simulation)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import apdispatch.learned
from apdispatch.learned import native
from apdispatch.tools.compile import remove

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
MODULES = ("pkg.learned.alpha", "pkg.learned.beta")


def lay_out(folder: Path, *, extensions: bool = True, library: bool = True, record: bool = True) -> Path:
    """Sources of ``MODULES`` in ``folder``; stand-ins for their extensions and the record, as asked."""
    for module in MODULES:
        stem = module.rsplit(".", 1)[1]
        (folder / f"{stem}.py").write_text(f"NAME = {stem!r}\n")
        if extensions:
            (folder / f"{stem}{SUFFIX}").write_bytes(b"")
    if library:
        (folder / f"hot__mypyc{SUFFIX}").write_bytes(b"")
    if record:
        digests = {m: native.source_digest(native.source_path(m, folder)) for m in MODULES}
        (folder / native.RECORD).write_text(json.dumps(digests))
    return folder


def status(folder: Path, **environ: str) -> native.NativeStatus:
    return native.status(folder, environ, MODULES)


def test_nothing_built_is_interpreted(tmp_path: Path) -> None:
    current = status(lay_out(tmp_path, extensions=False, library=False, record=False))
    assert not current.compiled and "not compiled" in current.reason
    assert not native.built(tmp_path)


def test_a_current_build_is_compiled(tmp_path: Path) -> None:
    assert status(lay_out(tmp_path)) == native.NativeStatus(True, "compiled (mypyc)")


def test_the_environment_can_ask_for_the_sources(tmp_path: Path) -> None:
    lay_out(tmp_path)
    assert status(tmp_path, APDISPATCH_INTERPRETED="1") == native.NativeStatus(
        False, "APDISPATCH_INTERPRETED=1"
    )
    assert status(tmp_path, APDISPATCH_INTERPRETED="0").compiled
    assert status(tmp_path, APDISPATCH_INTERPRETED="").compiled


def test_a_source_changed_since_the_build_is_stale(tmp_path: Path) -> None:
    lay_out(tmp_path)
    (tmp_path / "beta.py").write_text("NAME = 'changed'\n")
    current = status(tmp_path)
    assert not current.compiled
    assert "stale: beta.py" in current.reason and "alpha" not in current.reason


def test_an_incomplete_build_is_not_used(tmp_path: Path) -> None:
    current = status(lay_out(tmp_path, library=False))
    assert not current.compiled and "missing pkg.learned.hot__mypyc" not in current.reason
    assert "incomplete" in current.reason
    (tmp_path / f"hot__mypyc{SUFFIX}").write_bytes(b"")
    (tmp_path / f"alpha{SUFFIX}").unlink()
    assert "missing pkg.learned.alpha" in status(tmp_path).reason


def test_a_build_without_its_record_is_not_used(tmp_path: Path) -> None:
    current = status(lay_out(tmp_path, record=False))
    assert not current.compiled and native.RECORD in current.reason
    (tmp_path / native.RECORD).write_text("{not json")
    assert not status(tmp_path).compiled


def test_an_extension_of_no_build_is_not_used(tmp_path: Path) -> None:
    # Left by a build that compiled more modules: it would load against the newer shared library.
    lay_out(tmp_path)
    (tmp_path / "policy.py").write_text("")
    (tmp_path / f"policy{SUFFIX}").write_bytes(b"")
    current = status(tmp_path)
    assert not current.compiled and f"policy{SUFFIX}" in current.reason


def test_the_source_finder_takes_the_packages_modules_from_their_sources(tmp_path: Path) -> None:
    lay_out(tmp_path)
    finder = native.SourceFinder("pkg.learned", tmp_path)
    spec = finder.find_spec("pkg.learned.alpha")
    assert spec is not None and spec.origin == str(tmp_path / "alpha.py")
    assert finder.find_spec("pkg.learned.gamma") is None  # no source: left to the other finders
    assert finder.find_spec("pkg.learned.alpha.inner") is None
    assert finder.find_spec("pkg.other") is None
    assert finder.find_spec("json") is None


def test_remove_takes_every_extension_and_leaves_the_sources(tmp_path: Path) -> None:
    lay_out(tmp_path)
    (tmp_path / f"policy{SUFFIX}").write_bytes(b"")
    gone = remove(tmp_path)
    assert {p.name for p in gone} == {
        f"alpha{SUFFIX}",
        f"beta{SUFFIX}",
        f"hot__mypyc{SUFFIX}",
        f"policy{SUFFIX}",
        native.RECORD,
    }
    assert (tmp_path / "alpha.py").exists() and (tmp_path / "beta.py").exists()
    assert not native.built(tmp_path)


SIM = """
import sys
import apdispatch.learned
import apdispatch.learned.guards as guards
from apdispatch.cli import main
print(apdispatch.learned.NATIVE.compiled, guards.__file__, flush=True)
sys.exit(main(sys.argv[1:]))
"""


def simulate(out: Path, **environ: str) -> tuple[str, dict[str, object]]:
    args = [
        "sim",
        str(ROOT / "scenarios" / "cloud-bottleneck.toml"),
        "--policies",
        "learned,slack-guarded",
        "--no-bound",
        "--cascade",
        "--duration",
        "40",
        "--json",
        str(out),
    ]
    done = subprocess.run(
        [sys.executable, "-c", SIM, *args],
        env={**os.environ, **environ},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return done.stdout.splitlines()[0], json.loads(out.read_text())


@pytest.mark.skipif(not apdispatch.learned.NATIVE.compiled, reason=apdispatch.learned.NATIVE.reason)
def test_compiled_and_interpreted_simulate_alike(tmp_path: Path) -> None:
    compiled_says, compiled = simulate(tmp_path / "compiled.json", APDISPATCH_INTERPRETED="0")
    interpreted_says, interpreted = simulate(tmp_path / "interpreted.json", APDISPATCH_INTERPRETED="1")
    assert compiled_says.startswith("True ") and compiled_says.endswith(SUFFIX), compiled_says
    assert interpreted_says.startswith("False ") and interpreted_says.endswith("guards.py"), interpreted_says
    assert compiled == interpreted


def test_a_machine_without_a_compiler_is_told_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from apdispatch.cli import main
    from apdispatch.tools.compile import missing_toolchain

    monkeypatch.setenv("CC", "no-such-cc-here")
    assert missing_toolchain() == "C compiler (no-such-cc-here)"
    before = native.status()
    # --force asks for a build, which cannot run: the hot path stays as it was.
    assert main(["compile", "--force"]) == 1
    assert "no C compiler (no-such-cc-here)" in capsys.readouterr().err
    assert main(["compile", "--force", "--if-possible"]) == 0
    assert native.status() == before

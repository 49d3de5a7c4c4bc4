"""The command line's refusals: a bad option ends the command before anything starts, named."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


BENCH = ["bench", "--decisions", "--policies", "fastest"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*BENCH, "--sizes", "0"], "apdispatch bench: --sizes: "),
        ([*BENCH, "--sizes", "abc"], "apdispatch bench: --sizes: "),
        ([*BENCH, "--sizes", "4-x"], "apdispatch bench: --sizes: "),
        ([*BENCH, "--sizes", "8-4"], "apdispatch bench: --sizes: "),
        ([*BENCH, "--sizes", ""], "apdispatch bench: --sizes: "),
        ([*BENCH, "--rate", "-5"], "apdispatch bench: --rate: "),
        ([*BENCH, "--policies", "nope"], "apdispatch bench: --policies: "),
        ([*BENCH, "--policies", ","], "apdispatch bench: --policies: "),
        (["serve", "--policy", "nope"], "apdispatch serve: policy: unknown policy 'nope' (known: "),
        (["serve", "--listen", "nohost"], "apdispatch serve: listen: expected host:port"),
        (["serve", "--log-level", "loud"], "apdispatch serve: log_level: "),
    ],
)
def test_a_bad_setting_is_refused_on_stderr_by_name(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from apdispatch.cli import main

    # Refused before any policy, learner or server starts: exit 2, the setting named.
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.err.startswith(message) and out.out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["--overload", "--runs", "0"],
        ["--overload", "--step-s", "0"],
        ["--overload", "--step-s", "nan"],
        ["--requests", "0"],
    ],
)
def test_bench_refuses_non_positive_counts_and_durations(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from apdispatch.cli import main

    # argparse's refusal: exit 2 before anything starts, the option named.
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    assert f"argument {argv[-2]}:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["sim", "scenarios/demo.toml", "--jobs", "-1"],
        ["sim", "scenarios/demo.toml", "--bench", "--repeats", "0"],
        ["sim", "scenarios/demo.toml", "--duration", "-5"],
        ["evaluate", "scenarios/demo.toml", "--jobs", "0"],
        ["evaluate", "scenarios/demo.toml", "--duration", "0"],
        ["ablate", "scenarios/demo.toml", "--jobs", "0"],
        ["ablate", "scenarios/demo.toml", "--duration", "inf"],
        ["generate", "--seeds", "1", "--out", "x", "--duration", "0"],
        ["train", "scenarios/demo.toml", "--out", "x", "--duration", "0"],
        ["demo", "--duration", "0"],
        ["load", "--duration", "-1"],
        ["chaos", "--duration", "0"],
        ["k6", "--duration", "0"],
    ],
)
def test_counts_and_durations_are_refused_by_name(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from apdispatch.cli import main

    # Refused by the parser, before any simulation, process or file: exit 2, the option named.
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {argv[-2]}:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["edge", "--slots", "0"],
        ["edge", "--slowdown", "0"],
        ["edge", "--slowdown", "nan"],
        ["edge", "--link-delay-ms", "-1"],
        ["edge", "--shutdown-grace-s", "-1"],
        ["edge", "--metrics-port", "70000"],
        ["cloud", "--slots", "-2"],
        ["cloud", "--max-batch-size", "0"],
        ["cloud", "--max-wait-ms", "-0.5"],
    ],
)
def test_a_worker_refuses_a_count_or_time_out_of_range_by_name(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from apdispatch.cli import main

    # A worker of 0 slots would take requests and never run one: refused before it serves.
    with pytest.raises(SystemExit) as exc:
        main(["worker", *argv, "--variants", "digits-tiny"])
    assert exc.value.code == 2
    assert f"argument {argv[-2]}:" in capsys.readouterr().err

"""The command line's refusals: a bad option ends the command before anything starts, named."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


BENCH = ["bench", "--decisions", "--policies", "fastest"]
REGISTER = ["worker", "register", "--ap", "127.0.0.1:1", "--address", "127.0.0.1:2", "--variants", "v"]


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
    ("argv", "option"),
    [
        (["bench", "--overload", "--runs", "0"], "--runs"),
        (["bench", "--overload", "--step-s", "0"], "--step-s"),
        (["bench", "--overload", "--step-s", "nan"], "--step-s"),
        (["bench", "--requests", "0"], "--requests"),
        (["sim", "scenarios/demo.toml", "--jobs", "-1"], "--jobs"),
        (["sim", "scenarios/demo.toml", "--bench", "--repeats", "0"], "--repeats"),
        (["sim", "scenarios/demo.toml", "--duration", "-5"], "--duration"),
        (["evaluate", "scenarios/demo.toml", "--jobs", "0"], "--jobs"),
        (["evaluate", "scenarios/demo.toml", "--duration", "0"], "--duration"),
        (["ablate", "scenarios/demo.toml", "--jobs", "0"], "--jobs"),
        (["ablate", "scenarios/demo.toml", "--duration", "inf"], "--duration"),
        (["generate", "--seeds", "1", "--out", "x", "--duration", "0"], "--duration"),
        (["train", "scenarios/demo.toml", "--out", "x", "--duration", "0"], "--duration"),
        (["demo", "--duration", "0"], "--duration"),
        (["load", "--duration", "-1"], "--duration"),
        (["chaos", "--duration", "0"], "--duration"),
        (["k6", "--duration", "0"], "--duration"),
        # numpy's generators take no negative seed: a traceback from deep in a run.
        (["sim", "scenarios/demo.toml", "--seed", "-1"], "--seed"),
        (["evaluate", "scenarios/demo.toml", "--seed", "-1"], "--seed"),
        (["ablate", "scenarios/demo.toml", "--seed", "-1"], "--seed"),
        (["train", "scenarios/demo.toml", "--out", "x", "--seed", "-1"], "--seed"),
        (["load", "scenarios/demo.toml", "--seed", "-1"], "--seed"),
        (["chaos", "scenarios/demo.toml", "--fault-seed", "-1"], "--fault-seed"),
        (["k6", "scenarios/demo.toml", "--seed", "-1"], "--seed"),
        (["demo", "--seed", "-1"], "--seed"),
        # A worker of 0 slots would take requests and never run one.
        (["worker", "edge", "--variants", "v", "--slots", "0"], "--slots"),
        (["worker", "edge", "--variants", "v", "--slowdown", "0"], "--slowdown"),
        (["worker", "edge", "--variants", "v", "--slowdown", "nan"], "--slowdown"),
        (["worker", "edge", "--variants", "v", "--link-delay-ms", "-1"], "--link-delay-ms"),
        (["worker", "edge", "--variants", "v", "--shutdown-grace-s", "-1"], "--shutdown-grace-s"),
        (["worker", "edge", "--variants", "v", "--metrics-port", "70000"], "--metrics-port"),
        (["worker", "cloud", "--variants", "v", "--slots", "-2"], "--slots"),
        (["worker", "cloud", "--variants", "v", "--max-batch-size", "0"], "--max-batch-size"),
        (["worker", "cloud", "--variants", "v", "--max-wait-ms", "-0.5"], "--max-wait-ms"),
        ([*REGISTER, "--slots", "0"], "--slots"),
        ([*REGISTER, "--max-batch-size", "0"], "--max-batch-size"),
        ([*REGISTER, "--accuracy", "1.5"], "--accuracy"),
        ([*REGISTER, "--latency-ms", "0"], "--latency-ms"),
        ([*REGISTER, "--heartbeat-s", "0"], "--heartbeat-s"),
        ([*REGISTER, "--wait-s", "-1"], "--wait-s"),
        ([*REGISTER, "--shutdown-grace-s", "nan"], "--shutdown-grace-s"),
    ],
)
def test_a_count_time_or_port_out_of_range_is_refused_by_the_parser(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from apdispatch.cli import main

    # Refused before any simulation, process, server or file: exit 2, the option named.
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err

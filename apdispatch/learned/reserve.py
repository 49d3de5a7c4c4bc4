"""Keep requests that have a choice off workers that other apps cannot do without.

Spending slack (send a request as far as its deadline allows) leaves the
near, fast targets to the requests that need them, but "far" only stands
in for "needed by nobody else". Where some apps can use only a few workers
(their accuracy floor and deadline rule out every other) and their demand
is a noticeable share of those workers' capacity, other apps' requests that
can go elsewhere must leave those workers alone.

Everything is learned online from what the policy sees, per deployment:

- per app, its arrival rate (decisions and admission rejections, decayed
  with time constant ``tau_s`` of the request's ``now_s``);
- per (app, target), its typical prediction with a slot free (a moving
  average; a queued target's prediction counts with its queue taken out):
  a worker is *feasible* for an app when one of its targets is typically
  expected within the app's deadline, the target's safety margin
  included (a cloud whose replies come 18 ms later than predicted is no
  option for a 30 ms app, however often its prediction says 29 ms), or,
  when none is, predicted within it;
- per (app, worker), the app's service time there: of its candidates on
  the worker, the least (prediction - round trip, queue taken out), i.e.
  its fastest variant that meets its floor, averaged like the typical
  predictions. The least ever seen stuck to one hopeful prediction (a
  live estimator's first, from the latency a worker announces, or a
  noisy one): live, on scenarios/edge-contention.toml, the policy was
  calm (replies' p50 17 ms, as under `fastest`) while ar-overlay (35 ms)
  had 2-6 % of its requests rejected; with the average it spends slack
  there again (p50 44-45 ms, two runs).

An app's *pressure* is its arrival rate over the capacity of its feasible
workers for it (sum of slots / service time): about the share of its
requests that would find them busy, counted in full only while the app
misses its SLA on ``MISSES`` (1 %) of its requests or more. Finding a
worker busy costs an app nothing when its slack absorbs the wait, and the
utilisation alone overstated that cost: on generated-115 a 153 ms app was
kept off three idle edge workers, for apps that met every SLA whoever used
them, and sent to a cloud 70 +- 34 ms away that made 1.1 % of its replies
late. An app that misses less has its pressure scaled down in proportion
(an average over its last ~300 outcomes, ``MISS_ALPHA``); once it misses
again, its workers are reserved again. A worker is *reserved* against a
request when the other apps that could use it, and could not use some other
worker open to the request, press by ``load`` or more in all; it is then
closed to the request unless every other open target is likelier to be
late than that pressure (``mask``). A batching cloud worker serves thousands
per second and is reserved against nobody; a one-slot MEC server running
the large variants is.

Found on generated scenarios (``apdispatch generate --seeds N --duration
150``), `learned` against `fastest`, one seed each:

- generated-101: app-3 (25.7 ms, accuracy 0.931) can only use a one-slot
  MEC server, which `learned` filled with three apps that had edge targets
  to spare: 63.8 % against 75.0 %.
- generated-128: one slot that app-1 needs for its digits-small; the
  worker's capacity once counted with another app's far faster shapes-tiny
  looked four times what app-1 could get: 6,243 of app-1's 8,614 requests
  rejected, 8.9 points below.
- generated-103: two apps share the same two edge workers (the cloud is 70
  ms away), and a looser app filled one of them: 2.9 points below.
- generated-107: a cloud 72.4 ms away, once predicted within a 72.4 ms
  deadline, counted as a second worker for the app, and its batching
  capacity hid the one MEC server the app really had: 0.5 points below.

- generated-115 (above): 0.23 points below the best static policy, 0.12
  with the pressure scaled by the misses; generated-120 and -121 from
  -0.14 and -0.18 to -0.02 and -0.09, generated-103 from +3.5 to +4.1,
  generated-128 from +0.49 to +0.35. A faster average (the last ~30
  outcomes) or a higher miss level (10 %) let generated-128 fall to -0.3;
  from 3 %, generated-128 was +0.02 and generated-115 -0.14.

The same miss averages say when nobody needs room (``calm``): while every
app that sends requests misses its SLA on less than ``MISSES`` of them, or
presses below ``load`` (below), the policy takes the soonest predicted of
its open candidates, as `fastest` does, instead of spending slack. Spent slack frees near, fast targets for
others; with nobody short of them it only adds the risk of a far or queued
target. On the 30 random scenarios, 8 of the 9 where `learned` was behind
the best static policy were lightly loaded ones that `fastest` served at
99.9-100 %, and `learned` lost 2-42 requests there to late replies from a
jittery cloud (generated-115: 21 of 2,227 of app-3's requests sent 70 +- 34
ms away with a 153 ms deadline) or from a queue it chose over a free slot
(generated-115: app-1 queued on the MEC server, predicted 2.7 ms inside
its deadline; generated-120). An app that misses but presses below
``load`` does not count against calm: making room would not help it (no
worker is reserved for it either). On generated-124, app-1 missed 16 % of
its requests on a batching cloud, its only feasible worker, so the policy
was never calm, and sent 3,527 of app-3's 3,528 requests to that cloud
instead of a free edge slot: 7 late, 0.02 points below `fastest`, now
level. That needs the queue taken out of the typical predictions: on
generated-104 the MEC server app-3 depends on was always full when app-3
looked, so app-3 had no feasible worker and pressed on nothing, the policy
went calm, and `learned` fell from 9.9 points above `fastest` to 0.6 below.

Nothing of this is saved in checkpoints: it describes a deployment's
current apps, and is learned again in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from math import exp

from apdispatch.routing.policy import Candidate, RequestView

# The pressure from which a worker is reserved. Against `fastest` on
# generated-128: -8.9 points with 0.25 (app-1's 0.3 of one slot came and
# went around it), +0.4 with 0.1, +0.5 with 0.05; on the full-edge
# scenarios and high-jitter 0.05 and 0.25 were within 0.12 points (seeds 7-9).
LOAD = 0.05
TAU_S = 10.0
# The dependencies and capacities are refreshed at most this often per app,
# and the pressures of all apps as decisions read them. A refresh walks a
# request's candidates (~10-20 us for 16), after a feedback (``defer``,
# ``catch_up``); the rates they feed decay over TAU_S.
REFRESH_S = 0.2
# Decisions read the pressures ``catch_up`` refreshes after each feedback,
# every REFRESH_S; they recompute them on their own path only once they are
# this old (no feedback for that long, such as at the very start).
STALE_S = 1.0
# Weight of a refresh in a target's typical prediction: about the last 5
# refreshes (one second of a busy app). The least prediction ever seen was
# too hopeful: a cloud 72.4 ms away was once predicted within a 72.4 ms
# deadline, counted as a second worker for the app, and its batching
# capacity hid the one MEC server the app really had (generated-107).
TYPICAL_ALPHA = 0.2
# The miss ratio from which an app's pressure counts in full, and the weight
# of one outcome in the app's average (about its last 300).
MISSES = 0.01
MISS_ALPHA = 0.003
INF = float("inf")


def _never_late(key: str, predicted_ms: float, deadline_ms: float) -> float:
    return 0.0


class Reservations:
    __slots__ = (
        "_arrivals",
        "_calm",
        "_deferred",
        "_feasible",
        "_load",
        "_misses",
        "_pressed_at",
        "_pressures",
        "_refreshed",
        "_service",
        "_slots",
        "_tau",
        "_total",
        "_typical",
    )

    def __init__(self, load: float = LOAD, tau_s: float = TAU_S) -> None:
        self._load = load
        self._tau = tau_s
        self._arrivals: dict[str, tuple[float, float]] = {}  # app -> (decayed count, at now_s)
        # app -> target key -> its prediction when a slot is free, averaged, ms
        self._typical: dict[str, dict[str, float]] = {}
        # app -> (its feasible workers, 1 / their capacity for it in requests a second)
        self._feasible: dict[str, tuple[frozenset[str], float]] = {}
        self._service: dict[str, dict[str, float]] = {}  # app -> worker -> service alone, ms
        self._slots: dict[str, int] = {}  # worker -> slots
        self._refreshed: dict[str, float] = {}  # app -> now_s of its last refresh
        # app -> the request and candidate set its due refresh learns from (``defer``)
        self._deferred: dict[str, tuple[RequestView, Sequence[Candidate]]] = {}
        # The pressures as decisions read them, recomputed at most every
        # REFRESH_S: app -> (feasible workers, pressure), and their sum.
        self._pressures: dict[str, tuple[frozenset[str], float]] = {}
        self._total = 0.0
        self._pressed_at: float | None = None
        # app -> its share of requests that missed the SLA, averaged; from MISSES (in full) at first
        self._misses: dict[str, float] = {}
        self._calm = False  # no app that sends requests needs room (``calm``)

    def arrive(self, request: RequestView) -> None:
        """Count a request of its app: every decision, and every admission rejection."""
        count, at = self._arrivals.get(request.app, (0.0, request.now_s))
        self._arrivals[request.app] = (count * exp((at - request.now_s) / self._tau) + 1.0, request.now_s)

    def outcome(self, app: str, ok: bool) -> None:
        """Count an outcome of the app's: ``ok`` when its SLA was met (an admission rejection is a miss)."""
        m = self._misses.get(app, MISSES)
        self._misses[app] = m + MISS_ALPHA * ((0.0 if ok else 1.0) - m)

    def rate(self, app: str, now_s: float) -> float:
        """The app's arrivals per second, decayed to ``now_s``."""
        count, at = self._arrivals.get(app, (0.0, now_s))
        return count * exp((at - now_s) / self._tau) / self._tau

    def note(
        self,
        request: RequestView,
        candidates: Sequence[Candidate],
        margins: Mapping[str, float] | None = None,
    ) -> None:
        """Learn from a request's candidate set, when its app's refresh is due: feasibility and service times.

        ``margins``: per target key, how much later than predicted its
        replies come (``features.Margins.margin``); a target is feasible
        when its typical prediction plus that margin is within the deadline.
        """
        if self._due(request):
            self._learn(request, candidates, margins)

    def defer(self, request: RequestView, candidates: Sequence[Candidate]) -> None:
        """``note`` in two halves, for the decision path: keep the set when a refresh is due (O(1)).

        ``catch_up``, called where no request waits (after a reply has
        gone), learns from what was kept. A refresh walks every candidate
        and costs about a decision: at 16 candidates, the 1 % of decisions
        that paid it (four apps, one refresh each per REFRESH_S, 2,000
        decisions a second) made up a third of the slowest 1 %, and took the
        decision p99 from 41 to 52 us.
        """
        if self._due(request):
            self._deferred[request.app] = (request, candidates)

    def catch_up(self, now_s: float, margins: Mapping[str, float] | None = None) -> None:
        """Learn from the sets ``defer`` kept, and refresh the pressures if due at ``now_s``.

        ``now_s``: the latest decision's clock. Whatever is not caught up by
        the next decision that needs it is done there: the pressures by
        ``calm`` and ``reserved``; the kept sets wait (one per app).
        """
        deferred = self._deferred
        while deferred:
            _, (request, candidates) = deferred.popitem()
            self._learn(request, candidates, margins)
        self._press(now_s)

    def _due(self, request: RequestView) -> bool:
        """Whether the request's app was last refreshed REFRESH_S ago or more (marks it refreshed if so)."""
        app = request.app
        now = request.now_s
        last = self._refreshed.get(app)
        if last is not None and 0.0 <= now - last < REFRESH_S:
            return False
        self._refreshed[app] = now
        return True

    def _learn(
        self,
        request: RequestView,
        candidates: Sequence[Candidate],
        margins: Mapping[str, float] | None,
    ) -> None:
        app = request.app
        margin = (margins or {}).get
        deadline = request.deadline_ms
        typical = self._typical.setdefault(app, {})
        service = self._service.setdefault(app, {})
        slots = self._slots
        feasible: set[str] = set()
        hopeful: set[str] = set()  # typically predicted in time, margins aside
        least: dict[str, float] = {}  # worker -> its fastest variant's compute in this set
        for c in candidates:
            key = c.key
            worker = c.worker
            predicted = c.predicted_ms
            b = typical.get(key)
            in_flight = c.in_flight
            if in_flight < c.slots:  # a free slot: the prediction is the target's own, no queue
                own = predicted
            else:
                # Queued: the queue taken out as the estimator puts it in (the
                # requests ahead, served ``slots`` at a time, each as long as
                # the compute), which leaves its prediction with the last slot
                # free. From free slots alone, a worker that other apps kept
                # full was never feasible for an app that saw it only busy:
                # on generated-104, app-3 (55 ms) depends on a two-slot MEC
                # server that app-1 filled, and had no feasible worker at all.
                own = c.rtt_ms + (predicted - c.rtt_ms) * c.slots / (in_flight + 1)
            typical[key] = b = own if b is None else b + TYPICAL_ALPHA * (own - b)
            if b <= deadline:
                hopeful.add(worker)
                if b + margin(key, 0.0) <= deadline:
                    feasible.add(worker)
            alone = own - c.rtt_ms  # the compute alone, queue or not
            if alone < least.get(worker, INF):
                least[worker] = alone if alone > 1e-3 else 1e-3
            slots[worker] = c.slots
        for worker, alone in least.items():
            s = service.get(worker)
            service[worker] = alone if s is None else s + TYPICAL_ALPHA * (alone - s)
        # As in the features' mask: when the margins leave nothing, the app
        # still uses what is predicted in time (generated-101: a MEC server
        # whose margin grows under load is all a 25.7 ms app has).
        feasible = feasible or hopeful
        # The set's capacity for this app, in requests a second: sum of slots / service time.
        capacity = sum(slots[w] * 1000.0 / service[w] for w in feasible)
        self._feasible[app] = (frozenset(feasible), 1.0 / capacity if capacity > 0.0 else 0.0)

    def pressure(self, app: str, now_s: float) -> float:
        """The share of its feasible workers' capacity the app's arrivals would take, scaled by its misses."""
        needs = self._feasible.get(app)
        if needs is None:
            return 0.0
        return self.rate(app, now_s) * needs[1] * min(1.0, self._misses.get(app, MISSES) / MISSES)

    def _press(self, now_s: float, every_s: float = REFRESH_S) -> None:
        """Recompute every app's pressure when the last were computed ``every_s`` ago or more.

        Rates decay over ``tau_s`` (10 s) and feasible sets change at most
        every REFRESH_S: ``catch_up`` keeps the pressures a decision reads
        at most that old, and the decisions in between skip an exp() per
        app. Decisions recompute them only once they are STALE_S old.
        """
        last = self._pressed_at
        if last is not None and 0.0 <= now_s - last < every_s:
            return
        self._pressed_at = now_s
        pressures = {
            app: (feasible, self.pressure(app, now_s))
            for app, (feasible, _) in self._feasible.items()
            if app in self._arrivals
        }
        self._pressures = pressures
        self._total = sum(p for _, p in pressures.values())
        # Apps that sent nothing for a while (rate below one per tau_s) do
        # not count: an app that left while missing would hold it forever.
        misses = self._misses
        load = self._load
        self._calm = all(
            misses.get(app, MISSES) < MISSES or (app in pressures and pressures[app][1] < load)
            for app in self._arrivals
            if self.rate(app, now_s) * self._tau >= 1.0
        )

    def calm(self, now_s: float) -> bool:
        """Whether no app that sends requests needs room: each meets its SLA or presses below ``load``.

        An app meets its SLA when it misses on less than ``MISSES`` of its
        requests. One that misses more but presses below ``load`` (its
        demand is a small share of what its feasible workers serve) loses
        its requests to something other requests cannot free it from, such
        as a cloud's jitter: no worker is reserved for it either.
        Refreshed with the pressures: by ``catch_up``, or here once STALE_S old.
        """
        self._press(now_s, STALE_S)
        return self._calm

    def _others_press(self, request: RequestView) -> bool:
        """Whether the apps other than the request's press by ``load`` or more in all."""
        self._press(request.now_s, STALE_S)
        own = self._pressures.get(request.app)
        return self._total - (own[1] if own is not None else 0.0) >= self._load

    def reserved(self, request: RequestView, open_workers: Set[str]) -> dict[str, float]:
        """Of ``open_workers``, those the request's app should leave to others, with their pressure.

        A worker is reserved when the apps that could use it, but not the
        other open workers, press on their feasible sets by ``load`` or more.
        """
        if not self._others_press(request):
            return {}
        return self._claimed(request, open_workers)

    def _claimed(self, request: RequestView, open_workers: Set[str]) -> dict[str, float]:
        """``reserved``, once the other apps are known to press by ``load`` or more in all."""
        claims: list[tuple[frozenset[str], float]] = []
        total = 0.0
        for app, (feasible, p) in self._pressures.items():
            if app == request.app or open_workers <= feasible:
                continue  # the request has nowhere to go that this app could not use
            taken = feasible & open_workers
            if taken:
                claims.append((taken, p))
                total += p
        # Without a loop over workers: nobody presses enough in all, or one app alone does.
        if total < self._load:
            return {}
        if len(claims) == 1:
            return dict.fromkeys(claims[0][0], total)
        pressure: dict[str, float] = {}
        for taken, p in claims:
            for w in taken:
                pressure[w] = pressure.get(w, 0.0) + p
        return {w: p for w, p in pressure.items() if p >= self._load}

    def mask(
        self,
        request: RequestView,
        candidates: Sequence[Candidate],
        open_: list[int],
        late_chance: Callable[[str, float, float], float] | None = None,
    ) -> list[int]:
        """Of the candidates at ``open_``, those left once the reserved ones that cost more are closed.

        A candidate's cost is its worker's pressure (0 unless reserved) plus,
        with ``late_chance`` (``Margins.late_chance``: target key, prediction,
        deadline), its chance to reply past the deadline: a reserved worker
        stays open when every other target is likelier to be late than the
        dependent apps' pressure on it, and where every open worker is
        reserved the least pressed stay open. The cheapest candidate always
        stays open.
        """
        # The hot path's commonest cases first, before any set is built: one
        # candidate open (it stays), or the other apps do not press enough,
        # whatever they can use.
        if len(open_) < 2 or not self._others_press(request):
            return open_
        reserved = self._claimed(request, {candidates[k].worker for k in open_})
        if not reserved:
            return open_
        deadline = request.deadline_ms
        late = late_chance or _never_late
        taken = []
        cheapest = INF
        for k in open_:
            c = candidates[k]
            if c.worker in reserved:
                taken.append(k)
            elif cheapest > 0.0:  # once a free target is sure to be in time, nothing costs less
                chance = late(c.key, c.predicted_ms, deadline)
                if chance < cheapest:
                    cheapest = chance
        if cheapest > 0.0:
            # No free target is sure: every reserved candidate's cost counts.
            cost = {}
            for k in taken:
                c = candidates[k]
                cost[k] = reserved[c.worker] + late(c.key, c.predicted_ms, deadline)
            cheapest = min(cheapest, *cost.values())
            taken = [k for k in taken if cost[k] > cheapest]
        if not taken:
            return open_
        shut = set(taken)
        return [k for k in open_ if k not in shut]

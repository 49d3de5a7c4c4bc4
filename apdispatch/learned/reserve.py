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
  predictions (the least ever seen would stick to one hopeful prediction).

An app's *pressure* is its arrival rate over the capacity of its feasible
workers for it (sum of slots / service time): about the share of its
requests that would find them busy, counted in full only while the app
misses its SLA on ``misses`` (1 %) of its requests or more (an average
over its last ~300 outcomes, ``miss_alpha``), and scaled down in
proportion below: finding a worker busy costs an app nothing when its
slack absorbs the wait. A worker is *reserved* against a request when
the other apps that could use it, and could not use some other worker open
to the request, press by ``load`` or more in all; it is then closed to the
request unless every other open target is likelier to be late than that
pressure (``mask``). A batching cloud worker serves thousands per second
and is reserved against nobody; a one-slot MEC server running the large
variants is.

The same miss averages say when nobody needs room (``calm``): while every
app that sends requests misses its SLA on less than ``misses`` of them, or
presses below ``load``, the policy takes the soonest predicted of its open
candidates, as `fastest` does: with nobody short of near, fast targets,
spending slack only adds the risk of a far or queued one. An app that
misses but presses below ``load`` does not count against calm: making
room would not help it (no worker is reserved for it either).

The thresholds are ``GuardConfig`` fields, saved with a learned policy's
checkpoint. What is learned is not: it describes a deployment's current
apps, and is learned again in seconds. The scenarios behind each
rule are in docs/experiments.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from math import exp

from apdispatch.learned.guard_config import GuardConfig
from apdispatch.routing.policy import Candidate, RequestView

INF = float("inf")


def _never_late(key: str, predicted_ms: float, deadline_ms: float) -> float:
    return 0.0


class Reservations:
    __slots__ = (
        "_arrivals",
        "_calm",
        "_deferred",
        "_feasible",
        "_frozen",
        "_load",
        "_max_apps",
        "_miss_alpha",
        "_misses",
        "_misses_full",
        "_pressed_at",
        "_pressures",
        "_refresh_s",
        "_refreshed",
        "_service",
        "_slots",
        "_stale_s",
        "_tau",
        "_total",
        "_typical",
        "_typical_alpha",
    )

    def __init__(self, config: GuardConfig | None = None) -> None:
        config = config or GuardConfig()
        self._load = config.load
        self._tau = config.tau_s
        self._refresh_s = config.refresh_s
        self._stale_s = config.stale_s
        self._typical_alpha = config.typical_alpha
        self._misses_full = config.misses
        self._miss_alpha = config.miss_alpha
        self._max_apps = config.max_apps
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
        # refresh_s: app -> (feasible workers, pressure), and their sum.
        self._pressures: dict[str, tuple[frozenset[str], float]] = {}
        self._total = 0.0
        self._pressed_at: float | None = None
        # app -> its share of requests that missed the SLA, averaged; from ``misses`` (in full) at first
        self._misses: dict[str, float] = {}
        self._calm = False  # no app that sends requests needs room (``calm``)
        self._frozen = False  # ``freeze``: the pressures stay as they are

    def freeze(self, now_s: float, margins: Mapping[str, float] | None = None) -> None:
        """Learn nothing more: the pressures, refreshed once at ``now_s`` (``catch_up``), stay as they are.

        Arrivals, outcomes and candidate sets are no longer counted, and the
        decisions read the pressures, the reservations and calm of ``now_s``.
        """
        self.catch_up(now_s, margins)
        self._press(now_s, 0.0)
        self._frozen = True

    def arrive(self, request: RequestView) -> None:
        """Count a request of its app: every decision, and every admission rejection."""
        if self._frozen:
            return
        count, at = self._arrivals.get(request.app, (0.0, request.now_s))
        self._arrivals[request.app] = (count * exp((at - request.now_s) / self._tau) + 1.0, request.now_s)

    def outcome(self, app: str, ok: bool) -> None:
        """Count an outcome of the app's: ``ok`` when its SLA was met (an admission rejection is a miss)."""
        if self._frozen:
            return
        m = self._misses.get(app, self._misses_full)
        self._misses[app] = m + self._miss_alpha * ((0.0 if ok else 1.0) - m)

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
        and costs about a decision: on the decision path it would set the
        decisions' tail latency.
        """
        if not self._frozen and self._due(request):
            self._deferred[request.app] = (request, candidates)

    def catch_up(self, now_s: float, margins: Mapping[str, float] | None = None) -> None:
        """Learn from the sets ``defer`` kept, and refresh the pressures if due at ``now_s``.

        ``now_s``: the latest decision's clock. Whatever is not caught up by
        the next decision that needs it is done there: the pressures by
        ``calm`` and ``reserved``; the kept sets wait (one per app).
        """
        if self._frozen:
            return
        deferred = self._deferred
        while deferred:
            _, (request, candidates) = deferred.popitem()
            self._learn(request, candidates, margins)
        self._press(now_s)

    def _due(self, request: RequestView) -> bool:
        """Whether the app was last refreshed ``refresh_s`` ago or more (marks it refreshed if so)."""
        app = request.app
        now = request.now_s
        last = self._refreshed.get(app)
        if last is not None and 0.0 <= now - last < self._refresh_s:
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
        alpha = self._typical_alpha
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
                # free. From free slots alone, a worker that other apps keep
                # full would never be feasible for an app that sees it only busy.
                own = c.rtt_ms + (predicted - c.rtt_ms) * c.slots / (in_flight + 1)
            typical[key] = b = own if b is None else b + alpha * (own - b)
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
            service[worker] = alone if s is None else s + alpha * (alone - s)
        # As in the features' mask: when the margins leave nothing, the app
        # still uses what is predicted in time (a worker whose margin grows
        # under load may be all a tight app has).
        feasible = feasible or hopeful
        # The set's capacity for this app, in requests a second: sum of slots / service time.
        capacity = sum(slots[w] * 1000.0 / service[w] for w in feasible)
        self._feasible[app] = (frozenset(feasible), 1.0 / capacity if capacity > 0.0 else 0.0)

    def pressure(self, app: str, now_s: float) -> float:
        """The share of its feasible workers' capacity the app's arrivals would take, scaled by its misses."""
        needs = self._feasible.get(app)
        if needs is None:
            return 0.0
        full = self._misses_full
        return self.rate(app, now_s) * needs[1] * min(1.0, self._misses.get(app, full) / full)

    def _press(self, now_s: float, every_s: float | None = None) -> None:
        """Recompute every app's pressure when the last were computed ``every_s`` ago or more.

        Rates decay over ``tau_s`` (10 s) and feasible sets change at most
        every ``refresh_s``: ``catch_up`` keeps the pressures a decision reads
        at most that old, and the decisions in between skip an exp() per
        app. Decisions recompute them only once they are ``stale_s`` old.
        """
        if self._frozen:
            return
        last = self._pressed_at
        if last is not None and 0.0 <= now_s - last < (self._refresh_s if every_s is None else every_s):
            return
        self._pressed_at = now_s
        if len(self._refreshed) > self._max_apps or len(self._arrivals) > self._max_apps:
            self._forget_quiet(now_s)
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
        full = self._misses_full
        load = self._load
        self._calm = all(
            misses.get(app, full) < full or (app in pressures and pressures[app][1] < load)
            for app in self._arrivals
            if self.rate(app, now_s) * self._tau >= 1.0
        )

    def _forget_quiet(self, now_s: float) -> None:
        tables = (
            self._arrivals,
            self._typical,
            self._feasible,
            self._service,
            self._refreshed,
            self._deferred,
            self._misses,
        )
        apps: set[str] = set()
        apps.update(*tables)
        for app in apps:
            if self.rate(app, now_s) * self._tau < 1.0:
                for table in tables:
                    table.pop(app, None)

    def apps(self) -> int:
        """How many apps the reservations hold state for."""
        return len(set(self._arrivals) | set(self._refreshed) | set(self._misses))

    def calm(self, now_s: float) -> bool:
        """Whether no app that sends requests needs room: each meets its SLA or presses below ``load``.

        An app meets its SLA when it misses on less than ``misses`` of its
        requests. One that misses more but presses below ``load`` (its
        demand is a small share of what its feasible workers serve) loses
        its requests to something other requests cannot free it from, such
        as a cloud's jitter: no worker is reserved for it either.
        Refreshed with the pressures: by ``catch_up``, or here once ``stale_s`` old.
        """
        self._press(now_s, self._stale_s)
        return self._calm

    def _others_press(self, request: RequestView) -> bool:
        """Whether the apps other than the request's press by ``load`` or more in all."""
        self._press(request.now_s, self._stale_s)
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

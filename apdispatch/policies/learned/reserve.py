"""Keep requests that have a choice off a worker that another app cannot do without.

Spending slack (send a request as far as its deadline allows) leaves the
near, fast targets to the requests that need them, but "far" only stands
in for "needed by nobody else". Where one worker is the only one some app
can use (its accuracy floor and deadline rule out every other) and that
app's demand is a large share of the worker's capacity, other apps' requests
that have another safe target must leave it alone.

Found on a generated scenario (``apdispatch generate --seeds 101
--duration 150``): app-3 (25.7 ms, accuracy 0.931) can only use a one-slot
MEC server; `learned` filled it with requests of three apps that had edge
targets to spare, and scored 63.8 % against `fastest`'s 75.0 %. With this
mask it is 0.24 points below `fastest` there, and no scenario of
``scenarios/`` moved by more than 0.3 points (seeds 7-9).

Everything is learned online from what the policy sees, per deployment:

- per app, its arrival rate (decisions and admission rejections, decayed
  with time constant ``tau_s`` of the request's ``now_s``);
- per (app, target), the best prediction ever seen: a worker is *feasible*
  for an app when one of its targets was once predicted within the app's
  deadline; an app with exactly one feasible worker *depends* on it;
- per worker, its capacity: slots over the least (prediction - round trip)
  seen, i.e. its service time alone.

A worker is *reserved* against a request when the apps other than the
request's that depend on it offer at least ``load`` times its capacity.
A batching cloud worker serves thousands per second and is reserved
against nobody; a one-slot MEC server running the large variants is.
Nothing of this is saved in checkpoints: it describes a deployment's
current apps, and is learned again in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import exp

from apdispatch.policies.base import Candidate, RequestView

# The dependent demand, as a share of a worker's capacity, from which the
# worker is reserved: 0.5 left generated-101 2.3 points below `fastest`,
# 0.25 and 0.1 within 0.3; 0.25 changed no scenario of scenarios/ by more
# than 0.3 points (seeds 7-9).
LOAD = 0.25
TAU_S = 10.0
# The dependencies and capacities are refreshed at most this often per app.
REFRESH_S = 0.05


class Reservations:
    __slots__ = ("_arrivals", "_best", "_depends", "_load", "_refreshed", "_service", "_tau")

    def __init__(self, load: float = LOAD, tau_s: float = TAU_S) -> None:
        self._load = load
        self._tau = tau_s
        self._arrivals: dict[str, tuple[float, float]] = {}  # app -> (decayed count, at now_s)
        self._best: dict[tuple[str, str], float] = {}  # (app, target key) -> least prediction, ms
        self._depends: dict[str, str | None] = {}  # app -> the one worker it can use, or None
        self._service: dict[str, tuple[float, int]] = {}  # worker -> (service alone ms, slots)
        self._refreshed: dict[str, float] = {}  # app -> now_s of its last refresh

    def arrive(self, request: RequestView) -> None:
        """Count a request of its app: every decision, and every admission rejection."""
        count, at = self._arrivals.get(request.app, (0.0, request.now_s))
        self._arrivals[request.app] = (count * exp((at - request.now_s) / self._tau) + 1.0, request.now_s)

    def rate(self, app: str, now_s: float) -> float:
        """The app's arrivals per second, decayed to ``now_s``."""
        count, at = self._arrivals.get(app, (0.0, now_s))
        return count * exp((at - now_s) / self._tau) / self._tau

    def note(self, request: RequestView, candidates: Sequence[Candidate]) -> None:
        """Learn from a request's candidate set: feasibility, dependency and service times."""
        app = request.app
        now = request.now_s
        last = self._refreshed.get(app)
        if last is not None and 0.0 <= now - last < REFRESH_S:
            return
        self._refreshed[app] = now
        best = self._best
        service = self._service
        feasible: set[str] = set()
        for c in candidates:
            key = (app, c.key)
            b = best.get(key)
            if b is None or c.predicted_ms < b:
                best[key] = b = c.predicted_ms
            if b <= request.deadline_ms:
                feasible.add(c.worker)
            alone = max(c.predicted_ms - c.rtt_ms, 1e-3)
            s = service.get(c.worker)
            if s is None or alone < s[0]:
                service[c.worker] = (alone, c.slots)
        self._depends[app] = next(iter(feasible)) if len(feasible) == 1 else None

    def reserved(self, request: RequestView) -> set[str]:
        """Workers the request's app must leave to the apps that depend on them."""
        now = request.now_s
        demand: dict[str, float] = {}
        for app, worker in self._depends.items():
            if worker is not None and app != request.app:
                demand[worker] = demand.get(worker, 0.0) + self.rate(app, now)
        out = set()
        for worker, qps in demand.items():
            service_ms, slots = self._service[worker]
            if qps >= self._load * slots * 1000.0 / service_ms:
                out.add(worker)
        return out

    def mask(self, request: RequestView, candidates: Sequence[Candidate], masked: list[int]) -> list[int]:
        """``masked`` plus the open candidates on reserved workers, while another stays open."""
        reserved = self.reserved(request)
        if not reserved:
            return masked
        closed = set(masked)
        open_ = [k for k in range(len(candidates)) if k not in closed]
        taken = [k for k in open_ if candidates[k].worker in reserved]
        if not taken or len(taken) == len(open_):
            return masked
        closed.update(taken)
        return sorted(closed)

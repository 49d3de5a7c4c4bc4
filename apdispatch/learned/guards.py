"""The guards: which candidates a decision may take, before anything chooses among them.

A guarded decision reads top to bottom (``Guards.open``): every candidate
starts open, and each guard in turn closes some of what is still open:

1. ``SlowerVariant``: on a worker with several variants predicted in time,
   all but the soonest predicted (a slower variant on the same worker meets
   the SLA no better and holds the slot longer). Candidates predicted past
   the deadline close here too.
2. ``SafetyMargin``: of those, the ones whose prediction plus the target's
   safety margin (``Margins.margin``) is past the deadline, while one stays.
3. ``Reservation``: workers other apps cannot do without
   (``Reservations.mask``).
4. ``Risk``: those the wider margin (``Margins.risk``) puts past the
   deadline, while one stays. Last, so that it never sends a request onto
   a worker another app needs.
5. ``LastResort``: if nothing is left (nothing was predicted in time),
   every candidate is open again.
6. ``PreferCascade``: when the router offers cascades and one is open,
   only cascades.
7. ``Calm``: while no app needs room (``Reservations.calm``), only the
   soonest predicted of what is open: spending slack would only add risk.

Then a chooser picks one of the open candidates: the network
(``ActorCriticPolicy``) or a rule (``SlackPolicy``). The margins and the
reservations are learned online from every feedback (``observe``); every
threshold is a field of ``GuardConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from apdispatch.learned.features import MIN_DEADLINE_MS, Margins
from apdispatch.learned.guard_config import GuardConfig
from apdispatch.learned.reserve import Reservations
from apdispatch.routing.cascade import Cascade
from apdispatch.routing.policy import Candidate, Feedback, RequestView

Open = list[int]  # indices into the request's candidates, in their order


def safe(
    request: RequestView, candidates: Sequence[Candidate], open_: Open, margin: dict[str, float]
) -> Open:
    """Of ``open_``, those whose prediction plus ``margin`` (by target key, 0 if unknown) meets the
    deadline (none, possibly)."""
    deadline = request.deadline_ms
    of = margin.get
    return [k for k in open_ if candidates[k].predicted_ms + of(candidates[k].key, 0.0) <= deadline]


def within_margin(
    request: RequestView, candidates: Sequence[Candidate], open_: Open, margin: dict[str, float]
) -> Open:
    """``safe``, or all of ``open_`` when none is."""
    return safe(request, candidates, open_, margin) or open_


def soonest(candidates: Sequence[Candidate], open_: Open) -> Open:
    """The soonest predicted of ``open_`` (non-empty), alone."""
    return [min(open_, key=lambda k: candidates[k].predicted_ms)]


class Guard(Protocol):
    name: str

    def open(self, request: RequestView, candidates: Sequence[Candidate], open_: Open) -> Open:
        """Of the candidates at ``open_``, those this guard leaves open (in order)."""
        ...


class SlowerVariant:
    """Per worker, only its soonest predicted candidate among those predicted in time.

    The margins are left out of this comparison: the variants share the
    worker's network and queue, and their margins differ mostly by how often
    each was chosen.
    """

    name = "slower-variant"

    def open(self, request: RequestView, candidates: Sequence[Candidate], open_: Open) -> Open:
        inv = 1.0 / max(request.deadline_ms, MIN_DEADLINE_MS)
        timely = [k for k in open_ if not candidates[k].predicted_ms * inv > 1.0]
        # The common case, one candidate per worker, in two passes without a dict.
        if len({candidates[k].worker for k in timely}) == len(timely):
            return timely
        soonest: dict[str, int] = {}
        for k in timely:
            c = candidates[k]
            first = soonest.get(c.worker)
            if first is None or c.predicted_ms < candidates[first].predicted_ms:
                soonest[c.worker] = k
        return sorted(soonest.values())


class SafetyMargin:
    """Only those whose prediction plus their safety margin meets the deadline, if any does.

    The margins act through this guard only, not as a feature: as an input,
    a margin larger than any seen in training pushes the network's scores
    off the targets the guard trusts.
    """

    name = "safety-margin"

    def __init__(self, margins: Margins) -> None:
        self.margins = margins

    def open(self, request: RequestView, candidates: Sequence[Candidate], open_: Open) -> Open:
        return within_margin(request, candidates, open_, self.margins.margin)


class Reservation:
    """Close the workers other apps cannot do without, unless every alternative is likelier late."""

    name = "reservation"

    def __init__(self, reserve: Reservations, margins: Margins) -> None:
        self.reserve = reserve
        self.margins = margins

    def open(self, request: RequestView, candidates: Sequence[Candidate], open_: Open) -> Open:
        return self.reserve.mask(request, candidates, open_, self.margins.late_chance)


class Risk:
    """Close those the wider margin puts past the deadline, as long as one stays open."""

    name = "risk"

    def __init__(self, margins: Margins) -> None:
        self.margins = margins

    def open(self, request: RequestView, candidates: Sequence[Candidate], open_: Open) -> Open:
        return within_margin(request, candidates, open_, self.margins.risk)


class LastResort:
    """Nothing left open (nothing predicted in time): every candidate is."""

    name = "last-resort"

    def open(self, request: RequestView, candidates: Sequence[Candidate], open_: Open) -> Open:
        return open_ or list(range(len(candidates)))


class Calm:
    """While no app needs room, only the soonest predicted of what is open."""

    name = "calm"

    def __init__(self, reserve: Reservations) -> None:
        self.reserve = reserve

    def open(self, request: RequestView, candidates: Sequence[Candidate], open_: Open) -> Open:
        if len(open_) > 1 and self.reserve.calm(request.now_s):
            return soonest(candidates, open_)
        return open_


class Unsafe:
    """No open candidate is safe (prediction plus safety margin within the deadline): only the soonest.

    The safety-margin and risk guards keep every candidate open when none is
    safe; the slack rule then takes the soonest, and so does this guard for
    whatever chooses next.
    """

    name = "unsafe"

    def __init__(self, margins: Margins) -> None:
        self.margins = margins

    def open(self, request: RequestView, candidates: Sequence[Candidate], open_: Open) -> Open:
        if len(open_) < 2 or safe(request, candidates, open_, self.margins.margin):
            return open_
        return soonest(candidates, open_)


class PreferCascade:
    """When a cascade is open, only cascades: the accurate targets are what cascades spare.

    A cascade (``apdispatch.routing.cascade``) answers most requests on a light
    variant and sends only the unsure on to an accurate target, which is
    offered only when both steps fit the deadline; spending slack would
    otherwise send the request straight to the scarce accurate target.
    """

    name = "prefer-cascade"

    def open(self, request: RequestView, candidates: Sequence[Candidate], open_: Open) -> Open:
        # The router appends cascades after the plain candidates: without one last, there is none.
        if not candidates or not isinstance(candidates[-1].ref, Cascade):
            return open_
        cascades = [k for k in open_ if isinstance(candidates[k].ref, Cascade)]
        return cascades or open_


class Guards:
    """The guard pipeline, with the online state it reads (margins, reservations)."""

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config or GuardConfig()
        self.margins = Margins(self.config)
        self.reserve = Reservations(self.config)
        steps: list[Guard] = [
            SlowerVariant(),
            SafetyMargin(self.margins),
            Reservation(self.reserve, self.margins),
            Risk(self.margins),
            LastResort(),
        ]
        if self.config.prefer_cascade:
            steps.append(PreferCascade())
        if self.config.calm:
            steps.append(Calm(self.reserve))
        if self.config.unsafe:
            steps.append(Unsafe(self.margins))
        self.steps: tuple[Guard, ...] = tuple(steps)
        self._now = 0.0  # the latest decision's clock

    def arrive(self, request: RequestView, candidates: Sequence[Candidate]) -> None:
        """Count a decision's request; keep its set for the reservations' refresh, if one is due."""
        self.reserve.arrive(request)
        self.reserve.defer(request, candidates)
        self._now = request.now_s

    def open(self, request: RequestView, candidates: Sequence[Candidate]) -> Open:
        """The candidates the guards leave open, after ``arrive``."""
        open_ = list(range(len(candidates)))
        for guard in self.steps:
            open_ = guard.open(request, candidates, open_)
        return open_

    def freeze(self) -> None:
        """Learn nothing more: the margins and the reservations stay as they are at the latest decision."""
        self.margins.freeze()
        self.reserve.freeze(self._now, self.margins.margin)

    def rejected(self, request: RequestView) -> None:
        """Admission rejected ``request``: it still counts in its app's demand, and as a miss."""
        self.reserve.arrive(request)
        self.reserve.outcome(request.app, False)

    def observe(self, feedback: Feedback) -> None:
        chosen = feedback.chosen
        self.margins.observe(chosen.key, chosen.predicted_ms, feedback.latency_ms)
        self.reserve.outcome(feedback.request.app, feedback.outcome == "ok")
        # The reservations' periodic walks, off the decision path (``Reservations.defer``).
        self.reserve.catch_up(self._now, self.margins.margin)

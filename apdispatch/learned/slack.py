"""``slack``: spend each request's slack, a rule of its own (and the learned policy's teacher).

Greedy ``fastest`` gives every request the best target, so requests with
time to spare take the near, fast targets from those that have none (the
AP then rejects those or they come back late). ``slack`` sends a request as
far (by round trip) as its deadline allows, ties to the faster, and to the
fastest target when none qualifies. Safely: a target's prediction plus its
safety margin (``Margins``: how much later than predicted its replies come)
must be within the deadline.

``slack-guarded`` applies the same rule to the candidates the guards leave
open (``guards.Guards``): the learned policy's pipeline with the rule in
place of the network.
"""

from __future__ import annotations

from collections.abc import Sequence

from apdispatch.learned import RULE_POLICIES
from apdispatch.learned.features import Margins
from apdispatch.learned.guard_config import GuardConfig
from apdispatch.learned.guards import Guards
from apdispatch.routing.policy import Candidate, Feedback, Policy, RequestView

__all__ = ["RULE_POLICIES", "GuardedSlackPolicy", "SlackPolicy", "farthest_in_time", "make_rule_policy"]


def farthest_in_time(request: RequestView, candidates: Sequence[Candidate], margins: Margins) -> Candidate:
    """The farthest candidate whose prediction plus safety margin meets the deadline, else the fastest."""
    deadline = request.deadline_ms
    margin = margins.margin.get
    within = [c for c in candidates if c.predicted_ms + margin(c.key, 0.0) <= deadline]
    if not within:
        return min(candidates, key=lambda c: c.predicted_ms)
    return max(within, key=lambda c: (c.rtt_ms, -c.predicted_ms))


class SlackPolicy(Policy):
    """The rule on every candidate; it learns only its targets' margins."""

    name = "slack"

    def __init__(self, guards: GuardConfig | None = None) -> None:
        self.margins = Margins(guards or GuardConfig())

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        return farthest_in_time(request, candidates, self.margins)

    def observe(self, feedback: Feedback) -> None:
        chosen = feedback.chosen
        self.margins.observe(chosen.key, chosen.predicted_ms, feedback.latency_ms)


class GuardedSlackPolicy(Policy):
    """The rule on the candidates the guards leave open."""

    name = "slack-guarded"

    def __init__(self, guards: GuardConfig | None = None) -> None:
        self.guards = Guards(guards)

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        self.guards.arrive(request, candidates)
        if len(candidates) == 1:
            return candidates[0]
        open_ = self.guards.open(request, candidates)
        return farthest_in_time(request, [candidates[k] for k in open_], self.guards.margins)

    def rejected(self, request: RequestView) -> None:
        self.guards.rejected(request)

    def observe(self, feedback: Feedback) -> None:
        self.guards.observe(feedback)


def make_rule_policy(name: str, guards: GuardConfig | None = None) -> Policy:
    if name == "slack":
        return SlackPolicy(guards)
    if name == "slack-guarded":
        return GuardedSlackPolicy(guards)
    raise KeyError(f"unknown rule policy {name!r} (known: {', '.join(RULE_POLICIES)})")

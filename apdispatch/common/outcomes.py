"""What became of a request: exactly one outcome each."""

from __future__ import annotations

from enum import StrEnum
from types import MappingProxyType
from typing import Final

from apdispatch.common.protocol import dispatcher_pb2 as pb


class Outcome(StrEnum):
    """A request's outcome; members compare equal to their names (``Outcome.OK == "ok"``).

    ``ok``: served by a variant that meets ``min_accuracy``, within the deadline;
    ``late``: served, after the deadline; ``inaccurate``: served in time by a
    variant below ``min_accuracy``; ``rejected``: turned away at admission, no
    target could meet the SLA; ``failed``: an error (bad input, a worker failed).
    """

    OK = "ok"
    LATE = "late"
    INACCURATE = "inaccurate"
    REJECTED = "rejected"
    FAILED = "failed"


# In this order everywhere counts are tabled (reports, JSON, arrays indexed by outcome).
OUTCOMES: Final[tuple[Outcome, ...]] = tuple(Outcome)
# The outcomes of a request some worker answered.
SERVED: Final[frozenset[Outcome]] = frozenset({Outcome.OK, Outcome.LATE, Outcome.INACCURATE})
# The wire's enum (``apdispatch.v1.Outcome``) both ways.
TO_PROTO: Final = MappingProxyType(
    {
        Outcome.OK: pb.OK,
        Outcome.LATE: pb.LATE,
        Outcome.INACCURATE: pb.INACCURATE,
        Outcome.REJECTED: pb.REJECTED,
        Outcome.FAILED: pb.FAILED,
    }
)
FROM_PROTO: Final = MappingProxyType({v: k for k, v in TO_PROTO.items()})

"""Static policies on hand-made candidate sets."""

from __future__ import annotations

import pytest

from apdispatch.policies import STATIC_POLICIES, Candidate, RequestView, make_policy

REQUEST = RequestView(task="digits", app="ar", deadline_ms=50.0, min_accuracy=0.8)


def _c(key: str, *, rtt: float, in_flight: int, slots: int, predicted: float, accuracy: float) -> Candidate:
    return Candidate(
        key=key,
        worker=key,
        cluster=key,
        variant="v",
        accuracy=accuracy,
        rtt_ms=rtt,
        in_flight=in_flight,
        slots=slots,
        predicted_ms=predicted,
    )


NEAR_BUSY = _c("near", rtt=1.0, in_flight=4, slots=1, predicted=20.0, accuracy=0.85)
MID_IDLE = _c("mid", rtt=5.0, in_flight=0, slots=2, predicted=6.0, accuracy=0.90)
FAR_ACCURATE = _c("far", rtt=40.0, in_flight=1, slots=8, predicted=45.0, accuracy=0.99)
CANDIDATES = [NEAR_BUSY, MID_IDLE, FAR_ACCURATE]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("closest", "near"),
        ("fastest", "mid"),
        ("most-accurate", "far"),
        ("least-loaded", "mid"),
    ],
)
def test_deterministic_rules(name: str, expected: str) -> None:
    assert make_policy(name).choose(REQUEST, CANDIDATES).key == expected


def test_round_robin_cycles_per_task() -> None:
    policy = make_policy("round-robin")
    picks = [policy.choose(REQUEST, CANDIDATES).key for _ in range(6)]
    assert picks == ["near", "mid", "far", "near", "mid", "far"]


def test_random_covers_all_and_is_seeded() -> None:
    a = [make_policy("random", seed=3).choose(REQUEST, CANDIDATES).key for _ in range(1)]
    policy = make_policy("random", seed=3)
    picks = [policy.choose(REQUEST, CANDIDATES).key for _ in range(300)]
    assert set(picks) == {"near", "mid", "far"}
    assert picks[0] == a[0]
    again = make_policy("random", seed=3)
    assert picks == [again.choose(REQUEST, CANDIDATES).key for _ in range(300)]


def test_p2c_never_picks_the_most_loaded_of_two() -> None:
    policy = make_policy("p2c", seed=1)
    # near has load 4/1, far 1/8 and mid 0/2: near loses every pair it is in.
    picks = [policy.choose(REQUEST, CANDIDATES).key for _ in range(300)]
    assert "near" not in picks
    assert {"mid", "far"} == set(picks)


def test_single_candidate_is_always_chosen() -> None:
    for name in STATIC_POLICIES:
        assert make_policy(name).choose(REQUEST, [MID_IDLE]) is MID_IDLE


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="round-robin"):
        make_policy("nope")

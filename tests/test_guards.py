"""The guards of a learned decision, their config, and the ``slack`` rules, by hand cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from candidates import candidate

from apdispatch.ap.config import ConfigError, load_config
from apdispatch.cli import main as cli_main
from apdispatch.common.confidence import Acceptance
from apdispatch.learned.checkpoint import paths
from apdispatch.learned.factory import make_learned_policy
from apdispatch.learned.guard_config import GuardConfig, parse_guard_overrides
from apdispatch.learned.guards import (
    Calm,
    Guards,
    LastResort,
    PreferCascade,
    SafetyMargin,
    SlowerVariant,
    Unsafe,
)
from apdispatch.learned.policy import ActorCriticPolicy
from apdispatch.learned.slack import GuardedSlackPolicy, SlackPolicy
from apdispatch.policies import Candidate, Feedback, RequestView, make_policy, policy_names
from apdispatch.routing.cascade import Cascade

REPO = Path(__file__).resolve().parents[1]
REQUEST = RequestView(task="digits", app="ar", deadline_ms=50.0, min_accuracy=0.8, now_s=1.0)


def _c(worker: str, variant: str, *, rtt: float, predicted: float) -> Candidate:
    return candidate(worker, variant, rtt=rtt, predicted=predicted, accuracy=0.9)


FAST = _c("edge", "small", rtt=2.0, predicted=20.0)
SLOW = _c("edge", "large", rtt=2.0, predicted=30.0)  # same worker, slower
FAR = _c("cloud", "large", rtt=30.0, predicted=45.0)
LATE = _c("far", "large", rtt=60.0, predicted=70.0)  # predicted past the 50 ms deadline
CANDIDATES = [FAST, SLOW, FAR, LATE]


def _margins_of(guards: Guards, margin: dict[str, float]) -> Guards:
    guards.margins.margin.update(margin)
    return guards


# The config ------------------------------------------------------------------------


def test_guard_config_defaults_are_the_shipped_thresholds() -> None:
    c = GuardConfig()
    assert (c.spread, c.risk_spread, c.small_sample_max, c.margin_alpha) == (1.0, 2.0, 400, 0.05)
    assert (c.load, c.tau_s, c.refresh_s, c.stale_s, c.typical_alpha) == (0.05, 10.0, 0.2, 1.0, 0.2)
    assert (c.misses, c.miss_alpha, c.max_apps, c.calm) == (0.01, 0.003, 1000, True)
    assert (c.prefer_cascade, c.unsafe) == (True, True)
    assert GuardConfig.from_json(c.to_json()) == c


def test_guard_overrides_are_typed_and_a_bad_one_is_named() -> None:
    c = GuardConfig().with_overrides({"spread": 2, "calm": False, "max_apps": 10})
    assert c.spread == 2.0 and isinstance(c.spread, float) and c.calm is False and c.max_apps == 10
    with pytest.raises(ValueError, match=r"^nope: not a guard setting"):
        GuardConfig().with_overrides({"nope": 1})
    with pytest.raises(ValueError, match=r"^spread: must be a finite number > 0"):
        GuardConfig().with_overrides({"spread": -1.0})
    with pytest.raises(ValueError, match=r"^calm: must be true or false"):
        GuardConfig().with_overrides({"calm": 1})
    with pytest.raises(ValueError, match=r"^max_apps: must be an integer"):
        GuardConfig().with_overrides({"max_apps": 1.5})
    with pytest.raises(ValueError, match=r"^miss_alpha: must be in"):
        GuardConfig().with_overrides({"miss_alpha": 0.0})
    assert parse_guard_overrides(["spread=1.5", "calm=false", "max_apps=7"]) == {
        "spread": 1.5,
        "calm": False,
        "max_apps": 7,
    }
    with pytest.raises(ValueError, match="spread takes a float"):
        parse_guard_overrides(["spread=wide"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_guard_overrides(["spread"])


# Each guard by hand -----------------------------------------------------------------


def test_slower_variant_keeps_each_workers_soonest_in_time() -> None:
    # edge: small (20) beats large (30); cloud 45 is in time; far 70 is not.
    assert SlowerVariant().open(REQUEST, CANDIDATES, [0, 1, 2, 3]) == [0, 2]
    # Of what is open only: with small closed before, large is edge's soonest.
    assert SlowerVariant().open(REQUEST, CANDIDATES, [1, 2, 3]) == [1, 2]
    assert SlowerVariant().open(REQUEST, CANDIDATES, [3]) == []
    # One candidate per worker: only the late close.
    assert SlowerVariant().open(REQUEST, CANDIDATES, [0, 2, 3]) == [0, 2]
    # A worker's sooner variant listed after another worker's: still in candidate order.
    assert SlowerVariant().open(REQUEST, [SLOW, FAR, FAST], [0, 1, 2]) == [1, 2]


def test_safety_margin_closes_the_unsafe_while_one_is_safe() -> None:
    guards = _margins_of(Guards(), {FAR.key: 10.0, FAST.key: 1.0})  # 45 + 10 > 50; 20 + 1 fine
    guard = SafetyMargin(guards.margins)
    assert guard.open(REQUEST, CANDIDATES, [0, 2]) == [0]
    # Nothing safe: what was open stays open.
    assert guard.open(REQUEST, CANDIDATES, [2]) == [2]


def test_last_resort_opens_everything_when_nothing_is_left() -> None:
    assert LastResort().open(REQUEST, CANDIDATES, []) == [0, 1, 2, 3]
    assert LastResort().open(REQUEST, CANDIDATES, [2]) == [2]


def test_calm_takes_the_soonest_while_no_app_needs_room() -> None:
    guards = Guards()
    # No app has sent anything yet: nobody needs room.
    assert Calm(guards.reserve).open(REQUEST, CANDIDATES, [0, 2]) == [0]
    assert Calm(guards.reserve).open(REQUEST, CANDIDATES, [2]) == [2]


def test_unsafe_leaves_the_soonest_when_no_open_candidate_is_within_its_margin() -> None:
    guards = _margins_of(Guards(), {FAR.key: 10.0, FAST.key: 31.0})  # 45 + 10 and 20 + 31 > 50
    guard = Unsafe(guards.margins)
    assert guard.open(REQUEST, CANDIDATES, [0, 2]) == [0]
    assert guard.open(REQUEST, CANDIDATES, [2, 0]) == [0]  # by prediction, not by position
    # One safe (the slower variant: 30 + 0 <= 50): every open one stays, unsafe ones too.
    assert guard.open(REQUEST, CANDIDATES, [0, 1, 2]) == [0, 1, 2]
    # Exactly at the deadline is safe: 20 + 30 = 50.
    guards.margins.margin[FAST.key] = 30.0
    assert guard.open(REQUEST, CANDIDATES, [0, 2]) == [0, 2]
    assert guard.open(REQUEST, CANDIDATES, [2]) == [2]
    assert guard.open(REQUEST, CANDIDATES, []) == []


def test_prefer_cascade_keeps_only_cascades_when_one_is_open() -> None:
    entry = Acceptance(floor=0.94, threshold=0.8, coverage=0.85, accuracy=0.97)
    plan = Cascade(FAST.ref, entry, FAR.ref)  # type: ignore[arg-type]  # the guard reads only its type
    cascade = FAST._replace(key=f"{FAST.key}>{FAR.key}", ref=plan)
    candidates = [FAST, FAR, cascade]
    assert PreferCascade().open(REQUEST, candidates, [0, 1, 2]) == [2]
    assert PreferCascade().open(REQUEST, candidates, [0, 1]) == [0, 1]  # none open: all stay


def test_the_pipeline_in_order_and_calm_can_be_turned_off() -> None:
    names = [g.name for g in Guards().steps]
    assert names == [
        "slower-variant",
        "safety-margin",
        "reservation",
        "risk",
        "last-resort",
        "prefer-cascade",
        "calm",
        "unsafe",
    ]
    assert "calm" not in [g.name for g in Guards(GuardConfig(calm=False)).steps]
    assert "unsafe" not in [g.name for g in Guards(GuardConfig(unsafe=False)).steps]
    assert "prefer-cascade" not in [g.name for g in Guards(GuardConfig(prefer_cascade=False)).steps]
    # Edge's soonest and the cloud stay open, calm or not, while the app is
    # new: its misses start at the threshold, so it may need room.
    off = Guards(GuardConfig(calm=False))
    off.arrive(REQUEST, CANDIDATES)
    assert off.open(REQUEST, CANDIDATES) == [0, 2]
    on = Guards()
    on.arrive(REQUEST, CANDIDATES)
    assert on.open(REQUEST, CANDIDATES) == [0, 2]
    # Ten SLAs met: its misses fall below 1 %, and once the pressures are
    # recomputed (stale_s later) calm leaves edge's soonest alone.
    for guards in (off, on):
        for _ in range(10):
            guards.observe(Feedback(REQUEST, FAST, "ok", 20.0))
    later = REQUEST._replace(now_s=1.0 + GuardConfig().stale_s)
    assert off.open(later, CANDIDATES) == [0, 2]
    assert on.open(later, CANDIDATES) == [0]
    # Nothing in time: every candidate, then the unsafe guard's soonest (calm's too).
    late = later._replace(deadline_ms=10.0)
    assert off.open(late, CANDIDATES) == [0]
    assert on.open(late, CANDIDATES) == [0]
    bare = Guards(GuardConfig(calm=False, unsafe=False))
    bare.arrive(late, CANDIDATES)
    assert bare.open(late, CANDIDATES) == [0, 1, 2, 3]


# The rules --------------------------------------------------------------------------


def test_slack_sends_a_request_as_far_as_its_deadline_allows() -> None:
    policy = SlackPolicy()
    assert policy.choose(REQUEST, CANDIDATES) is FAR  # the farthest in time
    # The cloud's replies come 10 ms late: 45 + 10 > 50, so edge, the faster of its two.
    for _ in range(3):
        policy.observe(Feedback(REQUEST, FAR, "ok", 55.0))
    assert policy.margins.margin[FAR.key] == pytest.approx(10.0)
    assert policy.choose(REQUEST, CANDIDATES) is FAST
    # Nothing in time: the fastest.
    late = RequestView(task="digits", app="ar", deadline_ms=10.0, min_accuracy=0.8)
    assert policy.choose(late, CANDIDATES) is FAST


def test_slack_guarded_applies_the_rule_to_what_the_guards_leave() -> None:
    policy = GuardedSlackPolicy()
    assert policy.choose(REQUEST, CANDIDATES) is FAR  # edge's soonest and the cloud are open
    for _ in range(10):
        policy.observe(Feedback(REQUEST, FAR, "ok", 45.0))
    # Calm (the app meets its SLA): the guards leave the soonest alone.
    later = REQUEST._replace(now_s=1.0 + GuardConfig().stale_s)
    assert policy.choose(later, CANDIDATES) is FAST
    assert GuardedSlackPolicy(GuardConfig(calm=False)).choose(later, CANDIDATES) is FAR
    assert {"slack", "slack-guarded"} <= set(policy_names())
    rule = make_policy("slack-guarded", guards={"calm": False})
    assert isinstance(rule, GuardedSlackPolicy) and rule.guards.config.calm is False


# Saved with the checkpoint, overridable ---------------------------------------------


def test_guard_config_is_saved_in_the_checkpoint_and_an_override_replaces_it(tmp_path: Path) -> None:
    policy = make_learned_policy("learned", learn=False, background=False, guards={"spread": 1.5})
    assert isinstance(policy, ActorCriticPolicy)
    assert policy.guards.config.spread == 1.5 and policy.margins is policy.guards.margins
    # learn=False: nothing to save from; a learning one writes its config.
    learning = make_learned_policy("learned", background=False, guards={"spread": 1.5, "calm": False})
    try:
        learning.save(tmp_path / "ck")
    finally:
        learning.close()
    saved = json.loads(paths(tmp_path / "ck")[1].read_text())["guards"]
    assert saved == GuardConfig(spread=1.5, calm=False).to_json()
    resumed = make_learned_policy("learned", checkpoint=tmp_path / "ck", learn=False, background=False)
    assert isinstance(resumed, ActorCriticPolicy)
    assert resumed.guards.config == GuardConfig(spread=1.5, calm=False)
    again = make_learned_policy(
        "learned", checkpoint=tmp_path / "ck", learn=False, background=False, guards={"spread": 0.5}
    )
    assert isinstance(again, ActorCriticPolicy)
    assert again.guards.config == GuardConfig(spread=0.5, calm=False)


def test_ap_config_takes_a_guards_table_and_flags_over_it(tmp_path: Path) -> None:
    path = tmp_path / "ap.toml"
    path.write_text('policy = "learned"\n[guards]\nspread = 1.5\ncalm = false\n')
    config = load_config(path, guards={"spread": 2.0})
    assert config.guards == {"spread": 2.0, "calm": False}
    path.write_text("[guards]\nwide = 1.5\n")
    with pytest.raises(ConfigError, match=r"^guards.wide: not a guard setting"):
        load_config(path)


def test_sim_takes_guard_overrides_and_names_a_bad_one(capsys: pytest.CaptureFixture[str]) -> None:
    scenario = str(REPO / "scenarios" / "demo.toml")
    assert cli_main(["sim", scenario, "--policies", "slack", "--guard", "wide=1", "--no-bound"]) == 2
    assert "wide=1" in capsys.readouterr().err
    args = ["sim", scenario, "--policies", "slack,slack-guarded", "--duration", "4", "--no-bound"]
    assert cli_main([*args, "--guard", "calm=false"]) == 0
    out = capsys.readouterr().out
    assert "[slack]" in out and "[slack-guarded]" in out


def test_aset_has_the_rules_among_its_actions_and_tells_them_of_rejections() -> None:
    from apdispatch.learned.aset import ACTIONS, AsetPolicy

    assert ACTIONS[-2:] == ("slack", "slack-guarded")
    policy = make_learned_policy("aset", seed=0, fresh=True, background=False, learn=False)
    assert isinstance(policy, AsetPolicy)
    guarded = policy._statics[ACTIONS.index("slack-guarded")]
    assert isinstance(guarded, GuardedSlackPolicy)
    assert guarded.guards.reserve.rate("ar", REQUEST.now_s) == 0.0
    policy.rejected(REQUEST)  # whatever runs: the rule's guards count the app's demand
    assert guarded.guards.reserve.rate("ar", REQUEST.now_s) > 0.0


def test_learned_takes_the_soonest_when_nothing_open_is_safe() -> None:
    # calm off, so that only the unsafe guard can narrow the choice to one.
    policy = make_learned_policy("learned", learn=False, background=False, guards={"calm": False})
    assert isinstance(policy, ActorCriticPolicy)
    _margins_of(policy.guards, {FAST.key: 31.0, FAR.key: 10.0})  # 20 + 31 and 45 + 10 > 50
    for i in range(50):
        assert policy.choose(REQUEST._replace(now_s=1.0 + i), CANDIDATES) is FAST
        assert policy.scored == 0  # the network was not asked
    # A safe one open again: the network scores edge's soonest and the cloud.
    policy.margins.margin.update({FAST.key: 0.0, FAR.key: 0.0})
    policy.choose(REQUEST._replace(now_s=60.0), CANDIDATES)
    assert policy.scored == 2

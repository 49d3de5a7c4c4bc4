"""Unit tests of the open-loop load generator.

The arrival process is checked statistically on seeded plans (no network).
Accounting runs against a small real grpc.aio Dispatcher server whose replies
depend on the request's app (ok, rejected, failed, late, never, stream abort):
a stand-in for the network peer. End-to-end runs against the real AP live elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from apdispatch.common.errors import UnavailableError
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc
from apdispatch.scenario import Arrivals, ArrivalStep, Scenario, parse_scenario
from apdispatch.tools.loadgen import (
    NO_REPLY,
    LoadReport,
    load_samples,
    main,
    plan_load,
    run_load,
    stream_starts,
)
from apdispatch.tools.processes import free_port

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

OUTCOMES = ("ok", "late", "inaccurate", "rejected", "failed")
RATIOS = ("success_ratio", "violation_ratio", "rejection_ratio")


def make_scenario(
    apps: list[dict[str, Any]],
    *,
    duration_s: float,
    schedule: list[dict[str, float]],
    stream_mean_s: float,
    seed: int = 1,
) -> Scenario:
    return parse_scenario(
        {
            "name": "test",
            "duration_s": duration_s,
            "seed": seed,
            "apps": apps,
            "devices": {"d": {}},
            "clusters": [{"name": "c", "rtt_ms": 1.0, "workers": [{"device": "d", "variants": []}]}],
            "arrivals": {"schedule": schedule, "stream_mean_s": stream_mean_s},
        }
    )


# The SDK calls an ok reply late when it comes after the deadline on the client's clock; the fake
# AP answers in 2 ms, but a loaded machine can hold a reply back for longer than 100 ms.
ROOMY_DEADLINE_MS = 10_000.0


def app(
    name: str,
    *,
    rate_qps: float = 10.0,
    share: float = 1.0,
    deadline_ms: float = ROOMY_DEADLINE_MS,
    task: str = "digits",
) -> dict[str, Any]:
    return {
        "name": name,
        "task": task,
        "deadline_ms": deadline_ms,
        "min_accuracy": 0.5,
        "rate_qps": rate_qps,
        "share": share,
    }


# ------------------------------------------------------------------ arrivals


def test_stream_starts_follow_the_piecewise_rate() -> None:
    arrivals = Arrivals(
        schedule=(ArrivalStep(0, 0.0), ArrivalStep(100, 60.0), ArrivalStep(1100, 240.0)),
        stream_mean_s=10,
    )
    starts = stream_starts(arrivals, 2100, np.random.default_rng(3))
    assert np.all(np.diff(starts) > 0) and starts[-1] < 2100
    assert not np.any(starts < 100)  # rate 0 in the first phase
    for lo, hi, expected in ((100, 1100, 1000), (1100, 2100, 4000)):
        n = np.count_nonzero((starts >= lo) & (starts < hi))
        assert abs(n - expected) < 4 * math.sqrt(expected), (lo, n, expected)
    # Exponential gaps within a phase: coefficient of variation ~ 1.
    gaps = np.diff(starts[starts >= 1100])
    assert 0.9 < gaps.std() / gaps.mean() < 1.1


def expected_queries(scenario: Scenario) -> float:
    """E[queries] for one constant rate: streams starting at s live min(L, D - s)."""
    (step,) = scenario.arrivals.schedule
    lam, m, d = step.clients_per_min / 60, scenario.arrivals.stream_mean_s, scenario.duration_s
    total_share = sum(a.share for a in scenario.apps)
    qps = sum(a.share * a.rate_qps for a in scenario.apps) / total_share
    # integral over s of m (1 - exp(-(d - s) / m))
    return lam * qps * (m * d - m * m * (1 - math.exp(-d / m)))


BIG = make_scenario(
    [app("cam", rate_qps=10.0, share=3.0), app("mic", rate_qps=4.0, share=1.0)],
    duration_s=1000,
    schedule=[{"at_s": 0, "clients_per_min": 600}],
    stream_mean_s=10,
)


@pytest.mark.parametrize("process", ["periodic", "poisson"])
def test_plan_expected_streams_and_queries(process: Any) -> None:
    plan = plan_load(BIG, seed=11, query_process=process)
    n = len(plan.streams)
    assert abs(n - 10_000) < 4 * 100
    apps = np.array([s.app for s in plan.streams])
    cam = np.count_nonzero(apps == 0)
    assert abs(cam - 0.75 * n) < 4 * math.sqrt(n * 0.75 * 0.25)
    exp_q = expected_queries(BIG)
    # compound Poisson: relative sd ~ sqrt(2 / n) ~ 1.4 %
    assert abs(plan.queries - exp_q) / exp_q < 0.06, (plan.queries, exp_q)
    for s in plan.streams:
        assert 0 <= s.start_s <= s.end_s <= BIG.duration_s
        if s.send_times.size:
            assert s.start_s <= s.send_times[0] and s.send_times[-1] < s.end_s
            assert np.all(np.diff(s.send_times) >= 0)
    # Lifetimes: exponential with the scenario's mean (streams far from the end).
    early = [s.end_s - s.start_s for s in plan.streams if s.start_s < 800]
    assert abs(np.mean(early) - 10) < 0.5


def test_periodic_streams_are_cameras() -> None:
    plan = plan_load(BIG, seed=5)
    phases = []
    for s in plan.streams:
        rate = BIG.apps[s.app].rate_qps
        if s.send_times.size > 1:
            np.testing.assert_allclose(np.diff(s.send_times), 1 / rate, rtol=1e-9)
        if s.send_times.size:
            phase = (s.send_times[0] - s.start_s) * rate
            assert 0 <= phase < 1
            phases.append(phase)
            # no frame is missing at the end
            assert s.end_s - s.send_times[-1] <= 1 / rate
    assert abs(np.mean(phases) - 0.5) < 0.02  # uniform random phase


def test_poisson_queries_have_exponential_gaps() -> None:
    plan = plan_load(BIG, seed=5, query_process="poisson")
    gaps = np.concatenate([np.diff(s.send_times) for s in plan.streams if s.app == 0])
    assert abs(gaps.mean() - 0.1) < 0.005
    assert 0.95 < gaps.std() / gaps.mean() < 1.05


def test_plan_is_deterministic_per_seed() -> None:
    small = BIG.scaled(50)
    a, b, c = plan_load(small, seed=1), plan_load(small, seed=1), plan_load(small, seed=2)
    assert [s.start_s for s in a.streams] == [s.start_s for s in b.streams]
    assert all(np.array_equal(x.send_times, y.send_times) for x, y in zip(a.streams, b.streams, strict=True))
    assert [s.sample_offset for s in a.streams] == [s.sample_offset for s in b.streams]
    assert [s.start_s for s in a.streams] != [s.start_s for s in c.streams]


def test_plan_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        plan_load(BIG, seed=1, query_process="bursty")  # type: ignore[arg-type]
    zero = make_scenario(
        [app("a", share=0.0)], duration_s=10, schedule=[{"at_s": 0, "clients_per_min": 60}], stream_mean_s=1
    )
    with pytest.raises(ValueError):
        plan_load(zero, seed=1)


# --------------------------------------------------------- fake AP (peer)


class FakeAP(pb_grpc.DispatcherServicer):
    """Replies by app: good -> ok (logits one-hot at x[0, 0]), late -> late after the
    deadline, rej -> rejected, bad -> failed, mute -> never, abort -> ends the stream."""

    def __init__(self) -> None:
        self.received = 0
        self.streams = 0

    async def Infer(self, request: pb.InferRequest, context: Any) -> pb.InferResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streams only")
        raise AssertionError

    async def InferStream(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InferResponse]:
        self.streams += 1
        replies: asyncio.Queue[pb.InferResponse | None] = asyncio.Queue()
        work: set[asyncio.Task[None]] = set()

        async def answer(req: pb.InferRequest) -> None:
            rid = req.request_id
            if req.app == "good":
                await asyncio.sleep(0.002)
                label = int(np.frombuffer(req.inputs[0].data, dtype="<f4")[0])
                logits = np.zeros((1, 4), dtype="<f4")
                logits[0, label] = 1.0
                reply = pb.InferResponse(
                    request_id=rid,
                    outcome=pb.OK,
                    outputs=[pb.Tensor(name="logits", datatype="FP32", shape=[1, 4], data=logits.tobytes())],
                    served_by=pb.Target(worker="w1", variant="v-small", cluster="edge", accuracy=0.9),
                )
            elif req.app == "late":
                await asyncio.sleep(req.sla.deadline_ms / 1000 + 0.01)
                reply = pb.InferResponse(
                    request_id=rid,
                    outcome=pb.LATE,
                    served_by=pb.Target(worker="w2", variant="v-big", cluster="cloud"),
                )
            elif req.app == "rej":
                reply = pb.InferResponse(
                    request_id=rid, outcome=pb.REJECTED, status_code=8, error="no target meets the SLA"
                )
            elif req.app == "bad":
                reply = pb.InferResponse(
                    request_id=rid, outcome=pb.FAILED, status_code=14, error="worker died"
                )
            else:  # mute: hold the stream open, never answer
                await asyncio.Event().wait()
                return
            await replies.put(reply)

        aborted = False

        async def consume() -> None:
            nonlocal aborted
            async for req in request_iterator:
                self.received += 1
                if req.app == "abort":
                    aborted = True
                    await replies.put(None)
                    return
                task = asyncio.create_task(answer(req))
                work.add(task)
                task.add_done_callback(work.discard)
            while work:
                await asyncio.gather(*list(work))
            await replies.put(None)

        consumer = asyncio.create_task(consume())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            consumer.cancel()
            for task in list(work):
                task.cancel()
        if aborted:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "AP going away")


@pytest.fixture
async def fake_ap() -> AsyncIterator[tuple[str, FakeAP]]:
    servicer = FakeAP()
    server = grpc.aio.server()
    pb_grpc.add_DispatcherServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(0)


def samples(n: int = 7) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """x[i, 0] carries the label, so the fake AP answers correctly."""
    y = np.arange(n) % 4
    x = np.zeros((n, 8), dtype=np.float32)
    x[:, 0] = y
    return {"digits": (x, y)}


def free_address() -> str:
    return f"127.0.0.1:{free_port()}"


MIXED = make_scenario(
    [
        app("good", share=3),
        app("late", share=1, deadline_ms=30),
        app("rej", share=1),
        app("bad", share=1),
        app("mute", share=1, deadline_ms=50),
    ],
    duration_s=3.0,
    schedule=[{"at_s": 0, "clients_per_min": 1200}, {"at_s": 1.5, "clients_per_min": 2400}],
    stream_mean_s=1.0,
    seed=4,
)


def check_schema(doc: dict[str, Any], apps: list[str]) -> None:
    for key in (
        "scenario",
        "ap",
        "duration_s",
        "seed",
        "sent",
        "total",
        *OUTCOMES,
        *RATIOS,
        "latency_ms",
        "per_app",
        "timeline",
        "served_by",
        "send_lag_ms",
    ):
        assert key in doc, key
    assert doc["total"] == doc["sent"] == sum(doc[o] for o in OUTCOMES)
    assert set(doc["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert set(doc["send_lag_ms"]) >= {"p50", "p99"}
    assert set(doc["per_app"]) == set(apps)
    for block in doc["per_app"].values():
        assert block["sent"] == block["total"] == sum(block[o] for o in OUTCOMES)
        assert set(block) >= {*OUTCOMES, *RATIOS, "latency_ms"}
    assert sum(b["total"] for b in doc["per_app"].values()) == doc["total"]
    assert [b["t_s"] for b in doc["timeline"]] == list(range(len(doc["timeline"])))
    assert len(doc["timeline"]) == math.ceil(doc["duration_s"])
    assert sum(b["sent"] for b in doc["timeline"]) == doc["sent"]
    for o in OUTCOMES:
        assert sum(b[o] for b in doc["timeline"]) == doc[o]
    json.dumps(doc)  # serialisable as is


async def test_every_query_gets_exactly_one_outcome(fake_ap: tuple[str, FakeAP]) -> None:
    address, servicer = fake_ap
    # The default grace: the fake's replies have seconds to arrive, even on a loaded machine.
    report = await run_load(MIXED, address, samples(), seed=4)
    plan = plan_load(MIXED, seed=4)
    assert report.sent == plan.queries == servicer.received > 200
    assert report.counts_add_up and report.total == report.sent
    per_app = report.per_app
    good, late, rej, bad, mute = (per_app[a] for a in ("good", "late", "rej", "bad", "mute"))
    assert good["ok"] == good["total"] > 0 and good["success_ratio"] == 1.0
    assert late["late"] == late["total"] > 0 and late["violation_ratio"] == 1.0
    assert rej["rejected"] == rej["total"] > 0 and rej["rejection_ratio"] == 1.0
    assert bad["failed"] == bad["total"] > 0
    assert mute["failed"] == mute["total"] > 0
    assert report.errors[f"failed: {NO_REPLY}"] == mute["total"]
    assert report.errors["failed: worker died"] == bad["total"]
    assert report.errors["rejected: no target meets the SLA"] == rej["total"]
    assert report.served_by == {"cloud/w2/v-big": late["total"], "edge/w1/v-small": good["total"]}
    assert report.observed_accuracy["edge/w1/v-small"] == {"n": good["total"], "top1": 1.0}
    # Per app, beside its floor; per variant, the same answers (no manifest: samples given as arrays).
    n = good["total"]
    lower = round(0.05 ** (1 / n), 6)  # all n right: P(n of n) = p^n = 5 %
    floor = MIXED.app("good").min_accuracy
    assert good["accuracy"] == {"n": n, "top1": 1.0, "lower95": lower, "min_accuracy": floor}
    no_answers = {"n": 0, "top1": None, "lower95": None, "min_accuracy": MIXED.app("rej").min_accuracy}
    assert rej["accuracy"] == no_answers
    assert report.variant_accuracy == {"v-small": {"n": n, "top1": 1.0, "lower95": lower, "manifest": None}}
    assert report.unmatched_replies == 0
    # client-side latency over served replies; late ones took more than their deadline
    assert late["latency_ms"]["p50"] >= 30
    assert good["latency_ms"]["p50"] is not None and report.reject_latency_ms["p50"] is not None
    assert report.send_lag_ms["p99"] is not None
    doc = report.to_dict()
    check_schema(doc, ["good", "late", "rej", "bad", "mute"])
    assert doc["scenario"] == "test" and doc["seed"] == 4 and doc["ap"] == address
    assert doc["streams"] == len(plan.streams)
    assert [b["streams"] for b in doc["timeline"]] == [plan.active_during(t, t + 1) for t in range(3)]
    assert all(b["streams"] > 0 for b in doc["timeline"])
    assert "good" in report.summary() and "send lag" in report.summary()


async def test_broken_streams_reconnect_and_count_as_failed(fake_ap: tuple[str, FakeAP]) -> None:
    address, servicer = fake_ap
    scenario = make_scenario(
        [app("abort", rate_qps=20)],
        duration_s=1.5,
        schedule=[{"at_s": 0, "clients_per_min": 240}],
        stream_mean_s=1.0,
        seed=2,
    )
    report = await run_load(scenario, address, samples(), grace_s=0.2)
    assert report.sent == plan_load(scenario, seed=2).queries > 10
    assert report.counts["failed"] == report.sent and report.counts_add_up
    # a camera whose stream broke opens a new one for its next frame
    assert servicer.streams > len([s for s in plan_load(scenario, seed=2).streams if s.send_times.size])
    assert all("UNAVAILABLE" in e or NO_REPLY in e for e in report.errors)


async def test_duration_compresses_the_scenario(fake_ap: tuple[str, FakeAP]) -> None:
    address, _ = fake_ap
    long = make_scenario(
        [app("good", rate_qps=5)],
        duration_s=100,
        schedule=[{"at_s": 0, "clients_per_min": 6}, {"at_s": 50, "clients_per_min": 12}],
        stream_mean_s=20,
        seed=9,
    )
    report = await run_load(long, address, samples(), duration_s=2.0)
    assert report.duration_s == 2.0 and len(report.timeline) == 2
    assert report.sent == plan_load(long.scaled(2.0), seed=9).queries
    assert report.counts["ok"] == report.sent


async def test_unreachable_ap_raises() -> None:
    with pytest.raises(UnavailableError):
        await run_load(MIXED, free_address(), samples(), connect_timeout_s=0.3)


def test_load_samples(tmp_path: Path) -> None:
    (tmp_path / "samples").mkdir()
    x, y = samples()["digits"]
    np.savez(tmp_path / "samples" / "digits.npz", x=x, y=y)
    got = load_samples(tmp_path, {"digits"})
    np.testing.assert_array_equal(got["digits"][0], x)
    with pytest.raises(FileNotFoundError, match="shapes"):
        load_samples(tmp_path, ["shapes"])


SCENARIO_TOML = """
name = "cli"
duration_s = 60
seed = 3
[[apps]]
name = "good"
task = "digits"
deadline_ms = 10000.0
min_accuracy = 0.5
rate_qps = 10.0
share = 1.0
[devices.d]
[[clusters]]
name = "c"
rtt_ms = 1.0
workers = [ { device = "d", count = 1, variants = [] } ]
[arrivals]
schedule = [ { at_s = 0, clients_per_min = 120 } ]
stream_mean_s = 10.0
"""


def cli_args(tmp_path: Path, ap: str, models: Path) -> argparse.Namespace:
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO_TOML)
    return argparse.Namespace(
        scenario=scenario,
        ap=ap,
        models=models,
        duration=1.5,
        json=tmp_path / "out" / "load.json",
        seed=None,
        no_progress=True,
        connect_timeout=0.5,
    )


async def test_main_writes_the_json(
    fake_ap: tuple[str, FakeAP], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, _ = fake_ap
    (tmp_path / "models" / "samples").mkdir(parents=True)
    x, y = samples()["digits"]
    np.savez(tmp_path / "models" / "samples" / "digits.npz", x=x, y=y)
    args = cli_args(tmp_path, address, tmp_path / "models")
    args.connect_timeout = 60.0  # the AP is there: only a loaded machine makes connecting slow
    # main() runs its own event loop, so off this one (which serves the fake AP)
    assert await asyncio.to_thread(main, args) == 0
    doc = json.loads(args.json.read_text())
    check_schema(doc, ["good"])
    assert doc["scenario"] == "cli" and doc["seed"] == 3 and doc["duration_s"] == 1.5
    assert doc["ok"] == doc["sent"] > 0
    assert "good" in capsys.readouterr().out


def test_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli_args(tmp_path, free_address(), tmp_path / "nomodels")
    assert main(args) == 2  # no samples
    assert "digits" in capsys.readouterr().err
    (tmp_path / "models" / "samples").mkdir(parents=True)
    x, y = samples()["digits"]
    np.savez(tmp_path / "models" / "samples" / "digits.npz", x=x, y=y)
    args.models = tmp_path / "models"
    assert main(args) == 1  # AP unreachable
    assert "unreachable" in capsys.readouterr().err
    args.scenario = tmp_path / "missing.toml"
    assert main(args) == 2


def test_report_ratios() -> None:
    counts = {"ok": 6, "late": 1, "inaccurate": 1, "rejected": 2, "failed": 0}
    lat = {"p50": None, "p90": None, "p99": None, "max": None}
    r = LoadReport(
        scenario="s",
        ap="a",
        duration_s=1,
        seed=0,
        query_process="periodic",
        grace_s=1,
        streams=1,
        sent=10,
        counts=counts,
        latency_ms=lat,
        reject_latency_ms=lat,
        send_lag_ms=lat,
        per_app={},
        timeline=[],
        served_by={},
        observed_accuracy={},
        errors={},
        unmatched_replies=0,
        wall_s=1.0,
    )
    assert r.counts_add_up
    assert (r.success_ratio, r.violation_ratio, r.rejection_ratio) == (0.6, 0.2, 0.2)
    bad = LoadReport(**{**{f: getattr(r, f) for f in r.__slots__}, "sent": 11})  # type: ignore[arg-type]
    assert not bad.counts_add_up and "ERROR" in bad.summary()


async def test_stop_ends_sending_and_still_accounts_for_everything(fake_ap: tuple[str, FakeAP]) -> None:
    address, servicer = fake_ap
    stop = asyncio.Event()

    async def stop_once_under_way() -> None:
        while servicer.received < 20:
            await asyncio.sleep(0.01)
        stop.set()

    stopper = asyncio.create_task(stop_once_under_way())
    # A scenario far longer than the run: the stop, not its end, ends the sending.
    report = await run_load(MIXED, address, samples(), seed=4, duration_s=60.0, grace_s=0.3, stop=stop)
    await stopper
    planned = plan_load(MIXED.scaled(60.0), seed=4).queries
    assert report.stopped_at_s is not None and report.stopped_at_s < 60.0
    assert 20 <= report.sent < planned
    assert report.counts_add_up and report.total == report.sent
    # Nothing was sent after the stop.
    assert sum(b["sent"] for b in report.timeline[int(report.stopped_at_s) + 1 :]) == 0
    assert report.to_dict()["stopped_at_s"] == pytest.approx(report.stopped_at_s, abs=1e-3)
    assert "stopped early" in report.summary()


async def test_cli_ctrl_c_reports_what_was_sent(fake_ap: tuple[str, FakeAP], tmp_path: Path) -> None:
    address, servicer = fake_ap
    (tmp_path / "models" / "samples").mkdir(parents=True)
    x, y = samples()["digits"]
    np.savez(tmp_path / "models" / "samples" / "digits.npz", x=x, y=y)
    args = cli_args(tmp_path, address, tmp_path / "models")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "apdispatch.cli",
        "load",
        str(args.scenario),
        "--ap",
        address,
        "--models",
        str(args.models),
        "--duration",
        "30",
        "--json",
        str(args.json),
        "--no-progress",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    # Interrupt once the run is under way (the JSON is only written at the end);
    # its start (imports) takes long on a loaded machine.
    deadline = asyncio.get_running_loop().time() + 120
    while servicer.received == 0:
        assert proc.returncode is None and asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert "stopped early" in out.decode() and "SIGINT" in err.decode()
    doc = json.loads(args.json.read_text())
    assert doc["stopped_at_s"] is not None and doc["sent"] > 0
    assert doc["total"] == doc["sent"] == doc["ok"]


def test_error_kinds_do_not_count_numbers_apart() -> None:
    from apdispatch.tools.loadgen.report import Tally

    tally = Tally(n_apps=1, n_buckets=1)
    for ms in range(100):
        tally._error(f"rejected: fastest {ms}.5 ms, {ms / 7:.2f} ms left")
    assert dict(tally.errors) == {"rejected: fastest N ms, N ms left": 100}

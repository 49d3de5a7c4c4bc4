"""Prometheus metrics of the AP and the workers, scraped by a real Prometheus server.

One module-wide setup: an AP (learned policy, so that the learner's metrics
exist) with ``metrics_port``, an edge worker with ``--metrics-port``, and
Debian's ``prometheus`` on loopback scraping both every second with the scrape
jobs of deploy/prometheus/prometheus.yml. Load with known outcomes goes
through the AP; Prometheus's HTTP API must then report, per app and outcome,
exactly the requests sent, and every PromQL query of the Grafana dashboard
(deploy/grafana/dashboards/apdispatch.json) must return data.

Skipped, with the reason, when the ``prometheus`` binary is missing
(``make tools`` installs Debian's package; ``make test`` runs it).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from live_ap import APThread, sample

from apdispatch.ap.auth import APP, Gate, TokenEntry, Tokens
from apdispatch.ap.config import APConfig
from apdispatch.ap.dispatcher import Dispatcher
from apdispatch.ap.forwarder import Forwarder
from apdispatch.ap.metrics import OTHER_APPS, Stats, rejection_reason
from apdispatch.ap.overload import ConcurrencyLimit, OverloadConfig
from apdispatch.client import Client, StreamRequest
from apdispatch.common.errors import DeadlineExceededError, NotFoundError, RejectedError
from apdispatch.common.logs import make_logger
from apdispatch.common.outcomes import Outcome
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.learned.actor_critic import ActorCriticAlgo, ActorCriticConfig, ActorCriticHyper, Transition
from apdispatch.learned.features import N_FEATURES
from apdispatch.learned.learner import RewardMean
from apdispatch.learned.process import ProcessLearner
from apdispatch.policies import make_policy
from apdispatch.routing.estimator import LatencyEstimator
from apdispatch.routing.policy import RequestView
from apdispatch.routing.registry import Registry, Target, VariantInfo, Worker
from apdispatch.routing.router import admit, build_candidates
from apdispatch.tools.processes import ChildError, Children, free_port
from workers.metrics import WorkerMetrics
from workers.runtime import InferResult, Slots

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "apdispatch.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
APPS = ("camera", "sensor", "drone")


def _get(url: str, timeout_s: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        body: bytes = reply.read()
    return body


class Prometheus:
    """A Prometheus server on loopback, in a temporary folder, scraping ``jobs`` every second."""

    def __init__(self, run_dir: Path, jobs: dict[str, list[str]]) -> None:
        # The shipped scrape jobs, with the live targets in place of the compose services.
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": jobs[job["job_name"]]}]
        path = run_dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = (run_dir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={path}",
                f"--storage.tsdb.path={run_dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.log_path = run_dir / "prometheus.log"

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ChildError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                if _get(f"{self.url}/-/ready", 2.0):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise ChildError(f"prometheus not ready: {self.log_path.read_text()[-2000:]}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        reply = json.loads(_get(url))
        assert reply["status"] == "success", reply
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def wait_up(self, jobs: list[str], timeout_s: float = 60.0) -> None:
        """Until every job's target was scraped (Prometheus takes in new targets every few seconds)."""
        deadline = time.monotonic() + timeout_s
        while (health := self.targets_up()) != dict.fromkeys(jobs, "up"):
            if time.monotonic() > deadline:
                raise ChildError(f"targets not up: {health}")
            time.sleep(0.2)

    def targets_up(self) -> dict[str, str]:
        reply = json.loads(_get(f"{self.url}/api/v1/targets"))
        return {t["scrapePool"]: t["health"] for t in reply["data"]["activeTargets"]}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class Setup:
    def __init__(
        self, ap: APThread, worker_metrics: str, prometheus: Prometheus, sent: Counter[tuple[str, str]]
    ):
        self.ap = ap
        self.worker_metrics = worker_metrics
        self.prometheus = prometheus
        self.sent = sent  # (app, outcome) -> requests, as the client saw them


@pytest.fixture(scope="module")
def setup(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus binary is missing: `make tools` installs Debian's package")
    run_dir = tmp_path_factory.mktemp("metrics")
    ap = APThread(APConfig(listen="127.0.0.1:0", policy="learned", metrics_port=free_port()))
    children = Children(run_dir)
    prometheus: Prometheus | None = None
    try:
        worker_metrics = f"127.0.0.1:{free_port()}"
        children.start(
            "edge-0",
            [
                "worker",
                "edge",
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--worker-id",
                "edge-0",
                "--variants",
                "digits-tiny,digits-small",
                "--slots",
                "2",
                "--models",
                str(models_dir),
                "--ap",
                ap.address,
                "--metrics-port",
                worker_metrics.rsplit(":", 1)[1],
            ],
        )
        deadline = time.monotonic() + 120
        while not ap.ap.registry.workers():
            if children.get("edge-0").exited() is not None or time.monotonic() > deadline:
                raise ChildError(children.get("edge-0").describe())
            time.sleep(0.2)
        prometheus = Prometheus(
            run_dir, {"apdispatch-ap": [ap.ap.metrics_address], "apdispatch-workers": [worker_metrics]}
        )
        prometheus.wait_ready()
        prometheus.wait_up(["apdispatch-ap", "apdispatch-workers"])
        sent = _count_load(ap.address, models_dir)
        yield Setup(ap, worker_metrics, prometheus, sent)
    finally:
        if prometheus is not None:
            prometheus.close()
        children.close()
        ap.close()


def _count_load(address: str, models_dir: Path) -> Counter[tuple[str, str]]:
    """Run the load; (app, outcome) -> requests, from the replies (matched to their app by request id)."""
    x = sample(models_dir)
    apps: dict[str, str] = {}

    def requests() -> Iterator[StreamRequest]:
        for i in range(240):
            time.sleep(0.02)
            app = APPS[i % len(APPS)]
            request_id = f"r{i}"
            apps[request_id] = app
            if i % 10 == 3:  # rejected: no variant that accurate
                yield StreamRequest("digits", x, 100.0, 0.9999, app, request_id)
            elif i % 10 == 6:  # rejected: no target that fast
                yield StreamRequest("digits", x, 0.01, 0.0, app, request_id)
            elif i % 20 == 9:  # failed: no such task
                yield StreamRequest("no-such-task", x, 100.0, 0.0, app, request_id)
            else:
                yield StreamRequest("digits", x, 200.0, 0.0, app, request_id)

    seen: Counter[tuple[str, str]] = Counter()
    for result in Client(address).stream(requests(), timeout_s=120):
        seen[(apps[result.request_id], str(result.outcome))] += 1
    assert sum(seen.values()) == 240
    return seen


def _wait_for(
    prometheus: Prometheus, promql: str, want: dict[tuple[str, str], float], timeout_s: float = 30.0
):
    """The query's (app, outcome) values once they equal ``want``, or the last ones seen."""
    deadline = time.monotonic() + timeout_s
    got: dict[tuple[str, str], float] = {}
    while time.monotonic() < deadline:
        got = {
            (r["metric"]["app"], r["metric"]["outcome"]): float(r["value"][1])
            for r in prometheus.query(promql)
            if float(r["value"][1]) > 0
        }
        if got == want:
            break
        time.sleep(0.5)
    return got


def _wait_value(prometheus: Prometheus, promql: str, same_as: str, timeout_s: float = 30.0) -> float:
    """The scalar value of ``promql`` once ``same_as`` has the same (the last seen otherwise)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left, right = prometheus.query(promql), prometheus.query(same_as)
        value = float(left[0]["value"][1]) if left else math.nan
        if (right and float(right[0]["value"][1]) == value) or time.monotonic() > deadline:
            assert right and float(right[0]["value"][1]) == value, (promql, left, same_as, right)
            return value
        time.sleep(0.5)


def test_prometheus_counts_every_request_sent_per_app_and_outcome(setup: Setup) -> None:
    prometheus = setup.prometheus
    assert prometheus.targets_up() == {"apdispatch-ap": "up", "apdispatch-workers": "up"}
    want = {key: float(n) for key, n in setup.sent.items()}
    # The load's mix: each kind of outcome it was built to produce did occur.
    outcomes = {outcome for _, outcome in want}
    assert {Outcome.REJECTED, Outcome.FAILED} <= outcomes and outcomes & {"ok", "late", "inaccurate"}
    got = _wait_for(
        prometheus, 'sum by (app, outcome) (apdispatch_ap_requests_total{job="apdispatch-ap"})', want
    )
    assert got == want
    # Rejections by reason add up to the rejected requests, and name the two causes sent.
    reasons = {
        r["metric"]["reason"]: float(r["value"][1])
        for r in prometheus.query("apdispatch_ap_rejections_total")
    }
    assert sum(reasons.values()) == sum(n for (_, o), n in want.items() if o == Outcome.REJECTED)
    # (a loaded machine may turn more away for their deadline, none for accuracy)
    assert reasons["accuracy"] == 24 and reasons["deadline"] >= 24
    # The worker answered every request the AP sent it (ok, or past its deadline), once each.
    forwarded = _wait_value(
        prometheus, "sum(apdispatch_ap_decisions_total)", "sum(apdispatch_worker_requests_total)"
    )
    assert forwarded >= sum(n for (_, o), n in want.items() if o in ("ok", "late", "inaccurate")), want
    # The latency histogram counts every served request, per app.
    counts = prometheus.query("sum by (app) (apdispatch_ap_request_duration_seconds_count)")
    assert {r["metric"]["app"]: float(r["value"][1]) for r in counts} == {
        app: sum(n for (a, o), n in want.items() if a == app and o in ("ok", "late", "inaccurate"))
        for app in APPS
    }


def _panel_queries() -> list[tuple[str, list[str]]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], [t["expr"] for t in panel["targets"]]) for panel in dashboard["panels"]]


def test_dashboard_covers_what_operators_look_for() -> None:
    titles = [title for title, _ in _panel_queries()]
    for wanted in (
        "Success ratio by app",
        "Outcomes",
        "Latency percentiles against deadlines",
        "Ejections",
        "Learner reward",
    ):
        assert wanted in titles
    assert any("worker" in title.lower() for title in titles)
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][
        0
    ]
    # Every panel and query reads the provisioned data source.
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert all(t["datasource"]["uid"] == datasource["uid"] for t in panel["targets"])
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "apdispatch.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


@pytest.mark.parametrize("title,queries", _panel_queries(), ids=[t for t, _ in _panel_queries()])
def test_every_dashboard_query_returns_data(setup: Setup, title: str, queries: list[str]) -> None:
    values: list[float] = []
    for promql in queries:
        result = setup.prometheus.query(promql)
        assert result, f"{title}: no data for {promql}"
        values += [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), f"{title}: only NaN"


def _promtool_check(text: bytes) -> None:
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_promtool_accepts_both_expositions(setup: Setup) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is missing: `make tools` installs Debian's prometheus package")
    ap_text = _get(f"http://{setup.ap.ap.metrics_address}/metrics")
    worker_text = _get(f"http://{setup.worker_metrics}/metrics")
    _promtool_check(ap_text)
    _promtool_check(worker_text)
    assert b"apdispatch_ap_learner_reward{" in ap_text
    assert b"apdispatch_worker_compute_seconds_bucket{" in worker_text


def test_promtool_accepts_the_shipped_prometheus_config() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is missing: `make tools` installs Debian's prometheus package")
    check = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


# -- label bounds and rejection reasons, without a server ---------------------------------


@pytest.mark.unit
def test_rejections_are_counted_by_reason_from_each_place_that_rejects() -> None:
    """Overload (the dispatcher's limit), rate limit (the gate), SLA (admission): each its own reason."""
    stats = Stats()
    log = make_logger("error")
    limit = ConcurrencyLimit(OverloadConfig(max_in_flight=1, min_in_flight=1))
    limit.in_flight = 1  # full: the next request is shed
    forwarder = Forwarder("stream", log)
    dispatcher = Dispatcher(
        APConfig(),
        Registry(5.0),
        LatencyEstimator(),
        make_policy("fastest"),
        forwarder,
        stats,
        log,
        limit=limit,
    )
    replies: list[object] = []
    dispatcher.submit(pb.InferRequest(task="digits", app="a"), time.monotonic(), replies.append)
    assert isinstance(replies[0], RejectedError)
    assert stats.rejections == {"overload": 1}

    gate = Gate(Tokens({"t": TokenEntry(APP, "a", rate=1.0, burst=1.0)}), mtls=False, stats=stats)
    entry = TokenEntry(APP, "a", rate=1.0, burst=1.0)
    refusals = [gate.admit(entry, pb.InferRequest(app="a")) for _ in range(3)]
    assert refusals[0] is None and all(isinstance(r, RejectedError) for r in refusals[1:])
    assert stats.rejections == {"overload": 1, "rate_limit": 2}

    # Admission's two refusals, with the messages the router really writes.
    target = Target(
        Worker("w", "127.0.0.1:1", "c", "edge", 1, 0.0, True, {}, 0.0, pb.RegisterRequest()),
        VariantInfo("v", "digits", 0.9, 5.0, 5.0, (), (), 1),
    )
    estimator = LatencyEstimator()
    for view, reason in (
        (RequestView("digits", "a", 1.0, 0.0), "deadline"),
        (RequestView("digits", "a", 100.0, 0.99), "accuracy"),
    ):
        with pytest.raises(RejectedError) as raised:
            admit(view, [target], build_candidates([target], view.min_accuracy, estimator))
        assert rejection_reason(raised.value.message) == reason
    assert rejection_reason("something new") == "other"


@pytest.mark.unit
def test_label_values_stay_bounded() -> None:
    stats = Stats(max_apps=3, max_targets=2)
    for i in range(10):
        stats.record(Outcome.OK, f"app{i}", 1.0, target=f"c/w{i}/v", deadline_ms=10.0)
        stats.estimated(f"cluster{i}", 1.0, 2.0)
        stats.ejected(f"w{i}")
    assert set(stats.by_app) == set(stats.latency_by_app) == {"app0", "app1", "app2", OTHER_APPS}
    other = stats.latency_by_app[OTHER_APPS]
    assert sum(other.latency.counts) == 7 and other.deadline_sum == 70.0
    assert stats.by_target == {"c/w0/v": 1, "c/w1/v": 1, OTHER_APPS: 8}
    assert stats.ejections == {"w0": 1, "w1": 1, OTHER_APPS: 8}
    assert set(stats.estimate_error) == {"cluster0", "cluster1", OTHER_APPS}
    # A latency on a bucket's bound counts in that bucket (Prometheus' "le").
    assert other.latency.counts[other.latency.bounds.index(1)] == 7


def test_learner_process_reports_its_updates_and_loss() -> None:
    """The actor-critic's learner runs in a process: its loss comes back with each snapshot."""
    hyper = ActorCriticHyper(batch_size=8, minibatch_size=8, max_learn_per_s=0.0)
    algo = ActorCriticAlgo(ActorCriticConfig(hyper=hyper))
    learner = ProcessLearner(algo, lambda snapshot: None, name="test-learner")
    try:
        assert learner.wait_ready()
        assert math.isnan(algo.loss)
        rng = np.random.default_rng(0)
        for seq in range(8):
            x = rng.standard_normal((3, N_FEATURES))
            learner.put(Transition(seq, x, 1, np.zeros(3), float(seq % 2)))
        deadline = time.monotonic() + 120
        while learner.updates < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert learner.updates == 1 and algo.updates == 1
        assert math.isfinite(algo.loss)
    finally:
        learner.close()


@pytest.mark.unit
def test_learned_policies_report_their_reward() -> None:
    rewards = RewardMean()
    for r in (1.0, 0.0, 1.0, 1.0):
        rewards.add(r)
    assert rewards.count == 4 and rewards.mean == 0.75
    # Past the span, the mean follows the recent rewards.
    for _ in range(1000):
        rewards.add(0.0)
    assert rewards.mean < 0.01
    assert make_policy("fastest").telemetry() == {}


@pytest.mark.unit
def test_worker_counts_requests_by_model_and_status_with_bounded_model_names() -> None:
    metrics = WorkerMetrics()
    slots = Slots(2)
    metrics.watch(slots, {"digits-tiny": object()}, lambda: True)
    for exc in (NotFoundError("no such model"), DeadlineExceededError(), ValueError("model bug")):
        metrics.started()
        metrics.failed("digits-tiny" if not isinstance(exc, NotFoundError) else "x" * 1000, exc)
    metrics.started()
    metrics.served("digits-tiny", InferResult([], queue_ms=0.5, compute_ms=2.0, batch_size=1))

    def count(model: str, code: str) -> float | None:
        return metrics.registry.get_sample_value(
            "apdispatch_worker_requests_total", {"model": model, "code": code}
        )

    assert count("(unknown)", "NOT_FOUND") == 1
    assert count("digits-tiny", "DEADLINE_EXCEEDED") == 1
    assert count("digits-tiny", "INTERNAL") == 1
    assert count("digits-tiny", "OK") == 1
    assert metrics.in_flight == 0
    assert metrics.registry.get_sample_value("apdispatch_worker_slots") == 2
    assert metrics.registry.get_sample_value("apdispatch_worker_ready") == 1
    compute = metrics.registry.get_sample_value(
        "apdispatch_worker_compute_seconds_bucket", {"model": "digits-tiny", "le": "0.002"}
    )
    assert compute == 1
    slots.close()

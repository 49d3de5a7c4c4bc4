"""Scenario -> worker processes: the shipped scenario, flags, and the errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from apdispatch.cli import build_parser
from apdispatch.common.manifest import Manifest, TensorSpec, Variant, load_manifest
from apdispatch.scenario import Scenario, load_scenario, parse_scenario
from apdispatch.tools.topology import CLOUD, EDGE, TopologyError, build_topology
from workers.runtime import parse_service_times

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "scenarios" / "small-edge-cloud.toml"

# The zoo's variants and their runtimes, as the manifest would list them; the
# numbers do not matter to the topology.
ZOO = {
    "digits-tiny": "onnx",
    "digits-small": "onnx",
    "digits-medium": "onnx",
    "digits-large": "torch",
    "shapes-tiny": "onnx",
    "shapes-small": "onnx",
    "shapes-medium": "onnx",
    "shapes-large": "torch",
}


def _variant(name: str, runtime: str) -> Variant:
    spec = TensorSpec(name="input", datatype="FP32", shape=(-1, 1, 8, 8))
    return Variant(
        name=name,
        task=name.split("-")[0],
        runtime=runtime,
        file=f"{name}.{'onnx' if runtime == 'onnx' else 'pt'}",
        accuracy=0.9,
        params=1,
        flops=1,
        latency_ms_batch1=0.1,
        latency_ms_batch8=0.2,
        inputs=(spec,),
        outputs=(spec,),
    )


@pytest.fixture
def manifest() -> Manifest:
    return Manifest(root=Path("/nonexistent"), variants=tuple(_variant(n, r) for n, r in ZOO.items()))


def _doc() -> dict[str, Any]:
    return tomllib.loads(SHIPPED.read_text())


def _scenario(doc: dict[str, Any]) -> Scenario:
    return parse_scenario(doc)


def test_shipped_scenario_topology(manifest: Manifest) -> None:
    scenario = load_scenario(SHIPPED)
    specs = build_topology(scenario, manifest)
    edge = [s for s in specs if s.kind == EDGE]
    cloud = [s for s in specs if s.kind == CLOUD]
    assert len(edge) == 3 and len(cloud) == 1
    assert len({s.worker_id for s in specs}) == len(specs)
    # Three edge devices of different speeds: three different slowdowns.
    assert len({s.slowdown for s in edge}) == 3
    for spec in specs:
        device = scenario.devices[spec.device]
        cluster = next(c for c in scenario.clusters if c.name == spec.cluster)
        assert spec.slowdown == pytest.approx(1.0 / device.speed)
        assert spec.slowdown >= 1.0  # a faster device cannot be emulated by waiting
        assert spec.link_delay_ms == cluster.rtt_ms
        assert spec.slots == device.slots
        assert spec.worker_id.startswith(f"{spec.cluster}-")
    # Edge a few ms away, the cloud tens of ms away and batching.
    assert max(s.link_delay_ms for s in edge) < 10.0
    assert cloud[0].link_delay_ms >= 20.0
    assert cloud[0].max_batch_size > 1
    assert all(ZOO[v] == "onnx" for s in edge for v in s.variants)
    assert all(ZOO[v] == "torch" for s in cloud for v in s.variants)


def test_shipped_scenario_needs_no_manifest() -> None:
    # Every cluster says its kind, so the compose file can be written on a
    # machine without a built zoo, and it comes out the same.
    scenario = load_scenario(SHIPPED)
    with_zoo = build_topology(scenario, Manifest(Path("/x"), tuple(_variant(n, r) for n, r in ZOO.items())))
    assert build_topology(scenario) == with_zoo


def test_shipped_scenario_against_the_built_zoo(models_dir: Path) -> None:
    """The SLAs split as the scenario says: edge only, cloud only, and both."""
    manifest = load_manifest(models_dir)
    scenario = load_scenario(SHIPPED)
    specs = build_topology(scenario, manifest)
    assert {s.kind for s in specs} == {EDGE, CLOUD}
    places = {}
    for app in scenario.apps:
        feasible = set()
        for spec in specs:
            for name in spec.variants:
                variant = manifest.variant(name)
                # Accurate enough, and the round trip alone leaves time to compute.
                if (
                    variant.task == app.task
                    and variant.accuracy >= app.min_accuracy
                    and spec.link_delay_ms < app.deadline_ms
                ):
                    feasible.add(spec.kind)
        places[app.name] = feasible
    assert sorted(places.values(), key=sorted) == sorted([{EDGE}, {CLOUD}, {EDGE, CLOUD}], key=sorted), places


def test_argv_parses_with_the_cli(manifest: Manifest) -> None:
    parser = build_parser()
    for spec in build_topology(load_scenario(SHIPPED), manifest):
        argv = spec.argv(
            listen="127.0.0.1:0",
            models="/m",
            ap="127.0.0.1:5000",
            advertise="h:1",
            device="cpu" if spec.kind == CLOUD else None,
        )
        args = parser.parse_args(argv)
        assert (args.command, args.kind) == ("worker", spec.kind)
        assert args.variants.split(",") == list(spec.variants)
        assert args.cluster == spec.cluster and args.worker_id == spec.worker_id
        assert args.slots == spec.slots
        assert args.slowdown == pytest.approx(spec.slowdown, rel=1e-5)
        assert args.link_delay_ms == pytest.approx(spec.link_delay_ms)
        assert args.ap == "127.0.0.1:5000" and args.advertise == "h:1"
        assert str(args.models) == "/m"
        if spec.kind == CLOUD:
            assert args.max_batch_size == spec.max_batch_size
            assert args.max_wait_ms == pytest.approx(spec.max_wait_ms)
            assert args.device == "cpu"


def test_worker_ids_count_per_cluster(manifest: Manifest) -> None:
    doc = _doc()
    doc["clusters"][0]["workers"] = [
        {"device": doc["clusters"][0]["workers"][0]["device"], "count": 2, "variants": ["digits-tiny"]},
        {"device": doc["clusters"][0]["workers"][0]["device"], "count": 1, "variants": ["shapes-tiny"]},
    ]
    specs = build_topology(_scenario(doc), manifest)
    name = doc["clusters"][0]["name"]
    assert [s.worker_id for s in specs if s.cluster == name] == [f"{name}-1", f"{name}-2", f"{name}-3"]


def test_unknown_variant_names_the_key(manifest: Manifest) -> None:
    doc = _doc()
    doc["clusters"][1]["workers"][0]["variants"] = ["digits-tiny", "digits-huge"]
    with pytest.raises(TopologyError, match=r"clusters\[1\]\.workers\[0\]\.variants.*digits-huge"):
        build_topology(_scenario(doc), manifest)


def test_scenario_variants_are_known(manifest: Manifest) -> None:
    doc = _doc()
    doc["variants"] = {"digits-huge": {"task": "digits", "accuracy": 0.99, "latency_ms": 9.0}}
    doc["clusters"][1]["workers"][0]["variants"] = ["digits-tiny", "digits-huge"]
    specs = build_topology(_scenario(doc), manifest)
    assert any("digits-huge" in s.variants for s in specs)


def test_kind_from_the_manifest_when_not_declared(manifest: Manifest) -> None:
    doc = _doc()
    for cluster in doc["clusters"]:
        cluster.pop("kind", None)
    specs = build_topology(_scenario(doc), manifest)
    assert specs == build_topology(load_scenario(SHIPPED), manifest)
    with pytest.raises(TopologyError, match=r"clusters\[0\].*kind"):
        build_topology(_scenario(doc))  # no manifest, no kind: cannot tell


def test_edge_worker_cannot_run_torch_variants(manifest: Manifest) -> None:
    doc = _doc()
    doc["clusters"][0]["kind"] = "edge"
    doc["clusters"][0]["workers"][0]["variants"] = ["digits-tiny", "digits-large"]
    with pytest.raises(TopologyError, match=r"clusters\[0\]\.workers\[0\].*digits-large"):
        build_topology(_scenario(doc), manifest)
    doc["clusters"][0].pop("kind")
    with pytest.raises(TopologyError, match="mixes onnx and torch"):
        build_topology(_scenario(doc), manifest)


def test_cloud_worker_runs_onnx_variants_too(manifest: Manifest) -> None:
    doc = _doc()
    cloud = next(c for c in doc["clusters"] if c.get("kind") == "cloud")
    cloud["workers"][0]["variants"] = ["digits-small", "digits-large"]
    specs = build_topology(_scenario(doc), manifest)
    assert next(s for s in specs if s.cluster == cloud["name"]).kind == CLOUD


def test_an_app_nobody_serves_is_an_error(manifest: Manifest) -> None:
    doc = _doc()
    for cluster in doc["clusters"]:
        for group in cluster["workers"]:
            group["variants"] = [v for v in group["variants"] if v.startswith("digits")]
    doc["clusters"] = [c for c in doc["clusters"] if any(g["variants"] for g in c["workers"])]
    with pytest.raises(TopologyError, match=r"apps\[\d\]\.task.*shapes"):
        build_topology(_scenario(doc), manifest)


def test_cluster_names_must_be_host_names(manifest: Manifest) -> None:
    doc = _doc()
    doc["clusters"][0]["name"] = "Edge A"
    with pytest.raises(TopologyError, match=r"clusters\[0\]\.name"):
        build_topology(_scenario(doc), manifest)


def test_slow_devices_get_service_times_from_the_latency_profile(manifest: Manifest) -> None:
    from apdispatch.sim.profile import MEASURED_PROFILE, reference_profile

    scenario = load_scenario(ROOT / "scenarios" / "demo.toml")
    reference = reference_profile().variants
    assert reference is not None
    parser = build_parser()
    specs = build_topology(scenario, manifest)
    for spec in specs:
        speed = scenario.devices[spec.device].speed
        if speed >= 1.0:
            assert spec.service_ms == ()  # a fast device runs at this machine's speed
            assert "--service-ms" not in spec.argv(listen="x:1", models="/m", ap=None)
            continue
        # Every variant the reference profile knows: its latency on this device, in ms.
        expected = tuple((v, reference[v][0] / speed, reference[v][1] / speed) for v in spec.variants)
        assert spec.service_ms == expected
        # The worker gets them through its command line.
        args = parser.parse_args(spec.argv(listen="x:1", models="/m", ap=None))
        parsed = parse_service_times(args.service_ms)
        assert sorted(parsed) == sorted(spec.variants)
        for v, b1, b8 in expected:
            assert (parsed[v].batch1_ms, parsed[v].batch8_ms) == pytest.approx((b1, b8), rel=1e-5)
    # "measured": the zoo's own figures, emulated by slowdown alone.
    assert all(s.service_ms == () for s in build_topology(scenario, manifest, MEASURED_PROFILE))

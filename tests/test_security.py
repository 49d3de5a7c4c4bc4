"""The AP's doors: registration checks, TLS, mutual TLS, tokens, rate limits, worker identity.

Every refusal is shown against real gRPC servers on loopback: an in-process AP
(and, where a worker is needed, an in-process edge worker) and raw stubs or
the SDK as clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from apdispatch.ap.auth import TokenBucket
from apdispatch.ap.config import APConfig, ConfigError, load_config
from apdispatch.ap.server import AccessPoint
from apdispatch.common.errors import NotFoundError, PermissionDeniedError, UnauthenticatedError
from apdispatch.common.logs import make_logger
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc
from apdispatch.common.protocol import oip_pb2
from apdispatch.common.protocol import oip_pb2_grpc as oip_grpc
from apdispatch.common.tls import TLSFiles, aio_channel
from apdispatch.routing.registry import Registry

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


def _registration(
    worker_id: str = "w1", address: str = "127.0.0.1:1", **variant: object
) -> pb.RegisterRequest:
    fields: dict[str, object] = {
        "name": "v",
        "task": "t",
        "accuracy": 0.9,
        "latency_ms": 1.0,
        "inputs": [pb.TensorSpec(name="input", datatype="FP32", shape=[-1, 4])],
        "outputs": [pb.TensorSpec(name="output", datatype="FP32", shape=[-1, 2])],
    }
    fields.update(variant)
    return pb.RegisterRequest(
        worker_id=worker_id,
        address=address,
        kind="edge",
        slots=1,
        variants=[pb.VariantInfo(**fields)],  # type: ignore[arg-type]
    )


@pytest.fixture
async def plain_ap() -> AsyncIterator[AccessPoint]:
    ap = AccessPoint(APConfig(listen="127.0.0.1:0", log_level="warning"), make_logger("warning"))
    await ap.start()
    try:
        yield ap
    finally:
        await ap.stop(grace_s=0.1)


# -- registration checks ------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "field"),
    [
        (
            {"inputs": [pb.TensorSpec(name="input", datatype="FOO", shape=[-1, 4])]},
            "variants[0].inputs[0].datatype",
        ),
        (
            {"outputs": [pb.TensorSpec(name="output", datatype="fp32", shape=[-1, 2])]},
            "variants[0].outputs[0].datatype",
        ),
        (
            {"inputs": [pb.TensorSpec(name="input", datatype="FP32", shape=[-1, 0])]},
            "variants[0].inputs[0].shape",
        ),
        (
            {"inputs": [pb.TensorSpec(name="input", datatype="FP32", shape=[-2])]},
            "variants[0].inputs[0].shape",
        ),
        ({"inputs": [pb.TensorSpec(name="", datatype="FP32", shape=[-1, 4])]}, "variants[0].inputs[0].name"),
        (
            {
                "inputs": [
                    pb.TensorSpec(name="a", datatype="FP32", shape=[-1, 4]),
                    pb.TensorSpec(name="a", datatype="FP32", shape=[-1, 4]),
                ]
            },
            "variants[0].inputs[1].name",
        ),
        ({"latency_ms": -1.0}, "variants[0].latency_ms"),
        ({"latency_ms": float("nan")}, "variants[0].latency_ms"),
        ({"accuracy": float("nan")}, "variants[0].accuracy"),
    ],
)
async def test_registration_with_bad_tensor_specs_is_invalid_argument(
    plain_ap: AccessPoint, variant: dict[str, object], field: str
) -> None:
    async with grpc.aio.insecure_channel(plain_ap.address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Register(_registration(**variant), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith(field + ":"), info.value.details()
        # Refused, so nothing of it reaches routing.
        listed = await stub.ListWorkers(pb.ListWorkersRequest(), timeout=5)
        assert list(listed.workers) == []


async def test_a_good_registration_is_accepted(plain_ap: AccessPoint) -> None:
    async with grpc.aio.insecure_channel(plain_ap.address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        reply = await stub.Register(_registration(), timeout=5)
        assert reply.lease_s > 0
        assert [w.worker.worker_id for w in (await stub.ListWorkers(pb.ListWorkersRequest())).workers] == [
            "w1"
        ]


# -- TLS and mutual TLS -------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from apdispatch.tools.certs import make_certs

    made = make_certs(tmp_path_factory.mktemp("certs"), workers=["edge-a", "edge-b"])
    paths = {k: str(v) for k, v in made.items()}
    # A second CA: its certificates look right and are signed by a stranger.
    for k, v in make_certs(tmp_path_factory.mktemp("other")).items():
        paths[f"other-{k}"] = str(v)
    return paths


def _tls(certs: dict[str, str], who: str | None, ca: str = "ca") -> TLSFiles:
    if who is None:
        return TLSFiles(ca=certs[ca])
    return TLSFiles(ca=certs[ca], cert=certs[who], key=certs[f"{who}-key"])


@contextlib.asynccontextmanager
async def running_ap(**config: Any) -> AsyncIterator[AccessPoint]:
    ap = AccessPoint(APConfig(listen="127.0.0.1:0", log_level="warning", **config), make_logger("warning"))
    await ap.start()
    try:
        yield ap
    finally:
        await ap.stop(grace_s=0.1)


async def _code(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_plaintext_client_against_a_tls_ap_is_refused(certs: dict[str, str]) -> None:
    async with running_ap(tls_cert=certs["ap"], tls_key=certs["ap-key"]) as ap:
        port = ap.address.rsplit(":", 1)[1]
        async with aio_channel(ap.address) as plain:
            stub = pb_grpc.RegistryStub(plain)
            assert await _code(stub.ListWorkers(pb.ListWorkersRequest(), timeout=5)) == UNAVAILABLE
        # A client that checks the AP against another CA does not trust it.
        async with aio_channel(f"localhost:{port}", _tls(certs, None, ca="other-ca")) as wrong:
            stub = pb_grpc.RegistryStub(wrong)
            assert await _code(stub.ListWorkers(pb.ListWorkersRequest(), timeout=5)) == UNAVAILABLE
        async with aio_channel(f"localhost:{port}", _tls(certs, None)) as good:
            stub = pb_grpc.RegistryStub(good)
            assert await _code(stub.ListWorkers(pb.ListWorkersRequest(), timeout=5)) == grpc.StatusCode.OK


async def test_mutual_tls_refuses_workers_without_a_good_certificate(certs: dict[str, str]) -> None:
    async with running_ap(tls_cert=certs["ap"], tls_key=certs["ap-key"], tls_ca=certs["ca"]) as ap:

        async def register(tls: TLSFiles) -> grpc.StatusCode:
            async with aio_channel(ap.address, tls) as channel:
                return await _code(pb_grpc.RegistryStub(channel).Register(_registration(), timeout=5))

        assert await register(_tls(certs, None)) == UNAVAILABLE  # no certificate at all
        assert await register(_tls(certs, "other-worker")) == UNAVAILABLE  # signed by another CA
        assert await register(_tls(certs, "client")) == grpc.StatusCode.PERMISSION_DENIED  # not a worker
        assert await register(_tls(certs, "operator")) == grpc.StatusCode.PERMISSION_DENIED
        assert ap.registry.workers() == []
        assert await register(_tls(certs, "worker")) == grpc.StatusCode.OK
        assert [w.worker_id for w in ap.registry.workers()] == ["w1"]

        async def list_workers(tls: TLSFiles) -> grpc.StatusCode:
            async with aio_channel(ap.address, tls) as channel:
                stub = pb_grpc.RegistryStub(channel)
                return await _code(stub.ListWorkers(pb.ListWorkersRequest(), timeout=5))

        assert await list_workers(_tls(certs, "worker")) == grpc.StatusCode.PERMISSION_DENIED
        assert await list_workers(_tls(certs, "client")) == grpc.StatusCode.PERMISSION_DENIED
        assert await list_workers(_tls(certs, "operator")) == grpc.StatusCode.OK


async def test_mutual_tls_end_to_end_with_a_real_worker(certs: dict[str, str], models_dir: Path) -> None:
    """AP <-> worker both ways over mutual TLS; a client with a certificate is served."""
    from apdispatch import AsyncClient
    from apdispatch.common.manifest import load_manifest
    from workers.config import WorkerConfig
    from workers.server import Worker

    manifest = load_manifest(models_dir)
    variant = next(v for v in manifest.variants if v.runtime == "onnx")
    async with running_ap(tls_cert=certs["ap"], tls_key=certs["ap-key"], tls_ca=certs["ca"]) as ap:
        worker = Worker(
            WorkerConfig(
                kind="edge",
                listen="127.0.0.1:0",
                models=models_dir,
                variants=(variant.name,),
                ap=ap.address,
                worker_id="edge-tls",
                tls_cert=certs["worker"],
                tls_key=certs["worker-key"],
                tls_ca=certs["ca"],
            ),
            make_logger("warning"),
        )
        await worker.start()
        try:
            assert worker.registrar is not None
            await asyncio.wait_for(worker.registrar.registered.wait(), 30)
            # The worker's OIP port refuses a plaintext caller and a caller without a certificate.
            async with aio_channel(worker.address) as plain:
                stub = oip_grpc.GRPCInferenceServiceStub(plain)
                assert await _code(stub.ServerLive(oip_pb2.ServerLiveRequest(), timeout=5)) == UNAVAILABLE
            async with aio_channel(worker.address, _tls(certs, None)) as no_cert:
                stub = oip_grpc.GRPCInferenceServiceStub(no_cert)
                assert await _code(stub.ServerLive(oip_pb2.ServerLiveRequest(), timeout=5)) == UNAVAILABLE
            with np.load(models_dir / "samples" / f"{variant.task}.npz") as npz:
                x = npz["x"][:1]
            async with AsyncClient(
                ap.address, ca=certs["ca"], cert=certs["client"], key=certs["client-key"]
            ) as client:
                result = await client.infer(variant.task, x, deadline_ms=10_000.0, min_accuracy=0.0)
            assert result.outcome == "ok", result
            assert result.served_by is not None and result.served_by.worker == "edge-tls"
        finally:
            await worker.stop(0.5)


# -- tokens, per-app rate limits, worker identity -----------------------------

TOKENS = """
[[token]]
token = "camera-token-1"
app = "camera"

[[token]]
token = "burst-token-1"
app = "bursty"
rate = 0.001
burst = 2

[[token]]
token = "operator-token"
role = "operator"
name = "ops"

[[token]]
token = "worker-a-token"
role = "worker"
name = "host-a"

[[token]]
token = "worker-b-token"
role = "worker"
name = "host-b"
"""


@pytest.fixture
async def token_ap(tmp_path: Path) -> AsyncIterator[AccessPoint]:
    path = tmp_path / "tokens.toml"
    path.write_text(TOKENS)
    async with running_ap(tokens_file=str(path), lease_s=30.0) as ap:
        yield ap


def _infer(app: str = "", request_id: str = "r") -> pb.InferRequest:
    # An unknown task: a request that passes the gate is answered NOT_FOUND.
    return pb.InferRequest(
        request_id=request_id,
        task="no-such-task",
        app=app,
        sla=pb.SLA(deadline_ms=1000.0, min_accuracy=0.0),
        inputs=[pb.Tensor(name="input", datatype="FP32", shape=[1, 4], data=bytes(16))],
    )


async def test_dispatcher_needs_a_valid_token_of_the_right_app(token_ap: AccessPoint) -> None:
    async def infer(token: str | None, request: pb.InferRequest) -> grpc.StatusCode:
        async with aio_channel(token_ap.address, token=token) as channel:
            return await _code(pb_grpc.DispatcherStub(channel).Infer(request, timeout=5))

    assert await infer(None, _infer()) == grpc.StatusCode.UNAUTHENTICATED
    assert await infer("not-a-token-at-all", _infer()) == grpc.StatusCode.UNAUTHENTICATED
    assert await infer("camera-token-1", _infer(app="someone-else")) == grpc.StatusCode.PERMISSION_DENIED
    assert await infer("worker-a-token", _infer()) == grpc.StatusCode.PERMISSION_DENIED
    # Past the gate: the request's own fate (no worker serves that task).
    assert await infer("camera-token-1", _infer(app="camera")) == grpc.StatusCode.NOT_FOUND
    assert await infer("camera-token-1", _infer()) == grpc.StatusCode.NOT_FOUND
    # A stream without a token ends at once, before any message. (Nothing is
    # written: a client write racing the AP's early end makes grpc.aio report
    # its own failed send, INTERNAL, in place of the AP's status.)
    async with aio_channel(token_ap.address) as channel:
        call = pb_grpc.DispatcherStub(channel).InferStream(timeout=5)
        assert await call.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_app_over_its_rate_limit_is_rejected_and_counted(token_ap: AccessPoint) -> None:
    async with aio_channel(token_ap.address, token="burst-token-1") as channel:
        stub = pb_grpc.DispatcherStub(channel)
        codes = [await _code(stub.Infer(_infer(request_id=f"u{i}"), timeout=5)) for i in range(4)]
        assert codes == [grpc.StatusCode.NOT_FOUND] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        assert token_ap.stats.by_app["bursty"]["rejected"] == 2
        # On a stream: one reply per request, refusals included, and the stream goes on.
        requests = [_infer(request_id=f"s{i}") for i in range(3)] + [_infer(app="other", request_id="x")]
        replies = [r async for r in stub.InferStream(iter(requests), timeout=10)]
    by_id = {r.request_id: r for r in replies}
    assert sorted(by_id) == ["s0", "s1", "s2", "x"]
    for i in range(3):
        assert by_id[f"s{i}"].outcome == pb.REJECTED
        assert by_id[f"s{i}"].status_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert by_id["x"].status_code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert token_ap.stats.by_app["bursty"]["rejected"] == 5


async def test_the_sdk_sends_its_token(token_ap: AccessPoint) -> None:
    from apdispatch import AsyncClient

    async with AsyncClient(token_ap.address, token="camera-token-1") as client:
        with pytest.raises(NotFoundError):
            await client.infer("no-such-task", np.zeros((1, 4), np.float32), deadline_ms=1000.0)
    async with AsyncClient(token_ap.address) as client:
        with pytest.raises(UnauthenticatedError):
            await client.infer("no-such-task", np.zeros((1, 4), np.float32), deadline_ms=1000.0)

    def blocking(token: str | None) -> None:
        from apdispatch import Client

        with Client(token_ap.address, token=token) as client:
            client.infer("no-such-task", np.zeros((1, 4), np.float32), deadline_ms=1000.0)

    with pytest.raises(NotFoundError):
        await asyncio.to_thread(blocking, "camera-token-1")
    with pytest.raises(UnauthenticatedError):
        await asyncio.to_thread(blocking, "wrong-token-here")


async def test_list_workers_needs_an_operator(token_ap: AccessPoint) -> None:
    async def list_workers(token: str | None) -> grpc.StatusCode:
        async with aio_channel(token_ap.address, token=token) as channel:
            return await _code(pb_grpc.RegistryStub(channel).ListWorkers(pb.ListWorkersRequest(), timeout=5))

    assert await list_workers(None) == grpc.StatusCode.UNAUTHENTICATED
    assert await list_workers("camera-token-1") == grpc.StatusCode.PERMISSION_DENIED
    assert await list_workers("worker-a-token") == grpc.StatusCode.PERMISSION_DENIED
    assert await list_workers("operator-token") == grpc.StatusCode.OK


async def test_an_impostor_cannot_take_over_another_workers_id(token_ap: AccessPoint) -> None:
    async with (
        aio_channel(token_ap.address, token="worker-a-token") as a,
        aio_channel(token_ap.address, token="worker-b-token") as b,
        aio_channel(token_ap.address) as stranger,
    ):
        owner, impostor, nobody = (pb_grpc.RegistryStub(c) for c in (a, b, stranger))
        assert await _code(nobody.Register(_registration("edge-a"), timeout=5)) == UNAUTHENTICATED
        assert await _code(owner.Register(_registration("edge-a", "127.0.0.1:7001"), timeout=5)) == OK
        hijack = _registration("edge-a", "127.0.0.1:6666")
        assert await _code(impostor.Register(hijack, timeout=5)) == PERMISSION_DENIED
        beat = pb.HeartbeatRequest(worker_id="edge-a")
        assert await _code(impostor.Heartbeat(beat, timeout=5)) == PERMISSION_DENIED
        bye = pb.DeregisterRequest(worker_id="edge-a")
        assert await _code(impostor.Deregister(bye, timeout=5)) == PERMISSION_DENIED
        assert await _code(nobody.Deregister(bye, timeout=5)) == UNAUTHENTICATED
        worker = token_ap.registry.get("edge-a")
        assert worker is not None and worker.address == "127.0.0.1:7001"
        assert (await owner.Heartbeat(beat, timeout=5)).known
        # Once its owner lets go, the id is free for another identity.
        await owner.Deregister(bye, timeout=5)
        assert await _code(impostor.Register(hijack, timeout=5)) == OK
        assert await _code(owner.Heartbeat(beat, timeout=5)) == PERMISSION_DENIED


def test_a_lapsed_lease_frees_the_id() -> None:
    now = [100.0]
    registry = Registry(lease_s=5.0, clock=lambda: now[0])
    registry.register(_registration("edge-a"), owner="token:host-a")
    with pytest.raises(PermissionDeniedError):
        registry.register(_registration("edge-a"), owner="token:host-b")
    now[0] += 5.0  # the lease ran out; expire() has not run yet
    assert registry.register(_registration("edge-a"), owner="token:host-b").owner == "token:host-b"
    with pytest.raises(PermissionDeniedError):
        registry.heartbeat("edge-a", owner="token:host-a")


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=10.0, burst=2.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] += 0.1  # one token's worth
    assert [bucket.take() for _ in range(2)] == [True, False]
    now[0] += 10.0  # never more than the burst
    assert [bucket.take() for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[[token]]\ntoken = "short"\napp = "a"\n', "token"),
        ('[[token]]\ntoken = "long-enough"\nrole = "root"\nname = "x"\n', "role"),
        ('[[token]]\ntoken = "long-enough"\napp = "a"\nrate = -1\n', "rate"),
        ('[[token]]\ntoken = "long-enough"\nrole = "worker"\n', "name"),
        ('[[token]]\ntoken = "long-enough"\napp = "a"\ncolour = 1\n', "unknown keys"),
    ],
)
def test_a_bad_tokens_file_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key):
        load_config(tokens_file=str(path))


async def test_a_worker_certificate_of_its_own_owns_its_ids(certs: dict[str, str]) -> None:
    # `apdispatch certs --workers edge-a,edge-b`: two identities, where the shared
    # worker.pem would make every worker the same one.
    async with running_ap(tls_cert=certs["ap"], tls_key=certs["ap-key"], tls_ca=certs["ca"]) as ap:
        async with (
            aio_channel(ap.address, _tls(certs, "worker-edge-a")) as a,
            aio_channel(ap.address, _tls(certs, "worker-edge-b")) as b,
        ):
            owner, impostor = pb_grpc.RegistryStub(a), pb_grpc.RegistryStub(b)
            assert await _code(owner.Register(_registration("edge-a", "127.0.0.1:7001"), timeout=5)) == OK
            hijack = _registration("edge-a", "127.0.0.1:6666")
            assert await _code(impostor.Register(hijack, timeout=5)) == PERMISSION_DENIED
            beat = pb.HeartbeatRequest(worker_id="edge-a")
            assert await _code(impostor.Heartbeat(beat, timeout=5)) == PERMISSION_DENIED
            assert await _code(owner.Heartbeat(beat, timeout=5)) == OK
        worker = ap.registry.get("edge-a")
        assert worker is not None and worker.address == "127.0.0.1:7001"

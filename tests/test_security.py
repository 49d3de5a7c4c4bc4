"""The AP's doors: registration checks, TLS, mutual TLS, tokens, rate limits, worker identity.

Every refusal is shown against real gRPC servers on loopback: an in-process AP
(and, where a worker is needed, an in-process edge worker) and raw stubs or
the SDK as clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from apdispatch.ap.config import APConfig
from apdispatch.ap.server import AccessPoint
from apdispatch.common.logs import make_logger
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc


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

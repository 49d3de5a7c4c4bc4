"""The AP's Open Inference Protocol front, driven by the real tritonclient and by raw OIP stubs.

tritonclient registers its own ``inference`` proto package, which clashes with
ours: it runs in a subprocess, once as the pinned 2.41.0 (in this venv) and
once as the newest, 2.73.0, installed without its dependencies into a venv of
its own under build/ that is made when missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apdispatch.ap.config import APConfig
from apdispatch.ap.oip_codec import to_infer_request
from apdispatch.ap.server import AccessPoint
from apdispatch.common.confidence import top_probability
from apdispatch.common.errors import InvalidRequestError
from apdispatch.common.logs import make_logger
from apdispatch.common.manifest import load_manifest
from apdispatch.common.outcomes import Outcome
from apdispatch.common.protocol import oip_pb2 as oip
from apdispatch.common.protocol import oip_pb2_grpc as oip_grpc
from apdispatch.common.tensors import TensorSpec
from apdispatch.tools.processes import free_port
from workers.config import WorkerConfig
from workers.runtime import ServiceTime
from workers.server import Worker

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 60.0  # only to turn a hang into a failure
SERVICE_MS = 300.0  # what the worker takes per request: long enough to tell budgets apart
NEWEST = "2.73.0"
NEWEST_VENV = REPO / "build" / "venvs" / f"tritonclient-{NEWEST}"
# tritonclient 2.73 declares protobuf<7 (it runs on 7) and ml-dtypes<=0.5.4.
NEWEST_DEPS = ("numpy", "grpcio", "protobuf", "python-rapidjson", "packaging", "urllib3", "ml-dtypes==0.5.4")
Tensor = oip.ModelInferRequest.InferInputTensor


@asynccontextmanager
async def ap_and_worker(models_dir: Path) -> AsyncIterator[tuple[AccessPoint, np.ndarray]]:
    """An AP and one one-slot edge worker holding ``digits-small`` for SERVICE_MS per request."""
    small = load_manifest(models_dir).variant("digits-small")
    ap = AccessPoint(
        APConfig(listen=f"127.0.0.1:{free_port()}", policy="fastest").validate(),
        make_logger("warning"),
    )
    address = await ap.start()
    worker = Worker(
        WorkerConfig(
            kind="edge",
            listen="127.0.0.1:0",
            models=models_dir,
            variants=(small.name,),
            ap=address,
            heartbeat_s=0.2,
            service_ms={small.name: ServiceTime(SERVICE_MS, SERVICE_MS)},
        ),
        make_logger("warning"),
    )
    await worker.start()
    try:
        async with asyncio.timeout(WAIT_S):
            while not ap.registry.targets("digits"):
                await asyncio.sleep(0.02)
        with np.load(models_dir / "samples" / "digits.npz") as npz:
            x = npz["x"][:1].astype(np.float32)
        yield ap, x
    finally:
        await worker.close()
        await ap.stop(grace_s=0.5)


# --- the real tritonclient -----------------------------------------------------------------------

TRITON_SCRIPT = textwrap.dedent(
    """
    import importlib.metadata, json, queue, sys
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    url, samples = sys.argv[1:3]
    client = tc.InferenceServerClient(url)
    out = {"version": importlib.metadata.version("tritonclient")}
    out["live"] = client.is_server_live()
    out["ready"] = client.is_server_ready()
    out["model_ready"] = client.is_model_ready("digits")
    out["unknown_ready"] = client.is_model_ready("no-such-model")
    meta = client.get_server_metadata()
    out["server"] = [meta.name, list(meta.extensions)]
    model = client.get_model_metadata("digits")
    spec = model.inputs[0]
    out["model"] = [model.name, list(model.versions), [o.name for o in model.outputs]]
    out["input"] = [spec.name, spec.datatype, list(spec.shape)]
    with np.load(samples) as npz:
        x = npz["x"][:1].astype(np.float32).reshape(1, *[int(d) for d in spec.shape[1:]])

    def tensor():
        t = tc.InferInput(spec.name, list(x.shape), "FP32")
        t.set_data_from_numpy(x)
        return t

    def params(result):
        raw = result.get_response().parameters
        return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in raw.items()}

    def status(**kwargs):
        try:
            client.infer(kwargs.pop("model", "digits"), [tensor()], **kwargs)
        except InferenceServerException as err:
            return [str(err.status()), err.message()]
        return ["no error", ""]

    # tritonclient 2.41 sends no float parameter: a number may come as a string.
    min_accuracy = "0.5" if out["version"] == "2.41.0" else 0.5
    sla = {"deadline_ms": 20000, "min_accuracy": min_accuracy, "app": "triton"}
    result = client.infer("digits", [tensor()], request_id="t-1", parameters=sla)
    out["logits"] = result.as_numpy("logits").tolist()
    out["id"] = result.get_response().id
    out["params"] = params(result)
    # No deadline_ms: the gRPC deadline is the budget.
    out["client_timeout"] = params(client.infer("digits", [tensor()], client_timeout=10))["outcome"]
    out["short_client_timeout"] = status(client_timeout=0.15)
    out["no_deadline"] = status()
    out["rejected"] = status(parameters={"deadline_ms": 1})
    out["unknown"] = status(model="no-such-model", parameters={"deadline_ms": 1000})

    replies = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for i, deadline_ms in enumerate([20000, 1, 20000]):
            client.async_stream_infer("digits", [tensor()], request_id=f"s-{i}",
                                      parameters={"deadline_ms": deadline_ms})
        stream = {}
        for _ in range(3):
            result, error = replies.get(timeout=60)
            if error is not None:
                stream["error"] = error.message()
            else:
                stream[result.get_response().id] = params(result)["outcome"]
    finally:
        client.stop_stream()  # its thread would keep this process alive
    out["stream"] = stream
    print(json.dumps(out))
    """
)


def _newest_python() -> Path:
    """The python of a venv with tritonclient NEWEST and our pins of its dependencies, made when missing."""
    python = NEWEST_VENV / "bin" / "python"
    done = NEWEST_VENV / ".installed"
    if done.is_file():
        return python
    constraints = str(REPO / "constraints.txt")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(NEWEST_VENV)],
        [str(python), "-m", "pip", "install", "-q", "-c", constraints, *NEWEST_DEPS],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", f"tritonclient[grpc]=={NEWEST}"],
    ]
    for step in steps:
        run = subprocess.run(step, capture_output=True, text=True, timeout=240)
        if run.returncode != 0:
            pytest.skip(f"tritonclient {NEWEST} cannot be installed here: {run.stderr.strip()[-400:]}")
    done.write_text(f"tritonclient {NEWEST}\n")
    return python


@pytest.mark.parametrize("version", ["2.41.0", pytest.param(NEWEST, marks=pytest.mark.venv)])
async def test_tritonclient_against_the_ap(models_dir: Path, version: str) -> None:
    python = Path(sys.executable) if version == "2.41.0" else await asyncio.to_thread(_newest_python)
    async with ap_and_worker(models_dir) as (ap, _):
        env = {**os.environ, "PYTHONPATH": "", "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(
            str(python), "-c", TRITON_SCRIPT, ap.address, str(models_dir / "samples" / "digits.npz"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd="/",
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), WAIT_S * 2)
        assert proc.returncode == 0, stderr.decode()
        out = json.loads(stdout.decode().strip().splitlines()[-1])
        served, rejected = ap.stats.totals[Outcome.OK], ap.stats.totals[Outcome.REJECTED]

    assert out["version"] == version
    assert out["live"] and out["ready"] and out["model_ready"] and not out["unknown_ready"]
    assert out["server"] == ["apdispatch-ap", ["parameters", "model_stream_infer"]]
    assert out["model"] == ["digits", ["1"], ["logits"]]
    assert out["input"][:2] == ["input", "FP32"] and out["input"][2][0] == -1

    assert out["id"] == "t-1"
    assert np.argmax(out["logits"]) in range(10) and np.array(out["logits"]).shape == (1, 10)
    params = out["params"]
    assert params["outcome"] == "ok" and params["variant"] == "digits-small"
    assert params["cluster"] == "default" and params["worker"]
    assert params["accuracy"] >= 0.5
    assert params["compute_ms"] >= SERVICE_MS * 0.9  # the emulated service time is compute
    assert params["total_ms"] >= params["compute_ms"] + params["queue_ms"]
    assert params["network_ms"] >= 0
    assert params["confidence"] == pytest.approx(float(top_probability(np.array(out["logits"]))[0]), rel=1e-5)

    assert out["client_timeout"] == "ok"
    # A gRPC deadline of 150 ms cannot fit a 300 ms request: rejected at once, not sent.
    assert out["short_client_timeout"][0] == "StatusCode.RESOURCE_EXHAUSTED"
    assert out["short_client_timeout"][1].startswith("parameters.deadline_ms: ")  # as OIP names it
    assert out["no_deadline"][0] == "StatusCode.INVALID_ARGUMENT"
    assert "parameters.deadline_ms" in out["no_deadline"][1]
    assert out["rejected"][0] == "StatusCode.RESOURCE_EXHAUSTED"
    assert out["unknown"][0] == "StatusCode.NOT_FOUND"
    assert out["unknown"][1].startswith("model_name: ") and "no-such-model" in out["unknown"][1]

    # One reply per request on the stream: the rejection in error_message, and the stream went on.
    assert out["stream"]["s-0"] == "ok" and out["stream"]["s-2"] == "ok"
    assert "s-1" not in out["stream"] and out["stream"]["error"].startswith("parameters.deadline_ms: ")
    # Counted once each, by the data plane: served with parameters, with client_timeout and twice on
    # the stream; rejected for the short client timeout, the 1 ms budget and once on the stream.
    assert served == 4 and rejected == 3


# --- raw OIP stubs: what tritonclient does not show ----------------------------------------------


def _request(x: np.ndarray, **params: oip.InferParameter) -> oip.ModelInferRequest:
    return oip.ModelInferRequest(
        model_name="digits",
        id="r-1",
        parameters=params,
        inputs=[Tensor(name="input", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()],
    )


def _ms(value: float) -> oip.InferParameter:
    return oip.InferParameter(double_param=value)


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_typed_contents_and_requested_outputs(models_dir: Path) -> None:
    async with ap_and_worker(models_dir) as (ap, x), grpc.aio.insecure_channel(ap.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        raw = await stub.ModelInfer(_request(x, deadline_ms=_ms(20_000)), timeout=WAIT_S)
        typed = _request(x, deadline_ms=_ms(20_000))
        del typed.raw_input_contents[:]
        typed.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
        typed.outputs.add(name="logits")
        reply = await stub.ModelInfer(typed, timeout=WAIT_S)
        assert reply.raw_output_contents == raw.raw_output_contents
        assert [o.name for o in reply.outputs] == ["logits"] and list(reply.outputs[0].shape) == [1, 10]
        assert reply.model_name == "digits" and reply.model_version == "1" and reply.id == "r-1"

        wrong = _request(x, deadline_ms=_ms(20_000))
        wrong.outputs.add(name="probabilities")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(wrong, timeout=WAIT_S)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outputs[0].name" in (info.value.details() or "")
        text = _request(x, deadline_ms=oip.InferParameter(string_param="soon"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(text, timeout=WAIT_S)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parameters.deadline_ms: must be a number" in (info.value.details() or "")
        # Not a ModelInferRequest at all: INVALID_ARGUMENT, not UNKNOWN.
        garbage = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        assert await _code(garbage(b"\xff\xff\xff", timeout=WAIT_S)) == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_names_the_oip_front_and_drain_ends_its_streams(models_dir: Path) -> None:
    async with ap_and_worker(models_dir) as (ap, x), grpc.aio.insecure_channel(ap.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        assert (await health.Check(check, timeout=WAIT_S)).status == health_pb2.HealthCheckResponse.SERVING
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        requests: asyncio.Queue[oip.ModelInferRequest | None] = asyncio.Queue()

        async def feed() -> AsyncIterator[oip.ModelInferRequest]:
            while (request := await requests.get()) is not None:
                yield request

        call = stub.ModelStreamInfer(feed(), timeout=WAIT_S)
        requests.put_nowait(_request(x, deadline_ms=_ms(20_000)))
        async with asyncio.timeout(WAIT_S):
            while ap.registry.workers()[0].in_flight == 0:
                await asyncio.sleep(0.01)
        drain = asyncio.ensure_future(ap.drain(grace_s=5.0))
        replies = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for reply in call:
                replies.append(reply)
        await drain
    # What the stream took is answered; then it ends, UNAVAILABLE, as the native stream does.
    assert [r.infer_response.parameters["outcome"].string_param for r in replies] == ["ok"]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


TOKENS = """
[[token]]
token = "camera-token-1"
app = "camera"

[[token]]
token = "worker-a-token"
role = "worker"
name = "host-a"
"""


async def test_the_oip_front_needs_an_app_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(TOKENS)
    config = APConfig(listen=f"127.0.0.1:{free_port()}", tokens_file=str(path)).validate()
    ap = AccessPoint(config, make_logger("warning"))
    await ap.start()
    # An unknown model: a request past the gate is answered NOT_FOUND.
    request = oip.ModelInferRequest(model_name="no-such-task", parameters={"deadline_ms": _ms(1000)})
    try:
        async with grpc.aio.insecure_channel(ap.address) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)

            def auth(token: str) -> tuple[tuple[str, str], ...]:
                return (("authorization", f"Bearer {token}"),)

            assert await _code(stub.ServerLive(oip.ServerLiveRequest())) == grpc.StatusCode.UNAUTHENTICATED
            assert await _code(stub.ModelInfer(request)) == grpc.StatusCode.UNAUTHENTICATED
            worker_token = stub.ModelInfer(request, metadata=auth("worker-a-token"))
            assert await _code(worker_token) == grpc.StatusCode.PERMISSION_DENIED
            other_app = oip.ModelInferRequest()
            other_app.CopyFrom(request)
            other_app.parameters["app"].string_param = "someone-else"
            camera = auth("camera-token-1")
            assert (
                await _code(stub.ModelInfer(other_app, metadata=camera)) == grpc.StatusCode.PERMISSION_DENIED
            )
            assert await _code(stub.ModelInfer(request, metadata=camera)) == grpc.StatusCode.NOT_FOUND
            live = await stub.ServerLive(oip.ServerLiveRequest(), metadata=camera)
            assert live.live
            ready = await stub.ServerReady(oip.ServerReadyRequest(), metadata=camera)
            assert not ready.ready  # no worker registered
            call = stub.ModelStreamInfer(iter([request]), timeout=WAIT_S)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            replies = [r async for r in stub.ModelStreamInfer(iter([request, other_app]), metadata=camera)]
    finally:
        await ap.stop(grace_s=0.5)
    assert sorted(r.infer_response.parameters["status"].string_param for r in replies) == [
        "NOT_FOUND",
        "PERMISSION_DENIED",
    ]


# --- the codec alone -------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_budget_is_the_earlier_of_deadline_ms_and_the_grpc_deadline() -> None:
    specs = (TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1, 1)))
    request = oip.ModelInferRequest(
        model_name="t",
        inputs=[
            Tensor(name="b", datatype="INT64", shape=[1, 1]),
            Tensor(name="a", datatype="FP32", shape=[1, 2]),
        ],
        raw_input_contents=[np.array([7], np.int64).tobytes(), np.array([1, 2], np.float32).tobytes()],
        parameters={
            "deadline_ms": oip.InferParameter(int64_param=500),
            "app": oip.InferParameter(string_param="x"),
        },
    )
    converted = to_infer_request(request, specs, None, 10.0, 0.0, 3_600_000.0)
    assert converted.sla.deadline_ms == 500 and converted.app == "x"
    assert [t.name for t in converted.inputs] == ["a", "b"]  # put in the task's order
    # A gRPC deadline 0.2 s away, 0.1 s after arrival: 300 ms from arrival.
    assert to_infer_request(request, specs, None, 0.2, 0.1, 3_600_000.0).sla.deadline_ms == pytest.approx(300)
    del request.parameters["deadline_ms"]
    assert to_infer_request(request, specs, None, 0.2, 0.1, 3_600_000.0).sla.deadline_ms == pytest.approx(300)
    # A far gRPC deadline is cut to the AP's longest, not refused.
    assert to_infer_request(request, specs, None, 1e6, 0.0, 60_000.0).sla.deadline_ms == 60_000
    with pytest.raises(InvalidRequestError, match=r"parameters\.deadline_ms"):
        to_infer_request(request, specs, None, None, 0.0, 3_600_000.0)

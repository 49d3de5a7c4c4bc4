"""The bench's peer proxy: nginx with the bench's config forwards the worker's OIP calls unchanged."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from apdispatch.common.protocol import oip_pb2, oip_pb2_grpc
from apdispatch.tools.bench import _oip_request, nginx_binary, nginx_proxy
from apdispatch.tools.processes import ChildError, Children, free_port

NGINX = nginx_binary()


def _wait_ready(address: str, children: Children, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                if stub.ServerReady(oip_pb2.ServerReadyRequest(), timeout=1.0).ready:
                    return
            except grpc.RpcError:
                pass
            worker = children.get("edge")
            if worker.exited() is not None or time.monotonic() > deadline:
                raise ChildError(worker.describe())
            time.sleep(0.2)


@pytest.mark.skipif(NGINX is None, reason="no nginx binary (apt-get install nginx)")
def test_nginx_forwards_unary_and_stream_calls(models_dir: Path, tmp_path: Path) -> None:
    assert NGINX is not None
    with np.load(models_dir / "samples" / "digits.npz") as npz:
        x = npz["x"][:1].astype(np.float32)
    worker = f"127.0.0.1:{free_port()}"
    children = Children(tmp_path)
    try:
        children.start(
            "edge",
            ["worker", "edge", "--listen", worker, "--models", str(models_dir), "--variants", "digits-tiny"],
        )
        _wait_ready(worker, children)
        request = _oip_request("digits-tiny", x)
        with grpc.insecure_channel(worker) as channel:
            direct = oip_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5.0)
        with nginx_proxy(NGINX, worker, tmp_path) as (kept, fresh):
            for address in (kept, fresh):
                with grpc.insecure_channel(address) as channel:
                    stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
                    for _ in range(3):
                        reply = stub.ModelInfer(request, timeout=5.0)
                        assert reply.raw_output_contents == direct.raw_output_contents
            with grpc.insecure_channel(kept) as channel:
                stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
                replies = list(stub.ModelStreamInfer(iter([request] * 5), timeout=10.0))
            assert len(replies) == 5
            assert all(not r.error_message for r in replies)
            assert all(r.infer_response.raw_output_contents == direct.raw_output_contents for r in replies)
        # nginx stopped with the context: its ports no longer answer.
        with grpc.insecure_channel(kept) as channel, pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=0.5)
    finally:
        children.close()

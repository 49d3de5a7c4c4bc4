"""The committed stubs match the protos, and the OIP proto keeps the wire contract."""

from __future__ import annotations

from pathlib import Path

from apdispatch.common.protocol import dispatcher_pb2, oip_pb2
from apdispatch.common.protocol.generate import ROOT, generate


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert len(written) == 6
    stale = [
        p.name
        for p in written
        if p.read_bytes() != (ROOT / "apdispatch" / "common" / "protocol" / p.name).read_bytes()
    ]
    assert not stale, f"stale stubs, run `make generate`: {stale}"


def test_oip_method_paths_and_field_numbers() -> None:
    service = oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} >= {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    }
    request = oip_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in request.items()} == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    }
    response = oip_pb2.ModelInferResponse.DESCRIPTOR.fields_by_name
    assert response["raw_output_contents"].number == 6
    assert response["outputs"].number == 5
    param = oip_pb2.InferParameter.DESCRIPTOR.fields_by_name
    assert [param[n].number for n in ("bool_param", "int64_param", "string_param", "double_param")] == [
        1,
        2,
        3,
        4,
    ]
    contents = oip_pb2.InferTensorContents.DESCRIPTOR.fields_by_name
    assert contents["fp32_contents"].number == 6
    assert contents["bytes_contents"].number == 8


def test_dispatcher_service_shape() -> None:
    service = dispatcher_pb2.DESCRIPTOR.services_by_name["Dispatcher"]
    methods = {m.name: m for m in service.methods}
    assert not methods["Infer"].client_streaming and not methods["Infer"].server_streaming
    assert methods["InferStream"].client_streaming and methods["InferStream"].server_streaming
    assert Path(dispatcher_pb2.__file__).parent == ROOT / "apdispatch" / "common" / "protocol"

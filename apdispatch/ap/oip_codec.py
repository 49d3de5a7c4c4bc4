"""Open Inference Protocol messages to and from the AP's own (``apdispatch.v1``).

The OIP front (:mod:`apdispatch.ap.oip_front`) serves one model per task: a
``ModelInferRequest`` for model ``digits`` becomes an ``InferRequest`` for task
``digits``. The SLA travels as request parameters ``deadline_ms`` and
``min_accuracy`` (numbers, or numbers written as strings); without ``deadline_ms``, the gRPC deadline is the
budget. Optional string parameters ``app`` and ``variant`` map to the fields of
the same names. Inputs come as ``raw_input_contents`` (what tritonclient sends)
or as typed ``contents``; replies carry every output in
``raw_output_contents`` and what the AP did as response parameters.

Conversion failures are :class:`InvalidRequestError` naming the field, as
validation's are; :func:`oip_message` names the AP's fields as OIP requests have them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from apdispatch.common.errors import ApdispatchError, InvalidRequestError, NotFoundError
from apdispatch.common.outcomes import FROM_PROTO, Outcome
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import oip_pb2 as oip
from apdispatch.common.tensors import DATATYPE_TO_DTYPE, OIP_CONTENTS_FIELD, TensorSpec

# The one version of every model the AP serves (a task, over whichever variants serve it).
MODEL_VERSION = "1"


_NUMBER_KINDS = ("int64_param", "uint64_param", "double_param")


def _number(parameters: Mapping[str, oip.InferParameter], key: str) -> float | None:
    """A numeric request parameter; None when absent."""
    if key not in parameters:
        return None
    param = parameters[key]
    kind = param.WhichOneof("parameter_choice")
    if kind == "string_param":
        # tritonclient 2.41 cannot send a float parameter: "0.9" stands for one.
        try:
            return float(param.string_param)
        except ValueError:
            raise InvalidRequestError(
                f"parameters.{key}", f"must be a number, got {param.string_param[:32]!r}"
            ) from None
    if kind not in _NUMBER_KINDS:
        raise InvalidRequestError(f"parameters.{key}", f"must be a number, got {kind or 'nothing'}")
    return float(getattr(param, kind))


def _string(parameters: Mapping[str, oip.InferParameter], key: str) -> str:
    if key not in parameters:
        return ""
    param = parameters[key]
    kind = param.WhichOneof("parameter_choice")
    if kind != "string_param":
        raise InvalidRequestError(f"parameters.{key}", f"must be a string, got {kind or 'nothing'}")
    return param.string_param


def deadline_ms(
    parameters: Mapping[str, oip.InferParameter],
    time_remaining_s: float | None,
    elapsed_s: float,
    max_deadline_ms: float,
) -> float:
    """The request's budget from arrival: ``deadline_ms``, or the gRPC deadline, whichever comes first.

    ``elapsed_s`` is the time since arrival, ``time_remaining_s`` what the gRPC
    deadline leaves now (None: no deadline). A reply after the client has given
    up reaches nobody, so admission must count it out.
    """
    given = _number(parameters, "deadline_ms")
    client_ms = None
    if time_remaining_s is not None and time_remaining_s > 0:
        client_ms = min((elapsed_s + time_remaining_s) * 1000.0, max_deadline_ms)
    if given is None:
        if client_ms is None:
            raise InvalidRequestError(
                "parameters.deadline_ms", "must be set (milliseconds), or the call given a gRPC deadline"
            )
        return client_ms
    if client_ms is not None and 0 < given <= max_deadline_ms and client_ms < given:
        return client_ms
    return given  # validation names a bad one


def _input_data(tensor: oip.ModelInferRequest.InferInputTensor, index: int, raw: Sequence[bytes]) -> bytes:
    if raw:
        if tensor.HasField("contents"):
            raise InvalidRequestError(f"inputs[{index}].contents", "not allowed beside raw_input_contents")
        return raw[index]
    field = OIP_CONTENTS_FIELD.get(tensor.datatype)
    dtype = DATATYPE_TO_DTYPE.get(tensor.datatype)
    if field is None or dtype is None:
        raise InvalidRequestError(
            f"inputs[{index}].datatype",
            f"{tensor.datatype[:32] or 'nothing'} cannot travel in typed contents: "
            "send it in raw_input_contents",
        )
    try:
        return np.asarray(getattr(tensor.contents, field), dtype=dtype).tobytes()
    except (OverflowError, ValueError) as exc:
        raise InvalidRequestError(f"inputs[{index}].contents.{field}", str(exc)) from None


def to_infer_request(
    request: oip.ModelInferRequest,
    specs: Sequence[TensorSpec] | None,
    outputs: Sequence[str] | None,
    time_remaining_s: float | None,
    elapsed_s: float,
    max_deadline_ms: float,
) -> pb.InferRequest:
    """The AP's request for an OIP one.

    ``specs`` are the task's inputs (None: unknown task, which validation
    reports): inputs sent by name in another order are put in theirs.
    ``outputs``, the task's output names, checks the requested outputs.
    """
    if request.model_version not in ("", MODEL_VERSION):
        raise NotFoundError(
            f"model_version: model {request.model_name[:64]!r} has version {MODEL_VERSION} only, "
            f"not {request.model_version[:32]!r}",
            request_id=request.id[:128],
        )
    params = request.parameters
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequestError(
            "raw_input_contents", f"has {len(raw)} entries, expected one per input ({len(request.inputs)})"
        )
    if outputs is not None:
        for i, wanted in enumerate(request.outputs):
            if wanted.name not in outputs:
                raise InvalidRequestError(
                    f"outputs[{i}].name",
                    f"model {request.model_name!r} has no output {wanted.name[:64]!r} "
                    f"(outputs: {', '.join(outputs)})",
                )
    sla = pb.SLA(
        deadline_ms=deadline_ms(params, time_remaining_s, elapsed_s, max_deadline_ms),
        min_accuracy=_number(params, "min_accuracy") or 0.0,
    )
    tensors = [
        pb.Tensor(name=t.name, datatype=t.datatype, shape=t.shape, data=_input_data(t, i, raw))
        for i, t in enumerate(request.inputs)
    ]
    if specs is not None and len(specs) > 1:
        order = {spec.name: i for i, spec in enumerate(specs)}
        if {t.name for t in tensors} == order.keys():
            tensors.sort(key=lambda t: order[t.name])
    return pb.InferRequest(
        task=request.model_name,
        inputs=tensors,
        sla=sla,
        request_id=request.id,
        app=_string(params, "app"),
        variant=_string(params, "variant"),
    )


def _param(value: str | float | bool) -> oip.InferParameter:
    if isinstance(value, str):
        return oip.InferParameter(string_param=value)
    if isinstance(value, bool):
        return oip.InferParameter(bool_param=value)
    return oip.InferParameter(double_param=value)


def to_model_infer_response(
    reply: pb.InferResponse, request: oip.ModelInferRequest
) -> oip.ModelInferResponse:
    """The OIP reply for a served request: outputs raw, what the AP did as parameters."""
    wanted = {t.name for t in request.outputs}
    outputs = [t for t in reply.outputs if not wanted or t.name in wanted]
    served, timings = reply.served_by, reply.timings
    params: dict[str, str | float | bool] = {
        "outcome": str(FROM_PROTO.get(reply.outcome, Outcome.FAILED)),
        "variant": served.variant,
        "worker": served.worker,
        "cluster": served.cluster,
        "accuracy": served.accuracy,
        "queue_ms": timings.queue_ms,
        "compute_ms": timings.compute_ms,
        "network_ms": timings.network_ms,
        "total_ms": timings.total_ms,
    }
    if reply.HasField("confidence"):
        params["confidence"] = reply.confidence
    if reply.escalated:
        params["escalated"] = True
    return oip.ModelInferResponse(
        model_name=request.model_name,
        model_version=MODEL_VERSION,
        id=reply.request_id,
        parameters={key: _param(value) for key, value in params.items()},
        outputs=[
            oip.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in outputs
        ],
        raw_output_contents=[t.data for t in outputs],
    )


# The AP's request fields as an OIP request names them, for the messages of errors.
_OIP_FIELDS = {
    "sla.deadline_ms": "parameters.deadline_ms",
    "sla.min_accuracy": "parameters.min_accuracy",
    "sla": "parameters",
    "task": "model_name",
    "variant": "parameters.variant",
    "app": "parameters.app",
    "request_id": "id",
}


def oip_message(message: str) -> str:
    """An error message (``field: problem``) naming the field as the OIP request has it."""
    field, sep, problem = message.partition(": ")
    renamed = _OIP_FIELDS.get(field)
    return f"{renamed}: {problem}" if sep and renamed else message


def to_stream_error(exc: ApdispatchError, request: oip.ModelInferRequest) -> oip.ModelStreamInferResponse:
    """A stream's reply for a request that ended in an error status: the stream goes on.

    ``error_message`` is what the unary call's status would say; the response
    names the model and id, with the status name and the outcome as parameters.
    """
    code = exc.code
    outcome = Outcome.REJECTED if code.name == "RESOURCE_EXHAUSTED" else Outcome.FAILED
    return oip.ModelStreamInferResponse(
        error_message=oip_message(exc.message),
        infer_response=oip.ModelInferResponse(
            model_name=request.model_name[:128],
            id=exc.request_id or request.id[:128],
            parameters={
                "status": oip.InferParameter(string_param=code.name),
                "outcome": oip.InferParameter(string_param=str(outcome)),
            },
        ),
    )


def model_metadata(
    task: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> oip.ModelMetadataResponse:
    def meta(specs: Sequence[TensorSpec]) -> list[oip.ModelMetadataResponse.TensorMetadata]:
        return [
            oip.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape))
            for s in specs
        ]

    return oip.ModelMetadataResponse(
        name=task,
        versions=[MODEL_VERSION],
        platform="apdispatch",
        inputs=meta(inputs),
        outputs=meta(outputs),
    )

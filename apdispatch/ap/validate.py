"""Checks on an incoming request; every failure names the field it is about."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from apdispatch.common.errors import InvalidRequestError, NotFoundError
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.tensors import DATATYPE_TO_DTYPE, FLOAT_DATATYPES, TensorSpec, all_finite
from apdispatch.routing.registry import Registry, Target

# App names key per-app tables (stats, the learned policy's demand): short
# identifiers, so that a name cannot carry a payload into every table.
MAX_APP_LEN = 128
_APP_NAME = re.compile(r"[A-Za-z0-9._:/@+-]*")


def _shown(text: str) -> str:
    """A client's string in an error message: never more than a few dozen characters of it."""
    return repr(text[:32] + ("..." if len(text) > 32 else ""))


def _check_name(field: str, value: str) -> None:
    if len(value) > MAX_APP_LEN:
        raise InvalidRequestError(
            field, f"must be at most {MAX_APP_LEN} characters, got {len(value)} ({_shown(value)})"
        )


def valid_app(app: str) -> bool:
    """Whether ``app`` is an acceptable app name (empty included: no app)."""
    return len(app) <= MAX_APP_LEN and _APP_NAME.fullmatch(app) is not None


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    task: str
    targets: list[Target]
    specs: tuple[TensorSpec, ...]
    deadline_ms: float
    min_accuracy: float
    batch: int


def check_request(
    req: pb.InferRequest, registry: Registry, max_tensor_bytes: int, max_deadline_ms: float
) -> CheckedRequest:
    if not valid_app(req.app):
        raise InvalidRequestError(
            "app",
            f"must be at most {MAX_APP_LEN} characters of A-Z a-z 0-9 . _ : / @ + -, "
            f"got {len(req.app)} characters ({_shown(req.app)})",
        )
    # Names the AP echoes in replies and logs: bounded like app names.
    for field in ("task", "request_id", "variant"):
        _check_name(field, getattr(req, field))
    if not req.task:
        raise InvalidRequestError("task", "must not be empty")
    targets = registry.targets(req.task)
    specs = registry.inputs(req.task)
    if targets is None or specs is None:
        known = ", ".join(registry.tasks()) or "none registered"
        raise NotFoundError(f"task: unknown task {req.task!r} (known: {known})")
    if req.variant:
        targets = [t for t in targets if t.variant.name == req.variant]
        if not targets:
            raise NotFoundError(f"variant: no worker serves variant {req.variant!r} of {req.task!r}")

    if not req.HasField("sla"):
        raise InvalidRequestError("sla", "must be set (deadline_ms and min_accuracy)")
    deadline_ms = req.sla.deadline_ms
    if not (deadline_ms > 0 and math.isfinite(deadline_ms)):
        raise InvalidRequestError("sla.deadline_ms", f"must be a finite number > 0, got {deadline_ms}")
    if deadline_ms > max_deadline_ms:
        raise InvalidRequestError(
            "sla.deadline_ms", f"must be at most {max_deadline_ms:g} (max_deadline_ms), got {deadline_ms:g}"
        )
    min_accuracy = req.sla.min_accuracy
    if not 0.0 <= min_accuracy <= 1.0:
        raise InvalidRequestError("sla.min_accuracy", f"must be in [0, 1], got {min_accuracy}")

    batch = _check_inputs(req, specs, max_tensor_bytes, max(t.variant.max_batch_size for t in targets))
    return CheckedRequest(req.task, targets, specs, deadline_ms, min_accuracy, batch)


def _check_inputs(req: pb.InferRequest, specs: tuple[TensorSpec, ...], max_bytes: int, max_batch: int) -> int:
    if len(req.inputs) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise InvalidRequestError(
            "inputs", f"task {req.task!r} takes {len(specs)} input(s) ({names}), got {len(req.inputs)}"
        )
    batch = 0
    for i, (tensor, spec) in enumerate(zip(req.inputs, specs, strict=True)):
        where = f"inputs[{i}]"
        if tensor.name and tensor.name != spec.name:
            raise InvalidRequestError(f"{where}.name", f"expected {spec.name!r}, got {tensor.name!r}")
        if tensor.datatype != spec.datatype:
            raise InvalidRequestError(
                f"{where}.datatype", f"expected {spec.datatype}, got {tensor.datatype or 'nothing'}"
            )
        shape = tuple(tensor.shape)
        if len(shape) != len(spec.shape) or any(
            want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True)
        ):
            raise InvalidRequestError(f"{where}.shape", f"expected {list(spec.shape)}, got {list(shape)}")
        if any(d <= 0 for d in shape):
            raise InvalidRequestError(f"{where}.shape", f"empty tensor {list(shape)}")
        if shape[0] > max_batch:
            raise InvalidRequestError(
                f"{where}.shape", f"batch of {shape[0]} exceeds the largest served, {max_batch}"
            )
        if batch and shape[0] != batch:
            raise InvalidRequestError(f"{where}.shape", "inputs disagree on the batch size")
        batch = shape[0]
        dtype = DATATYPE_TO_DTYPE[spec.datatype]
        size = math.prod(shape) * dtype.itemsize
        if size > max_bytes:
            raise InvalidRequestError(f"{where}.data", f"{size} bytes exceeds the limit of {max_bytes}")
        if len(tensor.data) != size:
            raise InvalidRequestError(
                f"{where}.data", f"expected {size} bytes for shape {list(shape)}, got {len(tensor.data)}"
            )
        if spec.datatype in FLOAT_DATATYPES and not all_finite(np.frombuffer(tensor.data, dtype=dtype)):
            raise InvalidRequestError(f"{where}.data", "contains NaN or infinity")
    return batch

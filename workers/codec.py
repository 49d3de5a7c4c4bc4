"""The Open Inference Protocol codec of one served variant: requests in, replies out.

:class:`Model` holds a variant's runtime and scheduler with what its tensors
look like on the wire. ``decode`` checks a ``ModelInferRequest``'s inputs and
turns them into arrays (raw contents become read-only views, typed contents are
copied); ``encode`` writes a reply with every output in
``raw_output_contents`` (the only thing tritonclient reads) and the parameters
``queue_ms``, ``compute_ms`` (double) and ``batch_size`` (int64); a classifier's
reply also ``confidence`` (double): the top softmax probability of its answer,
the lowest over the request's rows (``apdispatch.common.confidence``). A
request the model cannot run raises :class:`InvalidInputError`, worded as
Triton words it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from apdispatch.common import confidence
from apdispatch.common.errors import InvalidInputError
from apdispatch.common.manifest import Variant
from apdispatch.common.protocol import oip_pb2 as pb
from apdispatch.common.tensors import DATATYPE_TO_DTYPE, FLOAT_DATATYPES, OIP_CONTENTS_FIELD, all_finite
from workers.runtime import InferResult, Runtime, Scheduler

MODEL_VERSION = "1"


@dataclass(frozen=True, slots=True)
class _InputSpec:
    index: int
    name: str
    datatype: str
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 = any size
    is_float: bool
    # The common case, all dimensions but the batch fixed, is checked with one
    # tuple comparison: the per-request path stays short.
    tail: tuple[int, ...] | None  # shape[1:] when all fixed, else None


class Model:
    """One served variant: runtime, scheduler and the OIP codec for its tensors."""

    def __init__(self, runtime: Runtime, scheduler: Scheduler, *, max_batch_size: int) -> None:
        self.runtime = runtime
        self.scheduler = scheduler
        self.name = runtime.name
        self.variant: Variant = runtime.variant
        self.max_batch_size = max_batch_size
        self._inputs = {
            t.name: _InputSpec(
                index=i,
                name=t.name,
                datatype=t.datatype,
                dtype=DATATYPE_TO_DTYPE[t.datatype],
                shape=tuple(t.shape),
                is_float=t.datatype in FLOAT_DATATYPES,
                tail=tuple(t.shape[1:]) if all(d >= 0 for d in t.shape[1:]) else None,
            )
            for i, t in enumerate(runtime.inputs)
        }
        self._n_inputs = len(runtime.inputs)
        self._outputs = {t.name: i for i, t in enumerate(runtime.outputs)}
        self._output_specs = runtime.outputs
        self._output_dtypes = [DATATYPE_TO_DTYPE[t.datatype] for t in runtime.outputs]
        self._all_outputs = list(range(len(runtime.outputs)))
        self._classifier = confidence.is_classifier(self.variant.outputs)
        self.metadata = pb.ModelMetadataResponse(
            name=self.name,
            versions=[MODEL_VERSION],
            platform=runtime.platform,
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))
                for t in runtime.inputs
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))
                for t in runtime.outputs
            ],
        )

    def decode(self, request: pb.ModelInferRequest) -> tuple[list[np.ndarray], int]:
        """The request's input arrays (in the variant's input order) and its batch size.

        Raises :class:`InvalidInputError` naming the input and the model for
        anything the model cannot run. Raw contents become read-only views
        (``np.frombuffer``), not copies.
        """
        m = self.name
        tensors = request.inputs
        if len(tensors) != self._n_inputs:
            expected = ", ".join(f"'{n}'" for n in self._inputs)
            raise InvalidInputError(
                f"expected {self._n_inputs} inputs but got {len(tensors)} inputs"
                f" for model '{m}' (inputs: {expected})",
            )
        raw = request.raw_input_contents
        if raw and len(raw) != len(tensors):
            raise InvalidInputError(
                f"raw_input_contents for model '{m}' has {len(raw)} entries,"
                f" expected one per input ({len(tensors)})",
            )
        arrays: list[np.ndarray | None] = [None] * self._n_inputs
        rows = -1
        first = ""
        for pos, tensor in enumerate(tensors):
            name = tensor.name
            spec = self._inputs.get(name)
            if spec is None:
                raise InvalidInputError(f"unexpected inference input '{name}' for model '{m}'")
            if arrays[spec.index] is not None:
                raise InvalidInputError(f"input '{name}' for model '{m}' is given more than once")
            if tensor.datatype != spec.datatype:
                raise InvalidInputError(
                    f"inference input '{name}' data-type is '{tensor.datatype}',"
                    f" but model '{m}' expects '{spec.datatype}'",
                )
            shape = tuple(tensor.shape)
            fast = spec.tail is not None and len(shape) > 0 and shape[0] > 0 and shape[1:] == spec.tail
            if not fast and (
                len(shape) != len(spec.shape)
                or any(d < 0 or (e >= 0 and d != e) for d, e in zip(shape, spec.shape, strict=True))
            ):
                raise InvalidInputError(
                    f"unexpected shape for input '{name}' for model '{m}'."
                    f" Expected {format_shape(spec.shape)}, got {format_shape(shape)}",
                )
            count = 1
            for d in shape:
                count *= d
            if count == 0:
                raise InvalidInputError(
                    f"input '{name}' for model '{m}' is empty (shape {format_shape(shape)})"
                )
            batch = shape[0]
            if batch > self.max_batch_size:
                raise InvalidInputError(
                    f"inference request batch-size must be <= {self.max_batch_size}"
                    f" for model '{m}', got {batch} (input '{name}')",
                )
            if rows < 0:
                rows, first = batch, name
            elif batch != rows:
                raise InvalidInputError(
                    f"input '{name}' for model '{m}' has batch size {batch}, but input '{first}' has {rows}",
                )
            if raw:
                if tensor.HasField("contents"):
                    raise InvalidInputError(
                        f"input '{name}' for model '{m}' has both typed contents and raw_input_contents",
                    )
                data = raw[pos]
                expected_bytes = count * spec.dtype.itemsize
                if len(data) != expected_bytes:
                    raise InvalidInputError(
                        f"unexpected total byte size {len(data)} for input '{name}'"
                        f" for model '{m}', expecting {expected_bytes}"
                        f" (shape {format_shape(shape)} of {spec.datatype})",
                    )
                array = np.frombuffer(data, dtype=spec.dtype).reshape(shape)
            else:
                array = self._typed(tensor, spec, shape, count)
            if spec.is_float and not all_finite(array):
                raise InvalidInputError(f"input '{name}' for model '{m}' holds NaN or infinite values")
            arrays[spec.index] = array
        return arrays, rows  # type: ignore[return-value]  # every slot was filled above

    def _typed(
        self,
        tensor: pb.ModelInferRequest.InferInputTensor,
        spec: _InputSpec,
        shape: tuple[int, ...],
        count: int,
    ) -> np.ndarray:
        field = OIP_CONTENTS_FIELD.get(spec.datatype)
        m, name = self.name, spec.name
        if field is None:
            raise InvalidInputError(
                f"input '{name}' for model '{m}': {spec.datatype} travels only as raw_input_contents",
            )
        values = getattr(tensor.contents, field)
        if len(values) == 0:
            raise InvalidInputError(
                f"input '{name}' for model '{m}' has no data: neither raw_input_contents"
                f" nor contents.{field}",
            )
        if len(values) != count:
            raise InvalidInputError(
                f"input '{name}' for model '{m}' has {len(values)} values in"
                f" contents.{field}, expected {count} for shape {format_shape(shape)}",
            )
        try:
            return np.array(values, dtype=spec.dtype).reshape(shape)
        except OverflowError:
            raise InvalidInputError(
                f"input '{name}' for model '{m}' holds values out of range for {spec.datatype}"
            ) from None

    def requested_outputs(self, request: pb.ModelInferRequest) -> list[int]:
        if not request.outputs:
            return self._all_outputs
        picked = []
        for out in request.outputs:
            index = self._outputs.get(out.name)
            if index is None:
                raise InvalidInputError(f"unexpected inference output '{out.name}' for model '{self.name}'")
            picked.append(index)
        return picked

    def encode(
        self, request: pb.ModelInferRequest, result: InferResult, picked: list[int]
    ) -> pb.ModelInferResponse:
        tensors = []
        raw = []
        for i in picked:
            array = result.outputs[i]
            # The spec's dtypes are explicitly little-endian: anything else
            # (another width, big-endian) is converted, so the raw bytes below
            # are what the wire wants.
            if array.dtype != self._output_dtypes[i]:
                array = array.astype(self._output_dtypes[i])
            spec = self._output_specs[i]
            tensors.append(
                pb.ModelInferResponse.InferOutputTensor(
                    name=spec.name, datatype=spec.datatype, shape=array.shape
                )
            )
            raw.append(array.tobytes())  # row-major, whatever the array's strides
        parameters = {
            "queue_ms": pb.InferParameter(double_param=result.queue_ms),
            "compute_ms": pb.InferParameter(double_param=result.compute_ms),
            "batch_size": pb.InferParameter(int64_param=result.batch_size),
        }
        if self._classifier:
            # Whichever outputs were asked for: the answer's confidence is the logits'.
            lowest = confidence.answer_confidence(result.outputs[0])
            parameters[confidence.PARAMETER] = pb.InferParameter(double_param=lowest)
        return pb.ModelInferResponse(
            model_name=self.name,
            model_version=MODEL_VERSION,
            id=request.id,
            parameters=parameters,
            outputs=tensors,
            raw_output_contents=raw,
        )


def format_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"

"""Tensors as they travel: OIP datatype strings, numpy dtypes and raw bytes.

Raw contents are flat, row-major, little-endian; the AP never re-encodes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from apdispatch.common.protocol import dispatcher_pb2 as pb

DATATYPE_TO_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

# Which OIP InferTensorContents field carries each datatype when not sent raw
# (FP16 has none: it travels raw only).
OIP_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
DTYPE_TO_DATATYPE: dict[np.dtype, str] = {v: k for k, v in DATATYPE_TO_DTYPE.items()}
FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A named tensor a model takes or gives: in the manifest, in a registration, in the AP's checks."""

    name: str
    datatype: str  # an OIP datatype string
    shape: tuple[int, ...]  # -1 = any size (the batch dimension)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TensorSpec:
        return cls(name=raw["name"], datatype=raw["datatype"], shape=tuple(raw["shape"]))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_proto(cls, spec: pb.TensorSpec) -> TensorSpec:
        return cls(name=spec.name, datatype=spec.datatype, shape=tuple(spec.shape))

    def to_proto(self) -> pb.TensorSpec:
        return pb.TensorSpec(name=self.name, datatype=self.datatype, shape=list(self.shape))


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype string of a numpy array (native byte order is fine)."""
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    try:
        return DTYPE_TO_DATATYPE[np.dtype(dtype.str.replace("=", "<"))]
    except KeyError:
        raise TypeError(f"unsupported dtype {array.dtype}") from None


def to_bytes(array: np.ndarray) -> bytes:
    """Flat row-major little-endian bytes of ``array``."""
    dtype = DATATYPE_TO_DTYPE[datatype_of(array)]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def from_bytes(data: bytes, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """A read-only numpy view over raw contents."""
    dtype = DATATYPE_TO_DTYPE[datatype]
    return np.frombuffer(data, dtype=dtype).reshape(tuple(shape))


def to_tensor(name: str, array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(name=name, datatype=datatype_of(array), shape=list(array.shape), data=to_bytes(array))


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    return from_bytes(tensor.data, tensor.datatype, tensor.shape)


def all_finite(values: np.ndarray) -> bool:
    """True when a float array holds no NaN or infinity; the AP and the workers check inputs with it.

    NaN and infinity propagate through a sum, and a float64 sum of finite
    FP16/FP32 values cannot overflow: one reduction decides the common case
    without a boolean temporary. Only a non-finite sum, which huge finite FP64
    values can also give, needs the element-wise check.
    """
    if math.isfinite(float(np.add.reduce(values, axis=None, dtype=np.float64))):
        return True
    return bool(np.isfinite(values).all())

"""An MLServer runtime serving one ONNX file with onnxruntime: a stand-in for any OIP server.

MLServer (``pip install mlserver onnxruntime``) knows no ONNX runtime of its own;
this one is enough for the zoo's edge variants. ``model-settings.json``::

    {"name": "digits-tiny", "implementation": "onnx_runtime.OnnxRuntime",
     "parameters": {"uri": "/path/to/digits-tiny.onnx"}}

with this folder on ``PYTHONPATH``. Behind the AP it is registered by
``apdispatch worker register`` (it does not speak the AP's Registry itself).
Requests that come with raw contents (as the AP sends them) are answered with
raw contents: MLServer does that by itself.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor
from mlserver.utils import get_model_uri

# onnxruntime's element types, as OIP datatypes.
DATATYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}


def _metadata(args: list[ort.NodeArg]) -> list[MetadataTensor]:
    # A named (symbolic) dimension, such as the batch, is -1 in OIP metadata.
    return [
        MetadataTensor(
            name=a.name,
            datatype=DATATYPES.get(a.type, "BYTES"),
            shape=[d if isinstance(d, int) else -1 for d in a.shape],
        )
        for a in args
    ]


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        # One thread, as the edge worker runs it: the server's slots are its concurrency.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        path = await get_model_uri(self._settings)
        self._session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        # ModelMetadata tells what the file takes and gives, unless the settings say so.
        self.inputs = self.inputs or _metadata(self._session.get_inputs())
        self.outputs = self.outputs or _metadata(self._session.get_outputs())
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output(name, np.ascontiguousarray(value))
                for name, value in zip(self._outputs, results, strict=True)
            ],
        )

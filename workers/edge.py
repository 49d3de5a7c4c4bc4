"""The edge runtime: ONNX variants on ONNX Runtime's CPU provider.

One intra-op and one inter-op thread, sequential execution: an edge worker's
concurrency comes from its slots (one execution per slot thread), and the
models are small enough that ONNX Runtime's own thread pools would only add
hand-off latency and fight the other processes for the cores.

This module must not import torch, directly or indirectly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from apdispatch.common.manifest import Variant
from workers.runtime import Runtime


class OnnxRuntime(Runtime):
    platform = "onnxruntime_onnx"

    def __init__(self, variant: Variant, path: Path, *, max_batch_size: int = 8) -> None:
        super().__init__(variant, path, max_batch_size=max_batch_size)
        self._session: ort.InferenceSession | None = None
        self._input_names: list[str] = [t.name for t in variant.inputs]
        self._output_names: list[str] = [t.name for t in variant.outputs]

    def load(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Quiet: warnings only, not the per-session info lines.
        options.log_severity_level = 2
        session = ort.InferenceSession(
            str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        have_in = {i.name for i in session.get_inputs()}
        have_out = {o.name for o in session.get_outputs()}
        missing = [n for n in self._input_names if n not in have_in]
        missing += [n for n in self._output_names if n not in have_out]
        if missing:
            raise ValueError(
                f"model file {self.path} for variant '{self.name}' lacks tensors {missing}"
                f" named in the manifest (it has inputs {sorted(have_in)},"
                f" outputs {sorted(have_out)})"
            )
        self._session = session

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        session = self._session
        if session is None:
            raise RuntimeError(f"variant '{self.name}' is not loaded")
        feed = dict(zip(self._input_names, inputs, strict=True))
        outputs: list[np.ndarray] = session.run(self._output_names, feed)
        return outputs

    def unload(self) -> None:
        self._session = None

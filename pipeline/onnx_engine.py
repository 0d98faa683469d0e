"""Frozen backbones run by onnxruntime instead of torch: `[runtime] engine`, for inference on CPU only.

Why: on CPUs without native bf16 math, onnxruntime's CPU kernels ran the EfficientNet-Lite backbones'
frozen forward well ahead of torch fp32 (figures in docs/benchmarks.md). Its numbers equal torch fp32's
to rounding, not bit for bit, so the engine is in the features key; they do not depend on the batch
size or the thread count (tested), so extraction stays resumable and stream-independent. Whether it
wins on a given CPU and network is measured by calibration.py, as bf16 is.

The backbone, after cpu_rewrites.for_inference, is exported once to ONNX in memory at its input size
(batch size free) and run by one onnxruntime session per thread count: extraction streams each call
with their own share of the torch threads (extract.in_streams), and a session's pool is fixed when it
is made. `OnnxBackbone` is an nn.Module without parameters, so extraction handles it like the model.
"""

from __future__ import annotations

import importlib.util
import io
import threading
import warnings

import torch
from torch import nn

from .config import ConfigError

INSTALL_HINT = 'pip install -e ".[onnx]" (or make install)'


def available() -> bool:
    """Whether onnxruntime and onnx (its exporter's format) are importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def require() -> None:
    if not available():
        raise ConfigError(f"[runtime] engine = 'onnxruntime' needs the onnxruntime and onnx packages: {INSTALL_HINT}")


class OnnxBackbone(nn.Module):
    """A frozen backbone's forward pass (float32 [N, 3, S, S] -> [N, D]) run by onnxruntime on CPU."""

    def __init__(self, model: nn.Module, input_size: int):
        super().__init__()
        require()
        self.input_size = input_size
        self.graph = export(model, input_size)
        self._sessions: dict[int, object] = {}
        self._lock = threading.Lock()

    def session(self, threads: int):
        """The session whose pool has `threads` compute threads, made on first use."""
        with self._lock:
            if threads not in self._sessions:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                options.log_severity_level = 3  # its graph-optimisation notices are not the user's concern
                self._sessions[threads] = onnxruntime.InferenceSession(
                    self.graph, options, providers=["CPUExecutionProvider"]
                )
            return self._sessions[threads]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"this exported backbone takes {self.input_size} px images, not {tuple(images.shape)}")
        # The calling thread's torch thread count: extraction streams each set their own share.
        session = self.session(max(1, torch.get_num_threads()))
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (features,) = session.run(None, {"images": array})
        return torch.from_numpy(features)


def export(model: nn.Module, input_size: int) -> bytes:
    """The ONNX graph of a frozen fp32 `model` at `input_size` px, batch size free."""
    example = torch.zeros(2, 3, input_size, input_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter warns that it is deprecated; it needs no onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (example,),
            buffer,
            dynamo=False,
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
        )
    return buffer.getvalue()

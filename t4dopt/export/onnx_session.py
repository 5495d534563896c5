"""Run an exported model in ONNX Runtime on CPU, with the ``t4d`` custom op when the model needs it."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch

from t4dopt.export.custom_domain import DOMAIN


def uses_custom_domain(path: str | os.PathLike) -> bool:
    """Whether the model at `path` imports the ``t4d`` domain."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    return any(opset.domain == DOMAIN for opset in model.opset_import)


def session(path: str | os.PathLike) -> ort.InferenceSession:
    """A CPU session for `path`; t4d models get the onnxruntime-extensions op from ``t4dopt.plugins``."""
    options = ort.SessionOptions()
    if uses_custom_domain(path):
        try:
            from t4dopt.plugins.onnxruntime_ops import session_options
        except ImportError as error:
            raise ImportError(
                f"{os.fspath(path)} uses the t4d ONNX domain; running it in ONNX Runtime needs "
                "onnxruntime-extensions (pip install 't4dopt[onnx]'), or export with ops='portable'"
            ) from error
        options = session_options(options)
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def run(path: str | os.PathLike, args: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """The model's outputs on `args` (tensors, in the order of the model's inputs)."""
    sess = session(path)
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(sess.get_inputs(), args)}
    return sess.run(None, feeds)

"""Deployment exports of turbo4d-rewritten models: ``t4dopt.export.onnx(model, args, path, ops=...)``.

Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime, onnxruntime-extensions).
"""

from t4dopt.export.onnx_export import OPS, ExportResult, export_onnx

onnx = export_onnx

__all__ = ["OPS", "ExportResult", "export_onnx", "onnx"]

"""Deployment exports of turbo4d-rewritten models: ``t4dopt.export.onnx(model, args, path, ops=...)``.

Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime, onnxruntime-extensions).
"""

from t4dopt.export.aoti_export import AotiResult, export_aoti, load_aoti
from t4dopt.export.bundle import BundleResult, export_bundle
from t4dopt.export.onnx_export import OPS, ExportResult, export_onnx
from t4dopt.export.tensorrt_export import TensorRTResult, export_tensorrt

onnx = export_onnx
aoti = export_aoti
bundle = export_bundle
tensorrt = export_tensorrt

__all__ = ["OPS", "AotiResult", "BundleResult", "ExportResult", "TensorRTResult", "aoti", "bundle", "export_aoti",
           "export_bundle", "export_onnx", "export_tensorrt", "load_aoti", "onnx", "tensorrt"]

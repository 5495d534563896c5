"""TensorRT plugins and ONNX Runtime custom ops for the ``t4d`` ops (none yet)."""

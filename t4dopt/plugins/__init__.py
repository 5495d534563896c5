"""The ``t4d`` ops outside PyTorch: the TensorRT plugin (`tensorrt_plugins`), its torch-tensorrt converter
and lowering (`tensorrt_converter`), and the ONNX Runtime custom op (`onnxruntime_ops`)."""

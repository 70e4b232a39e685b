"""Running INT8 ONNX models: ONNX Runtime session options, OpenVINO, the measured runtime choice, BF16 ops."""

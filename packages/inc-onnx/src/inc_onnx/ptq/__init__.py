"""Post-training INT8 of ONNX models with ONNX Runtime's quantizers, fed with inc's calibration."""

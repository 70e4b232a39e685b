"""Quantization-aware training for Keras 3 in ``model.fit`` (fake-quant wrappers, QATCallback, convert)."""

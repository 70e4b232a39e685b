"""Quantization-aware training in the user's own loop (``inc_torch.prepare_qat`` -> train -> ``inc_torch.convert``)."""

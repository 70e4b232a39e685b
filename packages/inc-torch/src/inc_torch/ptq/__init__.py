"""Post-training INT8 on the torch paths: PT2E, FX, dynamic and IPEX, their calibration, op lists, op errors,
SmoothQuant, BF16 fallback, and the compiled module PT2E returns."""

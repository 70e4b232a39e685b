"""Post-training INT8 for Keras models: calibration, the LiteRT target and the SavedModel (oneDNN INT8) target."""

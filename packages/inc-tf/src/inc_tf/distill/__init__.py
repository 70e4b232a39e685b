"""Knowledge distillation for Keras: a student trained against a frozen teacher through ``compile``/``fit``."""

from inc_tf.distill._distiller import Distiller

__all__ = ["Distiller"]

"""Callbacks that make MAML meta-gradients visible and checkable in any run, and one that writes
the predictions of calibrated networks."""

from lightning_maml.callbacks.meta_gradient_check import MetaGradientCheck, MetaGradientMismatch
from lightning_maml.callbacks.meta_gradient_logger import MetaGradientLogger
from lightning_maml.callbacks.prediction_writer import PredictionWriter

__all__ = ["MetaGradientCheck", "MetaGradientLogger", "MetaGradientMismatch", "PredictionWriter"]

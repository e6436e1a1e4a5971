"""Callbacks that make MAML meta-gradients visible and checkable in any run."""

from lightning_maml.callbacks.meta_gradient_check import MetaGradientCheck, MetaGradientMismatch
from lightning_maml.callbacks.meta_gradient_logger import MetaGradientLogger

__all__ = ["MetaGradientCheck", "MetaGradientLogger", "MetaGradientMismatch"]

"""Networks for the meta-learning problems shipped with lightning-maml."""

from lightning_maml.models.eegnet import EEGNet
from lightning_maml.models.mlp import MLP

__all__ = ["EEGNet", "MLP"]

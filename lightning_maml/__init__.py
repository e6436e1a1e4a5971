"""lightning-maml: MAML-family meta-learning for PyTorch Lightning."""

from lightning_maml.episode import Episode
from lightning_maml.functional import meta_loss
from lightning_maml.maml import MAML
from lightning_maml.meta_sgd import MetaSGD
from lightning_maml.module import MAMLModule

__all__ = ["MAML", "Episode", "MAMLModule", "MetaSGD", "meta_loss"]
__version__ = "0.1.0"

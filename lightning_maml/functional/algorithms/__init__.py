"""The MAML family as objects: what an algorithm adapts, with which steps, and what it optimises.

An :class:`Algorithm` says which parameters adapt in the inner loop (:meth:`~Algorithm.adapted`),
the inner step sizes (:meth:`~Algorithm.rates`, learned where the algorithm owns parameters),
whether the inner loop is differentiated (:meth:`~Algorithm.is_first_order`), how the query losses
make the outer objective (:meth:`~Algorithm.step_weights`, :meth:`~Algorithm.outer`), and whether
its update is the gradient of that objective (:attr:`~Algorithm.has_objective`, which decides
whether :class:`~lightning_maml.callbacks.MetaGradientCheck` applies). The engine runs every
algorithm through the same task function (:func:`task_meta_loss`), vectorised, in a loop or
compiled. An algorithm with learned tensors is an ``nn.Module``: inside a
:class:`~lightning_maml.MAMLModule` they are meta-trained with the network and saved in its
checkpoints.

Adding an algorithm is a subclass that overrides some of these methods, registered under a name
with :func:`register_algorithm`.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_maml.functional import meta_loss
    >>> net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> anil = ANIL()  # adapts the last layer with parameters: net[2]
    >>> sx, sy, qx, qy = (torch.randn(4, 5, 1) for _ in range(4))
    >>> meta_loss(net, "mse", sx, sy, qx, qy, inner_lr=0.1, algorithm=anil).loss.backward()
    >>> anil.adapted(dict(net.named_parameters()))
    ['2.weight', '2.bias']
"""

from lightning_maml.functional.algorithms.anil import ANIL
from lightning_maml.functional.algorithms.base import Algorithm, TaskContext, split_prefixed
from lightning_maml.functional.algorithms.imaml import IMAML
from lightning_maml.functional.algorithms.maml import FOMAML, MAML
from lightning_maml.functional.algorithms.maml_plus_plus import MAMLPlusPlus
from lightning_maml.functional.algorithms.meta_sgd import MetaSGD
from lightning_maml.functional.algorithms.protomaml import ProtoMAML
from lightning_maml.functional.algorithms.registry import (
    ALGORITHMS,
    describe_algorithm,
    register_algorithm,
    resolve_algorithm,
)
from lightning_maml.functional.algorithms.reptile import Reptile
from lightning_maml.functional.algorithms.task import task_meta_loss

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "FOMAML",
    "IMAML",
    "MAML",
    "Algorithm",
    "MAMLPlusPlus",
    "MetaSGD",
    "ProtoMAML",
    "Reptile",
    "TaskContext",
    "describe_algorithm",
    "register_algorithm",
    "resolve_algorithm",
    "split_prefixed",
    "task_meta_loss",
]

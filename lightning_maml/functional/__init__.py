"""The engine: pure meta-gradient functions of a parameter dict, one module per responsibility.

- :mod:`~lightning_maml.functional.losses`: the losses, checked for shape.
- :mod:`~lightning_maml.functional.parameters`: a network's state as dicts, and :func:`forward`,
  the one way the engine runs a network.
- :mod:`~lightning_maml.functional.inner`: inner-loop update rules (:func:`sgd_step`,
  :func:`adapt_parameters`).
- :mod:`~lightning_maml.functional.algorithms`: the MAML family as objects (MAML, FOMAML,
  Reptile, ANIL, Meta-SGD, MAML++, IMAML, ProtoMAML) and the task function they share.
- :mod:`~lightning_maml.functional.execution`: tasks under vmap, in a loop or compiled, and the
  :class:`~lightning_maml.functional.execution.Executor` that remembers how.
- :mod:`~lightning_maml.functional.meta_loss`: :func:`meta_loss`, the front.

Everything in this module is a function of a parameter dict. The network is only ever run through
:func:`torch.func.functional_call` (see :func:`forward`), so no module is copied or modified (apart
from the temporary BatchNorm mode described in :func:`task_batch_norm`). Every call of the network
runs under :func:`lightning_maml.normalization.exact_normalization`, whose normalisation arithmetic
has exact second derivatives under :func:`torch.func.vmap` (torch's fused kernels do not).

The inner-loop update is :func:`sgd_step`; it is the single definition used by the
:class:`~lightning_maml.MAML` wrapper, :class:`~lightning_maml.MAMLModule`, the callbacks and the
benchmarks.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_maml.functional import meta_loss
    >>> net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
    >>> sx, sy, qx, qy = (torch.randn(4, 10, 1) for _ in range(4))   # 4 tasks, 10 shots each
    >>> out = meta_loss(net, "mse", sx, sy, qx, qy, inner_lr=0.01, inner_steps=1)
    >>> out.loss.backward()      # meta-gradient now in net's .grad
    >>> out.query_losses.shape
    torch.Size([4])
"""

from lightning_maml._checks import (
    COMPILE_MODES,
    VECTORIZE_MODES,
    check_checkpointing,
    check_compile,
    check_count,
    check_episode,
    check_inner_lr,
    check_inner_steps,
)
from lightning_maml.functional.algorithms import (
    ALGORITHMS,
    ANIL,
    FOMAML,
    IMAML,
    MAML,
    Algorithm,
    MAMLPlusPlus,
    MetaSGD,
    ProtoMAML,
    Reptile,
    TaskContext,
    register_algorithm,
    resolve_algorithm,
)
from lightning_maml.functional.execution import Executor, vmap_pays_off
from lightning_maml.functional.inner import adapt_parameters, sgd_step, support_gradients
from lightning_maml.functional.losses import (
    LossFn,
    cross_entropy_loss,
    mse_loss,
    register_loss,
    resolve_loss,
)
from lightning_maml.functional.meta_loss import (
    MetaLossOutput,
    episode_metrics,
    meta_loss,
    meta_objective,
    nonfinite_tasks,
    query_correct,
)
from lightning_maml.functional.parameters import forward, split_parameters, task_batch_norm

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "COMPILE_MODES",
    "FOMAML",
    "MAML",
    "VECTORIZE_MODES",
    "Algorithm",
    "Executor",
    "LossFn",
    "IMAML",
    "MAMLPlusPlus",
    "MetaLossOutput",
    "MetaSGD",
    "ProtoMAML",
    "Reptile",
    "TaskContext",
    "adapt_parameters",
    "check_checkpointing",
    "check_compile",
    "check_count",
    "check_episode",
    "check_inner_lr",
    "check_inner_steps",
    "cross_entropy_loss",
    "episode_metrics",
    "forward",
    "meta_loss",
    "meta_objective",
    "mse_loss",
    "nonfinite_tasks",
    "query_correct",
    "register_algorithm",
    "register_loss",
    "resolve_algorithm",
    "resolve_loss",
    "sgd_step",
    "split_parameters",
    "support_gradients",
    "task_batch_norm",
    "vmap_pays_off",
]

"""Log the meta-gradient of a MAMLModule: norms, inner-loop gradient, and its first-order cosine."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_maml._checks import check_count
from lightning_maml.functional import meta_loss, support_gradients
from lightning_maml.module import MAMLModule, as_episode, split_meta_parameters


class MetaGradientLogger(Callback):
    """Logs the meta-gradient that the optimizer is about to apply, every ``every_n_steps`` steps.

    Logged names (through every logger of the run, at the optimizer step they describe):

    - ``meta_grad/norm``: global L2 norm of the meta-gradient (DDP-averaged, before clipping);
    - ``meta_grad/norm/<parameter>``: L2 norm per parameter tensor (``per_parameter=True``);
    - ``meta_grad/inner_grad_norm``: mean over tasks of the norm of the first inner-loop gradient
      (support loss at the initial parameters);
    - ``meta_grad/query_loss_before`` and ``meta_grad/query_loss_after``: mean query loss of the
      batch before and after adaptation;
    - ``meta_grad/cosine_first_order`` (``cosine_first_order=True``): cosine similarity between the
      second-order and the first-order meta-gradient of the same batch; costs one more meta-loss
      pass. Near 1 means the second-order terms barely change the direction.

    With ``histograms=True`` and a ``TensorBoardLogger``, each parameter's meta-gradient is also
    written as a histogram. On the steps it skips the callback does no work.

    Args:
        every_n_steps: log every this many optimizer steps (default 50); must be >= 1.
        per_parameter: also log the norm of each parameter's meta-gradient (default ``True``).
        cosine_first_order: also log ``meta_grad/cosine_first_order`` (default ``False``).
        histograms: also write gradient histograms to TensorBoard loggers (default ``False``).

    Raises:
        ValueError: if ``every_n_steps`` is not an integer >= 1.
        MisconfigurationException: if the LightningModule is not a ``MAMLModule``, or
            ``cosine_first_order`` is asked for with ``algorithm="reptile"``.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_maml import MAMLModule
        >>> from lightning_maml.callbacks import MetaGradientLogger
        >>> from lightning_maml.datamodules import SinusoidDataModule
        >>> from lightning_maml.models import MLP
        >>> trainer = pl.Trainer(max_steps=2, callbacks=[MetaGradientLogger(every_n_steps=1)],
        ...                      logger=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, enable_checkpointing=False)
        >>> trainer.fit(MAMLModule(MLP()), SinusoidDataModule(meta_batch_size=4,
        ...                                                    batches_per_epoch=2))
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        per_parameter: bool = True,
        cosine_first_order: bool = False,
        histograms: bool = False,
    ) -> None:
        check_count(every_n_steps, "every_n_steps")
        self.every_n_steps = every_n_steps
        self.per_parameter = per_parameter
        self.cosine_first_order = cosine_first_order
        self.histograms = histograms
        self._batch: Any = None
        self.last_metrics: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, MAMLModule):
            raise MisconfigurationException(
                f"MetaGradientLogger needs a MAMLModule, got {type(pl_module).__name__}"
            )
        if self.cosine_first_order and not pl_module.algorithm.has_objective:
            raise MisconfigurationException(
                "MetaGradientLogger(cosine_first_order=True) compares the second- and "
                "first-order gradients of a meta-objective; it is not defined for "
                f"{pl_module.algorithm.describe()}, whose update is not such a gradient"
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch if trainer.global_step % self.every_n_steps == 0 else None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: MAMLModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._batch is None:
            return
        batch, self._batch = as_episode(self._batch), None
        grads = pl_module.meta_gradient()
        norms = {n: torch.linalg.vector_norm(g) for n, g in grads.items()}
        metrics: dict[str, Tensor] = {
            "meta_grad/norm": torch.linalg.vector_norm(torch.stack(list(norms.values())))
        }
        if self.per_parameter:
            metrics.update({f"meta_grad/norm/{n}": v for n, v in norms.items()})
        inner = support_gradients(
            pl_module.net, pl_module.loss_fn, batch.support_x, batch.support_y
        )
        per_task = torch.cat([g.flatten(1) for g in inner.values()], dim=1)
        metrics["meta_grad/inner_grad_norm"] = trainer.strategy.reduce(
            torch.linalg.vector_norm(per_task, dim=1).mean(), reduce_op="mean"
        )
        out = pl_module.last_meta_output
        if out is not None:
            metrics["meta_grad/query_loss_after"] = trainer.strategy.reduce(
                out.query_losses.mean(), reduce_op="mean"
            )
            if out.initial_query_losses is not None:
                metrics["meta_grad/query_loss_before"] = trainer.strategy.reduce(
                    out.initial_query_losses.mean(), reduce_op="mean"
                )
        if self.cosine_first_order:
            algorithm = pl_module.algorithm
            other = algorithm.with_order(not algorithm.is_first_order(pl_module.current_epoch))
            meta_parameters = pl_module.meta_parameters()
            _, learned = split_meta_parameters(meta_parameters)
            with torch.enable_grad():
                loss = meta_loss(
                    pl_module.net,
                    pl_module.loss_fn,
                    *batch,
                    inner_lr=pl_module.inner_lr,
                    inner_steps=pl_module.inner_steps,
                    algorithm=other,
                    vectorize=pl_module.vectorize,
                    track_initial_loss=False,
                    epoch=pl_module.current_epoch,
                    learned=learned,
                    executor=pl_module.executor,
                ).loss
                params = list(meta_parameters.values())
                other_grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat_other = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten()
                    for g, p in zip(other_grads, params)
                ]
            )
            flat_other = trainer.strategy.reduce(flat_other, reduce_op="mean")
            flat = torch.cat([g.flatten() for g in grads.values()])
            metrics["meta_grad/cosine_first_order"] = torch.nn.functional.cosine_similarity(
                flat, flat_other, dim=0
            )
        self.last_metrics = {k: float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(self.last_metrics, step=trainer.global_step)
            if self.histograms and isinstance(logger, TensorBoardLogger):
                for n, g in grads.items():
                    logger.experiment.add_histogram(f"meta_grad/{n}", g, trainer.global_step)

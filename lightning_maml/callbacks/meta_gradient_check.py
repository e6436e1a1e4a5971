"""Check the meta-gradient a MAMLModule is about to apply against float64 finite differences."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_maml._checks import check_count
from lightning_maml.episode import Episode
from lightning_maml.functional import meta_objective, split_parameters
from lightning_maml.module import (
    ALGORITHM_PREFIX,
    MAMLModule,
    as_episode,
    split_meta_parameters,
)


class MetaGradientMismatch(AssertionError):
    """Raised by :class:`MetaGradientCheck` when the gradient disagrees with finite differences."""


class MetaGradientCheck(Callback):
    """Compares the meta-gradient the optimizer is about to apply with central finite differences.

    On the steps it checks, the callback takes ``num_directions`` random unit directions ``v`` and
    compares the directional derivative ``g · v`` of the gradient ``g`` held by the meta-parameters
    (the network's and the algorithm's learned step sizes, after DDP averaging, before clipping)
    with ``[L(θ + εv) − L(θ − εv)] / 2ε``, where ``L`` is the objective of the module's algorithm
    (:func:`~lightning_maml.functional.meta_objective`): e.g. the mean over tasks of the query loss
    after the inner loop (``"maml"``), the same with the inner gradients held at their values at
    ``θ`` (first-order algorithms), MAML++'s weighted multi-step loss. ``L`` is evaluated in float64
    on copies of the network and the algorithm, task by task without vmap or compilation, so the
    run's parameters, gradients and RNG state are untouched.

    A meta-gradient holding NaN or inf fails the check whatever the finite differences say
    (``max_rel_error`` is ``inf``, the message names the tensors), and so does a direction whose
    derivative or finite difference is not finite. Under DDP every rank draws the same directions,
    the losses are averaged across ranks, and the largest error over ranks decides, so all ranks
    agree; the message gives that rank's figures and names it. Logged (through every logger):
    ``meta_grad_check/max_rel_error`` and ``meta_grad_check/fd_derivative_<i>``.

    The relative error of a direction is ``|g·v − fd| / max(|g·v|, |fd|, atol)``. Where it exceeds
    ``rtol`` the derivative is estimated again with steps ``eps / 10`` and ``eps / 100``, and the
    closest of the three estimates counts: a step that straddles a kink of the objective (a ReLU
    switching between ``θ − εv`` and ``θ + εv``) spoils one estimate, not all three, while a wrong
    gradient disagrees with every one.

    Args:
        every_n_steps: check every this many optimizer steps; ``None`` (default) for none beyond
            the first.
        check_first_step: check the first optimizer step of the fit (default ``True``).
        num_directions: random directions per check (default 3).
        eps: finite-difference step along a unit direction, in float64 (default 1e-6).
        rtol: largest accepted relative error (default 1e-3, allowing for float32 gradients).
        atol: floor of the error's denominator (default 1e-8).
        on_mismatch: ``"raise"`` (default) raises :class:`MetaGradientMismatch`; ``"warn"`` warns.
        seed: seed of the directions (combined with the step number).

    Raises:
        ValueError: on an argument outside the allowed values, at construction.
        MisconfigurationException: at setup, for a module that is not a ``MAMLModule``, for
            an algorithm whose update is no gradient of an objective (Reptile), for gradient
            accumulation, or for a network with active dropout (``p > 0``: its objective is
            random).

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_maml import MAMLModule
        >>> from lightning_maml.callbacks import MetaGradientCheck
        >>> from lightning_maml.datamodules import SinusoidDataModule
        >>> from lightning_maml.models import MLP
        >>> check = MetaGradientCheck(every_n_steps=1)
        >>> trainer = pl.Trainer(max_steps=2, callbacks=[check], logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False,
        ...                      enable_checkpointing=False)
        >>> trainer.fit(MAMLModule(MLP()), SinusoidDataModule(meta_batch_size=4,
        ...                                                    batches_per_epoch=2))
        >>> check.last_result["max_rel_error"] < 1e-3
        True
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        check_first_step: bool = True,
        num_directions: int = 3,
        eps: float = 1e-6,
        rtol: float = 1e-3,
        atol: float = 1e-8,
        on_mismatch: str = "raise",
        seed: int = 0,
    ) -> None:
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"`every_n_steps` must be None or an integer >= 1, got {every_n_steps!r}"
            )
        check_count(num_directions, "num_directions")
        for name, value in (("eps", eps), ("rtol", rtol), ("atol", atol)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
        if on_mismatch not in ("raise", "warn"):
            raise ValueError(f"`on_mismatch` must be 'raise' or 'warn', got {on_mismatch!r}")
        self.every_n_steps = every_n_steps
        self.check_first_step = check_first_step
        self.num_directions = num_directions
        self.eps = float(eps)
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.on_mismatch = on_mismatch
        self.seed = seed
        self._batch: Any = None
        self._first_step: int | None = None
        self.last_result: dict[str, Any] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, MAMLModule):
            raise MisconfigurationException(
                f"MetaGradientCheck needs a MAMLModule, got {type(pl_module).__name__}"
            )
        if not pl_module.algorithm.has_objective:
            note = pl_module.algorithm.update_note
            raise MisconfigurationException(
                "MetaGradientCheck checks gradients of a meta-objective; "
                f"{pl_module.algorithm.describe()} applies a direction that is not one"
                + (f": {note}" if note else "")
            )
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                "MetaGradientCheck compares one batch's gradient; got "
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}, need 1"
            )
        dropout = [
            n
            for n, m in pl_module.net.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
        ]
        if dropout:
            raise MisconfigurationException(
                f"MetaGradientCheck needs a deterministic network; dropout layers {dropout} make "
                "the meta-objective random"
            )

    def _due(self, step: int) -> bool:
        if self._first_step is None:
            self._first_step = step
        if self.check_first_step and step == self._first_step:
            return True
        return self.every_n_steps is not None and step % self.every_n_steps == 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch if self._due(trainer.global_step) else None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: MAMLModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._batch is None:
            return
        batch, self._batch = as_episode(self._batch), None
        with torch.random.fork_rng(devices=[]):
            result = self._check(trainer, pl_module, batch)
        self.last_result = result
        metrics = {"meta_grad_check/max_rel_error": result["max_rel_error"]}
        for i, fd in enumerate(result["fd_derivatives"]):
            metrics[f"meta_grad_check/fd_derivative_{i}"] = fd
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if result["max_rel_error"] <= self.rtol:  # False for NaN: never passes a NaN
            return
        where = f"step {trainer.global_step}"
        if trainer.world_size > 1:
            where += f", rank {result['rank']} (the largest error over {trainer.world_size} ranks)"
        header = f"meta-gradient of {type(pl_module).__name__} ({pl_module.algorithm.describe()}) "
        if result["non_finite"]:
            message = (
                f"{header}holds non-finite values (NaN or inf) at {where}, in "
                f"{result['non_finite']}; a gradient check cannot pass such a gradient"
            )
        else:
            lines = [
                f"  direction {i}: gradient·v = {g:.6e}, finite difference = {f:.6e}, "
                f"relative error {e:.2e}"
                for i, (g, f, e) in enumerate(
                    zip(result["grad_derivatives"], result["fd_derivatives"], result["rel_errors"])
                )
            ]
            message = (
                f"{header}disagrees with finite differences at {where}: largest relative error "
                f"{result['max_rel_error']:.2e} > rtol {self.rtol:.1e}\n" + "\n".join(lines)
            )
        if self.on_mismatch == "raise":
            raise MetaGradientMismatch(message)
        rank_zero_warn(message)  # every rank holds the same verdict

    def _check(self, trainer: pl.Trainer, pl_module: MAMLModule, batch: Episode) -> dict[str, Any]:
        grads = {n: g.double() for n, g in pl_module.meta_gradient().items()}
        net = copy.deepcopy(pl_module.net).double()
        algorithm = copy.deepcopy(pl_module.algorithm).double()
        params = {n: p.detach() for n, p in split_parameters(net)[0].items()}
        params.update({ALGORITHM_PREFIX + n: t.detach() for n, t in algorithm.learned().items()})
        batch = Episode(*(t.double() if t.is_floating_point() else t for t in batch))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.global_step)
        directions = []
        for _ in range(self.num_directions):
            v = {
                n: torch.randn(p.shape, generator=generator, dtype=torch.float64)
                for n, p in params.items()
            }
            norm = math.sqrt(sum(float((t**2).sum()) for t in v.values()))
            directions.append({n: t / norm for n, t in v.items()})

        anchor = split_meta_parameters(params)

        def objective(shift: dict[str, Tensor], step: float) -> Tensor:
            shifted = {n: p + step * shift[n] for n, p in params.items()}
            net_params, learned = split_meta_parameters(shifted)
            return meta_objective(
                net,
                pl_module.loss_fn,
                batch,
                inner_lr=pl_module.inner_lr,
                inner_steps=pl_module.inner_steps,
                algorithm=algorithm,
                params=net_params,
                learned=learned,
                anchor=anchor,
                epoch=pl_module.current_epoch,
            )

        def central_difference(v: dict[str, Tensor], eps: float) -> float:
            pair = torch.stack([objective(v, eps), objective(v, -eps)])
            pair = trainer.strategy.reduce(pair, reduce_op="mean")  # the loss all ranks optimise
            return float((pair[0] - pair[1]) / (2 * eps))

        def error(g: float, f: float) -> float:
            if not (math.isfinite(g) and math.isfinite(f)):
                return math.inf
            return abs(g - f) / max(abs(g), abs(f), self.atol)

        non_finite = [n for n, g in grads.items() if not bool(torch.isfinite(g).all())]
        gv = [float(sum((grads[n] * v[n]).sum() for n in grads)) for v in directions]
        fd = [central_difference(v, self.eps) for v in directions]
        errors = [error(g, f) for g, f in zip(gv, fd)]
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        failed = torch.tensor([int(not e <= self.rtol) for e in errors], dtype=torch.int64)
        if distributed:  # every rank re-estimates the same directions (the reduce is collective)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        for i in failed.nonzero().flatten().tolist():
            for eps in (self.eps / 10, self.eps / 100):
                estimate = central_difference(directions[i], eps)
                if error(gv[i], estimate) < errors[i]:
                    fd[i], errors[i] = estimate, error(gv[i], estimate)
        worst = math.inf if non_finite else max(errors)
        rank = trainer.global_rank
        if distributed:  # every rank's figures: the report is the worst rank's, named
            n = len(errors)
            mine = torch.tensor([worst, len(non_finite), *errors, *gv, *fd], dtype=torch.float64)
            every = trainer.strategy.all_gather(mine)
            rank = int(every[:, 0].argmax())
            worst, count = float(every[rank, 0]), int(every[rank, 1])
            errors, gv, fd = (every[rank, 2 + i * n : 2 + (i + 1) * n].tolist() for i in range(3))
            if rank != trainer.global_rank:
                non_finite = [f"{count} gradient tensor(s) of rank {rank}"] if count else []
        return {
            "max_rel_error": worst,
            "rel_errors": errors,
            "fd_derivatives": fd,
            "grad_derivatives": gv,
            "non_finite": non_finite,
            "rank": rank,
        }

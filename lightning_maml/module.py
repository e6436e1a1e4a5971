"""``MAMLModule``: meta-train any ``nn.Module`` with an algorithm of the MAML family."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_maml._checks import (
    check_checkpointing,
    check_compile,
    check_inner_lr,
    check_inner_steps,
    check_meta_optimizer,
    check_vectorize,
)
from lightning_maml._diagnosis import (
    check_class_outputs,
    check_optimizers_cover,
    nonfinite_message,
    report_nonfinite_tasks,
)
from lightning_maml._trust import check_checkpoint_names, read_hyperparameters
from lightning_maml.calibration import BatchNormStatistics, calibrate
from lightning_maml.checkpoints import (
    CHECKPOINT_KEY,
    build_network,
    check_training_record,
    describe_network,
    describe_or_none,
    training_record,
)
from lightning_maml.episode import Episode
from lightning_maml.functional import (
    Algorithm,
    Executor,
    MetaLossOutput,
    episode_metrics,
    meta_loss,
    nonfinite_tasks,
    resolve_algorithm,
    resolve_loss,
    split_parameters,
)
from lightning_maml.functional.algorithms import split_prefixed
from lightning_maml.functional.losses import describe_loss
from lightning_maml.functional.meta_loss import AlgorithmName, Vectorize

#: the prefix of an algorithm's learned tensors in :meth:`MAMLModule.meta_parameters`
ALGORITHM_PREFIX = "algorithm."

OnNonFinite = Literal["raise", "skip"]

#: the progress bar's short names of the logged values (loggers get ``{stage}/<name>``)
BAR_NAMES = {"query_loss_before": "before", "query_loss_after": "after", "query_acc_after": "acc"}


def split_meta_parameters(
    values: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Values keyed like :meth:`MAMLModule.meta_parameters`, as ``(the network's, the
    algorithm's learned tensors by their own names)``."""
    return split_prefixed(values, ALGORITHM_PREFIX)


def as_episode(batch: Any) -> Episode:
    """Read a batch as an :class:`Episode`: an Episode, a 4-sequence or a mapping of its fields."""
    if isinstance(batch, Episode):
        return batch
    if isinstance(batch, Mapping) and set(Episode._fields) <= set(batch):
        return Episode(*(batch[f] for f in Episode._fields))
    if isinstance(batch, Sequence) and len(batch) == 4:
        return Episode(*batch)
    raise TypeError(
        "a batch must be an Episode, a (support_x, support_y, query_x, query_y) sequence or a "
        f"mapping with those keys, got {type(batch).__name__}"
    )


class MAMLModule(pl.LightningModule):
    """Meta-learns the initial parameters of ``net`` from batches of support/query tasks.

    Each training step adapts a copy of the parameters to every task of the batch on its support
    set (``inner_steps`` SGD steps of size ``inner_lr``), evaluates the query set, and
    backpropagates the mean query loss through the adaptation (second order) into the
    meta-update. Tasks are vectorised with ``torch.func.vmap`` where that is exact and pays off, and
    otherwise run one by one, one task's graph at a time (see ``vectorize``). Validation and test
    adapt on each task's support set too (with ``eval_inner_steps``), under any ``Trainer``: the
    module enables gradients for the inner loop itself. BatchNorm layers normalise with each task's
    own statistics; normalisation layers are exact under vmap
    (:mod:`lightning_maml.normalization`).

    Batches are :class:`~lightning_maml.Episode` s (or 4-tuples / mappings with the same fields)
    with a leading task dimension.

    Logged metrics (``stage`` is ``train``, ``val`` or ``test``): ``{stage}/query_loss_before`` and
    ``{stage}/query_loss_after`` (mean query loss before and after adaptation),
    ``{stage}/query_acc_after`` for classification, and ``train/loss`` (the meta-loss). Training
    values are logged on the trainer's logging steps (``log_every_n_steps``) and as epoch means
    over every step (``train/<name>_epoch``). The progress bar shows them by short names that
    stay apart at 80 columns (``before``, ``after``, ``acc``, refreshed every
    ``log_every_n_steps`` batches; ``val_after``, ``val_acc``); loggers get only the full names.
    Under ``Trainer(barebones=True)`` nothing is logged.

    Args:
        net: the network; any ``nn.Module``. Where it records its arguments (this library's
            models do) or comes from a LightningCLI config, checkpoints rebuild it:
            ``MAMLModule.load_from_checkpoint(path)``; otherwise pass it again,
            ``load_from_checkpoint(path, net=MyNet(...))``.
        loss: ``"mse"``, ``"cross_entropy"`` or a callable ``(prediction, target) -> scalar``.
        inner_lr: inner-loop SGD step size, > 0 (default 0.01); ``inner_steps=0`` for no
            adaptation.
        inner_steps: inner-loop steps in training (default 1).
        eval_inner_steps: inner-loop steps in validation and test (default: ``inner_steps``).
        algorithm: ``"maml"`` (second order, default), ``"fomaml"`` (first order),
            ``"reptile"``, ``"anil"`` (the last layer adapts), ``"metasgd"`` (learned
            per-parameter inner step sizes), ``"maml++"`` (learned per-layer per-step step sizes,
            multi-step loss), ``"imaml"`` (implicit gradients of a regularised inner problem),
            ``"protomaml"`` (each task's head from its class prototypes), or an
            :class:`~lightning_maml.functional.algorithms.Algorithm`
            object for other settings (e.g. ``ANIL(head=["classifier.*"])``). Learned step sizes
            are initialised to ``inner_lr`` and meta-trained with ``net`` (they are this module's
            parameters, under ``algorithm.``).
        meta_lr: learning rate of the default meta-optimizer, Adam (``None``: 1e-3; torch's fused
            Adam where the parameters' device and dtype have one).
        optimizer: a callable ``params -> Optimizer`` replacing the default (in a LightningCLI
            config: ``class_path`` and ``init_args``); its learning rate is its own, so
            ``meta_lr`` must not be given with it.
        vectorize: ``"auto"`` (default): vmap, except for convolution networks on a CPU without
            ``compile`` (slower under vmap there), checked against the per-task loop on the first
            batch of each setting; ``"vmap"`` or ``"loop"`` to choose (see
            :func:`lightning_maml.functional.meta_loss`).
        classification: log query accuracy; default: ``loss == "cross_entropy"``.
        track_initial_loss: compute the query loss before adaptation in training (one forward pass
            per task); validation and test always do.
        compile: compute the training meta-gradient with ``torch.compile`` (see
            :func:`lightning_maml.functional.meta_loss`): the first steps compile (seconds to a
            minute, again for each new batch shape), later steps run several times faster on small
            networks. Validation and test stay eager. A string picks a ``torch.compile`` mode
            (e.g. ``"reduce-overhead"``: CUDA graphs on a GPU).
        optimizers_from: an existing ``LightningModule`` whose ``configure_optimizers`` (its
            optimizers and learning-rate schedulers, as it returns them) this module uses, for a
            ``net`` taken from it: ``MAMLModule(existing.model, optimizers_from=existing)``. Its
            optimizers must cover exactly this module's meta-parameters (checked at the start of
            fitting); not with ``optimizer`` or ``meta_lr``.
        checkpoint_inner_steps: checkpoint each inner step of second-order training (see
            :func:`lightning_maml.functional.meta_loss`): peak memory stays near one step's
            whatever ``inner_steps`` is, for about the cost of a second forward pass of the inner
            loop; tasks then run one by one. Not with ``compile`` or ``vectorize="vmap"``.
        on_nonfinite: what a training step whose meta-loss or meta-gradient holds NaN or inf
            does (checked after the backward, before the optimizer, on every rank together):
            ``"raise"`` (default) stops the fit with an error naming the step, the batch, the
            tasks whose query loss is not finite and whether their data or their adaptation made
            it; ``"skip"`` warns, applies nothing (every meta-parameter's gradient is dropped, so
            no optimizer moves it, momentum included) and counts the step in
            ``train/nonfinite_steps``. Either way nothing of such a step reaches the parameters.
            Under a gradient scaler (``precision="16-mixed"``) non-finite gradients are the
            scaler's to skip; the meta-loss is still checked.

    A checkpoint records the algorithm (its class and settings) and the loss; reloading rebuilds
    both from it (``MAMLModule.load_from_checkpoint(path, net=net)``), or, where they cannot be
    rebuilt (a lambda as loss, an algorithm class that cannot be imported), refuses with an error
    that names what to pass. An algorithm object belongs to one module.

    Raises:
        TypeError, ValueError: on an argument outside the allowed values, at construction.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_maml import MAMLModule
        >>> from lightning_maml.datamodules import SinusoidDataModule
        >>> from lightning_maml.models import MLP
        >>> module = MAMLModule(MLP(), loss="mse", inner_lr=0.01, inner_steps=1)
        >>> trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False,
        ...                      enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(module, SinusoidDataModule(meta_batch_size=4, batches_per_epoch=2))
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        loss: str | Callable[[Tensor, Tensor], Tensor] = "mse",
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        algorithm: AlgorithmName | Algorithm = "maml",
        meta_lr: float | None = None,
        optimizer: OptimizerCallable | None = None,
        vectorize: Vectorize = "auto",
        classification: bool | None = None,
        track_initial_loss: bool = True,
        compile: bool | str = False,
        checkpoint_inner_steps: bool = False,
        optimizers_from: pl.LightningModule | None = None,
        on_nonfinite: OnNonFinite = "raise",
    ) -> None:
        super().__init__()
        if net is None:
            raise TypeError(
                "`net` is missing: pass the network (any nn.Module). A checkpoint rebuilds it only "
                "where it was described (this library's models, or a network from a LightningCLI "
                "config); otherwise pass it, built as for training: "
                "MAMLModule.load_from_checkpoint(path, net=MyNet(...))"
            )
        if isinstance(net, Mapping):  # a description saved in a checkpoint
            net = build_network(net)
        if not isinstance(net, nn.Module):
            raise TypeError(f"`net` must be a torch.nn.Module, got {type(net).__name__}")
        if not any(p.requires_grad for p in net.parameters()):
            raise ValueError(
                f"`net` ({type(net).__name__}) has no parameter with requires_grad=True: MAML "
                "adapts and meta-learns parameters, so at least one must be trainable"
            )
        self.loss_fn = resolve_loss(loss)
        self.inner_lr = check_inner_lr(inner_lr, positive=True)
        self.inner_steps = check_inner_steps(inner_steps)
        self.eval_inner_steps = check_inner_steps(
            self.inner_steps if eval_inner_steps is None else eval_inner_steps, "eval_inner_steps"
        )
        algorithm_object = resolve_algorithm(algorithm)
        if getattr(algorithm_object, "_module_owned", False):
            raise ValueError(
                f"this {type(algorithm_object).__name__} object already belongs to another "
                "MAMLModule, which trains its learned tensors and settings: give each module an "
                f"algorithm object of its own (e.g. algorithm={type(algorithm_object).__name__}"
                "(...) in each)"
            )
        algorithm_object.bind(split_parameters(net)[0], self.inner_lr, self.inner_steps, net=net)
        algorithm_object._module_owned = True
        check_vectorize(vectorize)
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"`on_nonfinite` must be 'raise' or 'skip', got {on_nonfinite!r}")
        if optimizers_from is not None and not isinstance(optimizers_from, pl.LightningModule):
            raise TypeError(
                f"`optimizers_from` must be a LightningModule, got {type(optimizers_from).__name__}"
            )
        self.meta_lr = check_meta_optimizer(optimizer, meta_lr, optimizers_from is not None)
        self.vectorize = vectorize
        self.optimizer = optimizer
        self.track_initial_loss = track_initial_loss
        self.compile_meta_gradient = check_compile(compile)
        self.checkpoint_inner_steps = check_checkpointing(
            checkpoint_inner_steps, vectorize, compile
        )
        self.classification = loss == "cross_entropy" if classification is None else classification
        self.on_nonfinite = on_nonfinite
        #: training steps skipped for a non-finite meta-loss or meta-gradient (``"skip"``)
        self.nonfinite_steps = 0
        #: how the data module made the trials (``describe_preprocessing()`` of the data module
        #: it was fitted on, e.g. MOABBDataModule's; kept in checkpoints), or ``None``
        self.preprocessing: dict[str, Any] | None = None
        # the hyper-parameters rebuild the loss and the algorithm where they can be described
        # (a name, an import path, a class path with its arguments); where not, they are left
        # out and on_load_checkpoint refuses a module built otherwise than the one trained
        loss = describe_loss(loss)
        algorithm = algorithm if isinstance(algorithm, str) else describe_or_none(algorithm_object)
        network, net = net, describe_network(net)
        ignore = ["optimizer", "optimizers_from"]
        described = (("loss", loss), ("algorithm", algorithm), ("net", net))
        ignore += [name for name, value in described if not value]
        self.save_hyperparameters(ignore=ignore)
        net = network
        self.net = net
        self.algorithm = algorithm_object
        #: what this module's meta-losses remember between batches (vmap decisions, compiled code)
        self.executor = Executor()
        # not a submodule: its parameters are net's, registered once
        self.__dict__["optimizers_from"] = optimizers_from
        self.last_meta_output: MetaLossOutput | None = None
        self._classes_checked = False
        # the last training step's per-task values, folded into the epoch means at its end
        # (None once skipped as non-finite), and its episode and index, for a non-finite message
        self._step_values: dict[str, Tensor] | None = None
        self._last_step: tuple[Episode, int] | None = None
        # per-epoch (sum, count) of the training values; folded into train_metrics at epoch end
        self._train_totals: dict[str, tuple[Tensor, int]] = {}
        names = ["query_loss_before", "query_loss_after"]
        if self.classification:
            names.append("query_acc_after")
        # one set per stage (attribute names, as "train" would shadow nn.Module.train in a dict)
        self.train_metrics = nn.ModuleDict({name: MeanMetric() for name in names})
        # evaluation means leave out non-finite values, which _update_metrics counts and reports
        self.val_metrics = nn.ModuleDict({n: MeanMetric(nan_strategy="ignore") for n in names})
        self.test_metrics = nn.ModuleDict({n: MeanMetric(nan_strategy="ignore") for n in names})
        #: per evaluation stage this epoch: (tasks whose adaptation ended non-finite, tasks)
        self._nonfinite_counts: dict[str, tuple[int, int]] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def on_fit_start(self) -> None:
        self._record_preprocessing()
        if self.optimizers_from is not None:
            check_optimizers_cover(self)

    def _record_preprocessing(self) -> None:
        """Keep how the data module makes its trials (``describe_preprocessing``, e.g.
        MOABBDataModule's), for checkpoints: a new person's recordings are then prepared alike
        (:class:`~lightning_maml.datamodules.recordings.EEGPreprocessing`)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        describe = getattr(datamodule, "describe_preprocessing", None)
        if not callable(describe):
            return
        try:
            self.preprocessing = describe()
        except ValueError as error:
            rank_zero_warn(f"the data's preprocessing is not recorded in checkpoints: {error}")

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> MAMLModule:
        """Lightning's ``load_from_checkpoint``, refusing, before anything is imported or built,
        a checkpoint whose hyper-parameters name a loss, network, algorithm or optimizer that is
        not this library's, torch's or registered, unless ``kwargs`` passes that argument
        (``net=``, ``loss=``, ``algorithm=``, ``optimizer=``): a checkpoint never makes loading
        import or call code of its choosing. See the reliability guide."""
        hparams = read_hyperparameters(checkpoint_path, hparams_file, weights_only is not False)
        check_checkpoint_names(hparams, kwargs)
        return super().load_from_checkpoint(
            checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict,
            weights_only=weights_only, **kwargs,
        )  # fmt: skip

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            **training_record(self.loss_fn, self.algorithm),
            "nonfinite_steps": self.nonfinite_steps,
            "preprocessing": self.preprocessing,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = check_training_record(checkpoint, training_record(self.loss_fn, self.algorithm))
        self.nonfinite_steps = saved.get("nonfinite_steps", 0)
        self.preprocessing = saved.get("preprocessing")

    def meta_forward(
        self, batch: Any, inner_steps: int | None = None, train: bool = True
    ) -> MetaLossOutput:
        """Run the meta-loss of a batch of tasks and return everything it computes.

        With ``train=False`` the adaptation is evaluated without a graph to the parameters (as in
        validation and test): first order, from detached parameters and learned step sizes.
        """
        episode = as_episode(batch)
        steps = self.inner_steps if inner_steps is None else inner_steps
        algorithm, params, learned = self.algorithm, None, None
        if not train:  # plain adaptation from detached parameters
            algorithm = self.algorithm.with_order(first_order=True)
            params = {name: p.detach() for name, p in split_parameters(self.net)[0].items()}
            learned = {name: t.detach() for name, t in self.algorithm.learned().items()}
        return meta_loss(
            self.net,
            self.loss_fn,
            *episode,
            inner_lr=self.inner_lr,
            inner_steps=steps,
            algorithm=algorithm,
            vectorize=self.vectorize,
            params=params,
            track_initial_loss=self.track_initial_loss or not train,
            compile=self.compile_meta_gradient if train else False,
            checkpoint_inner_steps=self.checkpoint_inner_steps and train,
            epoch=self.current_epoch,
            learned=learned,
            executor=self.executor,
        )

    def meta_parameters(self) -> dict[str, Tensor]:
        """Everything the meta-update trains: ``net``'s trainable parameters (by their names in
        ``net``) and the algorithm's learned tensors (under ``algorithm.``)."""
        named = dict(split_parameters(self.net)[0])
        named.update({ALGORITHM_PREFIX + n: t for n, t in self.algorithm.learned().items()})
        return named

    def meta_gradient(self) -> dict[str, Tensor]:
        """The gradient held by :meth:`meta_parameters` (zeros where there is none): after the
        backward of a training step, the meta-gradient the optimizer applies next (DDP-averaged,
        before clipping). Read by the callbacks."""
        return {
            name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
            for name, p in self.meta_parameters().items()
        }

    def meta_loss(self, batch: Any) -> Tensor:
        """The scalar whose ``backward()`` puts this module's meta-gradient on ``net``'s parameters
        (the mean over the batch's tasks)."""
        return self.meta_forward(batch).loss

    def _check_classes(self, episode: Episode) -> None:
        check_class_outputs(self, episode)

    def _metric_values(self, out: MetaLossOutput, batch: Episode) -> dict[str, Tensor]:
        return episode_metrics(out, batch.query_y, self.classification)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        episode = as_episode(batch)
        self._check_classes(episode)
        out = self.meta_forward(episode)
        self.last_meta_output = out._replace(loss=out.loss.detach())  # for MetaGradientLogger
        self._last_step = (episode, batch_idx)  # for the message of a non-finite step
        values = self._metric_values(out, episode)
        # metric updates are costly next to a small meta-batch: every step adds to plain running
        # sums (in on_train_batch_end, unless the step was skipped), and their epoch means go out
        # (through torchmetrics, synchronised across processes) in on_train_epoch_end; step values
        # go to self.log, which writes them on Lightning's logging steps (log_every_n_steps)
        self._step_values = values
        if not self.trainer.barebones:  # barebones Trainers refuse self.log
            means = {name: v.mean() for name, v in values.items()}
            step_values = {f"train/{name}": v for name, v in means.items()}
            step_values["train/loss"] = out.loss.detach()
            batch_size = len(out.query_losses)
            self.log_dict(step_values, batch_size=batch_size)  # full names, for loggers
            # the bar's short names (told apart at 80 columns), refreshed every
            # log_every_n_steps batches: each logged name costs about 0.25 ms a step on a CPU
            if batch_idx % max(self.trainer.log_every_n_steps, 1) == 0:
                bar = {BAR_NAMES[name]: v for name, v in means.items()}
                self.log_dict(bar, prog_bar=True, logger=False, batch_size=batch_size)
        return out.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        values, self._step_values = self._step_values, None
        if values is None:  # skipped for non-finite values
            return
        for name, value in values.items():
            total, count = self._train_totals.get(name, (0, 0))
            self._train_totals[name] = (total + value.detach().sum(), count + value.numel())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse or skip a step whose meta-loss or meta-gradient is not finite (``on_nonfinite``),
        before the optimizer (and gradient clipping) sees it."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        loss = self.last_meta_output.loss if self.last_meta_output is not None else None
        checks = [] if loss is None else [torch.isfinite(loss).all()]
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scaled = isinstance(self.trainer.precision_plugin, MixedPrecision) and scaler is not None
        if not scaled:  # under a gradient scaler, inf gradients are the scaler's to skip
            checks += [torch.isfinite(g).all() for g in grads]
        finite = bool(torch.stack(checks).all()) if checks else True
        if self.trainer.world_size > 1:  # the same verdict on every rank
            finite = not self.trainer.strategy.reduce_boolean_decision(not finite, all=False)
        if finite:
            return
        message = nonfinite_message(self, params, scaled)
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        for p in params:  # an optimizer leaves a parameter without a gradient untouched
            p.grad = None
        self._step_values = None
        self.nonfinite_steps += 1
        rank_zero_warn(f"{message}; skipped (on_nonfinite='skip')")
        if not self.trainer.barebones:
            self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True)

    def on_train_epoch_end(self) -> None:
        for name, (total, count) in self._train_totals.items():
            metric = self.train_metrics[name]
            metric.update(total / count, weight=count)
            if self.trainer.barebones:
                metric.reset()
            else:  # Lightning computes it (synchronised across processes) and resets it
                self.log(f"train/{name}_epoch", metric)
        self._train_totals.clear()

    def _update_metrics(self, stage: str, out: MetaLossOutput, batch: Episode) -> None:
        bad = nonfinite_tasks(out)
        count, total = self._nonfinite_counts.get(stage, (0, 0))
        self._nonfinite_counts[stage] = (count + int(bad.sum()), total + len(bad))
        if not self.trainer.barebones:
            self.log(
                f"{stage}/nonfinite_tasks", bad.sum().float(), on_step=False, on_epoch=True,
                reduce_fx="sum", sync_dist=True, batch_size=len(bad),
            )  # fmt: skip
        metrics = getattr(self, f"{stage}_metrics")
        for name, value in self._metric_values(out, batch).items():
            metrics[name].update(value)
            if self.trainer.barebones:
                continue
            batch_size = batch.support_x.shape[0]
            self.log(
                f"{stage}/{name}",
                metrics[name],
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
            )
            if name != "query_loss_before":  # the bar: short names, for loggers none
                self.log(
                    f"{stage}_{BAR_NAMES[name]}", value.float().mean(), on_step=False,
                    on_epoch=True, prog_bar=True, logger=False, batch_size=value.numel(),
                )  # fmt: skip

    def on_validation_epoch_end(self) -> None:
        report_nonfinite_tasks(self, "val")

    def on_test_epoch_end(self) -> None:
        report_nonfinite_tasks(self, "test")

    def _evaluate(self, batch: Any, stage: str) -> None:
        # Lightning evaluates under inference mode; the inner loop needs autograd, and inference
        # tensors cannot take part in it, so leave inference mode and copy the batch out of it.
        with torch.inference_mode(False), torch.enable_grad():
            episode = Episode(*(t.clone() if t.is_inference() else t for t in as_episode(batch)))
            self._check_classes(episode)
            out = self.meta_forward(episode, self.eval_inner_steps, train=False)
        self._update_metrics(stage, out, episode)

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int | None = None,
        batch_norm: BatchNormStatistics = "support",
    ) -> nn.Module:
        """Calibrate to one new task (e.g. a new EEG subject) from its labelled trials: a
        standalone copy of the network whose parameters are the meta-parameters after the
        algorithm's inner updates on ``support_x`` (``[K, *features]``) and ``support_y``
        (``[K, *targets]``), ``steps`` of them (default ``eval_inner_steps``), with its learned
        step sizes where it has them; only the parameters the algorithm adapts change, from where
        the algorithm starts a task (ProtoMAML: the head from the class prototypes) and by its own
        inner rule (iMAML: the regularised steps).

        The copy is a plain ``nn.Module`` in eval mode with no graph to this module, which is left
        unchanged: use it for inference, save its ``state_dict`` (it loads into a fresh network
        of the same class and arguments), trace or export it. The adaptation runs as in
        validation and test (dropout off, first order, from detached parameters).

        Its BatchNorm layers (``batch_norm``): ``"support"`` (default) normalise with the
        statistics of the calibration trials (``support_x`` through the adapted network, kept as
        their running statistics, the variance unbiased as torch keeps it), so that each trial
        is classified alone, the same whether it comes alone or in a batch, and no trial to be
        classified informs another; ``"batch"`` normalise with the statistics of the batch they
        are given (as meta-training, validation and test do with each task's query set; their
        running statistics are removed), for classifying a whole set of trials together.

        Raises:
            ValueError: on NaN or inf in ``support_x`` or ``support_y`` (naming the trials); on an
                adaptation that ends in non-finite parameters or outputs (naming the step size
                and steps); for ProtoMAML, on a support set without some of the head's classes.

        Example::

            >>> import torch
            >>> from lightning_maml.models import MLP
            >>> module = MAMLModule(MLP(), inner_lr=0.1)
            >>> x = torch.linspace(-3, 3, 10).unsqueeze(1)
            >>> calibrated = module.adapt(x, torch.sin(x), steps=5)
            >>> calibrated(x).shape, calibrated.training
            (torch.Size([10, 1]), False)
        """
        return calibrate(self, support_x, support_y, steps, batch_norm)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The query predictions of every episode of ``batch`` (``[tasks, queries, ...]``, the
        network's outputs) after adapting on its support set with ``eval_inner_steps`` steps, as
        in validation and test: ``trainer.predict(module, dataloaders=episodes)``."""
        with torch.inference_mode(False), torch.enable_grad():
            episode = Episode(*(t.clone() if t.is_inference() else t for t in as_episode(batch)))
            out = self.meta_forward(episode, self.eval_inner_steps, train=False)
        return out.query_predictions

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        if self.optimizers_from is not None:
            self.optimizers_from.trainer = self.trainer  # its hook may ask the Trainer
            return self.optimizers_from.configure_optimizers()
        # the network's parameters and the algorithm's learned step sizes, if any
        params = [*self.net.parameters(), *self.algorithm.parameters()]
        if self.optimizer is not None:
            return self.optimizer(params)
        try:  # the fused kernel: one call per step instead of a Python loop over parameters
            return torch.optim.Adam(params, lr=self.meta_lr, fused=True)
        except (RuntimeError, TypeError, ValueError):  # device or dtype without a fused Adam
            return torch.optim.Adam(params, lr=self.meta_lr)

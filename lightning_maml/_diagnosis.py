"""What :class:`~lightning_maml.MAMLModule` tells the user when something is off: a training
step with non-finite values (which tasks, and whether their data, their adaptation or the backward
pass made them), evaluation tasks that ended non-finite, a network with too few class outputs.
Private."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_maml._checks import nonfinite_rows
from lightning_maml.episode import Episode
from lightning_maml.functional import split_parameters
from lightning_maml.functional.losses import cross_entropy_loss
from lightning_maml.functional.parameters import forward, task_batch_norm

if TYPE_CHECKING:
    from lightning_maml.module import MAMLModule


def nonfinite_message(module: MAMLModule, params: Sequence[Tensor], scaled: bool) -> str:
    """What a training step whose meta-loss or meta-gradient is not finite tells the user: where
    (step, batch, rank), which tasks, and whether their data, a diverged adaptation or the
    backward pass made it."""
    episode, batch_idx = module._last_step
    out = module.last_meta_output
    names = {id(p): n for n, p in module.meta_parameters().items()}
    bad_grads = [
        names.get(id(p), "?")
        for p in params
        if p.grad is not None and not scaled and not bool(torch.isfinite(p.grad).all())
    ]
    rank = f", rank {module.trainer.global_rank}" if module.trainer.world_size > 1 else ""
    where = (
        f"training step {module.trainer.global_step} (epoch {module.current_epoch}, batch "
        f"{batch_idx}{rank})"
    )
    parts = [f"meta-loss {out.loss.item():.4g}"]
    if bad_grads:
        parts.append(f"non-finite meta-gradient in {bad_grads}")
    lines = [f"non-finite values at {where}: {', '.join(parts)}"]
    tasks = (~torch.isfinite(out.query_losses)).nonzero().flatten().tolist()
    data = {field: nonfinite_rows(t) for field, t in zip(Episode._fields, episode)}
    data = {field: ts for field, ts in data.items() if ts}
    if data:
        listed = "; ".join(f"{field} of tasks {ts}" for field, ts in data.items())
        lines.append(f"the data hold NaN or inf: {listed}")
    if tasks:
        lines.append(f"tasks {tasks} of the batch have a non-finite query loss after adaptation")
        before = out.initial_query_losses
        diverged = [
            t
            for t in tasks
            if not any(t in ts for ts in data.values())
            and (before is None or bool(torch.isfinite(before[t])))
        ]
        if diverged:
            learned = learned_rates_note(module)
            lines.append(
                f"the adaptation of tasks {diverged} diverged from finite data and a finite "
                f"initial loss (inner_lr={module.inner_lr}, inner_steps={module.inner_steps}"
                f"{learned}): smaller step sizes or fewer inner steps"
            )
    elif not data:
        lines.append(
            "every task of this batch has finite data and a finite query loss: the non-finite "
            "values arose in the backward pass through the adaptation"
            + (" or on another rank" if module.trainer.world_size > 1 else "")
        )
        if module.algorithm.nonfinite_note:
            lines.append(module.algorithm.nonfinite_note)
    lines.append("nothing of this step was applied to the parameters")
    return "; ".join(lines)


def check_class_outputs(module: MAMLModule, episode: Episode) -> None:
    """Once: a classifier's output must have a logit for every class of the episodes (the
    data module's ``n_way``, and every label seen), checked before the engine would fail
    with torch's 'Target ... is out of bounds'."""
    if module._classes_checked or episode.support_y.is_floating_point():
        return
    module._classes_checked = True
    if module.loss_fn is not cross_entropy_loss:
        return
    params, constants = split_parameters(module.net)
    with torch.no_grad(), task_batch_norm(module.net):
        logits = forward(module.net, params, constants, episode.support_x[0])
    outputs = logits.shape[1] if logits.dim() > 1 else 0
    labels = int(max(episode.support_y.max(), episode.query_y.max())) + 1
    datamodule = getattr(module.trainer, "datamodule", None)
    n_way = getattr(datamodule, "n_way", None)
    relabels = getattr(datamodule, "relabel", True)
    if outputs < labels or (n_way is not None and relabels and outputs < n_way):
        raise ValueError(
            f"{type(module.net).__name__} outputs {outputs} class logits (output shape "
            f"{tuple(logits.shape)} for {episode.support_x.shape[1]} support examples), but "
            + (f"the episodes are n_way={n_way}-way and " if n_way is not None else "")
            + f"hold labels up to {labels - 1}: give the network one output per class"
        )
    if n_way is not None and relabels and outputs > n_way:
        rank_zero_warn(
            f"{type(module.net).__name__} outputs {outputs} class logits but the episodes are "
            f"n_way={n_way}-way (labels 0..{n_way - 1}): the other {outputs - n_way} outputs "
            "are never a target"
        )


def report_nonfinite_tasks(module: MAMLModule, stage: str) -> None:
    """Warn how many of this epoch's ``stage`` tasks ended non-finite, and what that means for
    the logged values."""
    count, total = module._nonfinite_counts.pop(stage, (0, 0))
    if count:
        rank_zero_warn(
            f"{count} of {total} {'validation' if stage == 'val' else stage} tasks ended with "
            f"a non-finite query loss or predictions after adaptation (data with NaN or inf, "
            f"or an adaptation that diverged: inner_lr={module.inner_lr}, eval_inner_steps="
            f"{module.eval_inner_steps}): left out of the {stage}/query_loss_* means, counted as "
            f"wrong in {stage}/query_acc_after, and counted in {stage}/nonfinite_tasks"
        )


def check_optimizers_cover(module: MAMLModule) -> None:
    """At the start of fitting with ``optimizers_from``: its optimizers must hold exactly the
    module's meta-parameters."""
    optimized = {
        id(p) for o in module.trainer.optimizers for g in o.param_groups for p in g["params"]
    }
    meta = module.meta_parameters()
    missing = [n for n, p in meta.items() if id(p) not in optimized]
    foreign = len(optimized - {id(p) for p in meta.values()})
    if missing or foreign:
        raise MisconfigurationException(
            f"the optimizers of {type(module.optimizers_from).__name__}.configure_optimizers "
            f"must cover exactly the meta-parameters: missing {missing}, and {foreign} "
            "tensors that are not meta-parameters"
        )


def learned_rates_note(module: MAMLModule) -> str:
    """``", learned step sizes from a to b"`` for an algorithm that learns them, else ``""``: for
    messages about a diverged adaptation."""
    rates = [t.detach() for t in module.algorithm.learned().values()]
    if not rates:
        return ""
    low, high = min(float(r.min()) for r in rates), max(float(r.max()) for r in rates)
    return f", learned step sizes from {low:.3g} to {high:.3g}"

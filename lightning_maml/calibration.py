"""Calibrating a meta-trained network to one new task (a new EEG subject) from its labelled
trials: :meth:`MAMLModule.adapt <lightning_maml.MAMLModule.adapt>` calls :func:`calibrate`."""

from __future__ import annotations

from copy import deepcopy
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from lightning_maml._checks import check_episode, check_finite_trials, check_inner_steps
from lightning_maml._diagnosis import learned_rates_note
from lightning_maml.functional import split_parameters
from lightning_maml.functional.algorithms import TaskContext
from lightning_maml.functional.parameters import task_batch_norm
from lightning_maml.normalization import support_statistics

if TYPE_CHECKING:
    from lightning_maml.module import MAMLModule

#: how a calibrated network's BatchNorm layers normalise (:meth:`MAMLModule.adapt`)
BatchNormStatistics = Literal["support", "batch"]


def calibrate(
    module: MAMLModule,
    support_x: Tensor,
    support_y: Tensor,
    steps: int | None = None,
    batch_norm: BatchNormStatistics = "support",
) -> nn.Module:
    """What :meth:`MAMLModule.adapt <lightning_maml.MAMLModule.adapt>` returns (see there): a
    calibrated copy of ``module``'s network, checked before it is returned."""
    steps = module.eval_inner_steps if steps is None else check_inner_steps(steps, "steps")
    if batch_norm not in ("support", "batch"):
        raise ValueError(f"`batch_norm` must be 'support' or 'batch', got {batch_norm!r}")
    with torch.inference_mode(False):  # ordinary tensors, also when called under it
        support_x, support_y = (
            t.clone() if t.is_inference() else t for t in (support_x, support_y)
        )
        # one task, its support set standing in for the query set: the episode's checks
        check_episode(support_x[None], support_y[None], support_x[None], support_y[None])
        check_finite_trials(support_x, support_y)
        module.algorithm.check_support(split_parameters(module.net)[0], support_y)
        calibrated = _adapted_copy(module, support_x, support_y, steps)
        if batch_norm == "support":
            support_statistics(calibrated, support_x)
        else:
            for layer in calibrated.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.track_running_stats = False
                    layer.running_mean = layer.running_var = None
                    layer.num_batches_tracked = None
        calibrated.eval()
        with torch.no_grad():
            outputs = calibrated(support_x)
        _check_calibrated(module, calibrated, outputs, steps)
    return calibrated


def _adapted_copy(
    module: MAMLModule, support_x: Tensor, support_y: Tensor, steps: int
) -> nn.Module:
    params, constants = split_parameters(module.net)
    params = {name: p.detach() for name, p in params.items()}
    learned = {name: t.detach() for name, t in module.algorithm.learned().items()}
    training = module.net.training
    module.net.eval()  # adapted as in validation and test: no dropout
    try:
        with torch.enable_grad(), task_batch_norm(module.net):
            context = TaskContext(module.net, module.loss_fn, constants, module.inner_lr, steps)
            adapted = module.algorithm.adapt_values(context, params, learned, support_x, support_y)
    finally:
        module.net.train(training)
    calibrated = deepcopy(module.net)
    with torch.no_grad():
        for name, p in calibrated.named_parameters():
            if name in adapted:
                p.copy_(adapted[name].detach())
    return calibrated


def _check_calibrated(
    module: MAMLModule, calibrated: nn.Module, outputs: Tensor, steps: int
) -> None:
    """A calibrated network of non-finite parameters or outputs is refused, not returned."""
    bad = [n for n, p in calibrated.named_parameters() if not bool(torch.isfinite(p).all())]
    if not bad and bool(torch.isfinite(outputs).all()):
        return
    learned = learned_rates_note(module)
    what = f"parameters {bad}" if bad else "outputs on the calibration trials"
    raise ValueError(
        f"the calibration diverged: its {what} are not finite after {steps} steps with "
        f"inner_lr={module.inner_lr}{learned} from finite trials: pass fewer `steps` or build "
        "the module with a smaller inner_lr"
    )

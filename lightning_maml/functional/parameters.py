"""Parameter plumbing: a network's state as dicts, and the one way the engine runs a network."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from torch import Tensor, nn
from torch.func import functional_call

from lightning_maml.normalization import exact_normalization


def split_parameters(
    net: nn.Module, params: Mapping[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a network's state into ``(params, constants)`` for :func:`functional_call`.

    By default ``params`` are the parameters that require grad (the ones the inner loop adapts)
    and ``constants`` the frozen parameters and buffers, passed through unchanged. Given
    ``params`` (tensors standing in for some of the network's parameters), ``constants`` holds
    every other parameter and buffer.
    """
    trainable, constants = {}, {}
    for name, p in net.named_parameters():
        (trainable if p.requires_grad else constants)[name] = p
    constants.update(dict(net.named_buffers()))
    if params is None:
        return trainable, constants
    params = dict(params)
    constants = {k: v for k, v in {**trainable, **constants}.items() if k not in params}
    return params, constants


def forward(
    net: nn.Module,
    params: Mapping[str, Tensor],
    constants: Mapping[str, Tensor],
    x: Tensor,
    vectorized: bool = False,
) -> Tensor:
    """``net(x)`` with ``params`` and ``constants`` standing in for its state: the one way the
    engine runs a network. Normalisation layers run under
    :func:`~lightning_maml.normalization.exact_normalization` (running statistics untouched;
    ``vectorized=True``, for a call under vmap: computed by arithmetic with exact second
    derivatives).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> zero = {"weight": torch.zeros(1, 2), "bias": torch.ones(1)}
        >>> forward(net, zero, {}, torch.randn(3, 2))
        tensor([[1.],
                [1.],
                [1.]])
    """
    state = (dict(params), dict(constants))
    with exact_normalization(vectorized):
        try:
            return functional_call(net, state, (x,))
        except RuntimeError as error:
            if vectorized:
                raise  # under vmap: the per-task run that follows names the layer
            failing = _failing_layer(net, state, x)
            if failing is None:
                raise
            raise RuntimeError(
                f"{type(net).__name__} cannot run on this task's data: {failing} ({error})"
            ) from error


def _failing_layer(
    net: nn.Module, state: tuple[dict[str, Tensor], dict[str, Tensor]], x: Tensor
) -> str | None:
    """Run ``net`` again with a pre-hook on every submodule and say which innermost one was
    entered last before the error, with the shapes of its tensor inputs."""
    entered: list[tuple[str, nn.Module, list[tuple[int, ...]]]] = []

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            shapes = [tuple(a.shape) for a in args if isinstance(a, Tensor)]
            entered.append((name, module, shapes))

        return hook

    handles = [
        module.register_forward_pre_hook(record(name))
        for name, module in net.named_modules()
        if name and not list(module.children())
    ]
    try:
        functional_call(net, state, (x,))
    except RuntimeError:
        pass
    else:
        return None
    finally:
        for handle in handles:
            handle.remove()
    if not entered:
        return None
    name, module, shapes = entered[-1]
    shown = ", ".join(str(s) for s in shapes) or "no tensor"
    return f"layer `{name}` ({module}) failed on input of shape {shown}"


@contextmanager
def task_batch_norm(net: nn.Module) -> Iterator[None]:
    """Within the block, every BatchNorm layer of ``net`` normalises with the statistics of the
    batch it is given and leaves its running statistics untouched.

    This is the convention of MAML papers (Finn et al. 2017 and its reference code): each task's
    support and query sets are normalised with their own statistics, in training and in evaluation
    alike, and no statistics leak from one task to another. The layers' flags are restored on exit.
    """
    saved = []
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            saved.append((module, module.training, module.track_running_stats))
            module.training = True
            module.track_running_stats = False
    try:
        yield
    finally:
        for module, training, track in saved:
            module.training = training
            module.track_running_stats = track

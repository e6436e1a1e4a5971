"""Task execution: a batch of tasks under ``torch.func.vmap``, in a loop, or compiled.

The engine runs one task function (see
:func:`~lightning_maml.functional.algorithms.task_meta_loss`) over the tasks of a batch in one
of three ways, each giving the same meta-gradient: vectorised with vmap (fast for small
networks), task by task with each task's graph freed before the next (the memory of one task, as
a per-task autograd loop), or as one compiled ``grad_and_value`` of the whole batch. An
:class:`Executor` remembers, for one network, which way each setting runs (``vectorize="auto"``
checks vmap against the loop on a setting's first batch) and the compiled functions; its
lifetime is its owner's (a :class:`~lightning_maml.MAMLModule`, or the network itself for
:func:`~lightning_maml.functional.meta_loss` called without one).
"""

from __future__ import annotations

import math
import types
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import vmap

if TYPE_CHECKING:
    from lightning_maml.functional.algorithms import Algorithm

TaskFn = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]


def run_tasks(
    task: TaskFn,
    vectorized: bool,
    params: Mapping[str, Tensor],
    constants: Mapping[str, Tensor],
    batch: tuple[Tensor, ...],
    randomness: str = "different",
) -> tuple[Tensor, ...]:
    # (losses, query_losses, predictions, initial), each with a leading task dimension
    if vectorized:
        batched = vmap(partial(task, True), in_dims=(None, None, 0, 0, 0, 0), randomness=randomness)
        return batched(params, constants, *batch)
    n_tasks = len(batch[0])
    per_task = [task(False, params, constants, *(t[i] for t in batch)) for i in range(n_tasks)]
    return tuple(torch.stack(parts) for parts in zip(*per_task))


def mean_loss(outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    # per-task losses -> the meta-loss, their mean
    losses, *rest = outputs
    return (losses.mean(), *rest)


class _PrecomputedGradient(torch.autograd.Function):
    """Returns ``value``; its backward hands each of ``inputs`` the matching tensor of ``grads``
    (times the incoming gradient), so a meta-gradient computed ahead (by a compiled
    ``grad_and_value``, or task by task) reaches ``.grad`` through ordinary autograd, hooks and DDP
    included. Differentiable once: ``create_graph=True`` through it raises."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: tuple[Tensor, ...], *inputs: Tensor) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the gradient would be a constant
            raise RuntimeError(
                "this meta-loss was differentiated ahead (compiled, or task by task on the loop "
                "path) and supports one backward, not create_graph=True; for higher-order "
                "gradients use vectorize='vmap' without compile"
            )
        return (None, None, *(grad_output * g for g in ctx.grads))


def _needs_graph(params: Mapping[str, Tensor], batch: Sequence[Tensor]) -> bool:
    tensors = (*params.values(), *batch)
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def loop_meta_loss(
    task: TaskFn,
    params: Mapping[str, Tensor],
    constants: Mapping[str, Tensor],
    batch: tuple[Tensor, ...],
) -> tuple[Tensor, ...]:
    """The meta-loss task by task, each task's graph freed before the next task runs.

    Each task's loss is backpropagated at once into leaf stand-ins for the parameters and batch
    tensors that require grad, and the summed gradient reaches the real ones through the returned
    loss's backward: peak memory is one task's graph, as in a per-task clone/adapt/backward loop.
    """
    if not _needs_graph(params, batch):
        return mean_loss(run_tasks(task, False, params, constants, batch))
    n_tasks = len(batch[0])
    leaves = {name: p.detach().requires_grad_() for name, p in params.items() if p.requires_grad}
    stand_in = {**params, **leaves}
    batch_grads: list[list[Tensor]] = [[] for _ in batch]
    per_task = []
    for i in range(n_tasks):
        items = [t[i].detach().requires_grad_() if t.requires_grad else t[i] for t in batch]
        loss, *rest = task(False, stand_in, constants, *items)
        if loss.requires_grad:
            # .backward(), not autograd.grad: checkpointed inner steps support only this
            (loss / n_tasks).backward()
        per_task.append((loss.detach(), *rest))
        for grads, item, t in zip(batch_grads, items, batch):
            if t.requires_grad:
                grads.append(item.grad if item.grad is not None else torch.zeros_like(item))
    losses, *rest = (torch.stack(parts) for parts in zip(*per_task))
    inputs = [params[name] for name in leaves] + [t for t in batch if t.requires_grad]
    grads = [g.grad if g.grad is not None else torch.zeros_like(g) for g in leaves.values()]
    grads += [torch.stack(g) for g, t in zip(batch_grads, batch) if t.requires_grad]
    loss = _PrecomputedGradient.apply(losses.mean(), tuple(grads), *inputs)
    return (loss, *rest)


def compute_dtype(params: Mapping[str, Tensor], x: Tensor) -> torch.dtype:
    floating = [t.dtype for t in (*params.values(), x) if t.is_floating_point()]
    return floating[0] if floating else torch.get_default_dtype()


def _rng_devices(tensors: Sequence[Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def vmap_error(
    task: TaskFn,
    params: Mapping[str, Tensor],
    constants: Mapping[str, Tensor],
    batch: tuple[Tensor, ...],
) -> tuple[float, str]:
    """How far the vmapped tasks are from the same tasks run one by one: the largest relative
    difference (L2 norms) over query losses, predictions, initial losses and the meta-gradient,
    with what it was measured on. Both runs draw the same random numbers (vmap with
    ``randomness="same"``, the loop restarting every task from one RNG state), so dropout is
    compared too. ``inf`` if vmap raises; if the loop raises too, its error propagates: a data
    error is the user's, not vmap's. ``nan`` where the per-task run itself gives NaN or inf
    (non-finite data, a diverging inner loop): such a batch says nothing about vmap."""
    inputs = [p for p in params.values() if p.requires_grad] if torch.is_grad_enabled() else []
    tensors = [*params.values(), *batch]
    devices = _rng_devices(tensors)
    n_tasks = len(batch[0])

    def gradient(loss: Tensor) -> list[Tensor]:
        if not inputs or not loss.requires_grad:
            return []
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, inputs)]

    with torch.random.fork_rng(devices=devices):
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

        def restart_rng() -> None:
            torch.set_rng_state(cpu_state)
            for d, state in zip(devices, cuda_states):
                torch.cuda.set_rng_state(state, d)

        try:
            losses, *vmapped = run_tasks(task, True, params, constants, batch, "same")
            vmapped.append(gradient(losses.mean()))
        except Exception as error:  # noqa: BLE001 - decided below, by whether the loop runs
            vmapped, vmap_failure = None, error
        per_task, loop_grads = [], None
        for i in range(n_tasks):
            restart_rng()
            loss, *rest = task(False, params, constants, *(t[i] for t in batch))
            per_task.append(rest)
            grads = gradient(loss / n_tasks)
            loop_grads = grads if loop_grads is None else [a + b for a, b in zip(loop_grads, grads)]
    looped = [[torch.stack(parts)] for parts in zip(*per_task)] + [loop_grads or []]
    if not all(bool(torch.isfinite(t).all()) for ts in looped for t in ts):
        return math.nan, "the per-task run gave NaN or inf"
    if vmapped is None:
        return math.inf, f"vmap raised {type(vmap_failure).__name__}: {vmap_failure}"
    vmapped = [[t] for t in vmapped[:-1]] + [vmapped[-1]]
    worst, where = 0.0, "outputs"
    names = ("query losses", "query predictions", "initial query losses", "meta-gradient")
    for name, a, b in zip(names, vmapped, looped):
        if not b:
            continue
        a = torch.cat([t.detach().flatten().double() for t in a])
        b = torch.cat([t.detach().flatten().double() for t in b])
        error = (
            torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300)
        ).item()
        if not error <= worst:  # NaN counts as the worst
            worst, where = error, name
    return worst, f"relative difference {worst:.2e} in the {where}"


def _half_precision(params: Mapping[str, Tensor], x: Tensor) -> bool:
    # computing in a 16-bit dtype: the parameters' or data's, or autocast's on the data's device
    dtype = compute_dtype(params, x)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return torch.finfo(dtype).bits < 32


def _float32(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # 16-bit floating tensors as float32 leaves, requiring grad as they did
    return {
        n: t.detach().float().requires_grad_(t.requires_grad)
        if t.is_floating_point() and torch.finfo(t.dtype).bits < 32
        else t
        for n, t in tensors.items()
    }


def vmap_pays_off(net: nn.Module, device: torch.device, compiled: bool = False) -> bool:
    """Whether vmap can be expected to run ``net``'s tasks faster than a loop on ``device``.

    Not on a CPU, uncompiled, for a network with convolution layers: once the inner loop has
    adapted them, their weights differ per task and vmap runs them as grouped convolutions, which
    torch's CPU kernels compute more slowly than one convolution per task (second-order MAML on 2
    cores, against a per-task autograd loop: EEGNet 0.72x, an Omniglot-style CNN 0.55x under vmap
    and 0.97-0.98x as a loop; an MLP runs several times faster under vmap). Compiled, vmap wins
    again (EEGNet: 106 ms vmapped, 151 ms as a loop, 146 ms for the autograd loop).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> vmap_pays_off(nn.Conv1d(1, 1, 3), torch.device("cpu"))
        False
        >>> vmap_pays_off(nn.Linear(1, 1), torch.device("cpu"))
        True
    """
    if device.type != "cpu" or compiled:
        return True
    return not any(isinstance(m, nn.modules.conv._ConvNd) for m in net.modules())


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own (same body, closure and globals)."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


class Executor:
    """What one network's meta-losses remember between batches: for ``vectorize="auto"``, whether
    each setting runs under vmap (decided on its first batch), and the compiled meta-gradient of
    each compiled setting.

    A setting is everything that changes which operations run: algorithm (and its order),
    loss, whether the inner loop runs, whether a graph is needed, train/eval mode, dtype, device,
    compiled or not. Pickling or copying an executor (e.g. with its module, to DDP processes)
    starts it afresh.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_maml.functional import meta_loss
        >>> net, executor = nn.Linear(1, 1), Executor()
        >>> sx, sy, qx, qy = (torch.randn(2, 5, 1) for _ in range(4))
        >>> meta_loss(net, "mse", sx, sy, qx, qy, inner_lr=0.1, executor=executor).vectorized
        True
        >>> executor.uses_vmap("maml", "auto")
        True
    """

    def __init__(self) -> None:
        self.decisions: dict[tuple, bool] = {}
        self.compiled: dict[tuple, Callable] = {}
        #: the algorithm objects of the names meta-losses were called with
        self.algorithms: dict[str, Algorithm] = {}

    def __getstate__(self) -> dict:
        return {"decisions": {}, "compiled": {}, "algorithms": {}}

    def __deepcopy__(self, memo: dict) -> Executor:
        return Executor()

    def uses_vmap(self, algorithm: str, vectorize: str) -> bool:
        """Whether tasks of ``algorithm`` (a name) run under vmap with ``vectorize``, as far as is
        known before a batch: ``"vmap"`` always, ``"loop"`` never, ``"auto"`` unless a first batch
        of a setting of this algorithm ran the loop."""
        if vectorize == "auto":
            return all(ok for key, ok in self.decisions.items() if key[0] == algorithm)
        return vectorize == "vmap"

    def decide_vmap(
        self,
        net: nn.Module,
        key: tuple,
        task: TaskFn,
        params: Mapping[str, Tensor],
        constants: Mapping[str, Tensor],
        batch: tuple[Tensor, ...],
        compiled: bool,
    ) -> bool:
        """vectorize="auto": vmap for this setting if it pays off (:func:`vmap_pays_off`) and
        agreed with the per-task loop on its first batch with finite values (checked once, see
        :func:`vmap_error`; a batch whose per-task run gives NaN or inf runs in the loop and
        decides nothing), to ``sqrt(eps)`` of the dtype; runs in 16-bit dtypes or under autocast
        are compared in float32 without autocast. A disagreement warns once."""
        if key not in self.decisions and not vmap_pays_off(net, batch[0].device, compiled):
            self.decisions[key] = False
        if key not in self.decisions:
            device = batch[0].device.type
            if _half_precision(params, batch[0]):
                # 16-bit rounding differs between any two orders of summation by more than the
                # check could allow: the batching rules are compared in float32 instead
                params, constants = _float32(params), _float32(constants)
                batch = tuple(_float32(dict(enumerate(batch))).values())
            with (
                torch.autocast(device, enabled=False)
                if device in ("cpu", "cuda")
                else nullcontext()
            ):
                error, detail = vmap_error(task, params, constants, batch)
            if math.isnan(error):  # this batch cannot tell: the loop runs it, the next decides
                return False
            tolerance = math.sqrt(torch.finfo(compute_dtype(params, batch[0])).eps)
            self.decisions[key] = error <= tolerance
            if not self.decisions[key]:
                problem = (
                    f"failed on {type(net).__name__} ({detail})"
                    if math.isinf(error)
                    else f"does not reproduce the per-task computation on {type(net).__name__} "
                    f"({detail}, tolerance {tolerance:.1e})"
                )
                warnings.warn(
                    f"torch.func.vmap {problem}; running its tasks one by one for this setting. "
                    "Pass vectorize='loop' to silence this, or vectorize='vmap' to use vmap "
                    "regardless.",
                    stacklevel=4,
                )
        return self.decisions[key]

    def run_compiled(
        self,
        key: tuple,
        mode: str,
        task: TaskFn,
        vectorized: bool,
        params: dict[str, Tensor],
        constants: dict[str, Tensor],
        batch: tuple[Tensor, ...],
    ) -> tuple[Tensor, ...]:
        """(loss, query_losses, predictions, initial) of ``task`` over the batch, with ``loss``
        carrying the compiled meta-gradient. ``key`` holds every setting that shapes the graph."""
        compiled = self.compiled.get(key)
        if compiled is None:

            def objective(
                p: dict[str, Tensor], c: dict[str, Tensor], *episode: Tensor
            ) -> tuple[Tensor, tuple[Tensor, ...]]:
                loss, *rest = mean_loss(run_tasks(task, vectorized, p, c, episode))
                return loss, tuple(rest)

            def meta_gradient(
                p: dict[str, Tensor], c: dict[str, Tensor], *episode: Tensor
            ) -> tuple[dict[str, Tensor], tuple[Tensor, tuple[Tensor, ...]]]:
                return torch.func.grad_and_value(objective, has_aux=True)(p, c, *episode)

            # the whole meta-gradient (inner grads, adaptation, outer grad) is one forward graph
            # for the compiler; no backward runs through compiled code. Dynamo keeps its compiled
            # graphs per code object, at most torch._dynamo.config.recompile_limit (8) of them,
            # and runs the code eagerly past that: a code object per setting keeps every setting
            # compiled, however many a process uses.
            compiled = torch.compile(_own_code(meta_gradient), mode=mode, dynamic=False)
            self.compiled[key] = compiled
        names = list(params)
        detached = {name: params[name].detach() for name in names}
        grads, (loss, rest) = compiled(detached, constants, *batch)
        if mode in ("reduce-overhead", "max-autotune"):
            # CUDA-graph outputs live in memory the next replay overwrites: keep copies
            grads = {name: g.clone() for name, g in grads.items()}
            loss, rest = loss.clone(), tuple(t.clone() for t in rest)
        loss = _PrecomputedGradient.apply(
            loss, tuple(grads[name] for name in names), *(params[name] for name in names)
        )
        return (loss, *rest)


# meta_loss called without an executor: one per network, living as long as the network
_NETWORK_EXECUTORS: weakref.WeakKeyDictionary[nn.Module, Executor] = weakref.WeakKeyDictionary()


def executor_of(net: nn.Module) -> Executor:
    """The executor that :func:`~lightning_maml.functional.meta_loss` uses for ``net`` when none
    is given: created on first use, dropped with the network."""
    executor = _NETWORK_EXECUTORS.get(net)
    if executor is None:
        executor = _NETWORK_EXECUTORS[net] = Executor()
    return executor

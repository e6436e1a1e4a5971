"""Argument checks shared by the engine, the module and the data modules.

Private, and free of the engine: the data modules import it without importing torch.func code.
Each check names the argument, the value and what is allowed.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

VECTORIZE_MODES: tuple[str, ...] = ("auto", "vmap", "loop")
"""The values of ``vectorize``: decide per network and setting, always vmap, or task by task."""


def check_vectorize(value: object) -> str:
    """Return ``value`` if it is one of :data:`VECTORIZE_MODES`, else raise naming it."""
    if value not in VECTORIZE_MODES:
        raise ValueError(f"`vectorize` must be one of {VECTORIZE_MODES}, got {value!r}")
    return value  # type: ignore[return-value]


def check_inner_lr(value: object, name: str = "inner_lr", positive: bool = False) -> float:
    """Return ``value`` as a float, or raise naming ``name`` if it is not a finite real number
    (``positive=True``: a finite number > 0).

    Example::

        >>> check_inner_lr(0.0, positive=True)
        Traceback (most recent call last):
        ...
        ValueError: `inner_lr` must be a finite number > 0, got 0.0
    """
    allowed = "a finite number > 0" if positive else "a finite real number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {allowed}, got {value!r}")
    if not math.isfinite(float(value)) or (positive and value <= 0):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return float(value)


def check_inner_steps(value: object, name: str = "inner_steps") -> int:
    """Return ``value`` if it is an int >= 0, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}")
    return int(value)


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ``ValueError`` naming ``name``.

    Example::

        >>> check_count(0, "k_shot")
        Traceback (most recent call last):
        ...
        ValueError: `k_shot` must be an integer >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_episode(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> None:
    """Check that a batch of tasks is consistently shaped, naming the offending argument.

    Every tensor carries a leading task dimension ``T`` and then an example dimension: ``support_x``
    is ``[T, K, *features]``, ``support_y`` is ``[T, K, *targets]``, and the query set likewise with
    ``Q`` examples and the same feature and target shapes.
    """
    tensors = {
        "support_x": support_x,
        "support_y": support_y,
        "query_x": query_x,
        "query_y": query_y,
    }
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"`{name}` must have a leading task dimension and an example dimension "
                f"([tasks, examples, ...]), got shape {tuple(t.shape)}"
            )
    for name in ("support_x", "query_x"):
        t = tensors[name]
        if t.dim() == 2 and t.shape[1] == 1:
            raise ValueError(
                f"`{name}` has shape {tuple(t.shape)}: read as {t.shape[0]} tasks of one "
                "example each, with no feature dimension. A batch is [tasks, examples, "
                f"*features]: one task of {t.shape[0]} one-feature examples is shape "
                f"(1, {t.shape[0]}, 1) "
                f"(`{name}.unsqueeze(0)`), {t.shape[0]} tasks of one such example "
                f"(`{name}.unsqueeze(-1)`) shape ({t.shape[0]}, 1, 1)"
            )
    n_tasks = support_x.shape[0]
    for name, t in tensors.items():
        if t.shape[0] != n_tasks:
            raise ValueError(
                f"`{name}` has {t.shape[0]} tasks but `support_x` has {n_tasks}; every tensor of a "
                f"meta-batch needs the same leading task dimension"
            )
    if n_tasks < 1:
        raise ValueError("a meta-batch needs at least one task, got `support_x` with 0 tasks")
    for x, y in (("support_x", "support_y"), ("query_x", "query_y")):
        if tensors[x].shape[1] != tensors[y].shape[1]:
            raise ValueError(
                f"`{x}` has {tensors[x].shape[1]} examples per task but `{y}` has "
                f"{tensors[y].shape[1]}; they must match"
            )
    for name in ("support_x", "query_x"):
        if tensors[name].shape[1] < 1:
            raise ValueError(
                f"`{name}` needs at least one example per task, got {tensors[name].shape[1]}"
            )
    if support_x.shape[2:] != query_x.shape[2:]:
        raise ValueError(
            f"`support_x` examples have shape {tuple(support_x.shape[2:])} but `query_x` examples "
            f"have shape {tuple(query_x.shape[2:])}; they must match"
        )
    if support_y.shape[2:] != query_y.shape[2:]:
        raise ValueError(
            f"`support_y` targets have shape {tuple(support_y.shape[2:])} but `query_y` targets "
            f"have shape {tuple(query_y.shape[2:])}; they must match"
        )


COMPILE_MODES: tuple[str, ...] = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)
"""The :func:`torch.compile` modes that ``compile`` may name (``True`` is ``"default"``)."""


def nonfinite_rows(t: Tensor) -> list[int]:
    """The positions along the first dimension (trials, tasks) of ``t`` that hold NaN or inf;
    none for an integer tensor.

    Example::

        >>> nonfinite_rows(torch.tensor([[0.0, 1.0], [float("inf"), 2.0]]))
        [1]
    """
    if not (t.is_floating_point() or t.is_complex()):
        return []
    return (~torch.isfinite(t)).reshape(len(t), -1).any(1).nonzero().flatten().tolist()


def check_finite_trials(
    x: Tensor, y: Tensor, x_name: str = "support_x", y_name: str = "support_y"
) -> None:
    """Refuse NaN or inf in a task's trials ``x`` (``[K, ...]``) or float targets ``y``, naming
    the trials that hold them.

    Example::

        >>> x = torch.zeros(4, 2); x[2, 1] = float("nan")
        >>> check_finite_trials(x, torch.zeros(4))
        Traceback (most recent call last):
        ...
        ValueError: `support_x` holds NaN or inf in trials [2] (of 4): calibration trials must be finite
    """  # noqa: E501
    for name, t in ((x_name, x), (y_name, y)):
        bad = nonfinite_rows(t)
        if bad:
            raise ValueError(
                f"`{name}` holds NaN or inf in trials {bad} (of {len(t)}): calibration trials "
                "must be finite"
            )


def check_meta_optimizer(
    optimizer: object, meta_lr: object, optimizers_given: bool
) -> float | None:
    """The default Adam's learning rate from ``meta_lr`` (``None``: 1e-3), or ``None`` where
    ``optimizer`` (a callable ``params -> Optimizer``) or another module's optimizers
    (``optimizers_given``) replace it; refuses settings that contradict each other.

    Example::

        >>> check_meta_optimizer(None, None, False), check_meta_optimizer(None, 3e-3, False)
        (0.001, 0.003)
    """
    if optimizers_given:
        if optimizer is not None or meta_lr is not None:
            raise ValueError(
                "`optimizers_from` gives the optimizers; leave `optimizer` and `meta_lr` out"
            )
        return 1e-3 if meta_lr is None else None
    if optimizer is None:
        return 1e-3 if meta_lr is None else check_inner_lr(meta_lr, "meta_lr", positive=True)
    if not callable(optimizer):
        raise TypeError(f"`optimizer` must be a callable params -> Optimizer, got {optimizer!r}")
    if meta_lr is not None:
        raise ValueError(
            f"`meta_lr={meta_lr!r}` sets the learning rate of the default Adam, which "
            "`optimizer` replaces: set the learning rate in `optimizer` (in a config, "
            "model.optimizer.init_args.lr) or leave `optimizer` out"
        )
    return None


def check_compile(value: object, name: str = "compile") -> str | None:
    """The :func:`torch.compile` mode that ``compile`` asks for (``None``: no compilation).

    ``False`` means none, ``True`` the ``"default"`` mode; a string names a mode of
    :data:`COMPILE_MODES`."""
    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"`{name}` must be True, False or one of {COMPILE_MODES}, got {value!r}")


def check_checkpointing(checkpoint_inner_steps: object, vectorize: str, compile: object) -> bool:
    """Return ``checkpoint_inner_steps`` if it is a bool that can be used with these ``vectorize``
    and ``compile`` settings: checkpointed tasks run one by one and uncompiled."""
    if not isinstance(checkpoint_inner_steps, bool):
        raise TypeError(
            f"`checkpoint_inner_steps` must be True or False, got {checkpoint_inner_steps!r}"
        )
    if checkpoint_inner_steps and (vectorize == "vmap" or check_compile(compile)):
        setting = "vectorize='vmap'" if vectorize == "vmap" else f"compile={compile!r}"
        raise ValueError(
            f"`checkpoint_inner_steps=True` cannot be combined with {setting}: checkpointed "
            "tasks run one by one and uncompiled"
        )
    return checkpoint_inner_steps

"""What a checkpoint may name: loading one imports nothing new and builds only trusted objects.

A checkpoint's hyper-parameters are plain strings (``loss``, ``net``/``algorithm``/``optimizer``
``class_path``), so ``torch.load(weights_only=True)`` does not stop them from naming any module to
import and any class or function to call. Before a :class:`~lightning_maml.MAMLModule` is built
from one, every name in it must resolve, without importing anything outside this library, to

- this library's own losses, algorithms (:data:`~lightning_maml.functional.ALGORITHMS`) and
  models (:mod:`lightning_maml.models`), torch's functional losses, torch's optimizers and
  learning-rate schedulers;
- an object the user registered (:func:`~lightning_maml.functional.register_loss`,
  :func:`~lightning_maml.functional.register_algorithm`,
  :func:`~lightning_maml.models.register_network`);
- or be replaced by an object the caller passes (``load_from_checkpoint(path, net=...)``).

Anything else is refused before any import, naming the argument to pass. Private; the module and
the command line call :func:`check_checkpoint_names`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch

#: the library's own package: importing from it runs only this library's code
_OWN = "lightning_maml"


def _lookup(path: str) -> Any:
    """The object ``path`` names where that imports nothing new: a path inside this library
    (imported), or an attribute of a module already imported; ``None`` otherwise."""
    module, _, name = path.rpartition(".")
    if not module or not name.isidentifier():
        return None
    if module == _OWN or module.startswith(_OWN + "."):
        try:
            return getattr(importlib.import_module(module), name, None)
        except ImportError:
            return None
    loaded = sys.modules.get(module)
    return None if loaded is None else getattr(loaded, name, None)


def _is_torch_loss(obj: Any) -> bool:
    functional = torch.nn.functional
    return (
        callable(obj)
        and getattr(obj, "__module__", "") == functional.__name__
        and getattr(functional, getattr(obj, "__name__", ""), None) is obj
        and not getattr(obj, "__name__", "_").startswith("_")
    )


def _is_torch_class(obj: Any, base: type) -> bool:
    return (
        isinstance(obj, type) and issubclass(obj, base) and obj.__module__.startswith("torch.optim")
    )


def trusted(path: str, kind: str) -> bool:
    """Whether ``path`` (a checkpoint's string under the argument ``kind``: ``loss``, ``net``,
    ``algorithm``, ``optimizer``, or another) names a trusted object, importing nothing new.

    Example::

        >>> trusted("lightning_maml.models.MLP", "net"), trusted("os.system", "loss")
        (True, False)
        >>> trusted("mse", "loss"), trusted("torch.nn.functional.l1_loss", "loss")
        (True, True)
    """
    from lightning_maml.functional.algorithms.registry import _REGISTRY
    from lightning_maml.functional.losses import _LOSSES, _REGISTERED_LOSSES
    from lightning_maml.models import _NETWORKS

    if kind == "loss" and path in _LOSSES:
        return True
    if kind == "algorithm" and path in _REGISTRY:
        return True
    obj = _lookup(path)
    if obj is None:
        obj = {**_REGISTERED_LOSSES, **_NETWORKS}.get(path) or {
            f"{c.__module__}.{c.__qualname__}": c for c in _REGISTRY.values()
        }.get(path)
    if obj is None:
        return False
    losses = [*_LOSSES.values(), *_REGISTERED_LOSSES.values()]
    checks = {
        "loss": lambda: any(obj is f for f in losses) or _is_torch_loss(obj),
        "net": lambda: obj in _NETWORKS.values(),
        "algorithm": lambda: obj in _REGISTRY.values(),
        "optimizer": lambda: _is_torch_class(obj, torch.optim.Optimizer),
        "lr_scheduler": lambda: _is_torch_class(obj, torch.optim.lr_scheduler.LRScheduler),
    }
    if kind in checks:
        return bool(checks[kind]())
    return any(check() for check in checks.values())


def read_hyperparameters(
    checkpoint: Any, hparams_file: Any = None, weights_only: bool = True
) -> dict[str, Any]:
    """The hyper-parameters a checkpoint (a path or an open binary file, left where it was)
    gives, and those of ``hparams_file`` over them, read as data (``weights_only``, unless the
    caller trusts the whole file)."""
    if hasattr(checkpoint, "read"):
        position = checkpoint.tell()
        try:
            loaded = torch.load(checkpoint, map_location="cpu", weights_only=weights_only)
        finally:
            checkpoint.seek(position)
    else:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=weights_only)
    hparams = dict(loaded.get("hyper_parameters") or {}) if isinstance(loaded, Mapping) else {}
    if hparams_file is not None:
        from lightning.pytorch.core.saving import load_hparams_from_yaml

        hparams.update(load_hparams_from_yaml(str(hparams_file)) or {})
    return hparams


def _names(value: Any, key: str, top: bool = True) -> Iterator[tuple[str, str]]:
    """Every ``(argument, name)`` a hyper-parameter value holds: its class paths (nested ones
    too, which a config's instantiation would import) and, for ``loss`` and ``algorithm``, the
    value itself where it is a string (a name or an import path)."""
    if isinstance(value, Mapping):
        if "class_path" in value:
            yield key, str(value["class_path"])
        for inner_key, inner in value.items():
            if inner_key != "class_path":
                yield from _names(inner, key, top=False)
    elif isinstance(value, (list, tuple)):
        for inner in value:
            yield from _names(inner, key, top=False)
    elif isinstance(value, str) and top and key in ("loss", "algorithm"):
        yield key, value


def check_checkpoint_names(
    hparams: Mapping[str, Any],
    passed: Mapping[str, Any],
    replaces: bool = True,
    how_to_pass: str = "MAMLModule.load_from_checkpoint(path, {argument}=...)",
) -> None:
    """Refuse a checkpoint's hyper-parameters that name anything untrusted (see the module's
    docstring); nothing is imported to decide.

    ``passed``: the caller's own arguments. With ``replaces`` (``load_from_checkpoint``) a passed
    argument replaces the checkpoint's, which is then not looked at; without (the command line,
    where the checkpoint's values win) a name is trusted where the caller's own value for that
    argument names the same path.

    Raises:
        ValueError: naming the argument, the name and what to pass.

    Example::

        >>> check_checkpoint_names({"loss": "mse", "net": {"class_path": "lightning_maml.models.MLP"}}, {})
        >>> check_checkpoint_names({"loss": "evil.payload"}, {})
        Traceback (most recent call last):
        ...
        ValueError: the checkpoint's hyper-parameter `loss` names 'evil.payload', which is not ...
    """  # noqa: E501
    refused = []
    for key, value in hparams.items():
        if key.startswith("_"):  # Lightning vets its own (_instantiator, _class_path) itself
            continue
        if replaces and passed.get(key) is not None:
            continue
        for argument, name in _names(value, key):
            if not trusted(name, argument) and not _names_given(name, passed.get(argument)):
                refused.append((argument, name))
    if not refused:
        return
    argument, name = refused[0]
    others = f" (and {', '.join(f'`{a}` {n!r}' for a, n in refused[1:])})" if refused[1:] else ""
    raise ValueError(
        f"the checkpoint's hyper-parameter `{argument}` names {name!r}, which is not one of this "
        f"library's or torch's {argument} choices nor registered{others}: loading a checkpoint "
        "imports and calls nothing that it names outside those, so it was refused before any "
        "import. If you trust it, pass the object yourself, "
        + how_to_pass.format(argument=argument)
        + ", or register it first (lightning_maml.functional.register_loss, "
        "lightning_maml.functional.register_algorithm, lightning_maml.models.register_network)"
    )


def _names_given(name: str, given: Any) -> bool:
    """Whether the caller's own value for an argument (a string, or a config's
    ``{"class_path": ...}``) names ``name``."""
    return name in {n for _, n in _names(given, "loss")}

"""Algorithms by name: the registry, descriptions that rebuild an algorithm, and resolution."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_maml._imports import import_by_path
from lightning_maml.functional.algorithms.anil import ANIL
from lightning_maml.functional.algorithms.base import (
    Algorithm,
)
from lightning_maml.functional.algorithms.imaml import IMAML
from lightning_maml.functional.algorithms.maml import FOMAML, MAML
from lightning_maml.functional.algorithms.maml_plus_plus import MAMLPlusPlus
from lightning_maml.functional.algorithms.meta_sgd import MetaSGD
from lightning_maml.functional.algorithms.protomaml import ProtoMAML
from lightning_maml.functional.algorithms.reptile import Reptile

_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Make ``cls`` available by its ``name`` (``MAMLModule(algorithm=name)``); a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"only Algorithm subclasses can be registered, got {cls!r}")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (MAML, FOMAML, Reptile, ANIL, MetaSGD, MAMLPlusPlus, IMAML, ProtoMAML):
    register_algorithm(_cls)

ALGORITHMS: tuple[str, ...] = tuple(_REGISTRY)
"""The names ``algorithm=`` takes for the built-in algorithms (each with its default settings)."""


def describe_algorithm(algorithm: Algorithm) -> dict[str, Any]:
    """The class and arguments that rebuild ``algorithm`` with :func:`resolve_algorithm`, as
    LightningCLI writes them (``{"class_path": ..., "init_args": ...}``); its learned tensors
    are not included (they are state, saved with the module's ``state_dict``).

    Raises:
        TypeError: if the algorithm's class cannot be imported by its path or its arguments
            cannot be read (see :meth:`Algorithm.init_args`).

    Example::

        >>> describe_algorithm(ANIL(head=["fc.*"]))
        {'class_path': 'lightning_maml.functional.algorithms.ANIL', 'init_args': {'head': ['fc.*'], 'first_order': False}}
    """  # noqa: E501
    cls = type(algorithm)
    path = f"{cls.__module__}.{cls.__qualname__}"
    if "<" in path or import_by_path(path) is not cls:
        raise TypeError(f"{cls.__name__} cannot be imported as {path!r}")
    # the package's public name where it exports the class (stable when modules move)
    public = f"{cls.__module__.rpartition('.')[0]}.{cls.__qualname__}"
    if import_by_path(public) is cls:
        path = public
    return {"class_path": path, "init_args": algorithm.init_args()}


def resolve_algorithm(algorithm: str | Algorithm | Mapping[str, Any]) -> Algorithm:
    """An :class:`Algorithm` from a registered name (a new object with default settings), a
    description of :func:`describe_algorithm` (a new object with those settings), or the object
    itself.

    Example::

        >>> resolve_algorithm("fomaml").is_first_order(epoch=0)
        True
        >>> resolve_algorithm(describe_algorithm(ANIL(first_order=True))).first_order
        True
    """
    if isinstance(algorithm, Algorithm):
        return algorithm
    if isinstance(algorithm, str) and algorithm in _REGISTRY:
        return _REGISTRY[algorithm]()
    if isinstance(algorithm, Mapping) and set(algorithm) <= {"class_path", "init_args"}:
        cls = import_by_path(str(algorithm.get("class_path")))
        if isinstance(cls, type) and issubclass(cls, Algorithm):
            return cls(**dict(algorithm.get("init_args") or {}))
    raise ValueError(
        f"`algorithm` must be one of {tuple(_REGISTRY)}, an Algorithm object or a description "
        f"{{'class_path': <an Algorithm class>, 'init_args': {{...}}}}, got {algorithm!r}"
    )

"""Networks for the meta-learning problems shipped with lightning-maml."""

from torch import nn

from lightning_maml.models.eegnet import EEGNet
from lightning_maml.models.mlp import MLP

__all__ = ["EEGNet", "MLP", "register_network"]

#: network classes a checkpoint may name (by import path): this library's and registered ones
_NETWORKS: dict[str, type[nn.Module]] = {
    f"{cls.__module__}.{cls.__qualname__}": cls for cls in (EEGNet, MLP)
}


def register_network(cls: type[nn.Module]) -> type[nn.Module]:
    """Trust the network class ``cls`` to be named by checkpoints: a checkpoint of a network of
    this class that records its arguments then reloads without ``net=`` (loading never imports or
    builds a class a checkpoint names unless it is this library's or registered); a decorator.

    Example::

        >>> from torch import nn
        >>> @register_network
        ... class Tiny(nn.Linear):
        ...     pass
        >>> f"{Tiny.__module__}.{Tiny.__qualname__}" in _NETWORKS
        True
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"`cls` must be an nn.Module class, got {cls!r}")
    _NETWORKS[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls

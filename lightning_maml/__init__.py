"""lightning-maml: MAML-family meta-learning for PyTorch Lightning.

The names below are imported on first use, so that ``lightning_maml.datamodules`` (and the
argument checks it shares with the engine) can be imported without the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_maml.episode import Episode
    from lightning_maml.functional import meta_loss
    from lightning_maml.maml import MAML
    from lightning_maml.meta_sgd import MetaSGD
    from lightning_maml.module import MAMLModule

_HOMES = {
    "Episode": "lightning_maml.episode",
    "MAML": "lightning_maml.maml",
    "MAMLModule": "lightning_maml.module",
    "MetaSGD": "lightning_maml.meta_sgd",
    "meta_loss": "lightning_maml.functional",
}

__all__ = ["MAML", "Episode", "MAMLModule", "MetaSGD", "meta_loss"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_maml' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})

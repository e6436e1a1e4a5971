"""Objects named by their import path (``"package.module.Name"``), as checkpoints and configs
record classes and functions. Private, and free of the engine."""

from __future__ import annotations

import importlib
from typing import Any


def import_by_path(path: str) -> Any:
    """The object ``path`` names, or ``None`` where it cannot be imported.

    Example::

        >>> import_by_path("math.pi") > 3, import_by_path("math.nothing")
        (True, None)
    """
    module, _, name = path.rpartition(".")
    if not module:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None

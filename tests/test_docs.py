"""The API reference (docs/api/*.md, rendered by mkdocstrings) documents every public name."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API = Path(__file__).parents[1] / "docs" / "api"
PUBLIC_MODULES = [
    "lightning_maml",
    "lightning_maml.functional",
    "lightning_maml.callbacks",
    "lightning_maml.datamodules",
    "lightning_maml.models",
    "lightning_maml.study",
]


def _resolve(path: str) -> object:
    # the longest importable module prefix, then attributes
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(path)


def documented_objects() -> list[object]:
    """Every object an API page renders: each ``::: path`` and, for a module, the members its
    ``members:`` option lists (all of the module's public names where it lists none)."""
    objects = []
    for page in sorted(API.glob("*.md")):
        text = page.read_text()
        blocks = re.split(r"^::: ", text, flags=re.M)[1:]
        for block in blocks:
            path, _, options = block.partition("\n")
            obj = _resolve(path.strip())
            objects.append(obj)
            listed = re.search(r"members:\s*(\[[^\]]*\]|(?:\n\s+- \S+)+)", options)
            if listed is None:
                continue
            names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", listed.group(1))
            objects += [getattr(obj, name) for name in names]
    return objects


def test_every_api_page_entry_resolves():
    assert len(documented_objects()) > 40


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_is_in_the_api_reference(module):
    documented = documented_objects()
    mod = importlib.import_module(module)
    missing = [
        name for name in mod.__all__ if not any(getattr(mod, name) is obj for obj in documented)
    ]
    assert not missing, f"{module}: {missing} have no entry in docs/api/*.md"

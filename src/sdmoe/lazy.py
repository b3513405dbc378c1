"""Package attributes resolved on first use (PEP 562), so importing a package costs nothing until
a name is used: `sdmoe --help` and the torch-free config modules never import torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, table: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` that imports `table[name]` and returns its attribute `name`."""

    def __getattr__(name: str) -> object:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__

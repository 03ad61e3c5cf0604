"""Package attributes imported on first use (PEP 562), shared by `manifests` and `convert`.

A one-shot command then loads only the modules it runs, not every module its package exports: start-up is
part of every conversion's time (BENCHMARKS.md, "Converter").
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str],
                 public: list[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package`, whose names `exports` maps to their defining modules.

    The first access imports the defining module and stores the value in the package, so later accesses are
    plain attribute lookups.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__

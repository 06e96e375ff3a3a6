"""CFLOW-AD for anomalib: the ``CflowPlus`` model.

The names below load on first use, so that importing one module of the package (e.g. ``calibration``) loads neither
the Lightning module nor anomalib's models. Loading ``CflowPlus`` registers it with anomalib, for
``get_model({"class_path": "CflowPlus"})`` and YAML configs; the start-up hook loads it when ``anomalib.models`` is
imported first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .lightning_model import CflowPlus
    from .post_processor import CflowPlusPostProcessor
    from .torch_model import CflowPlusModel

__all__ = ["CflowPlus", "CflowPlusModel", "CflowPlusPostProcessor"]

_MODULES = {"CflowPlus": "lightning_model", "CflowPlusModel": "torch_model", "CflowPlusPostProcessor": "post_processor"}


def __getattr__(name: str) -> Any:
    """Load one of the package's public names from its module."""
    if name not in _MODULES:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    globals()[name] = value
    return value

"""Benchmark-only stand-in for torchvision, so that ``timm.models.vision_transformer`` imports.

timm imports torchvision at module level for its data pipeline (transforms, datasets) and for
FrozenBatchNorm2d; a ViT forward uses none of it, and torchvision is never installed in the
peers' venv (benchmarks/peers.py). Every name resolves to a placeholder class that raises when
used, so nothing can silently run stub code. This directory is on PYTHONPATH for peer runs only.
"""

from __future__ import annotations

import enum
from typing import Any, Callable


class InterpolationMode(enum.Enum):
    """The enum timm maps to strings at import time (torchvision.transforms.InterpolationMode)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def placeholder(module: str, name: str) -> type:
    """A class named ``name`` that refuses to be instantiated or called."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{module}.{name} is a benchmark stub: torchvision is not installed in the peers' venv")

    return type(name, (), {"__init__": refuse, "__call__": refuse, "__module__": module})


def module_getattr(module: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` handing out placeholders for every public name."""
    cache: dict[str, Any] = {}

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "InterpolationMode":
            return InterpolationMode
        if name not in cache:
            cache[name] = placeholder(module, name)
        return cache[name]

    return __getattr__

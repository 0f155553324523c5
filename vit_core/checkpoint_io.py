"""Compatibility module: the checkpoint layer now lives in :mod:`vit_core.checkpoint`.

Kept so that code written against earlier vitx versions keeps importing.
"""

from __future__ import annotations

import pathlib

import numpy as np

from .checkpoint import *  # noqa: F401,F403
from .checkpoint import __all__  # noqa: F401
from .checkpoint.files import read_raw
from .checkpoint.lazy import materialize


def read_raw_state_dict(path: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
    """One file in its own names, in memory, and its flavour (pt / tf / flax), as before."""
    raw, flavour = read_raw(pathlib.Path(path))
    return materialize(raw), flavour

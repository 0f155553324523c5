"""Compatibility module: the checkpoint layer now lives in :mod:`vit_core.checkpoint`.

Kept so that code written against earlier vitx versions keeps importing; it holds no logic.
"""

from .checkpoint import *  # noqa: F401,F403
from .checkpoint import __all__  # noqa: F401
from .checkpoint.files import read_raw as read_raw_state_dict  # noqa: F401

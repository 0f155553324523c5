"""Lazy tensors: shape and dtype known up front, data read on demand.

Every container reader returns a :data:`LazyState` (memory-mapped where the format allows), so a
conversion streams one tensor at a time; an eager read is :func:`materialize` of the lazy one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import CheckpointError


@dataclass(frozen=True)
class Lazy:
    """A tensor whose shape and dtype are known and whose data is produced by ``load()`` on demand.

    ``load`` returns a numpy array of exactly ``shape`` and ``dtype`` (it may be a read-only view
    of a memory-mapped file). ``source`` names where the data comes from, for error messages.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]
    source: str = ""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def materialize(self) -> np.ndarray:
        array = self.load()
        if tuple(array.shape) != self.shape or array.dtype != self.dtype:
            raise CheckpointError(f"{self.source or 'tensor'}: expected {self.shape} {self.dtype}, read "
                                  f"{tuple(array.shape)} {array.dtype}")
        return array


LazyState = dict[str, Lazy]


def lazy_from_array(array: np.ndarray, source: str = "") -> Lazy:
    """Wrap an array that is already in memory."""
    return Lazy(tuple(int(s) for s in array.shape), array.dtype, lambda: array, source)


def lazify(state: Mapping[str, np.ndarray]) -> LazyState:
    return {key: lazy_from_array(np.asarray(value), key) for key, value in state.items()}


def materialize(state: Mapping[str, Lazy]) -> dict[str, np.ndarray]:
    """Read every tensor into memory it owns (contiguous, writable, native byte order), so the
    result outlives the file."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        array = np.array(value.materialize())
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        out[key] = array
    return out

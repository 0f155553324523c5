"""Element types every container agrees on: numeric numpy dtypes only (never objects, strings,
structured or void records), with bfloat16 / float8 through ml_dtypes when it is installed.

Without ml_dtypes, bfloat16 data is read as its uint16 bits (:func:`by_name` gives ``<u2``,
:func:`is_bf16_bits` recognises it) and every reader hands it out widened to float32 exactly
(:func:`bf16_bits_to_float32`; bfloat16 is the top half of a float32).
"""

from __future__ import annotations

import numpy as np

from .errors import CheckpointError

# safetensors dtype codes -> numpy (little-endian); the ml_dtypes ones by name.
SAFETENSORS_NUMPY: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
    "BOOL": "?", "C64": "<c8",
}
SAFETENSORS_ML: dict[str, str] = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

# numpy kinds a weight may have: bool, signed / unsigned int, float, complex; ml_dtypes' floats
# report kind "V" and are recognised by name.
_NUMERIC_KINDS = frozenset("biufc")
ML_NAMES = frozenset(SAFETENSORS_ML.values())


def ml_dtype(name: str) -> np.dtype | None:
    """An ml_dtypes dtype (bfloat16, float8_*) if ml_dtypes is installed, else None."""
    try:
        import ml_dtypes  # small numpy extension (a jax dependency); optional here
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return np.dtype(getattr(ml_dtypes, name))


def bfloat16() -> np.dtype | None:
    return ml_dtype("bfloat16")


def is_bf16_bits(dtype: np.dtype) -> bool:
    """True for the stand-in used when bfloat16 data is read without ml_dtypes."""
    return dtype == np.dtype("<u2") and bfloat16() is None


def numeric(dtype: np.dtype, where: str) -> np.dtype:
    """``dtype`` if a weight may have it; CheckpointError naming ``where`` otherwise."""
    if dtype.name in ML_NAMES:
        return dtype
    if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise CheckpointError(f"{where}: dtype {dtype.str!r} is not a numeric tensor type (refused)")
    return dtype


def by_name(name: object, where: str) -> np.dtype:
    """A numeric dtype from its numpy name ("float32", "bfloat16", "<f4"); anything else is refused
    before numpy could build it (an "O" or a structured spec never reaches np.dtype)."""
    if not isinstance(name, str) or not name or len(name) > 32:
        raise CheckpointError(f"{where}: invalid dtype name {str(name)[:20]!r}")
    if name in ML_NAMES:
        dtype = ml_dtype(name)
        if dtype is None:
            if name == "bfloat16":
                return np.dtype("<u2")
            raise CheckpointError(f"{where}: dtype {name} needs the ml_dtypes package (pip install ml_dtypes)")
        return dtype
    if not name.replace("<", "").replace(">", "").replace("=", "").replace("|", "").isalnum():
        raise CheckpointError(f"{where}: invalid dtype name {name!r}")
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise CheckpointError(f"{where}: unknown dtype {name!r}") from None
    return numeric(dtype, where)


def from_safetensors(code: object, where: str) -> np.dtype:
    if isinstance(code, str) and code in SAFETENSORS_NUMPY:
        return np.dtype(SAFETENSORS_NUMPY[code])
    if isinstance(code, str) and code in SAFETENSORS_ML:
        return by_name(SAFETENSORS_ML[code], where)
    raise CheckpointError(f"{where}: unknown safetensors dtype {str(code)[:20]!r}")


def to_safetensors(dtype: np.dtype, where: str) -> str:
    for code, name in SAFETENSORS_ML.items():
        if dtype.name == name:
            return code
    for code, name in SAFETENSORS_NUMPY.items():
        if dtype.newbyteorder("<") == np.dtype(name):
            return code
    raise CheckpointError(f"{where}: dtype {dtype} cannot be stored in safetensors")


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def native(array: np.ndarray) -> np.ndarray:
    """The array in native byte order (a copy only when it was not)."""
    if not array.dtype.isnative:
        return array.astype(array.dtype.newbyteorder("="))
    return array


def little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and np.little_endian is False):
        return array.astype(array.dtype.newbyteorder("<"))
    return array

"""Construction and call options that every framework reads the same way.

The attention implementations, the output flags (``output_attentions`` and friends, from the call
or the config) and the spelling of dtype names. Each framework's model classes import these, so
the accepted values and the error messages are one list, not three.
"""

from __future__ import annotations

from typing import Any

from .config import ViTConfig

# "sdpa" (transformers' PyTorch name) and "fused" (vitx's TF / Flax name before 0.2) are the same
# fused path: no attention probabilities for the caller. "eager" writes the attention out.
ATTN_IMPLEMENTATIONS = ("sdpa", "fused", "eager")
_CANONICAL_ATTN = {"sdpa": "sdpa", "fused": "sdpa", "eager": "eager"}

# The compute / storage dtypes the models support, by every name the frameworks accepted before.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
# framework prefixes of a dtype's string form ("torch.float16", "tf.bfloat16", "jnp.float32")
_DTYPE_PREFIXES = ("torch.", "tf.", "keras.", "jnp.", "jax.numpy.", "np.", "numpy.")


def resolve_attn_implementation(attn_implementation: str | None) -> str:
    """The canonical name of an attention implementation: "sdpa" (the fused path, also the default
    for None and the meaning of "fused") or "eager". ValueError listing the choices otherwise."""
    if attn_implementation is None:
        return "sdpa"
    if not isinstance(attn_implementation, str) or attn_implementation not in _CANONICAL_ATTN:
        raise ValueError(f"attn_implementation={attn_implementation!r} is not supported; "
                         f"choose one of {ATTN_IMPLEMENTATIONS}")
    return _CANONICAL_ATTN[attn_implementation]


def flag(value: Any, config: ViTConfig, name: str, default: bool) -> bool:
    """An output flag (``output_attentions``, ``output_hidden_states``, ``return_dict``): the call's
    value, else the config's (transformers' config fields are kept in ``config.extra``), else
    ``default``. A config value must be a bool: a JSON string such as "false" is a ValueError,
    never read as True."""
    if value is not None:
        return bool(value)
    value = config.extra.get(name, default)
    if not isinstance(value, bool):
        raise ValueError(f"ViTConfig.{name} must be true or false, got {value!r}")
    return value


def dtype_name(dtype: str) -> str:
    """"float32", "bfloat16" or "float16" from a dtype's name: "bfloat16", "bf16", "half",
    "torch.float16", "tf.bfloat16"... ValueError naming the supported dtypes otherwise."""
    name = dtype
    for prefix in _DTYPE_PREFIXES:
        name = name.removeprefix(prefix)
    if name not in _DTYPE_ALIASES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {DTYPE_NAMES}")
    return _DTYPE_ALIASES[name]

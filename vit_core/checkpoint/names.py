"""transformers' own spellings of the canonical names, declared as reversible rules.

Canonical names are transformers 4.x PyTorch's (docs/FORMATS.md section 1). The other spellings a
transformers checkpoint can use are lists of rules for the rule engine (``rules.py``), applied
forward to read and backward to write:

- :data:`NEW_NAME_RULES`: transformers 5.9+ PyTorch names (section 2);
- :data:`TF_RULES`: transformers 4.x TensorFlow names and layouts (section 3);
- :data:`FLAX_RULES`: transformers 4.x Flax parameter paths and layouts (section 4).

A tensor's layout follows the *kind* its canonical name has in the weight table
(``vit_core.weights``): linear weights are Dense kernels (in, out), the conv weights HWIO, norm
weights ``gamma`` / ``scale`` and their biases ``beta`` (TF). Nothing is decided by a tensor's rank.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ViTConfig
from ..weights import weight_table
from .errors import CheckpointError
from .lazy import Lazy, LazyState, lazy_from_array
from .rules import Dims, Op, Rule, Sub, Transpose, apply_backward, apply_forward

# ---------------------------------------------------------------------------------------------
# Kinds, from the weight table
# ---------------------------------------------------------------------------------------------

_LAYER = re.compile(r"(^|\.)encoder\.layer\.\d+\.")


@functools.lru_cache(maxsize=1)
def _kinds() -> dict[str, str]:
    """Canonical name (without ``vit.``, layer index 0) -> kind, for every weight any ViT has."""
    config = ViTConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8,
                       image_size=8, patch_size=4, encoder_stride=4, num_labels=2)
    table = (weight_table(config, "base", add_pooling_layer=True, use_mask_token=True)
             + weight_table(config, "classification") + weight_table(config, "mim"))
    return {_generic(spec.name): spec.kind for spec in table}


def _generic(key: str) -> str:
    key = key[len("vit."):] if key.startswith("vit.") else key
    return _LAYER.sub(r"\1encoder.layer.0.", key)


def kind_of(key: str) -> str | None:
    """The weight table's kind of a canonical key ("linear", "conv", "norm", ...), None if no ViT has it."""
    return _kinds().get(_generic(key))


def module_kind(module: str) -> str | None:
    """The kind of a module's ``weight`` (so a norm's bias can be told from a linear's)."""
    return kind_of(f"{module}.weight")


# ---------------------------------------------------------------------------------------------
# Rules that need the whole state
# ---------------------------------------------------------------------------------------------

_LAYOUTS: dict[str, Op] = {"linear": Transpose((1, 0)), "conv": Transpose((3, 2, 0, 1))}


def _through(lazy: Lazy, op: Op, forward: bool, key: str) -> Lazy:
    shape = op.forward_shape(lazy.shape, {}) if forward else op.backward_shape(lazy.shape, {})
    fn = (lambda a: op.forward(a, {})) if forward else (lambda a: op.backward(a, {}, key))
    return Lazy(shape, lazy.dtype, lambda: fn(lazy.materialize()), key)


@dataclass(frozen=True)
class Leaves(Rule):
    """Framework leaf names and layouts by kind: linear / conv weights are ``kernel`` in the
    framework layout, norm weights ``norm_weight`` and their biases ``norm_bias``. Keys of modules
    no ViT has pass through unchanged (the strict fit then reports them)."""

    norm_weight: str
    norm_bias: str

    def forward(self, state: LazyState, dims: Dims) -> LazyState:
        out: LazyState = {}
        for key, lazy in state.items():
            module, _, leaf = key.rpartition(".")
            kind = module_kind(module)
            new = key
            if leaf == "kernel" and kind in _LAYOUTS:
                try:
                    lazy = _through(lazy, _LAYOUTS[kind], True, key)
                except CheckpointError as e:
                    raise CheckpointError(f"{key}: {e}") from None
                new = f"{module}.weight"
            elif kind == "norm" and leaf == self.norm_weight:
                new = f"{module}.weight"
            elif kind == "norm" and leaf == self.norm_bias:
                new = f"{module}.bias"
            out[new] = lazy
        return out

    def backward(self, state: LazyState, dims: Dims) -> LazyState:
        out: LazyState = {}
        for key, lazy in state.items():
            module, _, leaf = key.rpartition(".")
            kind = module_kind(module)
            new = key
            if leaf == "weight" and kind in _LAYOUTS:
                lazy = _through(lazy, _LAYOUTS[kind], False, key)
                new = f"{module}.kernel"
            elif kind == "norm":
                new = f"{module}.{self.norm_weight if leaf == 'weight' else self.norm_bias}"
            out[new] = lazy
        return out


# First components a transformers TF weight name can have once the Keras model name is gone:
# anything else in first position is the model name ("tf_vi_t_model", ...).
_TF_ROOTS = frozenset({"vit", "classifier", "decoder", "embeddings", "encoder", "layernorm", "pooler"})


def strip_tf_model_name(name: str) -> str:
    """Drop the Keras model name ("tf_vi_t_model/...") when the name starts with one."""
    first, _, rest = name.partition("/")
    if rest and re.sub(r"_\._\d+$", "", first) not in _TF_ROOTS:
        return rest
    return name


def tf_model_name(keys: Any) -> str:
    """The Keras name transformers gives the TF class holding these (file-side) keys."""
    firsts = {k.split("/", 1)[0] for k in keys}
    if any(f.startswith("decoder") for f in firsts):
        return "tf_vi_t_for_masked_image_modeling"
    if "classifier" in firsts:
        return "tf_vi_t_for_image_classification"
    return "tf_vi_t_model"


@dataclass(frozen=True)
class TFModelName(Rule):
    """The Keras model-name component: dropped when reading, the class's name when writing."""

    def forward(self, state: LazyState, dims: Dims) -> LazyState:
        return _renamed(state, strip_tf_model_name)

    def backward(self, state: LazyState, dims: Dims) -> LazyState:
        name = tf_model_name(state)
        return {f"{name}/{k}": v for k, v in state.items()}


@dataclass(frozen=True)
class TFBaseModelLevel(Rule):
    """transformers' TFViTModel keeps its whole backbone (pooler included) under the main layer
    ``vit``; PyTorch's ViTModel has no prefix. A state with nothing outside ``vit.`` is a base model."""

    def forward(self, state: LazyState, dims: Dims) -> LazyState:
        if state and all(k.startswith("vit.") for k in state):
            return {k[len("vit."):]: v for k, v in state.items()}
        return dict(state)

    def backward(self, state: LazyState, dims: Dims) -> LazyState:
        if any(k.startswith("vit.") for k in state):
            return dict(state)
        return {f"vit.{k}": v for k, v in state.items()}


_QKV_WEIGHT = re.compile(r"\.attention\.attention\.(query|key|value)\.weight$")


@dataclass(frozen=True)
class TFZeroQKVBias(Rule):
    """transformers' TF self-attention always has q/k/v biases: writing a ``qkv_bias=False`` model
    adds zero biases (which change no output); reading keeps them (the fit drops them again when the
    config says qkv_bias=False, see ``fit.drop_unused_qkv_bias``)."""

    def forward(self, state: LazyState, dims: Dims) -> LazyState:
        return dict(state)

    def backward(self, state: LazyState, dims: Dims) -> LazyState:
        out: LazyState = {}
        for key, lazy in state.items():
            out[key] = lazy
            bias = key[: -len("weight")] + "bias"
            if _QKV_WEIGHT.search(key) and bias not in state:
                out[bias] = lazy_from_array(np.zeros(lazy.shape[0], dtype=lazy.dtype), bias)
        return out


@dataclass(frozen=True)
class ParamsLevel(Rule):
    """A Flax variables dict (``{"params": {...}}``) instead of bare params: the level is dropped."""

    def forward(self, state: LazyState, dims: Dims) -> LazyState:
        if state and all(k.startswith("params/") for k in state):
            return {k[len("params/"):]: v for k, v in state.items()}
        return dict(state)

    def backward(self, state: LazyState, dims: Dims) -> LazyState:
        return dict(state)


def _renamed(state: Mapping[str, Any], fn: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = fn(key)
        if new in out:
            raise CheckpointError(f"two weights map to the key {new!r} (second: {key!r})")
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------------
# The declared rule lists (forward = toward canonical)
# ---------------------------------------------------------------------------------------------

# docs/FORMATS.md section 2 lists the 5.9+ renames from canonical "in that order"; backward runs these
# rules in reverse, so they are listed here as their inverses, last first. Every pattern matches
# one spelling only, so 4.x names pass through unchanged.
NEW_NAME_RULES: tuple[Rule, ...] = (
    Sub((r"\.mlp\.fc2\.", ".output.dense."), (r"\.output\.dense\.", ".mlp.fc2.")),
    Sub((r"\.mlp\.fc1\.", ".intermediate.dense."), (r"\.intermediate\.dense\.", ".mlp.fc1.")),
    Sub((r"\.attention\.o_proj\.", ".attention.output.dense."), (r"\.attention\.output\.dense\.", ".attention.o_proj.")),
    Sub((r"\.attention\.v_proj\.", ".attention.attention.value."), (r"\.attention\.attention\.value\.", ".attention.v_proj.")),
    Sub((r"\.attention\.k_proj\.", ".attention.attention.key."), (r"\.attention\.attention\.key\.", ".attention.k_proj.")),
    Sub((r"\.attention\.q_proj\.", ".attention.attention.query."), (r"\.attention\.attention\.query\.", ".attention.q_proj.")),
    Sub((r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."), (r"(^|\.)encoder\.layer\.(\d+)\.", r"\1layers.\2.")),
)

# docs/FORMATS.md section 3: "<model name>/vit/encoder/layer_._{i}/attention/attention/query/kernel:0".
TF_RULES: tuple[Rule, ...] = (
    TFModelName(),
    Sub((r":\d+$", ""), (r"$", ":0")),
    Sub((r"_\._", "."), (r"/(\d+)(?=/|$)", r"_._\1")),
    Sub((r"/", "."), (r"\.", "/")),
    Leaves(norm_weight="gamma", norm_bias="beta"),
    TFBaseModelLevel(),
    TFZeroQKVBias(),
)

# docs/FORMATS.md section 4: '/'-joined parameter paths, Dense / Conv "kernel", LayerNorm "scale".
FLAX_RULES: tuple[Rule, ...] = (
    ParamsLevel(),
    Sub((r"/", "."), (r"\.", "/")),
    Leaves(norm_weight="scale", norm_bias="bias"),
)

FLAVOUR_RULES: dict[str, tuple[Rule, ...]] = {"pt": (), "tf": TF_RULES, "flax": FLAX_RULES}


def to_canonical(state: LazyState, flavour: str) -> LazyState:
    """A state in a transformers file's own names (pt / tf / flax) -> canonical 4.x names."""
    state = apply_forward(FLAVOUR_RULES[flavour], state, {})
    return apply_forward(NEW_NAME_RULES, state, {})


def from_canonical(state: LazyState, flavour: str) -> LazyState:
    """Canonical names -> the names and layouts a transformers file of ``flavour`` holds."""
    return apply_backward(FLAVOUR_RULES[flavour], dict(state), {})


def to_new_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename canonical 4.x keys to transformers 5.9+ names; values untouched."""
    return apply_backward(NEW_NAME_RULES, dict(state), {})


def to_legacy_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename transformers 5.9+ keys to the canonical 4.x names (4.x keys pass through).

    Raises CheckpointError if two keys collide (a file that mixes both spellings of one weight).
    """
    return apply_forward(NEW_NAME_RULES, dict(state), {})

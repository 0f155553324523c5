"""Original Google JAX ViT checkpoints (docs/FORMATS.md section 6): ``ViT-B_16.npz``, AugReg files.

A flat npz with '/'-joined Flax parameter paths, kernels in (in, out) order, attention kernels
split by head ((D, H, hd) and (H, hd, D)). Two numberings of the block's sub-modules exist:
pre-Linen files count every sub-module of a block (``LayerNorm_0``,
``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``), Linen-era files count per
class (``LayerNorm_0``, ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``) and
may prefix everything with ``opt/target/`` (an optimizer state's target). These models use
LayerNorm eps 1e-6 and the tanh GELU (Flax's ``nn.gelu`` default), i.e. ``gelu_new``.

Heads (decisions, also in the notes of each load):

- ``pre_logits`` (the in21k "representation layer", Dense + tanh on the CLS token) is exactly
  transformers' ViTModel pooler (``pooler_act="tanh"``): such files load as ``ViTModel`` with a
  pooler, as transformers' own conversion script does.
- A head whose kernel and bias are all zeros (raw in21k files) carries nothing: it is dropped and
  its label count kept in the provenance record, so writing the npz back restores it bitwise.
- A non-zero head without ``pre_logits`` is ``ViTForImageClassification``'s classifier.
- A non-zero head *with* ``pre_logits`` has no transformers class (the classifier would read the
  pooler output): the state is ViTModel + pooler, plus ``classifier.*`` kept beside it (unused by
  ViTModel, written back to the npz); the notes say so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vit_core.checkpoint import CheckpointError
from vit_core.checkpoint.lazy import Lazy, LazyState, lazy_from_array
from vit_core.checkpoint.rules import (
    Rename,
    Renames,
    Reshape,
    Rule,
    Transpose,
    apply_backward,
    apply_forward,
    dims_of,
    strip_task_prefix,
    task_prefix,
)

from .base import PROVENANCE_KEY, Loaded, check_against_table, derive_config, drop_keys, numerics_note, provenance

NAME = "jax"
LAYER_NORM_EPS = 1e-6
HIDDEN_ACT = "gelu_new"

NUMBERINGS: dict[str, tuple[str, str, str, str]] = {
    # (norm before attention, attention, norm after attention, MLP)
    "pre-linen": ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
    "linen": ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
}
PREFIXES = ("", "opt/target/")

LINEAR = (Transpose((1, 0)),)            # Dense kernel (in, out) -> Linear weight (out, in)
CONV = (Transpose((3, 2, 0, 1)),)        # HWIO -> OIHW
QKV_KERNEL = (Reshape(("D", "H", "hd"), ("D", "D")), Transpose((1, 0)))
QKV_BIAS = (Reshape(("H", "hd"), ("D",)),)
OUT_KERNEL = (Reshape(("H", "hd", "D"), ("D", "D")), Transpose((1, 0)))


def block_renames(block: str, numbering: str) -> list[Rename]:
    """Renames of one encoder block; ``block`` is the block's path template with ``{i}``."""
    ln0, mha, ln1, mlp = NUMBERINGS[numbering]
    layer = "encoder.layer.{i}."
    renames = [
        Rename(f"{block}/{ln0}/scale", layer + "layernorm_before.weight"),
        Rename(f"{block}/{ln0}/bias", layer + "layernorm_before.bias"),
        Rename(f"{block}/{ln1}/scale", layer + "layernorm_after.weight"),
        Rename(f"{block}/{ln1}/bias", layer + "layernorm_after.bias"),
        Rename(f"{block}/{mha}/out/kernel", layer + "attention.output.dense.weight", OUT_KERNEL),
        Rename(f"{block}/{mha}/out/bias", layer + "attention.output.dense.bias"),
        Rename(f"{block}/{mlp}/Dense_0/kernel", layer + "intermediate.dense.weight", LINEAR),
        Rename(f"{block}/{mlp}/Dense_0/bias", layer + "intermediate.dense.bias"),
        Rename(f"{block}/{mlp}/Dense_1/kernel", layer + "output.dense.weight", LINEAR),
        Rename(f"{block}/{mlp}/Dense_1/bias", layer + "output.dense.bias"),
    ]
    for name in ("query", "key", "value"):
        renames += [
            Rename(f"{block}/{mha}/{name}/kernel", layer + f"attention.attention.{name}.weight", QKV_KERNEL),
            Rename(f"{block}/{mha}/{name}/bias", layer + f"attention.attention.{name}.bias", QKV_BIAS),
        ]
    return renames


def stem_and_head_renames(prefix: str) -> list[Rename]:
    """Patch embedding, CLS token, final norm, pre_logits and head (the same in both numberings)."""
    return [
        Rename(f"{prefix}embedding/kernel", "embeddings.patch_embeddings.projection.weight", CONV),
        Rename(f"{prefix}embedding/bias", "embeddings.patch_embeddings.projection.bias"),
        Rename(f"{prefix}cls", "embeddings.cls_token"),
        Rename(f"{prefix}Transformer/encoder_norm/scale", "layernorm.weight"),
        Rename(f"{prefix}Transformer/encoder_norm/bias", "layernorm.bias"),
        Rename(f"{prefix}pre_logits/kernel", "pooler.dense.weight", LINEAR),
        Rename(f"{prefix}pre_logits/bias", "pooler.dense.bias"),
        Rename(f"{prefix}head/kernel", "classifier.weight", LINEAR),
        Rename(f"{prefix}head/bias", "classifier.bias"),
    ]


def rules(layout: dict[str, Any]) -> list[Rule]:
    prefix, numbering = layout["prefix"], layout["numbering"]
    renames = stem_and_head_renames(prefix) + block_renames(f"{prefix}Transformer/encoderblock_{{i}}", numbering)
    renames.append(Rename(f"{prefix}Transformer/posembed_input/pos_embedding", "embeddings.position_embeddings"))
    return [Renames(renames, what="JAX npz")]


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


def detect(keys: set[str]) -> dict[str, Any] | None:
    """The layout (prefix, numbering) of an original JAX ViT npz, or None if it is not one."""
    for prefix in PREFIXES:
        if f"{prefix}embedding/kernel" in keys and f"{prefix}Transformer/posembed_input/pos_embedding" in keys:
            numbering = ("pre-linen" if any(k.startswith(f"{prefix}Transformer/encoderblock_0/MultiHeadDotProductAttention_1/")
                                            for k in keys) else "linen")
            return {"prefix": prefix, "numbering": numbering}
    return None


def refuse_unsupported(keys: set[str], prefix: str, where: str) -> None:
    """Variants of the Google ViT code that transformers' ViT cannot express."""
    features = []
    if any(k.startswith(f"{prefix}MAPHead_0/") for k in keys):
        features.append("MAP pooling head (MAPHead_0, attention pooling instead of the CLS token)")
    if f"{prefix}cls" not in keys:
        features.append("no class token (global average pooling, classifier='gap')")
    if any(k.startswith((f"{prefix}conv_root/", f"{prefix}block1/")) for k in keys):
        features.append("hybrid ResNet stem (R50+ViT)")
    if features:
        raise CheckpointError(f"{where}: unsupported ViT variant: {'; '.join(features)}. "
                              "transformers' ViT (and so vitx) has no equivalent")


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


def is_all_zero(lazy: Lazy) -> bool:
    return not np.any(lazy.materialize())


def drop_zero_head(raw: LazyState, prefix: str, notes: list[str]) -> tuple[LazyState, int | None]:
    """Raw in21k files carry an all-zero head: drop it (its label count is returned for write-back)."""
    kernel, bias = f"{prefix}head/kernel", f"{prefix}head/bias"
    if kernel in raw and bias in raw and is_all_zero(raw[kernel]) and is_all_zero(raw[bias]):
        labels = raw[kernel].shape[-1]
        notes.append(f"the head ({labels} labels) is all zeros, as in raw in21k files: dropped, the model is the "
                     "backbone" + (" with its pre_logits as pooler" if f"{prefix}pre_logits/kernel" in raw else ""))
        return {k: v for k, v in raw.items() if k not in (kernel, bias)}, labels
    return raw, None


def add_zero_head(state: LazyState, labels: int, hidden: int, dtype: np.dtype) -> LazyState:
    """The inverse of :func:`drop_zero_head`, in canonical names."""
    state = dict(state)
    state["classifier.weight"] = lazy_from_array(np.zeros((labels, hidden), dtype=dtype), "zero head")
    state["classifier.bias"] = lazy_from_array(np.zeros((labels,), dtype=dtype), "zero head")
    return state


def head_notes(state: LazyState, notes: list[str]) -> tuple[str, ...]:
    """Say what the heads became; returns key patterns allowed beside the canonical table."""
    if "pooler.dense.weight" in state:
        notes.append("pre_logits (Dense + tanh on the CLS token) -> ViTModel pooler (pooler_act='tanh')")
        if "classifier.weight" in state:
            notes.append("this file has both pre_logits and a trained head: no transformers class applies a head "
                         "after the pooler, so it loads as ViTModel (pooler_output = pre_logits); the head is kept "
                         "as classifier.* beside it (logits = classifier(pooler_output)) and written back to npz")
            return (r"^classifier\.",)
    return ()


# ---------------------------------------------------------------------------------------------
# Read / write
# ---------------------------------------------------------------------------------------------


def heads_of(raw: LazyState, block0: str) -> int:
    for key, lazy in raw.items():
        if key.startswith(block0) and key.endswith("/query/kernel"):
            if len(lazy.shape) != 3:
                raise CheckpointError(f"{key}: expected (D, heads, head_dim), got {lazy.shape}")
            return lazy.shape[1]
    raise CheckpointError(f"no {block0}.../query/kernel: cannot tell the number of heads")


def read(raw: LazyState, layout: dict[str, Any], where: str) -> Loaded:
    keys = set(raw)
    prefix = layout["prefix"]
    refuse_unsupported(keys, prefix, where)
    notes: list[str] = []
    raw, zero_head = drop_zero_head(raw, prefix, notes)
    _, mha, _, _ = NUMBERINGS[layout["numbering"]]
    heads = heads_of(raw, f"{prefix}Transformer/encoderblock_0/{mha}/")
    hidden = raw[f"{prefix}cls"].shape[-1]
    dims = {"D": hidden, "H": heads, "hd": hidden // heads}
    state = task_prefix(apply_forward(rules(layout), raw, dims))
    extra_ok = head_notes(state, notes)
    record = {"format": NAME, **layout, "zero_head": zero_head}
    config = derive_config(state, heads=heads, where=where, layer_norm_eps=LAYER_NORM_EPS, hidden_act=HIDDEN_ACT,
                           pooler_act="tanh", **{PROVENANCE_KEY: record})
    check_against_table(state, config, where, extra_ok=extra_ok)
    notes.append(f"numerics of the JAX ViT: layer_norm_eps={LAYER_NORM_EPS:g}, hidden_act={HIDDEN_ACT!r} (tanh GELU)")
    return Loaded(NAME, state, config, notes, where)


def default_layout() -> dict[str, Any]:
    """What ``convert(..., to="jax")`` writes for a checkpoint that did not come from an npz: the
    layout of the published ViT-B_16.npz files."""
    return {"prefix": "", "numbering": "pre-linen", "zero_head": None}


def write(state: LazyState, config: Any, notes: list[str]) -> LazyState:
    """Canonical state -> npz keys and layouts (the inverse of :func:`read`)."""
    layout = provenance(config, NAME) or default_layout()
    state = strip_task_prefix(state)
    state = drop_keys(state, (r"^embeddings\.mask_token$", r"^decoder\."), "the JAX ViT has no masked-image-modeling "
                      "head", notes)
    if layout.get("zero_head") and "classifier.weight" not in state:
        ref = state["embeddings.cls_token"]
        state = add_zero_head(state, int(layout["zero_head"]), ref.shape[-1], ref.dtype)
    notes += numerics_note(config, "the JAX ViT", LAYER_NORM_EPS, "the tanh GELU (gelu_new)",
                           ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"))
    return apply_backward(rules(layout), state, dims_of(config))

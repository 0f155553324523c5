"""big_vision ViT checkpoints (docs/FORMATS.md section 7).

Like the original JAX files with the Linen numbering, under a ``params/`` prefix (``params/img/``
for the image tower of two-tower models such as LiT / SigLIP; the other towers are ignored, and
the notes say so). Differences that matter:

- ``pos_embedding`` is top level, shape (1, N, D), with no CLS row, and big_vision concatenates
  the CLS token *after* adding it. The canonical table gets a zero CLS row: cls + 0 == cls, so the
  outputs are bitwise those of big_vision's order. Writing back refuses a non-zero CLS row.
- With ``scan=True`` the blocks are one ``Transformer/encoderblock/...`` tree whose arrays have a
  leading depth axis; they are unstacked per layer (and stacked again on writing).
- ``MAPHead_0`` (MAP attention pooling, big_vision's ``pool_type="map"``) and ``pool_type="gap"``
  (no ``cls``) have no ViT equivalent: refused.
- Numerics: Flax LayerNorm eps 1e-6 and ``nn.gelu`` (tanh form): ``gelu_new``.
"""

from __future__ import annotations

from typing import Any

from vit_core.checkpoint import CheckpointError
from vit_core.checkpoint.lazy import LazyState
from vit_core.checkpoint.rules import (
    Rename,
    Renames,
    Rule,
    Stack,
    ZeroClsRow,
    apply_backward,
    apply_forward,
    dims_of,
    strip_task_prefix,
    task_prefix,
)

from . import jax_npz
from .base import PROVENANCE_KEY, Loaded, check_against_table, derive_config, drop_keys, numerics_note, provenance

NAME = "big_vision"
LAYER_NORM_EPS = 1e-6
HIDDEN_ACT = "gelu_new"
PREFIXES = ("params/", "params/img/", "")

_CLS_ROW_WHY = ("big_vision adds position embeddings before concatenating the CLS token, so it has no CLS "
                "position row; fold it into cls_token (cls + row) first")


def rules(layout: dict[str, Any]) -> list[Rule]:
    prefix = layout["prefix"]
    renames = jax_npz.stem_and_head_renames(prefix) + jax_npz.block_renames(f"{prefix}Transformer/encoderblock_{{i}}", "linen")
    renames.append(Rename(f"{prefix}pos_embedding", "embeddings.position_embeddings", (ZeroClsRow(_CLS_ROW_WHY),)))
    out: list[Rule] = []
    if layout.get("scan"):
        out.append(Stack(f"{prefix}Transformer/encoderblock/{{path}}", f"{prefix}Transformer/encoderblock_{{i}}/{{path}}"))
    out.append(Renames(renames, what="big_vision npz"))
    return out


def detect(keys: set[str]) -> dict[str, Any] | None:
    """The layout (prefix, scan) of a big_vision ViT npz, or None."""
    for prefix in PREFIXES:
        if f"{prefix}embedding/kernel" not in keys:
            continue
        scan = any(k.startswith(f"{prefix}Transformer/encoderblock/") for k in keys)
        if prefix.startswith("params/") or f"{prefix}pos_embedding" in keys or scan:
            return {"prefix": prefix, "scan": scan}
    return None


def read(raw: LazyState, layout: dict[str, Any], where: str) -> Loaded:
    prefix = layout["prefix"]
    notes: list[str] = []
    outside = [k for k in raw if not k.startswith(prefix)]
    if outside:
        towers = sorted({k[len("params/"):].split("/", 1)[0] if k.startswith("params/") else k.split("/", 1)[0]
                         for k in outside})
        notes.append(f"ignored {len(outside)} arrays outside {prefix!r} (other towers / state: {', '.join(towers)})")
        raw = {k: v for k, v in raw.items() if k.startswith(prefix)}
    keys = set(raw)
    jax_npz.refuse_unsupported(keys, prefix, where)
    if f"{prefix}pos_embedding" not in keys:
        raise CheckpointError(f"{where}: unsupported ViT variant: no learned position embedding "
                              "(posemb='sincos2d' computes it); transformers' ViT stores a learned table")
    raw, zero_head = jax_npz.drop_zero_head(raw, prefix, notes)
    block0 = f"{prefix}Transformer/encoderblock/" if layout["scan"] else f"{prefix}Transformer/encoderblock_0/"
    heads = None
    for key, lazy in raw.items():
        if key.startswith(block0) and key.endswith("/query/kernel"):
            heads = lazy.shape[-2]
    if heads is None:
        raise CheckpointError(f"{where}: no {block0}.../query/kernel: cannot tell the number of heads")
    hidden = raw[f"{prefix}cls"].shape[-1]
    dims = {"D": hidden, "H": heads, "hd": hidden // heads}
    state = task_prefix(apply_forward(rules(layout), raw, dims))
    extra_ok = jax_npz.head_notes(state, notes)
    notes.append("big_vision has no CLS position row: the canonical row is zeros (exact, CLS is added after the "
                 "position embeddings there)")
    if layout["scan"]:
        notes.append("scanned blocks (leading depth axis) unstacked per layer")
    record = {"format": NAME, **layout, "zero_head": zero_head}
    if outside:
        record["ignored"] = len(outside)
    config = derive_config(state, heads=heads, where=where, layer_norm_eps=LAYER_NORM_EPS, hidden_act=HIDDEN_ACT,
                           pooler_act="tanh", **{PROVENANCE_KEY: record})
    check_against_table(state, config, where, extra_ok=extra_ok)
    notes.append(f"numerics of big_vision's ViT: layer_norm_eps={LAYER_NORM_EPS:g}, hidden_act={HIDDEN_ACT!r}")
    return Loaded(NAME, state, config, notes, where)


def write(state: LazyState, config: Any, notes: list[str]) -> LazyState:
    layout = provenance(config, NAME) or {"prefix": "params/", "scan": False, "zero_head": None}
    state = strip_task_prefix(state)
    state = drop_keys(state, (r"^embeddings\.mask_token$", r"^decoder\."), "big_vision's ViT has no "
                      "masked-image-modeling head", notes)
    if layout.get("zero_head") and "classifier.weight" not in state:
        ref = state["embeddings.cls_token"]
        state = jax_npz.add_zero_head(state, int(layout["zero_head"]), ref.shape[-1], ref.dtype)
    notes += numerics_note(config, "big_vision's ViT", LAYER_NORM_EPS, "the tanh GELU (gelu_new)",
                           ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"))
    return apply_backward(rules(layout), state, dims_of(config))

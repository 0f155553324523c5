"""What every source format shares: the loaded-checkpoint record, the config derived from weight
shapes, the canonical task of a state, and the provenance record that makes round trips exact."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vit_core import VARIANTS, ViTConfig
from vit_core.checkpoint import CheckpointError
from vit_core.checkpoint.fit import check_state_fits_table
from vit_core.weights import WeightSpec, weight_table

from vit_core.checkpoint.lazy import LazyState

# config.json key holding what a format needs to write a checkpoint back exactly as it was read
# (key numbering, prefixes, dropped all-zero heads). transformers keeps unknown config keys.
PROVENANCE_KEY = "vitx_source"

# Heads of the standard ViT sizes by hidden size (vit_core's VARIANTS), for formats whose weights
# do not show the head count (timm's fused qkv, a directory without config.json).
STANDARD_HEADS: dict[int, int] = {hidden: heads for hidden, _, heads, _ in VARIANTS.values()}


@dataclass
class Loaded:
    """A checkpoint read into canonical names: lazy tensors, the derived config, and notes that say
    what was decided on the way (inferred head counts, dropped heads, ...)."""

    format: str
    state: LazyState
    config: ViTConfig
    notes: list[str] = field(default_factory=list)
    path: str = ""

    @property
    def task(self) -> str:
        return task_of(self.state)


def task_of(keys: Any) -> str:
    """'classification', 'mim' or 'base' from canonical key names."""
    keys = list(keys)
    if any(k.startswith("decoder.") for k in keys):
        return "mim"
    if any(k.startswith("classifier.") for k in keys) and not any(k.startswith("pooler.") for k in keys):
        return "classification"
    return "base"


def architecture_of(task: str) -> str:
    return {"base": "ViTModel", "classification": "ViTForImageClassification",
            "mim": "ViTForMaskedImageModeling"}[task]


def table_for(config: ViTConfig, keys: Any) -> list[WeightSpec]:
    """The canonical weight table matching a state's keys (task, pooler, mask token)."""
    keys = set(keys)
    task = task_of(keys)
    if task == "base":
        return weight_table(config, "base", add_pooling_layer="pooler.dense.weight" in keys,
                            use_mask_token="embeddings.mask_token" in keys)
    if task == "classification":
        return weight_table(config, "classification", use_mask_token="vit.embeddings.mask_token" in keys)
    return weight_table(config, "mim")


def check_against_table(state: LazyState, config: ViTConfig, where: str, *, extra_ok: tuple[str, ...] = ()) -> None:
    """Strict: every key of the canonical table present with its shape, nothing else except keys
    matching ``extra_ok`` (one error lists all)."""
    checked = {k: v for k, v in state.items() if not any(re.match(p, k) for p in extra_ok)}
    check_state_fits_table(checked, table_for(config, state), source=where, model_name="a ViT of this config")


def _backbone_prefix(keys: Any) -> str:
    return "vit." if any(k.startswith("vit.") for k in keys) else ""


def derive_config(state: LazyState, *, heads: int, where: str, image_size: Any = None,
                  **fields: Any) -> ViTConfig:
    """A ViTConfig from canonical weight shapes: hidden size, depth, MLP size, patch, channels,
    image size (square grids only, unless ``image_size`` is given), qkv bias, labels, pooler, stride.

    ``fields`` (layer_norm_eps, hidden_act, ...) are set as given: a format's numerics.
    """
    p = _backbone_prefix(state)
    try:
        d = state[f"{p}embeddings.cls_token"].shape[-1]
        conv = state[f"{p}embeddings.patch_embeddings.projection.weight"].shape
        positions = state[f"{p}embeddings.position_embeddings"].shape
        mlp = state[f"{p}encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{where}: not a ViT checkpoint, {e.args[0]!r} is missing") from None
    if len(conv) != 4:
        raise CheckpointError(f"{where}: patch projection has shape {conv}; expected (D, C, P, P)")
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(rf"^{re.escape(p)}encoder\.layer\.(\d+)\.", k))}
    depth = len(layer_ids)
    if layer_ids != set(range(depth)):
        raise CheckpointError(f"{where}: encoder layers {sorted(layer_ids)} are not numbered 0..{depth - 1}")
    _, channels, ph, pw = conv
    patches = positions[1] - 1
    if image_size is None:
        side = math.isqrt(patches)
        if side * side != patches or ph != pw:
            raise CheckpointError(f"{where}: the position table has {patches} patch rows, not a square grid; "
                                  "the image size cannot be inferred: give a config.json")
        image_size = side * ph
    if d % heads:
        raise CheckpointError(f"{where}: hidden size {d} is not divisible by {heads} heads")
    config_fields: dict[str, Any] = dict(
        hidden_size=d, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
        image_size=image_size, patch_size=ph if ph == pw else (ph, pw), num_channels=channels,
        qkv_bias=f"{p}encoder.layer.0.attention.attention.query.bias" in state, encoder_stride=ph,
    )
    if "classifier.weight" in state:
        config_fields["num_labels"] = state["classifier.weight"].shape[0]
    if "pooler.dense.weight" in state and state["pooler.dense.weight"].shape[0] != d:
        config_fields["pooler_output_size"] = state["pooler.dense.weight"].shape[0]
    if "decoder.0.weight" in state:
        stride = math.isqrt(state["decoder.0.weight"].shape[0] // channels)
        config_fields["encoder_stride"] = stride
    task = task_of(state)
    config_fields["architectures"] = [architecture_of(task)]
    config_fields.update(fields)
    try:
        return ViTConfig(**config_fields)
    except ValueError as e:
        raise CheckpointError(f"{where}: the weights give an invalid config: {e}") from None


def provenance(config: ViTConfig, fmt: str) -> dict[str, Any]:
    """The layout record a format stored when it read this checkpoint, or {} if it came from elsewhere."""
    record = config.extra.get(PROVENANCE_KEY)
    if isinstance(record, dict) and record.get("format") == fmt:
        return dict(record)
    return {}


def numerics_note(config: ViTConfig, fmt: str, eps: float, act: str, act_names: tuple[str, ...]) -> list[str]:
    """A warning when the model's LayerNorm eps or activation differ from what ``fmt`` hard-codes."""
    notes = []
    if not np.isclose(config.layer_norm_eps, eps, rtol=0, atol=0):
        notes.append(f"{fmt} models use LayerNorm eps {eps:g}; this model has layer_norm_eps="
                     f"{config.layer_norm_eps:g}: outputs in {fmt} will differ slightly")
    if config.hidden_act not in act_names:
        notes.append(f"{fmt} models use {act}; this model has hidden_act={config.hidden_act!r}: outputs in {fmt} "
                     "will differ")
    return notes


def drop_keys(state: LazyState, patterns: tuple[str, ...], why: str, notes: list[str]) -> LazyState:
    """Remove keys matching ``patterns`` (the target format has no place for them), saying so."""
    dropped = [k for k in state if any(re.match(p, k) for p in patterns)]
    if dropped:
        notes.append(f"dropped {', '.join(dropped)}: {why}")
    return {k: v for k, v in state.items() if k not in dropped}

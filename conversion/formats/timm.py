"""timm VisionTransformer state dicts (docs/FORMATS.md section 5): ``.pth`` / ``.bin`` / ``.safetensors``.

One fused ``attn.qkv`` Linear per block (rows [0:D] query, [D:2D] key, [2D:3D] value), split
into three canonical Linears and merged back on writing. timm's ViTs use LayerNorm eps 1e-6 and
the exact (erf) GELU, so a converted config says so.

The head count cannot be read from a fused qkv: it comes from the timm model name when given
(``vit_base_patch16_224`` -> 12), else a timm ``config.json`` beside the weights (``model_args``
or ``architecture``), else the standard size table (192 -> 3, 384 -> 6, 768 -> 12, 1024 -> 16,
1280 -> 16), and the notes say which.

timm ``no_embed_class`` models (position table without a CLS row, CLS concatenated after the
add) map exactly to a zero canonical CLS row, like big_vision. Variants without a transformers
equivalent are refused with the feature named: register tokens, LayerScale (``ls1``/``ls2``),
qk-norm, ``fc_norm`` / average pooling, ``norm_pre``, MAP pooling (``attn_pool``), no class token.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

from vit_core import VARIANTS
from vit_core.checkpoint import CheckpointError
from vit_core.checkpoint.lazy import LazyState
from vit_core.checkpoint.rules import (
    Rename,
    Renames,
    Rule,
    Split,
    ZeroClsRow,
    apply_backward,
    apply_forward,
    dims_of,
    strip_task_prefix,
    task_prefix,
)

from .base import (
    PROVENANCE_KEY,
    STANDARD_HEADS,
    Loaded,
    check_against_table,
    derive_config,
    drop_keys,
    numerics_note,
    provenance,
)

NAME = "timm"
LAYER_NORM_EPS = 1e-6
HIDDEN_ACT = "gelu"

# timm size names -> (hidden size, heads)
# timm's size names -> vit_core's VARIANTS (the one size table).
SIZES: dict[str, str] = {"tiny": "Ti", "small": "S", "medium": "M", "base": "B", "large": "L", "huge": "H",
                         "giant": "g", "gigantic": "G"}
_MODEL_NAME = re.compile(
    r"^(?:timm/)?vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)(?P<rest>(?:_[a-z0-9]+?)*?)(?:_(?P<img>\d+))?(?:\.(?P<tag>[\w\-.]+))?$"
)
# Name parts of timm variants that transformers' ViT cannot express (the weights show most of
# them too; average pooling without fc_norm does not).
_NAME_FEATURES = (
    (re.compile(r"_reg\d+"), "register tokens"),
    (re.compile(r"_gap"), "global average pooling (no CLS token readout)"),
    (re.compile(r"siglip|_map"), "MAP pooling (attention-pool head)"),
)

# Weight names of unsupported variants -> the feature, as the refusal names it.
_KEY_FEATURES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^reg_token$"), "register tokens (reg_token)"),
    (re.compile(r"^blocks\.\d+\.ls[12]\."), "LayerScale (ls1/ls2)"),
    (re.compile(r"^blocks\.\d+\.attn\.(q_norm|k_norm)\."), "qk-norm (attn.q_norm/k_norm)"),
    (re.compile(r"^fc_norm\."), "fc_norm / average pooling (global_pool='avg')"),
    (re.compile(r"^norm_pre\."), "norm_pre (a LayerNorm before the blocks, as in CLIP models)"),
    (re.compile(r"^attn_pool\."), "MAP pooling (attn_pool)"),
    (re.compile(r"^blocks\.\d+\.attn\.(q|k|v)_proj\."), "separate q/k/v projections (a non-ViT timm block)"),
)


def rules(layout: dict[str, Any]) -> list[Rule]:
    pos_ops = (ZeroClsRow("this timm model (no_embed_class=True) has no CLS position row; fold it into "
                          "cls_token first"),) if layout.get("no_embed_class") else ()
    layer = "encoder.layer.{i}."
    renames = [
        Rename("cls_token", "embeddings.cls_token"),
        Rename("pos_embed", "embeddings.position_embeddings", pos_ops),
        Rename("patch_embed.proj.{wb}", "embeddings.patch_embeddings.projection.{wb}"),
        Rename("blocks.{i}.norm1.{wb}", layer + "layernorm_before.{wb}"),
        Rename("blocks.{i}.attn.query.{wb}", layer + "attention.attention.query.{wb}"),
        Rename("blocks.{i}.attn.key.{wb}", layer + "attention.attention.key.{wb}"),
        Rename("blocks.{i}.attn.value.{wb}", layer + "attention.attention.value.{wb}"),
        Rename("blocks.{i}.attn.proj.{wb}", layer + "attention.output.dense.{wb}"),
        Rename("blocks.{i}.norm2.{wb}", layer + "layernorm_after.{wb}"),
        Rename("blocks.{i}.mlp.fc1.{wb}", layer + "intermediate.dense.{wb}"),
        Rename("blocks.{i}.mlp.fc2.{wb}", layer + "output.dense.{wb}"),
        Rename("norm.{wb}", "layernorm.{wb}"),
        Rename("head.{wb}", "classifier.{wb}"),
    ]
    return [Split("blocks.{i}.attn.qkv.{wb}", "blocks.{i}.attn.{part}.{wb}", ("query", "key", "value")),
            Renames(renames, what="timm state dict")]


def detect(keys: set[str]) -> dict[str, Any] | None:
    """The layout of a timm ViT state dict ({"module_prefix": ...}), or None."""
    for prefix in ("", "module.", "model."):
        if f"{prefix}patch_embed.proj.weight" in keys and any(k.startswith(f"{prefix}blocks.") for k in keys):
            return {"module_prefix": prefix}
    return None


def refuse_unsupported(keys: set[str], where: str) -> None:
    features: list[str] = []
    for pattern, feature in _KEY_FEATURES:
        if any(pattern.search(k) for k in keys) and feature not in features:
            features.append(feature)
    if "cls_token" not in keys:
        features.append("no class token (class_token=False)")
    if features:
        raise CheckpointError(f"{where}: unsupported timm ViT variant: {'; '.join(features)}. "
                              "transformers' ViT (and so vitx) has no equivalent")


def parse_model_name(name: str) -> dict[str, Any]:
    """timm names like ``vit_base_patch16_224.augreg_in21k`` -> {"hidden", "heads", "patch", "image"}.

    Refuses names of variants without a ViT equivalent (registers, average pooling, MAP head).
    """
    m = _MODEL_NAME.match(name)
    if m is None or m.group("size") not in SIZES:
        raise CheckpointError(f"timm model name {name!r} is not a plain ViT name like 'vit_base_patch16_224' "
                              f"(sizes: {', '.join(SIZES)})")
    rest = m.group("rest") or ""
    for pattern, feature in _NAME_FEATURES:
        if pattern.search(rest) or pattern.search(m.group("size")):
            raise CheckpointError(f"timm model {name!r}: unsupported variant: {feature}; transformers' ViT has no equivalent")
    hidden, _, heads, _ = VARIANTS[SIZES[m.group("size")]]
    return {"hidden": hidden, "heads": heads, "patch": int(m.group("patch")),
            "image": int(m.group("img")) if m.group("img") else None}


def read_timm_config(directory: pathlib.Path) -> dict[str, Any] | None:
    """A timm hub ``config.json`` (has "architecture") beside the weights, or None."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and "architecture" in data else None


def read(raw: LazyState, layout: dict[str, Any], where: str, *, timm_model_name: str | None = None,
         timm_config: dict[str, Any] | None = None, heads_hint: int | None = None) -> Loaded:
    """timm state dict -> canonical. ``heads_hint`` comes from a transformers config.json beside it."""
    notes: list[str] = []
    prefix = layout.get("module_prefix", "")
    if prefix:
        raw = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in raw.items()}
        notes.append(f"stripped the {prefix!r} prefix of a wrapped model's state dict")
    keys = set(raw)
    refuse_unsupported(keys, where)
    if timm_config is not None:
        pool = timm_config.get("global_pool") or timm_config.get("model_args", {}).get("global_pool")
        if pool not in (None, "token"):
            raise CheckpointError(f"{where}: unsupported timm ViT variant: global_pool={pool!r} "
                                  "(transformers' ViT reads the CLS token)")
        if timm_model_name is None:
            timm_model_name = str(timm_config["architecture"])
    hidden = raw["cls_token"].shape[-1]
    model_args = (timm_config or {}).get("model_args") or {}
    named = parse_model_name(timm_model_name) if timm_model_name else None  # also refuses variant names
    if isinstance(model_args.get("num_heads"), int):
        heads = model_args["num_heads"]
        notes.append(f"{heads} attention heads from the timm config.json (model_args.num_heads)")
    elif heads_hint is not None:
        heads = heads_hint
        notes.append(f"{heads} attention heads from the config.json beside the weights")
    elif named is not None and not model_args:
        if named["hidden"] != hidden:
            raise CheckpointError(f"{where}: timm model {timm_model_name!r} has hidden size {named['hidden']}, "
                                  f"the weights have {hidden}")
        heads = named["heads"]
        notes.append(f"{heads} attention heads from the timm model name {timm_model_name!r}")
    elif hidden in STANDARD_HEADS:
        heads = STANDARD_HEADS[hidden]
        notes.append(f"{heads} attention heads assumed from the standard ViT size table (hidden size {hidden}); "
                     "timm's fused qkv does not show it: pass the timm model name to be sure")
    else:
        raise CheckpointError(f"{where}: hidden size {hidden} is not a standard ViT size, and timm's fused qkv does "
                              "not show the number of heads: pass timm_model_name= (--timm-model) or a config.json")
    # The position table has N + 1 rows, or N (a perfect square for square grids; N + 1 never is)
    # when the model was built with no_embed_class=True.
    pos_shape = raw["pos_embed"].shape
    pos_rows = pos_shape[1] if len(pos_shape) == 3 else -1
    image_size = model_args.get("img_size")
    conv = raw["patch_embed.proj.weight"].shape
    if image_size is not None and len(conv) == 4:
        ih, iw = (image_size, image_size) if isinstance(image_size, int) else image_size
        no_embed_class = pos_rows == (ih // conv[2]) * (iw // conv[3])
        image_size = ih if ih == iw else [ih, iw]
    else:
        no_embed_class = pos_rows > 0 and round(pos_rows ** 0.5) ** 2 == pos_rows
    if "no_embed_class" in model_args:
        no_embed_class = bool(model_args["no_embed_class"])
    layout = {"no_embed_class": no_embed_class}
    if no_embed_class:
        notes.append("no_embed_class model (no CLS row in pos_embed): canonical CLS row is zeros (exact)")
    state = task_prefix(apply_forward(rules(layout), raw, {"D": hidden, "H": heads}))
    record = {"format": NAME, **layout, "module_prefix": prefix}
    if timm_model_name:
        record["architecture"] = timm_model_name
    if model_args:
        record["model_args"] = {k: v for k, v in model_args.items() if isinstance(v, (int, float, str, bool, list))}
    config = derive_config(state, heads=heads, where=where, layer_norm_eps=LAYER_NORM_EPS, hidden_act=HIDDEN_ACT,
                           image_size=image_size, **{PROVENANCE_KEY: record})
    if named is not None and not model_args:
        if named["patch"] != config.patch_hw[0]:
            raise CheckpointError(f"{where}: timm model {timm_model_name!r} has patch size {named['patch']}, "
                                  f"the weights have {config.patch_hw}")
        if named["image"] and named["image"] != config.image_hw[0]:
            notes.append(f"the name says image size {named['image']}, the position table {config.image_hw[0]}: "
                         "the weights win")
    check_against_table(state, config, where)
    notes.append(f"numerics of timm's ViT: layer_norm_eps={LAYER_NORM_EPS:g}, hidden_act={HIDDEN_ACT!r} (exact GELU)")
    return Loaded(NAME, state, config, notes, where)


def write(state: LazyState, config: Any, notes: list[str]) -> LazyState:
    """Canonical state -> timm keys (fused qkv)."""
    layout = provenance(config, NAME) or {"no_embed_class": False}
    state = strip_task_prefix(state)
    state = drop_keys(state, (r"^pooler\.",), "timm's ViT has no pooler (representation layer)", notes)
    state = drop_keys(state, (r"^embeddings\.mask_token$", r"^decoder\."), "timm's ViT has no masked-image-modeling "
                      "head", notes)
    if config.hidden_act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu"):
        act = "gelu_tanh" if config.hidden_act != "quick_gelu" else "quick_gelu"
        notes.append(f"hidden_act={config.hidden_act!r}: build the timm model with act_layer={act!r} (the config.json "
                     "written in a timm directory says so); timm's default ViT uses the exact GELU")
    notes += numerics_note(config, "timm", LAYER_NORM_EPS, "the exact GELU",
                           ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu"))
    raw = apply_backward(rules(layout), state, dims_of(config))
    prefix = layout.get("module_prefix") or ""
    return {prefix + k: v for k, v in raw.items()}


def hub_config(config: Any, state_keys: set[str]) -> dict[str, Any]:
    """A timm ``config.json`` (hub layout) so ``timm.create_model("local-dir:<dir>", pretrained=True)``
    builds the matching model: architecture plus explicit model_args."""
    layout = provenance(config, NAME) or {}
    d, m = config.hidden_size, config.intermediate_size
    (h, w), (ph, pw) = config.image_hw, config.patch_hw
    num_classes = config.num_labels if "head.weight" in state_keys else 0
    model_args: dict[str, Any] = {
        "img_size": h if h == w else [h, w], "patch_size": ph if ph == pw else [ph, pw], "in_chans": config.num_channels,
        "embed_dim": d, "depth": config.num_hidden_layers, "num_heads": config.num_attention_heads,
        "mlp_ratio": m / d, "qkv_bias": config.qkv_bias, "class_token": True, "global_pool": "token",
        "no_embed_class": bool(layout.get("no_embed_class")), "num_classes": num_classes,
    }
    if config.hidden_act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        model_args["act_layer"] = "gelu_tanh"
    elif config.hidden_act == "quick_gelu":
        model_args["act_layer"] = "quick_gelu"
    if int(d * (m / d)) != m:
        raise CheckpointError(f"timm computes the MLP size as int(dim * mlp_ratio); {m} / {d} does not round-trip")
    # model_args fix every size, so any registered plain ViT name builds the right model.
    architecture = str(layout.get("architecture") or "vit_base_patch16_224").split(".")[0].removeprefix("timm/")
    out = {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": d,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [config.num_channels, h, w], "fixed_input_size": True, "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "center", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
            "num_classes": num_classes, "first_conv": "patch_embed.proj", "classifier": "head",
        },
    }
    if num_classes:
        out["label_names"] = [config.id2label[i] for i in range(config.num_labels)]
    return out


def heads_hint(config_path: pathlib.Path | None) -> int | None:
    """The head count of a transformers config.json beside a timm state dict, if there is a valid one."""
    if config_path is None:
        return None
    from vit_core import ViTConfig

    try:
        return ViTConfig.from_json_file(config_path).num_attention_heads
    except ValueError:
        return None

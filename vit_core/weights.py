"""The canonical weight table: every parameter of a ViT model, by name, shape and kind.

Canonical names and layouts are transformers 4.x PyTorch's (docs/FORMATS.md section 1): Linear
weights (out, in), the patch convolution (D, C, P, P). This table is the single source of truth:
each framework's ``weights.py`` converts by ``kind`` only, and each framework's attribute path of
a parameter is its canonical name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import ViTConfig

Kind = Literal["linear", "conv", "norm", "embedding", "bias"]
Task = Literal["base", "classification", "mim"]

# The kinds a framework may need to re-layout. Linear: (out, in) canonical. Conv: (out, in, kh, kw).
KINDS: tuple[str, ...] = ("linear", "conv", "norm", "embedding", "bias")


@dataclass(frozen=True)
class WeightSpec:
    """One parameter: canonical ``name``, canonical ``shape`` and ``kind``.

    ``init`` says how a fresh model initialises it, as transformers' ViT ``_init_weights`` does:
    "trunc_normal" (std = initializer_range, cut at +-2 std), "zeros", "ones".
    """

    name: str
    shape: tuple[int, ...]
    kind: Kind
    init: str


def _linear(prefix: str, out_f: int, in_f: int, bias: bool = True) -> list[WeightSpec]:
    specs = [WeightSpec(f"{prefix}.weight", (out_f, in_f), "linear", "trunc_normal")]
    if bias:
        specs.append(WeightSpec(f"{prefix}.bias", (out_f,), "bias", "zeros"))
    return specs


def _norm(prefix: str, dim: int) -> list[WeightSpec]:
    return [WeightSpec(f"{prefix}.weight", (dim,), "norm", "ones"),
            WeightSpec(f"{prefix}.bias", (dim,), "bias", "zeros")]


def backbone_table(config: ViTConfig, *, use_mask_token: bool = False, prefix: str = "") -> list[WeightSpec]:
    """Weights of the ViT backbone (embeddings, encoder, final layernorm), no pooler."""
    d, m, c = config.hidden_size, config.intermediate_size, config.num_channels
    ph, pw = config.patch_hw
    p = prefix
    specs = [WeightSpec(f"{p}embeddings.cls_token", (1, 1, d), "embedding", "trunc_normal")]
    if use_mask_token:
        specs.append(WeightSpec(f"{p}embeddings.mask_token", (1, 1, d), "embedding", "zeros"))
    specs += [
        WeightSpec(f"{p}embeddings.position_embeddings", (1, config.num_patches + 1, d), "embedding", "trunc_normal"),
        WeightSpec(f"{p}embeddings.patch_embeddings.projection.weight", (d, c, ph, pw), "conv", "trunc_normal"),
        WeightSpec(f"{p}embeddings.patch_embeddings.projection.bias", (d,), "bias", "zeros"),
    ]
    for i in range(config.num_hidden_layers):
        layer = f"{p}encoder.layer.{i}"
        specs += _norm(f"{layer}.layernorm_before", d)
        for name in ("query", "key", "value"):
            specs += _linear(f"{layer}.attention.attention.{name}", d, d, bias=config.qkv_bias)
        specs += _linear(f"{layer}.attention.output.dense", d, d)
        specs += _norm(f"{layer}.layernorm_after", d)
        specs += _linear(f"{layer}.intermediate.dense", m, d)
        specs += _linear(f"{layer}.output.dense", d, m)
    specs += _norm(f"{p}layernorm", d)
    return specs


def weight_table(
    config: ViTConfig,
    task: Task = "base",
    *,
    add_pooling_layer: bool = True,
    use_mask_token: bool = False,
) -> list[WeightSpec]:
    """The full canonical table of one model class.

    task "base" is ``ViTModel`` (no prefix; ``pooler.dense`` when ``add_pooling_layer``),
    "classification" is ``ViTForImageClassification`` (``vit.`` backbone, no pooler, ``classifier``;
    with num_labels == 0 the classifier is the identity and has no weights), "mim" is
    ``ViTForMaskedImageModeling`` (``vit.`` backbone with a mask token, ``decoder.0`` 1x1 conv).
    """
    d = config.hidden_size
    if task == "base":
        specs = backbone_table(config, use_mask_token=use_mask_token)
        if add_pooling_layer:
            specs += _linear("pooler.dense", config.pooler_size, d)
        return specs
    if task == "classification":
        specs = backbone_table(config, use_mask_token=use_mask_token, prefix="vit.")
        if config.num_labels > 0:
            specs += _linear("classifier", config.num_labels, d)
        return specs
    if task == "mim":
        specs = backbone_table(config, use_mask_token=True, prefix="vit.")
        out = config.encoder_stride**2 * config.num_channels
        specs += [WeightSpec("decoder.0.weight", (out, d, 1, 1), "conv", "trunc_normal"),
                  WeightSpec("decoder.0.bias", (out,), "bias", "zeros")]
        return specs
    raise ValueError(f"unknown task {task!r}; expected 'base', 'classification' or 'mim'")


# Keys a model of one task may lack in a checkpoint of another task (transformers initialises them
# and warns), and keys of other tasks' heads that are dropped when loading into this task.
HEAD_KEYS: dict[str, tuple[str, ...]] = {
    "base": ("pooler.dense.weight", "pooler.dense.bias", "embeddings.mask_token"),
    "classification": ("classifier.weight", "classifier.bias"),
    "mim": ("decoder.0.weight", "decoder.0.bias", "vit.embeddings.mask_token"),
}
FOREIGN_HEAD_PATTERNS: tuple[str, ...] = (
    r"^classifier\.", r"^decoder\.", r"^(vit\.)?pooler\.", r"^(vit\.)?embeddings\.mask_token$",
)


def parameter_count(config: ViTConfig, task: Task = "base", **kwargs: bool) -> int:
    """Number of parameters of a model class, from the table alone."""
    total = 0
    for spec in weight_table(config, task, **kwargs):
        n = 1
        for s in spec.shape:
            n *= s
        total += n
    return total

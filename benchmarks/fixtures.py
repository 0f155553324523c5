"""Same weights and inputs for every entry: prepared once per model by the parent process.

For each model (``benchmarks/results/cache/<B16>/``):

- ``config.json`` + ``model.safetensors``: a seeded ViTForImageClassification checkpoint written by
  vit_core.pretrained.save_pretrained (transformers 4.x names, float32). vitx, transformers 5.x
  and transformers 4.57 TF / Flax all load this same directory with their own from_pretrained.
- ``timm.safetensors``: the same weights in timm's names (fused qkv), docs/FORMATS.md section 5.
- ``pixels.npy``: 32 seeded images (32, 3, H, W) float32 in [-1, 1] (the range of ViT's
  normalised pixels); a batch of b takes the first b, so image 0 is the same in every cell.
- ``reference_logits.npy``: vit_core.reference.forward (float64 numpy) logits of image 0, the
  check that every entry really ran these weights on these inputs.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from .common import MODEL_SPECS, config_fields, fixture_dir

MAX_BATCH = 32
_VERSION = 1  # bump to rebuild cached fixtures when their recipe changes


def seeded_state(config, seed: int = 0) -> dict[str, np.ndarray]:  # config: vit_core.ViTConfig
    """Canonical float32 weights like a trained model's scale: truncated-normal 0.02 weights (the
    init recipe), LayerNorm scales near 1 and small non-zero biases so every term is exercised."""
    from vit_core.weights import weight_table

    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for spec in weight_table(config, "classification"):
        if spec.kind == "norm":
            value = 1.0 + 0.1 * rng.standard_normal(spec.shape)
        elif spec.kind == "bias":
            value = 0.02 * rng.standard_normal(spec.shape)
        else:
            value = np.clip(rng.standard_normal(spec.shape), -2.0, 2.0) * config.initializer_range
        state[spec.name] = value.astype(np.float32)
    return state


def to_timm_state(state: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """Canonical (transformers 4.x) names -> timm VisionTransformer names, query/key/value fused
    row-wise into ``attn.qkv`` (docs/FORMATS.md section 5, the reverse direction)."""
    p = "vit."
    out = {
        "cls_token": state[f"{p}embeddings.cls_token"],
        "pos_embed": state[f"{p}embeddings.position_embeddings"],
        "patch_embed.proj.weight": state[f"{p}embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state[f"{p}embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state[f"{p}layernorm.weight"],
        "norm.bias": state[f"{p}layernorm.bias"],
        "head.weight": state["classifier.weight"],
        "head.bias": state["classifier.bias"],
    }
    for i in range(num_layers):
        src, dst = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        attn = f"{src}attention.attention."
        for leaf in ("weight", "bias"):
            out[f"{dst}norm1.{leaf}"] = state[f"{src}layernorm_before.{leaf}"]
            out[f"{dst}norm2.{leaf}"] = state[f"{src}layernorm_after.{leaf}"]
            out[f"{dst}attn.qkv.{leaf}"] = np.concatenate(
                [state[f"{attn}query.{leaf}"], state[f"{attn}key.{leaf}"], state[f"{attn}value.{leaf}"]], axis=0)
            out[f"{dst}attn.proj.{leaf}"] = state[f"{src}attention.output.dense.{leaf}"]
            out[f"{dst}mlp.fc1.{leaf}"] = state[f"{src}intermediate.dense.{leaf}"]
            out[f"{dst}mlp.fc2.{leaf}"] = state[f"{src}output.dense.{leaf}"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def ensure_fixtures(model: str) -> pathlib.Path:
    """Build (once) and return the model's fixture directory."""
    from safetensors.numpy import save_file

    from vit_core import ViTConfig
    from vit_core.pretrained import save_pretrained
    from vit_core.reference import forward

    directory = fixture_dir(model)
    stamp = directory / "fixtures.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == _VERSION:
        return directory
    if model not in MODEL_SPECS:
        raise ValueError(f"unknown benchmark model {model!r}; choose from {sorted(MODEL_SPECS)}")
    config = ViTConfig(**config_fields(model))
    state = seeded_state(config)
    save_pretrained(config, state, directory)
    save_file(to_timm_state(state, config.num_hidden_layers), str(directory / "timm.safetensors"))
    rng = np.random.default_rng(1)
    h, w = config.image_hw
    pixels = rng.uniform(-1.0, 1.0, size=(MAX_BATCH, config.num_channels, h, w)).astype(np.float32)
    np.save(directory / "pixels.npy", pixels)
    reference = forward(state, config, pixels[:1], task="classification")["logits"][0]
    np.save(directory / "reference_logits.npy", np.asarray(reference, dtype=np.float64))
    stamp.write_text(json.dumps({"version": _VERSION, "model": model}))
    return directory


def ensure_train_fixtures(model: str, batch: int) -> pathlib.Path:
    """Build (once) the training benchmark's labels for ``batch`` images (seeded, over the 1000
    classes) and the float64 reference loss of that batch before any step: the first step of every
    training entry computes exactly this loss (same weights, images and labels; dropout 0)."""
    from vit_core import ViTConfig
    from vit_core.reference import forward

    directory = ensure_fixtures(model)
    stamp = directory / f"train-{batch}.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == _VERSION:
        return directory
    config = ViTConfig(**config_fields(model))
    labels = np.random.default_rng(2).integers(0, config.num_labels, size=batch).astype(np.int64)
    np.save(directory / f"train-labels-{batch}.npy", labels)
    state = seeded_state(config)  # what ensure_fixtures saved
    pixels = np.load(directory / "pixels.npy")[:batch]
    loss = forward(state, config, pixels, task="classification", labels=labels)["loss"]
    stamp.write_text(json.dumps({"version": _VERSION, "model": model, "batch": batch, "reference_loss": float(loss)}))
    return directory

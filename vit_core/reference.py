"""A float64 numpy forward of the whole ViT family: the framework-neutral ground truth.

Slow and plain on purpose: one function per concept, loops where they read better, every shape
written down. Every framework's models are tested against it, so no framework is right by
definition. It takes canonical weights (``vit_core.weights``: PyTorch names and layouts).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .activations import ACTIVATIONS
from .config import ViTConfig
from .resample import resample_position_embeddings


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """Two-pass LayerNorm over the last axis (biased variance), as torch computes it."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """x (..., in) @ weight (out, in).T + bias (out,)."""
    y = x @ weight.T
    return y if bias is None else y + bias


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def patch_embed(pixel_values: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Convolution with stride = kernel = patch size, written as patches @ kernel.

    pixel_values (batch, channels, height, width), weight (hidden, channels, ph, pw)
    -> (batch, gh * gw, hidden), patches in row-major grid order. Pixels past the last whole
    patch are dropped, as a strided convolution does.
    """
    b, c, h, w = pixel_values.shape
    d, _, ph, pw = weight.shape
    gh, gw = h // ph, w // pw
    x = pixel_values[:, :, : gh * ph, : gw * pw]
    x = x.reshape(b, c, gh, ph, gw, pw).transpose(0, 2, 4, 1, 3, 5)  # (b, gh, gw, c, ph, pw)
    x = x.reshape(b, gh * gw, c * ph * pw)
    return x @ weight.reshape(d, c * ph * pw).T + bias


def expand_head_mask(head_mask: np.ndarray | None, num_layers: int) -> list[np.ndarray | None]:
    """(heads,) or (layers, heads) -> one (1, heads, 1, 1) multiplier per layer (or None)."""
    if head_mask is None:
        return [None] * num_layers
    head_mask = np.asarray(head_mask, dtype=np.float64)
    if head_mask.ndim == 1:
        head_mask = np.broadcast_to(head_mask, (num_layers, head_mask.shape[0]))
    return [m.reshape(1, -1, 1, 1) for m in head_mask]


def embeddings(
    state: dict[str, np.ndarray],
    prefix: str,
    config: ViTConfig,
    pixel_values: np.ndarray,
    bool_masked_pos: np.ndarray | None,
    interpolate_pos_encoding: bool,
) -> np.ndarray:
    """(batch, channels, height, width) -> (batch, 1 + patches, hidden)."""
    p = prefix + "embeddings."
    _, _, h, w = pixel_values.shape
    ph, pw = config.patch_hw
    x = patch_embed(pixel_values, state[p + "patch_embeddings.projection.weight"],
                    state[p + "patch_embeddings.projection.bias"])  # (b, n, d)
    if bool_masked_pos is not None:
        mask = np.asarray(bool_masked_pos, dtype=np.float64)[..., None]  # (b, n, 1)
        x = x * (1.0 - mask) + state[p + "mask_token"] * mask
    b = x.shape[0]
    cls = np.broadcast_to(state[p + "cls_token"], (b, 1, x.shape[-1]))
    x = np.concatenate([cls, x], axis=1)  # (b, 1 + n, d)
    positions = state[p + "position_embeddings"]
    if interpolate_pos_encoding:
        positions = resample_position_embeddings(positions, config.grid_hw, (h // ph, w // pw))
    return x + positions


def attention(
    state: dict[str, np.ndarray], p: str, config: ViTConfig, x: np.ndarray, head_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-head self-attention. x (b, t, d) -> output (b, t, d), probabilities (b, heads, t, t)."""
    b, t, d = x.shape
    heads, hd = config.num_attention_heads, config.head_dim

    def project(name: str) -> np.ndarray:  # (b, t, d) -> (b, heads, t, hd); row h*hd + j is head h
        y = linear(x, state[f"{p}attention.attention.{name}.weight"], state.get(f"{p}attention.attention.{name}.bias"))
        return y.reshape(b, t, heads, hd).transpose(0, 2, 1, 3)

    q, k, v = project("query"), project("key"), project("value")
    probs = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd))  # (b, heads, t, t)
    if head_mask is not None:
        probs = probs * head_mask
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    out = linear(context, state[f"{p}attention.output.dense.weight"], state[f"{p}attention.output.dense.bias"])
    return out, probs


def encoder_layer(
    state: dict[str, np.ndarray], p: str, config: ViTConfig, x: np.ndarray, head_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-norm transformer block: x + attn(ln(x)), then + mlp(ln(.))."""
    eps = config.layer_norm_eps
    act = ACTIVATIONS[config.hidden_act]
    h = layer_norm(x, state[p + "layernorm_before.weight"], state[p + "layernorm_before.bias"], eps)
    attn_out, probs = attention(state, p, config, h, head_mask)
    x = x + attn_out
    h = layer_norm(x, state[p + "layernorm_after.weight"], state[p + "layernorm_after.bias"], eps)
    h = act(linear(h, state[p + "intermediate.dense.weight"], state[p + "intermediate.dense.bias"]))
    return x + linear(h, state[p + "output.dense.weight"], state[p + "output.dense.bias"]), probs


def backbone(
    state: dict[str, np.ndarray],
    config: ViTConfig,
    pixel_values: np.ndarray,
    *,
    prefix: str = "",
    bool_masked_pos: np.ndarray | None = None,
    head_mask: np.ndarray | None = None,
    interpolate_pos_encoding: bool = False,
    add_pooling_layer: bool = False,
) -> dict[str, Any]:
    """ViTModel: returns last_hidden_state, pooler_output (or None), hidden_states, attentions."""
    x = embeddings(state, prefix, config, pixel_values, bool_masked_pos, interpolate_pos_encoding)
    hidden_states = [x]
    attentions = []
    for i, mask in enumerate(expand_head_mask(head_mask, config.num_hidden_layers)):
        x, probs = encoder_layer(state, f"{prefix}encoder.layer.{i}.", config, x, mask)
        hidden_states.append(x)
        attentions.append(probs)
    last = layer_norm(x, state[prefix + "layernorm.weight"], state[prefix + "layernorm.bias"], config.layer_norm_eps)
    pooled = None
    if add_pooling_layer:
        pooled = ACTIVATIONS[config.pooler_act](linear(last[:, 0], state["pooler.dense.weight"], state["pooler.dense.bias"]))
    return {"last_hidden_state": last, "pooler_output": pooled,
            "hidden_states": tuple(hidden_states), "attentions": tuple(attentions)}


def classification_loss(logits: np.ndarray, labels: np.ndarray, config: ViTConfig) -> float:
    """transformers' image-classification loss, with its problem_type inference."""
    problem = config.problem_type
    labels = np.asarray(labels)
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif np.issubdtype(labels.dtype, np.integer):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        diff = logits.squeeze() - labels.astype(np.float64).squeeze() if config.num_labels == 1 else logits - labels
        return float(np.mean(diff**2))
    if problem == "single_label_classification":
        flat = logits.reshape(-1, config.num_labels)
        log_probs = flat - flat.max(axis=-1, keepdims=True)
        log_probs = log_probs - np.log(np.exp(log_probs).sum(axis=-1, keepdims=True))
        return float(-np.mean(log_probs[np.arange(flat.shape[0]), labels.reshape(-1)]))
    # multi-label: binary cross-entropy with logits, mean over every element
    y = labels.astype(np.float64)
    return float(np.mean(np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))))


def pixel_shuffle(x: np.ndarray, r: int) -> np.ndarray:
    """(b, c * r * r, h, w) -> (b, c, h * r, w * r); channel c*r*r + i*r + j lands at (h*r + i, w*r + j)."""
    b, crr, h, w = x.shape
    c = crr // (r * r)
    return x.reshape(b, c, r, r, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, c, h * r, w * r)


def forward(
    state: dict[str, np.ndarray],
    config: ViTConfig,
    pixel_values: np.ndarray,
    task: str = "base",
    *,
    bool_masked_pos: np.ndarray | None = None,
    head_mask: np.ndarray | None = None,
    interpolate_pos_encoding: bool = False,
    labels: np.ndarray | None = None,
    add_pooling_layer: bool = True,
) -> dict[str, Any]:
    """The reference forward of ViTModel ("base"), ViTForImageClassification ("classification") or
    ViTForMaskedImageModeling ("mim"), in float64. Returns a dict of every output."""
    state = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    pixel_values = np.asarray(pixel_values, dtype=np.float64)
    if task == "base":
        return backbone(state, config, pixel_values, bool_masked_pos=bool_masked_pos, head_mask=head_mask,
                        interpolate_pos_encoding=interpolate_pos_encoding, add_pooling_layer=add_pooling_layer)
    out = backbone(state, config, pixel_values, prefix="vit.", bool_masked_pos=bool_masked_pos,
                   head_mask=head_mask, interpolate_pos_encoding=interpolate_pos_encoding)
    result: dict[str, Any] = {"hidden_states": out["hidden_states"], "attentions": out["attentions"], "loss": None}
    last = out["last_hidden_state"]
    if task == "classification":
        cls = last[:, 0]
        logits = linear(cls, state["classifier.weight"], state["classifier.bias"]) if config.num_labels > 0 else cls
        result["logits"] = logits
        if labels is not None:
            result["loss"] = classification_loss(logits, labels, config)
        return result
    if task == "mim":
        b, _, h, w = pixel_values.shape
        ph, pw = config.patch_hw
        gh, gw = h // ph, w // pw
        grid = last[:, 1:].transpose(0, 2, 1).reshape(b, -1, gh, gw)  # (b, d, gh, gw)
        d = grid.shape[1]
        decoded = np.einsum("bdhw,od->bohw", grid, state["decoder.0.weight"].reshape(-1, d))
        decoded = decoded + state["decoder.0.bias"][None, :, None, None]
        reconstruction = pixel_shuffle(decoded, config.encoder_stride)
        result["reconstruction"] = reconstruction
        if bool_masked_pos is not None:
            mask = np.asarray(bool_masked_pos, dtype=np.float64).reshape(b, gh, gw)
            mask = mask.repeat(ph, axis=1).repeat(pw, axis=2)[:, None]  # (b, 1, h, w)
            l1 = np.abs(pixel_values - reconstruction)
            result["loss"] = float((l1 * mask).sum() / (mask.sum() + 1e-5) / config.num_channels)
        return result
    raise ValueError(f"unknown task {task!r}")

"""Attention maps of a ViT from its attention probabilities: rollout and the last layer (numpy only).

Both functions take what every vitx model returns with ``output_attentions=True`` (and what
transformers' ViT classes return): a sequence with one array per layer, each
(batch, heads, tokens, tokens), token 0 the CLS token. The arrays may be numpy, torch, TensorFlow
or JAX: they are read back as float64 numpy, so the maps of the three frameworks are computed by the
same code. See docs/attention.md.

Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020), per layer:

1. fuse the heads: their mean (or max, or min);
2. optionally set the lowest ``discard_ratio`` fraction of the fused weights of each image to zero.
   The CLS-to-CLS weight is never discarded (as in the widely used vit-explain implementation);
3. add the identity (the residual connection) and renormalise every row to sum to 1;
4. multiply into the running product: ``R = A_l @ R``, starting from the identity.

The map is the CLS row of the product over the patches, ``R[:, 0, 1:]``, reshaped to the patch grid
(gh, gw): how much of the final CLS token flows from each patch. Values are not rescaled.
:class:`AttentionRollout` folds one layer at a time, so a caller that gets the layers one by one
never holds more than one layer's attentions (conversion.attention does that).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

HEAD_FUSIONS = ("mean", "max", "min")


def attention_array(attention: Any, what: str = "attention") -> np.ndarray:
    """One layer's attention probabilities as float64 numpy, checked to be (batch, heads, tokens, tokens).

    Args:
        attention: a numpy array, torch tensor (any device, bfloat16 included), TensorFlow tensor or
            JAX array of shape (batch, heads, tokens, tokens).
        what: how error messages name this array (e.g. "attentions[3]").

    Returns:
        float64 numpy array of the same shape.
    """
    if attention is None:
        raise ValueError(f"{what} is None: call the model with output_attentions=True")
    if hasattr(attention, "detach"):  # torch: off the graph, to CPU, out of bfloat16 (numpy has none)
        attention = attention.detach().cpu()
        if hasattr(attention, "float"):
            attention = attention.float()
    if hasattr(attention, "numpy") and not isinstance(attention, np.ndarray):
        attention = attention.numpy()
    array = np.asarray(attention)
    if array.dtype.name == "bfloat16":  # a JAX / TF bfloat16 array (ml_dtypes)
        array = array.astype(np.float32)
    if array.dtype.kind != "f":
        raise ValueError(f"{what}: expected floating-point attention probabilities, got dtype {array.dtype}")
    if array.ndim != 4 or array.shape[2] != array.shape[3] or array.shape[2] < 2:
        raise ValueError(f"{what}: expected shape (batch, heads, tokens, tokens) with tokens >= 2 (CLS + patches), "
                         f"got {tuple(array.shape)}")
    return array.astype(np.float64)


def grid_of(tokens: int, grid_hw: tuple[int, int] | None) -> tuple[int, int]:
    """The patch grid (gh, gw) of ``tokens`` tokens (CLS + gh * gw patches).

    Args:
        tokens: number of tokens, CLS included.
        grid_hw: the grid when known (required for a non-square grid); None: a square grid.

    Returns:
        (gh, gw) with gh * gw == tokens - 1.
    """
    patches = tokens - 1
    if grid_hw is None:
        side = math.isqrt(patches)
        if side * side != patches:
            raise ValueError(f"{patches} patches do not form a square grid: pass grid_hw=(gh, gw)")
        return side, side
    gh, gw = (int(grid_hw[0]), int(grid_hw[1]))
    if gh * gw != patches:
        raise ValueError(f"grid_hw={tuple(grid_hw)} has {gh * gw} patches but the attentions have {patches} "
                         f"(tokens {tokens} = 1 CLS + patches)")
    return gh, gw


def _check_fusion(head_fusion: str) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion={head_fusion!r} is not supported; choose one of {HEAD_FUSIONS}")


def _check_ratio(discard_ratio: float) -> float:
    ratio = float(discard_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
    return ratio


class AttentionRollout:
    """Attention rollout folded one layer at a time (the running product of the module docstring).

    ``rollout = AttentionRollout(discard_ratio, head_fusion)``; ``rollout.add(layer_attention)`` per
    layer, first layer first; ``rollout.cls_map(grid_hw)`` then gives the (batch, gh, gw) map. Holds
    one (batch, tokens, tokens) float64 product, never the layers themselves.

    Args:
        discard_ratio: fraction in [0, 1) of each image's fused weights set to zero per layer (the
            lowest ones; never the CLS-to-CLS weight).
        head_fusion: "mean", "max" or "min" over the heads.
    """

    def __init__(self, discard_ratio: float = 0.0, head_fusion: str = "mean") -> None:
        _check_fusion(head_fusion)
        self.discard_ratio = _check_ratio(discard_ratio)
        self.head_fusion = head_fusion
        self.layers = 0
        self.product: np.ndarray | None = None

    def add(self, attention: Any) -> None:
        """Fold one layer's attention probabilities into the product.

        Args:
            attention: (batch, heads, tokens, tokens) in any framework's array type.
        """
        what = f"attentions[{self.layers}]"
        probs = attention_array(attention, what)
        fused = getattr(probs, self.head_fusion)(axis=1)  # (batch, tokens, tokens)
        batch, tokens, _ = fused.shape
        if self.discard_ratio > 0.0:
            fused = _discard_lowest(fused, self.discard_ratio)
        a = fused + np.eye(tokens)
        a = a / a.sum(axis=-1, keepdims=True)
        if self.product is None:
            self.product = a
        else:
            if self.product.shape != a.shape:
                raise ValueError(f"{what}: shape {tuple(probs.shape)} does not match the earlier layers' "
                                 f"(batch, tokens) = {self.product.shape[:2]}")
            self.product = a @ self.product
        self.layers += 1

    def cls_map(self, grid_hw: tuple[int, int] | None = None) -> np.ndarray:
        """The CLS-to-patch row of the product, (batch, gh, gw) float64.

        Args:
            grid_hw: the patch grid (gh, gw); None for a square grid.
        """
        if self.product is None:
            raise ValueError("attention rollout needs at least one layer of attentions")
        batch, tokens, _ = self.product.shape
        gh, gw = grid_of(tokens, grid_hw)
        return self.product[:, 0, 1:].reshape(batch, gh, gw)


def _discard_lowest(fused: np.ndarray, ratio: float) -> np.ndarray:
    """Zero the ``int(ratio * tokens²)`` lowest weights of each image's fused matrix, the
    CLS-to-CLS weight excepted (it is never a candidate). Ties go to the lower flat index."""
    batch, tokens, _ = fused.shape
    count = int(tokens * tokens * ratio)
    if count == 0:
        return fused
    flat = fused.reshape(batch, tokens * tokens).copy()
    candidates = flat[:, 1:]  # everything but flat index 0, the CLS-to-CLS weight
    order = np.argsort(candidates, axis=-1, kind="stable")[:, :count]
    np.put_along_axis(candidates, order, 0.0, axis=-1)
    flat[:, 1:] = candidates
    return flat.reshape(batch, tokens, tokens)


def attention_rollout(attentions: Iterable[Any], discard_ratio: float = 0.0, head_fusion: str = "mean",
                      grid_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) of a ViT's per-layer attention probabilities.

    Args:
        attentions: one (batch, heads, tokens, tokens) array per layer, first layer first (the
            ``attentions`` output of ``output_attentions=True``), numpy / torch / TF / JAX.
        discard_ratio: fraction in [0, 1) of each layer's fused weights set to zero before the
            identity is added (the lowest ones, per image; never the CLS-to-CLS weight).
        head_fusion: how the heads are fused per layer: "mean", "max" or "min".
        grid_hw: the patch grid (gh, gw); None: a square grid (a non-square one must be given).

    Returns:
        (batch, gh, gw) float64: the rolled-out attention of the CLS token to each patch.
    """
    rollout = AttentionRollout(discard_ratio, head_fusion)
    for attention in attentions:
        rollout.add(attention)
    return rollout.cls_map(grid_hw)


def cls_attention(attention: Any, head: str | int = "mean", grid_hw: tuple[int, int] | None = None,
                  what: str = "attention") -> np.ndarray:
    """The CLS-to-patch attention of one layer, one head or the mean over heads.

    Args:
        attention: (batch, heads, tokens, tokens) in any framework's array type.
        head: "mean" (over heads) or a head index in [0, heads).
        grid_hw: the patch grid (gh, gw); None for a square grid.
        what: how error messages name the array.

    Returns:
        (batch, gh, gw) float64.
    """
    probs = attention_array(attention, what)
    batch, heads, tokens, _ = probs.shape
    gh, gw = grid_of(tokens, grid_hw)
    check_head(head, heads)
    row = probs[:, :, 0, 1:].mean(axis=1) if head == "mean" else probs[:, int(head), 0, 1:]
    return row.reshape(batch, gh, gw)


def check_head(head: str | int, heads: int) -> None:
    """ValueError unless ``head`` is "mean" or a head index in [0, heads).

    Args:
        head: "mean" or a head index.
        heads: the model's number of attention heads.
    """
    if isinstance(head, str):
        if head != "mean":
            raise ValueError(f"head must be 'mean' or a head index, got {head!r}")
        return
    if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or not 0 <= int(head) < heads:
        raise ValueError(f"head={head!r} is out of range: the model has {heads} heads (0..{heads - 1})")


def last_layer_attention(attentions: Sequence[Any], head: str | int = "mean",
                         grid_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The CLS-to-patch attention of the last layer: one head, or the mean over the heads.

    Args:
        attentions: one (batch, heads, tokens, tokens) array per layer (only the last is read),
            numpy / torch / TF / JAX.
        head: "mean" (over heads) or a head index in [0, heads).
        grid_hw: the patch grid (gh, gw); None: a square grid.

    Returns:
        (batch, gh, gw) float64: the last layer's attention probabilities of the CLS token.
    """
    if attentions is None or len(attentions) == 0:
        raise ValueError("last_layer_attention needs at least one layer of attentions (output_attentions=True)")
    return cls_attention(attentions[-1], head, grid_hw, what=f"attentions[{len(attentions) - 1}]")

"""Bicubic resampling of the position-embedding grid: the numpy reference every framework matches.

The kernel is the one transformers >= 4.45 PyTorch ViT uses,
``torch.nn.functional.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)``
without antialiasing: Keys' cubic convolution with a = -0.75, half-pixel centres, source indices
not clamped before the floor (as torch does for cubic), taps clamped to the border. tf.image.resize
(a = -0.5) and jax.image.resize (antialiased when shrinking) differ from it, so each framework
builds the interpolation matrices below instead of calling its resize op.
"""

from __future__ import annotations

import numpy as np

CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
    """Weights of the four taps at offsets -1, 0, 1, 2 for a fractional position t, shape (n, 4)."""
    x0, x1, x2, x3 = t + 1.0, t, 1.0 - t, 2.0 - t

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return np.stack([far(x0), near(x1), near(x2), far(x3)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, dtype: type = np.float64) -> np.ndarray:
    """The (out_size, in_size) matrix M with ``out = M @ in`` along one axis.

    Resampling a grid is then ``M_h @ grid @ M_w.T``: separable, so every framework computes it
    with two small matmuls (exact up to float rounding against torch's direct 16-tap sum).
    """
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    src = (dst + 0.5) * scale - 0.5  # half-pixel centres; no clamp at 0 for cubic (torch)
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), idx), weights[:, tap])
    return matrix.astype(dtype)


def resample_grid(grid: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bicubic resampling of a (..., gh, gw, dim) grid to (..., out_h, out_w, dim)."""
    gh, gw = grid.shape[-3], grid.shape[-2]
    mh = bicubic_matrix(gh, out_hw[0])
    mw = bicubic_matrix(gw, out_hw[1])
    # rows first, then columns: (oh, gh) x (gh, gw, d) -> (oh, gw, d); then (ow, gw) along gw.
    rows = np.einsum("og,...gwd->...owd", mh, grid.astype(np.float64))
    return np.einsum("pw,...owd->...opd", mw, rows)


def resample_position_embeddings(
    position_embeddings: np.ndarray, grid_hw: tuple[int, int], out_hw: tuple[int, int]
) -> np.ndarray:
    """Resample a (1, 1 + gh * gw, dim) position table to a (out_h, out_w) patch grid.

    The CLS row (row 0) passes through unchanged. Returns (1, 1 + out_h * out_w, dim) float64.
    A grid already of the target size is returned as is (no resampling, bitwise).
    """
    gh, gw = grid_hw
    _, tokens, dim = position_embeddings.shape
    if tokens != 1 + gh * gw:
        raise ValueError(f"position table has {tokens} rows, expected 1 + {gh}x{gw} = {1 + gh * gw}")
    if (gh, gw) == tuple(out_hw):
        return position_embeddings.astype(np.float64)
    cls_row = position_embeddings[:, :1].astype(np.float64)
    grid = position_embeddings[:, 1:].reshape(1, gh, gw, dim)
    patches = resample_grid(grid, out_hw).reshape(1, out_hw[0] * out_hw[1], dim)
    return np.concatenate([cls_row, patches], axis=1)

"""The Flax primitives whose numerics must match vit_core's numpy references, in one place.

Everything that differs between frameworks in primitive behaviour lives here: the activation
table (exact-erf GELU, not jax's tanh default), the two-pass LayerNorm, the attention softmax in
float32, the bicubic position-grid resampling (constant matrices, never jax.image.resize), the
strided patch convolution, pixel shuffle and dropout. Each is tested against vit_core.

The CPU speed paths live here too, so modeling.py reads as the architecture: bfloat16 dots with
float32 results, attention with (batch, heads) leading, and sub-batching of large batches, as
vit_core.cpu's plan for the CPU and dtype says (:func:`speed_plan`; docs/performance.md). Each
computes the same sums as the plain path; why each exists is measured in benchmarks/RESULTS.md.

Parameter layouts are Flax's (the layouts of transformers' Flax checkpoints, docs/FORMATS.md section 4):
``Linear.kernel`` (in, out), ``Conv2d.kernel`` (kh, kw, in, out), ``LayerNorm.scale``. The one
rule mapping them to canonical names lives in ``vit_flax.weights``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_core import cpu
from vit_core.resample import bicubic_matrix

Array = jax.Array
DType = jnp.dtype | type

# ----------------------------------------------------------------------------------- activations
def gelu_fast(x: Array) -> Array:
    """transformers "gelu_fast": the tanh form written as x * 0.7978845608 * (1 + 0.044715 x^2)."""
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def quick_gelu(x: Array) -> Array:
    """x * sigmoid(1.702 x) (CLIP's)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: Array) -> Array:
    """Exact GELU with erf. jax.nn.gelu defaults to the tanh form (off by up to 4.7e-4)."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: Array) -> Array:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): "gelu_new" / "gelu_pytorch_tanh"."""
    return jax.nn.gelu(x, approximate=True)


# The same names and formulas as vit_core.activations.ACTIVATIONS (tested against it).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_fast,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """The activation for a config's ``hidden_act`` / ``pooler_act`` name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------------- initialisers
@functools.partial(jax.jit, static_argnames=("init", "shape"))
def init_array(init: str, key: Array, shape: tuple[int, ...], std: float) -> Array:
    """A fresh float32 parameter by the canonical table's ``init`` name (WeightSpec.init).

    "trunc_normal": normal with standard deviation ``std`` cut at +-2 std (no variance correction,
    unlike jax.nn.initializers.truncated_normal), as vit_torch's nn.init.trunc_normal_(std, -2 std,
    2 std); "zeros"; "ones". Compiled once per (init, shape): a model has few distinct shapes.
    """
    if init == "trunc_normal":
        return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    if init == "zeros":
        return jnp.zeros(shape, jnp.float32)
    if init == "ones":
        return jnp.ones(shape, jnp.float32)
    raise ValueError(f"unknown initialiser {init!r}; expected 'trunc_normal', 'zeros' or 'ones'")


def _placeholder(shape: tuple[int, ...], param_dtype: DType) -> nnx.Param:
    """A zero parameter; the model classes initialise every parameter from the canonical table."""
    return nnx.Param(jnp.zeros(shape, param_dtype))


# ----------------------------------------------------------------------------------- matmuls
def speed_plan(dtype: DType) -> cpu.PathPlan | None:
    """The CPU speed paths vit_core.cpu chose for Flax in ``dtype`` on this CPU (None for other dtypes)."""
    name = jnp.dtype(dtype).name
    return cpu.current_plan("flax", name) if name in cpu.DTYPES else None


def accumulator_dtype(dtype: jnp.dtype) -> jnp.dtype | None:
    """The result type to ask of a dot computed in ``dtype``: float32 where the vit_core.cpu plan
    says ``gemm="dot_f32_result"`` (bfloat16), else the input's (None).

    A bfloat16 dot is accumulated in float32 and rounded once either way, but XLA's CPU backend
    widens both operands to float32 for a bfloat16-result dot (and writes the widened weights out
    on every call), while a bfloat16 x bfloat16 -> float32 dot runs on the CPU's bf16
    instructions, at about twice the rate (measured in benchmarks/RESULTS.md). Callers round the
    result back.
    """
    plan = speed_plan(dtype)
    return jnp.dtype(jnp.float32) if plan is not None and plan.gemm == "dot_f32_result" else None


# ----------------------------------------------------------------------------------- leaf layers
class Linear(nnx.Module):
    """y = x @ kernel + bias (torch.nn.Linear). kernel (in_features, out_features): Flax's layout."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: DType = jnp.float32, param_dtype: DType = jnp.float32) -> None:
        self.kernel = _placeholder((in_features, out_features), param_dtype)
        self.bias = _placeholder((out_features,), param_dtype) if bias else None
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: Array) -> Array:
        """(..., in_features) -> (..., out_features), computed in ``dtype``."""
        y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                       preferred_element_type=accumulator_dtype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype).astype(y.dtype)
        return y.astype(self.dtype)  # bfloat16: the float32 sum x @ kernel + bias rounded once


class Conv2d(nnx.Module):
    """A convolution whose stride equals its kernel, without padding, on NCHW inputs (torch.nn.Conv2d
    with stride = kernel_size): all ViT needs (the patch projection and the 1x1 SimMIM decoder).

    Computed as non-overlapping patches @ kernel, which equals lax.conv_general_dilated to float
    rounding (tested) and is one plain matmul for XLA. kernel (kh, kw, in, out) is Flax's HWIO
    layout. Pixels past the last whole patch are dropped, as a strided convolution does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], *,
                 dtype: DType = jnp.float32, param_dtype: DType = jnp.float32) -> None:
        kh, kw = kernel_size
        self.kernel = _placeholder((kh, kw, in_channels, out_channels), param_dtype)
        self.bias = _placeholder((out_channels,), param_dtype)
        self.kernel_size = (kh, kw)
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: Array) -> Array:
        """(batch, in, height, width) -> (batch, out, height // kh, width // kw)."""
        batch, channels, height, width = x.shape
        kh, kw = self.kernel_size
        gh, gw = height // kh, width // kw
        x = x[:, :, : gh * kh, : gw * kw].astype(self.dtype)
        patches = x.reshape(batch, channels, gh, kh, gw, kw)
        # (batch, gh, gw, kh, kw, channels): the kernel's (kh, kw, in) order, flattened for one matmul
        patches = patches.transpose(0, 2, 4, 3, 5, 1).reshape(batch, gh, gw, kh * kw * channels)
        kernel = self.kernel[...].astype(self.dtype).reshape(kh * kw * channels, -1)  # (kh * kw * in, out)
        y = jnp.matmul(patches, kernel, preferred_element_type=accumulator_dtype(self.dtype))
        y = (y + self.bias[...].astype(self.dtype).astype(y.dtype)).astype(self.dtype)  # (batch, gh, gw, out)
        return y.transpose(0, 3, 1, 2)  # (batch, out, gh, gw)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with a two-pass variance mean((x - mean)^2), as torch computes it.

    flax.nnx.LayerNorm uses E[x^2] - E[x]^2, which loses digits when the mean is large. The
    statistics and the normalisation run in float32 whatever the compute dtype.
    """

    def __init__(self, hidden_size: int, eps: float, *, dtype: DType = jnp.float32,
                 param_dtype: DType = jnp.float32) -> None:
        self.scale = _placeholder((hidden_size,), param_dtype)
        self.bias = _placeholder((hidden_size,), param_dtype)
        self.eps = float(eps)
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: Array) -> Array:
        """(..., hidden) -> (..., hidden)."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        var = jnp.mean(centered * centered, axis=-1, keepdims=True)  # biased, two-pass
        y = centered * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def layer_norm(hidden_size: int, eps: float, *, dtype: DType, param_dtype: DType) -> LayerNorm:
    """The model's LayerNorm; eps always comes from the config (1e-12 for transformers checkpoints,
    1e-6 for timm / JAX originals), never a framework default."""
    return LayerNorm(hidden_size, eps, dtype=dtype, param_dtype=param_dtype)


def patch_projection(num_channels: int, hidden_size: int, patch_hw: tuple[int, int], *, dtype: DType,
                     param_dtype: DType) -> Conv2d:
    """The patch embedding: a convolution with kernel = stride = patch size; kernel (ph, pw, channels, hidden)."""
    return Conv2d(num_channels, hidden_size, patch_hw, dtype=dtype, param_dtype=param_dtype)


# ----------------------------------------------------------------------------------- attention
def eager_attention(query: Array, key: Array, value: Array, scaling: float, head_mask: Array | None,
                    dropout_prob: float, dropout_rng: Array | None) -> tuple[Array, Array]:
    """Attention written out, returning the probabilities.

    query/key/value (batch, heads, tokens, head_dim); head_mask broadcastable to
    (batch, heads, tokens, tokens) or None. The scores and the softmax are float32 whatever the
    input dtype. As in transformers, dropout then the head mask act on the probabilities, and
    those are returned. Returns context (batch, heads, tokens, head_dim) and probabilities
    (batch, heads, tokens, tokens) in the query's dtype.
    """
    scores = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32) * scaling
    probs = jax.nn.softmax(scores, axis=-1).astype(query.dtype)  # (batch, heads, tokens, tokens)
    probs = dropout(probs, dropout_prob, dropout_rng)
    if head_mask is not None:
        probs = probs * head_mask.astype(probs.dtype)
    context = jnp.einsum("bhqk,bhkd->bhqd", probs, value, preferred_element_type=accumulator_dtype(value.dtype))
    return context.astype(value.dtype), probs  # (batch, heads, tokens, head_dim)


def fused_attention(query: Array, key: Array, value: Array, scaling: float) -> Array:
    """Attention without probabilities for the caller: same shapes as :func:`eager_attention`.

    On CPU the formula is written out with (batch, heads) leading, which XLA compiles to batched
    dots of each head's (tokens, head_dim) blocks; jax.nn.dot_product_attention's CPU lowering
    (einsums over (batch, tokens, heads, head_dim) operands) is slower, most in bfloat16
    (benchmarks/flax_speed.py --attention; measured in benchmarks/RESULTS.md). Elsewhere
    (GPU, TPU) jax.nn.dot_product_attention picks the backend's fused kernel. Scores and softmax
    in float32 either way; no dropout (training with attention dropout takes the eager path).
    """
    if jax.default_backend() == "cpu":
        scores = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32) * scaling
        probs = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
        context = jnp.einsum("bhqk,bhkd->bhqd", probs, value, preferred_element_type=accumulator_dtype(value.dtype))
        return context.astype(value.dtype)  # (batch, heads, tokens, head_dim)
    # jax.nn.dot_product_attention takes (batch, tokens, heads, head_dim)
    context = jax.nn.dot_product_attention(query.transpose(0, 2, 1, 3), key.transpose(0, 2, 1, 3),
                                           value.transpose(0, 2, 1, 3), scale=scaling)
    return context.transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------------- other ops
def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout; the identity when ``rng`` is None (inference) or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def split_rng(rng: Array | None, n: int) -> list[Array | None]:
    """n independent keys from one (or n Nones when there is no key: no dropout)."""
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))


@functools.lru_cache(maxsize=64)
def _bicubic_matrix_f32(in_size: int, out_size: int) -> np.ndarray:
    return bicubic_matrix(in_size, out_size, dtype=np.float32)


def resample_position_grid(patch_pos_embed: Array, grid_hw: tuple[int, int], out_hw: tuple[int, int]) -> Array:
    """Bicubic resampling of the patch rows of a position table, as ``M_h @ grid @ M_w.T``.

    patch_pos_embed (1, gh * gw, dim) -> (1, out_h * out_w, dim), computed in float32 and returned
    in the input dtype. The kernel is torch's bicubic interpolate (a = -0.75, align_corners=False,
    no antialiasing; jax.image.resize uses a = -0.5 and antialiases): vit_core.resample's constant
    matrices, built with numpy at trace time, applied with two matmuls at full float32 precision.
    """
    gh, gw = grid_hw
    out_h, out_w = out_hw
    dim = patch_pos_embed.shape[-1]
    grid = patch_pos_embed.reshape(gh, gw, dim).astype(jnp.float32)  # (gh, gw, dim)
    matrix_h = jnp.asarray(_bicubic_matrix_f32(gh, out_h))  # (out_h, gh)
    matrix_w = jnp.asarray(_bicubic_matrix_f32(gw, out_w))  # (out_w, gw)
    highest = jax.lax.Precision.HIGHEST
    rows = jnp.einsum("og,gwd->owd", matrix_h, grid, precision=highest)  # (out_h, gw, dim)
    resampled = jnp.einsum("pw,owd->opd", matrix_w, rows, precision=highest)  # (out_h, out_w, dim)
    return resampled.reshape(1, out_h * out_w, dim).astype(patch_pos_embed.dtype)


def pixel_shuffle(x: Array, upscale_factor: int) -> Array:
    """(batch, c * r * r, h, w) -> (batch, c, h * r, w * r), torch.nn.PixelShuffle's channel order."""
    batch, crr, height, width = x.shape
    r = upscale_factor
    channels = crr // (r * r)
    x = x.reshape(batch, channels, r, r, height, width)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(batch, channels, height * r, width * r)


class PixelShuffle(nnx.Module):
    """torch.nn.PixelShuffle as a parameter-free module (decoder.1 of the SimMIM head)."""

    def __init__(self, upscale_factor: int) -> None:
        self.upscale_factor = upscale_factor

    def __call__(self, x: Array) -> Array:
        """(batch, c * r * r, h, w) -> (batch, c, h * r, w * r)."""
        return pixel_shuffle(x, self.upscale_factor)


# ----------------------------------------------------------------------------------- CPU speed paths
# ViTEncoder runs CPU inference batches as sub-batches of at most this many token rows (5 images
# of ViT-*/16 at 224): XLA's CPU dots lose rate on 6k-row operands (see splits_batch).
INFERENCE_CHUNK_ROWS = 1024


def splits_batch(hidden_states: Array, head_mask: Array | None, output_attentions: bool,
                 output_hidden_states: bool, dropout_rng: Array | None) -> bool:
    """Whether the encoder runs the batch in sub-batches (:func:`run_in_sub_batches`): the
    vit_core.cpu plan's ``sub_batches``, CPU inference (no dropout) of more than INFERENCE_CHUNK_ROWS token rows, no head mask and no
    per-layer outputs, at a known batch size (a symbolic one, as in jax.export, runs whole)."""
    batch_size, tokens = hidden_states.shape[:2]
    plan = speed_plan(hidden_states.dtype)
    return (
        plan is not None
        and plan.sub_batches
        and isinstance(batch_size, int)
        and batch_size * tokens > INFERENCE_CHUNK_ROWS
        and batch_size > 1
        and head_mask is None
        and not output_attentions
        and not output_hidden_states
        and dropout_rng is None
        and jax.default_backend() == "cpu"
    )


def run_in_sub_batches(run_layers: Callable[[Array], Array], hidden_states: Array) -> Array:
    """``run_layers`` (batch, tokens, hidden) -> (batch, tokens, hidden) on sub-batches of about
    INFERENCE_CHUNK_ROWS token rows, concatenated. Each image's computation is unchanged.

    Pairs of sub-batches are the body of one ``lax.map`` (a while loop, one pair at a time):
    compiled once however large the batch, and the two sub-batches of a pair are independent, so
    XLA may run them side by side. The one sub-batch and the remainder left after the pairs run
    as calls of their own (as vit_tf's, where pairs measured up to 1.08x one sub-batch at a time;
    here level: benchmarks/RESULTS.md)."""
    batch_size, tokens, hidden = hidden_states.shape
    images = max(1, INFERENCE_CHUNK_ROWS // tokens)
    paired = batch_size // (2 * images) * 2 * images
    outputs = []
    if paired:
        pairs = hidden_states[:paired].reshape(paired // (2 * images), 2, images, tokens, hidden)
        mapped = jax.lax.map(lambda pair: jnp.stack([run_layers(pair[0]), run_layers(pair[1])]), pairs)
        outputs.append(mapped.reshape(paired, tokens, hidden))
    outputs += [run_layers(hidden_states[i:i + images]) for i in range(paired, batch_size, images)]
    return jnp.concatenate(outputs) if len(outputs) > 1 else outputs[0]

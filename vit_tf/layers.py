"""The TensorFlow primitives whose numerics must match vit_core's numpy references.

Everything that differs between frameworks in how a ViT computes lives here, in one small place:
the activation table, LayerNorm, the attention kernels (fused and eager), the bicubic resampling
of the position grid, the patch convolution and the leaf layers that hold weights. tests/test_models.py
checks each against vit_core. The inference speed paths (bfloat16 dots with float32 results under
XLA, sub-batching of large batches) live here too, so modeling.py reads as the architecture;
whether they run is vit_core.cpu's plan for the CPU and dtype (:func:`speed_plan`;
docs/performance.md), why they exist is measured in benchmarks/RESULTS.md.

Leaf layers (``Dense``, ``LayerNorm``, ``Conv2d``) create their weights in ``__init__`` (shapes are
known from the config), named ``weight`` / ``bias`` like the canonical names; the layouts are
TensorFlow's: Dense ``weight`` is (in, out), Conv2d ``weight`` is HWIO (kh, kw, in, out).
vit_tf/weights.py converts by kind. Values start at zero: the model classes initialise every
weight from the canonical table (weights.init_weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from vit_core import cpu
from vit_core.resample import bicubic_matrix as numpy_bicubic_matrix

try:  # TensorFlow's own test of an XLA trace (compiling_for_xla); absent: TF's kernels, always correct
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext as _in_xla_context
except ImportError:
    _in_xla_context = None

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(x: tf.Tensor) -> tf.Tensor:
    """Exact GELU, x * Phi(x) with erf (transformers "gelu")."""
    return 0.5 * x * (1.0 + tf.math.erf(x / tf.cast(math.sqrt(2.0), x.dtype)))


def gelu_new(x: tf.Tensor) -> tf.Tensor:
    """tanh approximation ("gelu_new", "gelu_pytorch_tanh"; the original JAX ViT's)."""
    return 0.5 * x * (1.0 + tf.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def gelu_fast(x: tf.Tensor) -> tf.Tensor:
    """transformers "gelu_fast": the tanh GELU with the constant written as 0.7978845608."""
    return 0.5 * x * (1.0 + tf.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def quick_gelu(x: tf.Tensor) -> tf.Tensor:
    """x * sigmoid(1.702 x) (CLIP's)."""
    return x * tf.sigmoid(1.702 * x)


def silu(x: tf.Tensor) -> tf.Tensor:
    return x * tf.sigmoid(x)


# config.hidden_act / config.pooler_act -> function. Same names and formulas as
# vit_core.activations.ACTIVATIONS (the float64 references these are tested against).
ACTIVATIONS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "gelu": gelu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,
    "gelu_fast": gelu_fast,
    "quick_gelu": quick_gelu,
    "relu": tf.nn.relu,
    "silu": silu,
    "swish": silu,
    "tanh": tf.tanh,
}


def get_activation(name: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """The activation called ``name`` in a ViT config (ValueError for an unknown name)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


# ------------------------------------------------------------------------------ matmuls
def speed_plan(dtype: tf.DType) -> cpu.PathPlan | None:
    """The CPU speed paths vit_core.cpu chose for TensorFlow in ``dtype`` on this CPU (None for other dtypes)."""
    name = tf.as_dtype(dtype).name
    return cpu.current_plan("tf", name) if name in cpu.DTYPES else None


def compiling_for_xla() -> bool:
    """Whether the call is being traced into an XLA computation (``tf.function(jit_compile=True)``,
    Keras ``jit_compile``), where ops lower to XLA HLO instead of running TensorFlow's kernels."""
    if _in_xla_context is None or tf.executing_eagerly():
        return False
    return bool(_in_xla_context(tf.compat.v1.get_default_graph()))


def accumulator_dtype(dtype: tf.DType) -> tf.DType | None:
    """The result type to ask of a matmul computed in ``dtype``: float32 where the vit_core.cpu plan
    says ``gemm="matmul_xla_f32_result"`` (bfloat16 on bf16 hardware) and XLA compiles the call,
    else the input's (None).

    XLA's CPU backend widens both operands of a bfloat16-result dot to float32, while a bfloat16 x
    bfloat16 -> float32 dot runs on the CPU's bf16 instructions at about twice the rate (measured
    in benchmarks/RESULTS.md). TensorFlow's graph kernels have no bf16 -> float32 matmul, so
    outside XLA the matmul stays bf16. Callers round the result back. The patch convolution keeps
    a bf16-result convolution (one op per forward; vit_flax computes it as a dot).
    """
    plan = speed_plan(dtype)
    if plan is None or plan.gemm != "matmul_xla_f32_result" or not compiling_for_xla():
        return None
    return tf.float32


def matmul(x: tf.Tensor, y: tf.Tensor, transpose_b: bool = False, result_dtype: tf.DType | None = None) -> tf.Tensor:
    """``x @ y`` (``y`` transposed in its last two axes with ``transpose_b``; leading axes broadcast
    as ``tf.linalg.matmul``), with a ``result_dtype`` result where given (bf16 operands, float32
    sums kept: BatchMatMulV3's ``Tout``; TensorFlow has CPU kernels of it for integer operands
    only, so under XLA only, see :func:`accumulator_dtype`), else in the operands' dtype. Its
    gradient is ``tf.linalg.matmul``'s in the operands' dtype."""
    if result_dtype is None:
        return tf.linalg.matmul(x, y, transpose_b=transpose_b)

    @tf.custom_gradient
    def product(a: tf.Tensor, b: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], list[tf.Tensor]]]:
        def grad(upstream: tf.Tensor) -> list[tf.Tensor]:
            # BatchMatMulV3's registered gradient multiplies the float32 upstream by the bf16
            # operands (a dtype error): the operands'-dtype matmul's instead, whose forward value
            # is unused (XLA drops it)
            with tf.GradientTape() as tape:
                tape.watch([a, b])
                same = tf.linalg.matmul(a, b, transpose_b=transpose_b)
            return tape.gradient(same, [a, b], output_gradients=tf.cast(upstream, same.dtype))

        return tf.raw_ops.BatchMatMulV3(x=a, y=b, Tout=result_dtype, adj_y=transpose_b), grad

    return product(x, y)


# ------------------------------------------------------------------------------ leaf layers
class Dense(keras.Layer):
    """y = x @ weight + bias; weight (in_features, out_features) (TF layout of a canonical "linear")."""

    def __init__(self, in_features: int, out_features: int, use_bias: bool = True, *, dtype: str, name: str) -> None:
        super().__init__(name=name, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight = self.add_weight(shape=(in_features, out_features), initializer="zeros", name="weight")
        self.bias = self.add_weight(shape=(out_features,), initializer="zeros", name="bias") if use_bias else None
        self.built = True

    def call(self, x: tf.Tensor) -> tf.Tensor:
        """(..., in) -> (..., out)."""
        accumulator = accumulator_dtype(x.dtype)
        if accumulator is not None:  # bf16 operands, float32 sum + bias, rounded once
            # as a 2-D product (as tensordot): one GEMM over every row, and so is its weight gradient
            rows = tf.reshape(x, (-1, self.in_features))
            y = matmul(rows, tf.cast(self.weight, x.dtype), result_dtype=accumulator)
            y = y if self.bias is None else y + tf.cast(self.bias, accumulator)
            y = tf.reshape(tf.cast(y, x.dtype), tf.concat([tf.shape(x)[:-1], [self.out_features]], axis=0))
            return tf.ensure_shape(y, x.shape[:-1].concatenate([self.out_features]))
        y = tf.matmul(x, self.weight) if x.shape.rank == 2 else tf.tensordot(x, self.weight, axes=1)
        return y if self.bias is None else y + self.bias


class LayerNorm(keras.Layer):
    """LayerNorm over the last axis with the config's eps and torch's two-pass (biased) variance.

    Computed in float32 whatever the compute dtype (bfloat16 / float16 statistics lose digits),
    then cast back. keras.layers.LayerNormalization is not used: its eps default and its
    fused-moments path are framework choices; this one is written out to match the reference.
    """

    def __init__(self, hidden_size: int, eps: float, *, dtype: str, name: str) -> None:
        super().__init__(name=name, dtype=dtype)
        self.eps = float(eps)
        self.weight = self.add_weight(shape=(hidden_size,), initializer="ones", name="weight")
        self.bias = self.add_weight(shape=(hidden_size,), initializer="zeros", name="bias")
        self.built = True

    def call(self, x: tf.Tensor) -> tf.Tensor:
        """(..., hidden) -> (..., hidden)."""
        x32 = tf.cast(x, tf.float32)
        mean = tf.reduce_mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        variance = tf.reduce_mean(tf.square(centered), axis=-1, keepdims=True)  # two-pass, as torch
        normed = centered * tf.math.rsqrt(variance + self.eps)
        out = normed * tf.cast(self.weight, tf.float32) + tf.cast(self.bias, tf.float32)
        return tf.cast(out, x.dtype)


class Conv2d(keras.Layer):
    """Convolution with kernel = stride (the patch embedding, and SimMIM's 1x1 decoder).

    Input and output are NHWC (TensorFlow's CPU convolution supports no other layout); weight is
    HWIO (kh, kw, in, out). VALID padding: pixels past the last whole patch are dropped, as the
    canonical (PyTorch) convolution does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_hw: tuple[int, int], *, dtype: str, name: str) -> None:
        super().__init__(name=name, dtype=dtype)
        self.kernel_hw = tuple(kernel_hw)
        self.weight = self.add_weight(shape=(*self.kernel_hw, in_channels, out_channels), initializer="zeros",
                                      name="weight")
        self.bias = self.add_weight(shape=(out_channels,), initializer="zeros", name="bias")
        self.built = True

    def call(self, x: tf.Tensor) -> tf.Tensor:
        """(batch, height, width, in) -> (batch, height // kh, width // kw, out)."""
        if x.shape[0] == 0:
            # TensorFlow's CPU convolution returns its empty input unchanged, shape and all: the
            # empty result of the right shape instead, as torch gives (batch 0 runs everywhere)
            (kh, kw), out_channels = self.kernel_hw, self.weight.shape[-1]
            return tf.zeros((0, x.shape[1] // kh, x.shape[2] // kw, out_channels), self.compute_dtype)
        y = tf.nn.conv2d(x, self.weight, strides=(1, *self.kernel_hw, 1), padding="VALID")
        return tf.nn.bias_add(y, self.bias)


def layer_norm(hidden_size: int, eps: float, *, dtype: str, name: str) -> LayerNorm:
    """The LayerNorm of a ViT block; eps always comes from the config (1e-12 for transformers
    checkpoints, 1e-6 for timm / JAX originals), never a framework default."""
    return LayerNorm(hidden_size, eps, dtype=dtype, name=name)


def patch_projection(num_channels: int, hidden_size: int, patch_hw: tuple[int, int], *, dtype: str) -> Conv2d:
    """The patch embedding: a convolution with kernel = stride = patch size, HWIO weight (ph, pw, C, D)."""
    return Conv2d(num_channels, hidden_size, patch_hw, dtype=dtype, name="projection")


# ------------------------------------------------------------------------------ attention
def eager_attention(
    query: tf.Tensor,
    key: tf.Tensor,
    value: tf.Tensor,
    scaling: float,
    head_mask: tf.Tensor | None,
    dropout: Callable[[tf.Tensor], tf.Tensor] | None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Attention written out, returning the probabilities.

    query/key/value (batch, heads, tokens, head_dim); head_mask broadcastable to
    (batch, heads, tokens, tokens) or None; ``dropout`` applied to the probabilities (training).
    Returns context (batch, heads, tokens, head_dim) and probabilities (batch, heads, tokens, tokens)
    after dropout and head mask, as transformers'. The scores are upcast and the softmax runs in
    float32 whatever the compute dtype (bfloat16 / float16 logits lose the tail).
    """
    accumulator = accumulator_dtype(query.dtype)
    scores = matmul(query, key, transpose_b=True, result_dtype=accumulator)  # (batch, heads, tokens, tokens)
    scores = tf.cast(scores, tf.float32) * scaling
    probs = tf.cast(tf.nn.softmax(scores, axis=-1), query.dtype)
    if dropout is not None:
        probs = dropout(probs)
    if head_mask is not None:
        probs = probs * head_mask
    context = matmul(probs, value, result_dtype=accumulator)  # (batch, heads, tokens, head_dim)
    return tf.cast(context, value.dtype), probs


def fused_attention(query: tf.Tensor, key: tf.Tensor, value: tf.Tensor, scaling: float) -> tf.Tensor:
    """The same attention without materialising per-head probabilities for the caller.

    TensorFlow has no fused attention kernel on CPU; keras.ops.dot_product_attention lowers to two
    einsums with (batch, tokens, heads, head_dim) operands, which measured slower here than the
    batched matmuls below (benchmarks/tf_speed.py --attention; measured in benchmarks/RESULTS.md). Same shapes as
    :func:`eager_attention`, no probabilities (nothing kept for the caller, no head mask or
    dropout); softmax in float32.
    """
    accumulator = accumulator_dtype(query.dtype)
    scores = tf.cast(matmul(query, key, transpose_b=True, result_dtype=accumulator), tf.float32) * scaling
    probs = tf.cast(tf.nn.softmax(scores, axis=-1), query.dtype)
    return tf.cast(matmul(probs, value, result_dtype=accumulator), value.dtype)  # (batch, heads, tokens, head_dim)


# ------------------------------------------------------------------------------ position grid
def bicubic_matrix(in_size: int, out_size: int) -> tf.Tensor:
    """vit_core.resample.bicubic_matrix as a float32 constant (built with numpy at trace time:
    sizes are static in a ViT graph, so XLA sees a constant)."""
    return tf.constant(numpy_bicubic_matrix(in_size, out_size, dtype=np.float32))


def resample_position_grid(patch_pos_embed: tf.Tensor, grid_hw: tuple[int, int], out_hw: tuple[int, int]) -> tf.Tensor:
    """Bicubic resampling of the patch rows of a position table, as ``M_h @ grid @ M_w.T``.

    patch_pos_embed (1, gh * gw, dim) -> (1, out_h * out_w, dim), computed in float32 and returned
    in the input dtype. The kernel is torch's bicubic interpolate (a = -0.75, align_corners=False,
    no antialiasing), the one transformers >= 4.45 PyTorch uses; tf.image.resize's bicubic
    (a = -0.5) is a different kernel and is not used.
    """
    gh, gw = grid_hw
    out_h, out_w = out_hw
    dim = patch_pos_embed.shape[-1]
    grid = tf.reshape(tf.cast(patch_pos_embed, tf.float32), (gh, gw, dim))  # (gh, gw, dim)
    matrix_h = bicubic_matrix(gh, out_h)  # (out_h, gh)
    matrix_w = bicubic_matrix(gw, out_w)  # (out_w, gw)
    rows = tf.einsum("og,gwd->owd", matrix_h, grid)  # (out_h, gw, dim)
    resampled = tf.einsum("pw,owd->opd", matrix_w, rows)  # (out_h, out_w, dim)
    return tf.cast(tf.reshape(resampled, (1, out_h * out_w, dim)), patch_pos_embed.dtype)


class PixelShuffle(keras.Layer):
    """SimMIM's pixel shuffle, from channels-last tokens to an NCHW image.

    (batch, gh, gw, channels * r * r) -> (batch, channels, gh * r, gw * r); channel
    c * r * r + i * r + j lands at (gh * r + i, gw * r + j), as torch.nn.PixelShuffle.
    """

    def __init__(self, upscale_factor: int, *, dtype: str, name: str) -> None:
        super().__init__(name=name, dtype=dtype)
        self.upscale_factor = upscale_factor
        self.built = True

    def call(self, x: tf.Tensor) -> tf.Tensor:
        r = self.upscale_factor
        batch_size = tf.shape(x)[0]
        gh, gw, crr = x.shape[1], x.shape[2], x.shape[3]
        channels = crr // (r * r)
        x = tf.reshape(x, (batch_size, gh, gw, channels, r, r))
        x = tf.transpose(x, (0, 3, 1, 4, 2, 5))  # (batch, channels, gh, r, gw, r)
        return tf.reshape(x, (batch_size, channels, gh * r, gw * r))


# ------------------------------------------------------------------------------ speed paths
# ViTEncoder runs inference batches as sub-batches of at most this many token rows (5 images of
# ViT-*/16 at 224): see splits_batch.
INFERENCE_CHUNK_ROWS = 1024


def splits_batch(hidden_states: tf.Tensor, head_mask: tf.Tensor | None, output_attentions: bool,
                 output_hidden_states: bool, training: bool) -> bool:
    """Whether the encoder runs the batch in sub-batches (:func:`run_in_sub_batches`): the
    vit_core.cpu plan's ``sub_batches`` for the compute dtype (float32 yes; bfloat16 runs whole:
    TensorFlow's bf16 matmul gains rate with rows, measured in benchmarks/RESULTS.md) or, for
    bfloat16 under XLA with float32-result dots (:func:`accumulator_dtype`), yes as in vit_flax
    (XLA's CPU dots lose rate on 6k-row operands); inference of more than INFERENCE_CHUNK_ROWS
    token rows at a static batch size (a traced ``None`` batch runs whole), no head mask and no
    per-layer outputs."""
    batch_size, tokens = hidden_states.shape[:2]
    plan = speed_plan(hidden_states.dtype)
    return (
        plan is not None
        and (plan.sub_batches or accumulator_dtype(hidden_states.dtype) is not None)
        and batch_size is not None
        and batch_size > 1
        and batch_size * tokens > INFERENCE_CHUNK_ROWS
        and head_mask is None
        and not output_attentions
        and not output_hidden_states
        and not training
    )


def run_in_sub_batches(run_layers: Callable[[tf.Tensor], tf.Tensor], hidden_states: tf.Tensor) -> tf.Tensor:
    """``run_layers`` (batch, tokens, hidden) -> (batch, tokens, hidden) on sub-batches of about
    INFERENCE_CHUNK_ROWS token rows, concatenated. Each image's computation is unchanged.

    Pairs of sub-batches are the body of one ``tf.map_fn`` (a while loop, one pair at a time):
    traced and compiled once however large the batch, and the two sub-batches of a pair are
    independent, so TF's executor and XLA run them side by side (up to 1.08x one sub-batch at a
    time). The one sub-batch and the remainder left after the pairs run as calls of their own, as
    vit_flax's. Unrolled into one call per sub-batch, XLA compiled a copy of the encoder per
    sub-batch: at ViT-S/16 batch 128 (26 of them) an 88 s first call and 3.5 GB peak memory,
    against 18 s and 1.6 GB now (benchmarks/RESULTS.md)."""
    batch_size, tokens, hidden = hidden_states.shape
    images = max(1, INFERENCE_CHUNK_ROWS // tokens)
    paired = batch_size // (2 * images) * 2 * images
    outputs = []
    if paired:
        pairs = tf.reshape(hidden_states[:paired], (paired // (2 * images), 2, images, tokens, hidden))
        mapped = tf.map_fn(lambda pair: tf.stack([run_layers(pair[0]), run_layers(pair[1])]), pairs,
                           parallel_iterations=1,
                           fn_output_signature=tf.TensorSpec((2, images, tokens, hidden), hidden_states.dtype))
        outputs.append(tf.reshape(mapped, (paired, tokens, hidden)))
    outputs += [run_layers(hidden_states[i:i + images]) for i in range(paired, batch_size, images)]
    return tf.concat(outputs, axis=0) if len(outputs) > 1 else outputs[0]

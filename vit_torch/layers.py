"""The PyTorch primitives whose numerics must match vit_core's numpy references, and the CPU speed paths.

Everything that differs between frameworks in how a ViT computes lives here, in one small place:
the activation table, LayerNorm, the attention kernels (fused and eager), the bicubic resampling
of the position grid and the patch embedding. tests/test_models.py checks each against vit_core.

The CPU inference speed paths live here too, so modeling.py reads as the architecture: the
prepacked oneDNN Linear (with the GELU and the residual adds fused into its GEMM), q / k / v as
one GEMM, the patch convolution as one matmul, bfloat16 attention image by image, and
sub-batching of large batches. Which of them run is not decided here: vit_core.cpu's plan for the
CPU's ISA and the dtype says (:func:`speed_plan`; docs/performance.md). Each computes the same sums
as the plain path; why each exists is measured in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from vit_core import cpu
from vit_core.resample import CUBIC_A

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def tracing() -> bool:
    """Whether the forward is being compiled, exported or traced (torch.compile, torch.export, the
    dynamo ONNX exporter, torch.jit.trace, the legacy ONNX exporter): the CPU speed paths below
    (oneDNN prepacked GEMMs, sub-batches, per-image bfloat16 attention) are eager-only, and a
    graph must not depend on the batch size."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export())


def gelu_fast(x: torch.Tensor) -> torch.Tensor:
    """transformers "gelu_fast": the tanh GELU with the constant written as 0.7978845608."""
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers "gelu_new" (tanh approximation, the original JAX ViT's), written out like
    transformers' NewGELUActivation so it agrees with it to the last bit, not just to 1e-7."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) (CLIP's)."""
    return x * torch.sigmoid(1.702 * x)


def _gelu_exact(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # erf form: transformers "gelu"


def _gelu_pytorch_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# config.hidden_act / config.pooler_act -> function. Same names and formulas as
# vit_core.activations.ACTIVATIONS (the float64 references these are tested against).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": _gelu_exact,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": _gelu_pytorch_tanh,
    "gelu_fast": gelu_fast,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called ``name`` in a ViT config (ValueError for an unknown name)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


# hidden_act names whose formula oneDNN can apply inside the GEMM as a post-op: (attr, algorithm)
# of torch.ops.mkldnn._linear_pointwise. "gelu" is the erf form, the others the tanh form
# (gelu_fast writes the same constant as 0.7978845608: equal to float32 rounding).
_ONEDNN_POST_OPS: dict[str, tuple[str, str]] = {
    "gelu": ("gelu", "none"),
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "gelu_fast": ("gelu", "tanh"),
}


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def speed_plan(dtype: torch.dtype) -> cpu.PathPlan | None:
    """The CPU speed paths vit_core.cpu chose for ``dtype`` on this CPU (None for other dtypes)."""
    name = _DTYPE_NAMES.get(dtype)
    return None if name is None else cpu.current_plan("torch", name)


@functools.lru_cache(maxsize=4)
def _onednn_runs(dtype: torch.dtype) -> bool:
    """Whether this torch build can run oneDNN's GEMM in ``dtype`` at all (bf16: AVX-512 core or better)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


_ONEDNN_GEMMS = ("onednn_prepacked", "onednn_prepacked_float32")


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the prepacked oneDNN GEMM runs in for ``dtype`` inputs: float32 for bfloat16 where
    the plan says ``gemm == "onednn_prepacked_float32"`` (a CPU with no bf16 GEMM in oneDNN, AVX2:
    the bf16 values widen to float32 exactly, the products are summed in float32 as a bf16 GEMM
    sums them, and the result is rounded to bfloat16), else ``dtype`` itself."""
    plan = speed_plan(dtype)
    return torch.float32 if plan is not None and plan.gemm == "onednn_prepacked_float32" else dtype


def onednn_gemm(dtype: torch.dtype) -> bool:
    """Whether inference GEMMs in ``dtype`` run oneDNN on prepacked weights: the plan says so
    (``gemm`` "onednn_prepacked", or "onednn_prepacked_float32" for bfloat16 computed in float32)
    and this torch build can."""
    plan = speed_plan(dtype)
    return plan is not None and plan.gemm in _ONEDNN_GEMMS and _onednn_runs(gemm_dtype(dtype))


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """A 2-D (out, in) weight reordered into oneDNN's blocked layout, in :func:`gemm_dtype` of its dtype."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(gemm_dtype(weight.dtype)), None)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, attr: str = "none",
                  algorithm: str = "", residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` by oneDNN on a :func:`prepack` ed weight, with the activation ``attr`` /
    ``algorithm`` (a post-op of _ONEDNN_POST_OPS) or ``+ residual`` inside the GEMM, in the dtype
    the weight was packed in: for a bfloat16 ``x`` and a float32-packed weight (:func:`gemm_dtype`)
    the operands widen and the result (epilogue included) is rounded to bfloat16 once."""
    dtype, compute = x.dtype, packed.dtype
    if compute != dtype:
        x = x.to(compute)
        bias = None if bias is None else bias.to(compute)
        residual = None if residual is None else residual.to(compute)
    if residual is not None:
        out = torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
    else:
        out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], algorithm)
    return out if out.dtype == dtype else out.to(dtype)


def _cpu_inference(x: torch.Tensor) -> bool:
    """Eager CPU inference: autograd off (inference_mode / no_grad), a CPU tensor, not compiled,
    exported or traced (:func:`tracing`)."""
    return not torch.is_grad_enabled() and x.device.type == "cpu" and not tracing()


class _PackedWeightCache:
    """The oneDNN prepacked weights a layer keeps are a cache of opaque tensors that cannot be
    copied or pickled: ``copy.deepcopy(model)`` and ``pickle`` / ``torch.save(model)`` leave them out
    (the copy packs its own weights on its first inference call)."""

    _CACHE_FIELDS: tuple[str, ...] = ("_packed", "_packed_key")

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())  # type: ignore[misc]
        for name in self._CACHE_FIELDS:
            state.pop(name, None)
        return state


class Linear(_PackedWeightCache, nn.Linear):
    """nn.Linear whose inference forward runs oneDNN's GEMM on a prepacked weight (issue #6).

    In eval mode with autograd off (``torch.inference_mode()`` / ``torch.no_grad()``), on CPU, in
    a dtype whose vit_core.cpu plan picks ``gemm="onednn_prepacked"`` (float32 and bfloat16 on
    x86 with AVX2 / AVX-512; see :func:`onednn_gemm`), and outside torch.compile (whose inductor
    freezing packs weights itself), the weight is reordered once into oneDNN's blocked layout
    (``torch.ops.mkldnn._reorder_linear_weight``) and multiplied by
    ``torch.ops.mkldnn._linear_pointwise``, which outruns the MKL sgemm that ``F.linear`` runs on
    AVX-512 CPUs (measured in benchmarks/RESULTS.md). Still a float32 GEMM (another blocking
    of the same sums: differences ~1e-7 relative, well inside docs/NUMERICS.md's bounds). The packed
    copy is a plain attribute (never in the state dict), rebuilt whenever the weight's storage,
    version counter (in-place edits, load_state_dict) or dtype changes. Training and autograd use
    ``F.linear``.
    """

    _packed: torch.Tensor | None = None
    _packed_key: tuple[int, int, torch.dtype] | None = None
    # query Linear of an attention block only: the packed (query; key; value) weight, see qkv_projection
    _qkv_packed: tuple[torch.Tensor, torch.Tensor | None] | None = None
    _qkv_key: tuple | None = None
    _CACHE_FIELDS = ("_packed", "_packed_key", "_qkv_packed", "_qkv_key")

    def train(self, mode: bool = True) -> Linear:
        """Also drops the packed copies: a fused optimizer step (transformers' Trainer default,
        ``torch._fused_adamw_``) updates the weight without bumping the version counter the cache
        key reads, so a cache kept across a training phase could be stale."""
        self._packed = None
        self._packed_key = None
        self._qkv_packed = None
        self._qkv_key = None
        return super().train(mode)

    def onednn_ready(self, x: torch.Tensor) -> bool:
        """Whether the prepacked oneDNN path applies to input ``x``."""
        return not self.training and x.dtype == self.weight.dtype and _cpu_inference(x) and onednn_gemm(x.dtype)

    def epilogues(self, x: torch.Tensor) -> bool:
        """Whether the GELU / residual add can ride in this GEMM for input ``x`` (the plan's ``gemm_epilogues``)."""
        if not self.onednn_ready(x):
            return False
        plan = speed_plan(x.dtype)
        return plan is not None and plan.gemm_epilogues

    def packed_weight(self) -> torch.Tensor:
        """The weight in oneDNN's blocked layout, reordered on first use and cached."""
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.dtype)
        if self._packed is None or self._packed_key != key:
            self._packed = prepack(weight)
            self._packed_key = key
        return self._packed

    def fuses(self, x: torch.Tensor, activation: str) -> bool:
        """Whether ``forward(x, post_op=activation)`` can apply ``activation`` inside the GEMM."""
        return activation in _ONEDNN_POST_OPS and self.epilogues(x)

    def forward(self, x: torch.Tensor, post_op: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(..., in_features) -> (..., out_features). ``post_op``: an activation name applied by oneDNN
        inside the GEMM; only where :meth:`fuses` says so (callers fall back to the activation).
        ``residual`` (..., out_features) is added to the result (inside the GEMM on the oneDNN path)."""
        if residual is not None:
            if self.epilogues(x):
                return onednn_linear(x, self.packed_weight(), self.bias, residual=residual)
            return F.linear(x, self.weight, self.bias) + residual
        if post_op is not None:
            if not self.fuses(x, post_op):
                raise ValueError(f"activation {post_op!r} cannot be fused here; check Linear.fuses first")
            attr, algorithm = _ONEDNN_POST_OPS[post_op]
            return onednn_linear(x, self.packed_weight(), self.bias, attr, algorithm)
        if self.onednn_ready(x):
            return onednn_linear(x, self.packed_weight(), self.bias)
        return F.linear(x, self.weight, self.bias)


def layer_norm(hidden_size: int, eps: float) -> nn.LayerNorm:
    """torch's LayerNorm computes the two-pass (biased) variance the reference uses; eps always
    comes from the config (1e-12 for transformers checkpoints, 1e-6 for timm / JAX originals)."""
    return nn.LayerNorm(hidden_size, eps=eps)


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    head_mask: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, returning the probabilities.

    query/key/value (batch, heads, tokens, head_dim); head_mask broadcastable to
    (batch, heads, tokens, tokens) or None. Returns context (batch, heads, tokens, head_dim) and
    probabilities (batch, heads, tokens, tokens) after dropout and head mask, as transformers'.
    The softmax runs in float32 whatever the input dtype (bfloat16 / float16 logits lose the tail).
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (batch, heads, tokens, tokens)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    if head_mask is not None:
        probs = probs * head_mask
    context = torch.matmul(probs, value)  # (batch, heads, tokens, head_dim)
    return context, probs


def fused_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, dropout_p: float
) -> torch.Tensor:
    """The attention of the fused path; same shapes as :func:`eager_attention`, no probabilities.

    The kernel is the vit_core.cpu plan's ``attention`` for the input's dtype: "sdpa"
    (torch.nn.functional.scaled_dot_product_attention: torch's CPU flash kernel, which softmaxes
    in float32 internally for reduced-precision inputs and takes the strided q / k / v views of
    :func:`qkv_projection` without a copy) or, in CPU inference (autograd off, no dropout, outside
    torch.compile), "matmul_per_image" (:func:`attention_per_image`). Training, dropout and
    torch.compile always take SDPA.
    """
    if dropout_p == 0.0 and _cpu_inference(query):
        plan = speed_plan(query.dtype)
        if plan is not None and plan.attention == "matmul_per_image":
            return attention_per_image(query, key, value, scaling)
    return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, scale=scaling)


def attention_per_image(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """:func:`eager_attention`'s formula one image at a time, for inference (no dropout, no mask).

    query/key/value (batch, heads, tokens, head_dim), any strides; returns the context (batch,
    heads, tokens, head_dim), contiguous. Per image: scores = scaling * q @ k^T in one batched
    GEMM (``baddbmm``, the scale applied to the float32 sums before the single rounding), the
    softmax over them (torch's CPU kernel keeps the max and the sum in float32 for bfloat16 and
    rounds once), then probs @ v written straight into the output. q / k / v are made contiguous
    once for the whole batch (a no-op when they already are), so oneDNN's bf16 batched matmuls
    take k^T as a transposed view and nothing else is copied; the (heads, tokens, tokens)
    buffer of one image stays in cache (faster than the CPU flash kernel in bfloat16 on
    avx512_bf16: ``python -m benchmarks.torch_speed --attention``, docs/performance.md).
    """
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    batch_size, heads, tokens, _ = query.shape
    context = value.new_empty(value.shape)
    scores = query.new_empty((heads, tokens, key.shape[2]))
    for i in range(batch_size):
        torch.baddbmm(scores, query[i], key[i].transpose(1, 2), beta=0.0, alpha=scaling, out=scores)
        torch.bmm(torch.softmax(scores, dim=-1), value[i], out=context[i])
    return context


def _hooked(module: nn.Module) -> bool:
    """Whether forward (pre-)hooks are registered on ``module`` or on every module."""
    from torch.nn.modules import module as module_mod

    return bool(module._forward_hooks or module._forward_pre_hooks or module_mod._global_forward_hooks
                or module_mod._global_forward_pre_hooks)


def qkv_projection(query: Linear, key: Linear, value: Linear, hidden_states: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value projections of ``hidden_states`` (batch, tokens, hidden), each
    (batch, tokens, heads * head_dim).

    Where the plan says ``fused_qkv`` (and the oneDNN path applies), the three run as one GEMM on
    the concatenated (query; key; value) weight, prepacked once and cached on ``query`` against
    changes to any of the three weights (dropped on ``train()``, as :class:`Linear`'s own); the
    three results are views of its (batch, tokens, 3 * hidden) output, no copy. The same
    sums as three GEMMs: each output row is the dot product of the same weight row.
    """
    plan = speed_plan(hidden_states.dtype)
    layers = (query, key, value)
    # exactly this Linear (a subclass, such as a quantized one, keeps its own forward), and no hooks on
    # the three (a forward hook, e.g. int8 calibration's observer or a user's, must see its own call)
    if not (plan is not None and plan.fused_qkv and all(type(m) is Linear and not _hooked(m) for m in layers)
            and query.onednn_ready(hidden_states) and key.weight.dtype == value.weight.dtype == query.weight.dtype):
        return query(hidden_states), key(hidden_states), value(hidden_states)
    cache_key = tuple((m.weight.data_ptr(), m.weight._version, m.weight.dtype) for m in layers) + tuple(
        None if m.bias is None else (m.bias.data_ptr(), m.bias._version) for m in layers)
    if query._qkv_packed is None or query._qkv_key != cache_key:
        weight = torch.cat([m.weight.detach() for m in layers])  # (3 * all_head, hidden)
        bias = None if query.bias is None else torch.cat([
            m.bias.detach() if m.bias is not None else torch.zeros_like(query.bias) for m in layers])
        query._qkv_packed = (prepack(weight), bias)
        query._qkv_key = cache_key
    packed, bias = query._qkv_packed
    fused = onednn_linear(hidden_states, packed, bias)  # (batch, tokens, 3 * all_head)
    return fused.chunk(3, dim=-1)


def bicubic_matrix(in_size: int, out_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The (out_size, in_size) float32 matrix of vit_core.resample.bicubic_matrix, built with torch ops.

    Same formula, computed in float64 and rounded once to float32 (tested bitwise against the
    numpy builder). Built from torch ops rather than numpy so that torch.compile traces it without
    a graph break, also when dynamo makes the image size symbolic (a numpy constant cannot depend
    on a symbolic size). A one-hot comparison replaces numpy's ``add.at`` so the taps that the
    border clamp folds onto the same source index add up, as in the reference.
    """
    a = CUBIC_A
    scale = in_size / out_size
    dst = torch.arange(out_size, dtype=torch.float64, device=device)
    src = (dst + 0.5) * scale - 0.5  # half-pixel centres, not clamped at 0 (torch's cubic)
    base = torch.floor(src)
    t = src - base
    x0, x1, x2, x3 = t + 1.0, t, 1.0 - t, 2.0 - t

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    weights = torch.stack([far(x0), near(x1), near(x2), far(x3)], dim=-1)  # (out, 4)
    taps = torch.arange(4, device=device)
    index = (base.to(torch.int64)[:, None] - 1 + taps).clamp(0, in_size - 1)  # (out, 4)
    columns = torch.arange(in_size, device=device)
    one_hot = (index[:, :, None] == columns).to(torch.float64)  # (out, 4, in)
    matrix = (weights[:, :, None] * one_hot).sum(dim=1)  # (out, in)
    return matrix.to(torch.float32)


def resample_position_grid(patch_pos_embed: torch.Tensor, grid_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of the patch rows of a position table, as ``M_h @ grid @ M_w.T``.

    patch_pos_embed (1, gh * gw, dim) -> (1, out_h * out_w, dim), computed in float32 and returned
    in the input dtype. The kernel is torch's bicubic interpolate (a = -0.75, align_corners=False,
    no antialiasing), the one transformers >= 4.45 uses; two matmuls instead of the resize op so
    TF and Flax can do exactly the same.
    """
    gh, gw = grid_hw
    out_h, out_w = out_hw
    dim = patch_pos_embed.shape[-1]
    device = patch_pos_embed.device
    grid = patch_pos_embed.reshape(gh, gw, dim).to(torch.float32)  # (gh, gw, dim)
    matrix_h = bicubic_matrix(gh, out_h, device)  # (out_h, gh)
    matrix_w = bicubic_matrix(gw, out_w, device)  # (out_w, gw)
    rows = torch.einsum("og,gwd->owd", matrix_h, grid)  # (out_h, gw, dim)
    resampled = torch.einsum("pw,owd->opd", matrix_w, rows)  # (out_h, out_w, dim)
    return resampled.reshape(1, out_h * out_w, dim).to(patch_pos_embed.dtype)


class PatchProjection(_PackedWeightCache, nn.Conv2d):
    """The patch convolution (kernel = stride = patch size); in inference on oneDNN, one matmul.

    Patches do not overlap, so the convolution is a GEMM of the (batch * patches, C * ph * pw)
    patch rows by the (hidden, C * ph * pw) reshaped weight: on the prepacked oneDNN path (see
    :class:`Linear`; weight reordered once, cached against weight changes) that is faster than
    mkldnn_convolution (measured in benchmarks/RESULTS.md). Same sums, same layout out: (batch, hidden, gh, gw), a view of
    the (batch, gh, gw, hidden) result, which ViTPatchEmbeddings flattens without a copy.
    """

    _packed: torch.Tensor | None = None
    _packed_key: tuple[int, int, torch.dtype] | None = None

    def train(self, mode: bool = True) -> PatchProjection:
        """Also drops the packed copy (a fused optimizer step leaves the version counter unchanged; see Linear.train)."""
        self._packed = None
        self._packed_key = None
        return super().train(mode)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not (not self.training and pixel_values.dtype == self.weight.dtype and _cpu_inference(pixel_values)
                and onednn_gemm(pixel_values.dtype)):
            return super().forward(pixel_values)
        batch_size, channels, height, width = pixel_values.shape
        ph, pw = self.kernel_size
        gh, gw = height // ph, width // pw
        patches = pixel_values[:, :, : gh * ph, : gw * pw].reshape(batch_size, channels, gh, ph, gw, pw)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch_size, gh, gw, channels * ph * pw)  # (batch, gh, gw, C*ph*pw)
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.dtype)
        if self._packed is None or self._packed_key != key:
            self._packed = prepack(weight.reshape(weight.shape[0], -1))
            self._packed_key = key
        embeddings = onednn_linear(patches, self._packed, self.bias)  # (batch, gh, gw, hidden)
        return embeddings.permute(0, 3, 1, 2)  # (batch, hidden, gh, gw)


def patch_projection(num_channels: int, hidden_size: int, patch_hw: tuple[int, int]) -> PatchProjection:
    """The patch embedding: a convolution with kernel = stride = patch size. Its weight
    (hidden, channels, ph, pw) is the canonical layout; pixels past the last whole patch are dropped."""
    return PatchProjection(num_channels, hidden_size, kernel_size=patch_hw, stride=patch_hw)


# ------------------------------------------------------------------------------ CPU speed paths
# ViTEncoder splits CPU inference batches into sub-batches of about this many token rows (8 images
# of ViT-*/16 at 224): GEMMs of ~2k rows keep their operands in cache (see splits_batch).
INFERENCE_CHUNK_ROWS = 2048


def dense_activation(dense: Linear, hidden_states: torch.Tensor, hidden_act: str,
                     activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``activation(dense(hidden_states))``; in inference on oneDNN the activation runs inside the
    GEMM as a post-op (same formula, see :meth:`Linear.fuses`)."""
    if dense.fuses(hidden_states, hidden_act):
        return dense(hidden_states, post_op=hidden_act)
    return activation(dense(hidden_states))


def dense_dropout_residual(dense: Linear, dropout: nn.Dropout, hidden_states: torch.Tensor,
                           residual: torch.Tensor) -> torch.Tensor:
    """``dropout(dense(hidden_states)) + residual``; in inference on oneDNN dropout is the identity
    and the residual add runs inside the GEMM (a binary post-op)."""
    if dense.onednn_ready(hidden_states):
        return dense(hidden_states, residual=residual)
    return dropout(dense(hidden_states)) + residual


def splits_batch(hidden_states: torch.Tensor, head_mask: torch.Tensor | None, output_attentions: bool,
                 output_hidden_states: bool, training: bool) -> bool:
    """Whether the encoder runs the batch in sub-batches (:func:`run_in_sub_batches`): the plan's
    ``sub_batches``, CPU inference (eval, autograd off, not compiled or traced) of more than
    INFERENCE_CHUNK_ROWS token rows, no head mask and no per-layer outputs. Never while traced
    (checked first, so a symbolic batch size is not compared)."""
    if tracing():
        return False
    batch_size, tokens = hidden_states.shape[:2]
    plan = speed_plan(hidden_states.dtype)
    return (
        plan is not None
        and plan.sub_batches
        and batch_size * tokens > INFERENCE_CHUNK_ROWS
        and batch_size > 1
        and not training
        and _cpu_inference(hidden_states)
        and head_mask is None
        and not output_attentions
        and not output_hidden_states
    )


def run_in_sub_batches(run_layers: Callable[[torch.Tensor], torch.Tensor], hidden_states: torch.Tensor) -> torch.Tensor:
    """``run_layers`` (batch, tokens, hidden) -> (batch, tokens, hidden) on sub-batches of about
    INFERENCE_CHUNK_ROWS token rows, concatenated. Each image's computation is unchanged; the
    GEMMs' operands stay in cache (measured in benchmarks/RESULTS.md)."""
    images = max(1, INFERENCE_CHUNK_ROWS // hidden_states.shape[1])
    return torch.cat([run_layers(chunk) for chunk in hidden_states.split(images)])

"""The ViT family in Flax NNX: FlaxViTModel, FlaxViTForImageClassification, FlaxViTForMaskedImageModeling.

Architecture only. The module tree is transformers 4.x's, so every parameter's attribute path is
its canonical name in vit_core.weights, with Flax's leaf names (``kernel``, ``scale``; one rule in
weights.py); framework primitives and CPU speed paths live in layers.py, the output classes (JAX
pytrees) in outputs.py, the options every framework shares (attention implementation, output
flags, dtype names) in vit_core.options. vit_torch/modeling.py and vit_tf/modeling.py
define the same classes in the same order with the same names.

Calling a model runs its ``forward`` compiled: ``jax.jit`` with the model passed as a pytree and
the options static, so each input shape and option set is traced once (and shared by models of
the same architecture). ``forward`` itself is a plain traceable function: use it under your own
``jax.jit`` / ``jax.grad`` / ``jax.vmap``, e.g. as ``nnx.merge(graphdef, state).forward(...)``
after ``graphdef, state = nnx.split(model)``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_core import cpu, validation
from vit_core.config import ViTConfig
from vit_core.options import ATTN_IMPLEMENTATIONS, dtype_name, flag, resolve_attn_implementation  # noqa: F401
from vit_core.weights import Task, WeightSpec, weight_table

from . import weights as weights_io
from .layers import (
    Conv2d,
    Linear,
    PixelShuffle,
    dropout,
    eager_attention,
    fused_attention,
    get_activation,
    layer_norm,
    patch_projection,
    resample_position_grid,
    run_in_sub_batches,
    split_rng,
    splits_batch,
)
from .outputs import BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput

Array = jax.Array
DType = Any  # a jnp dtype, a numpy dtype or its name ("bfloat16")


class ViTPatchEmbeddings(nnx.Module):
    """(batch, channels, height, width) -> (batch, gh * gw, hidden): one token per patch."""

    def __init__(self, num_channels: int, hidden_size: int, patch_hw: tuple[int, int], *, dtype: DType,
                 param_dtype: DType) -> None:
        self.projection = patch_projection(num_channels, hidden_size, patch_hw, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, pixel_values: Array) -> Array:
        embeddings = self.projection(pixel_values)  # (batch, hidden, gh, gw)
        batch_size, hidden_size, gh, gw = embeddings.shape
        # (batch, gh * gw, hidden), row-major grid order
        return embeddings.reshape(batch_size, hidden_size, gh * gw).transpose(0, 2, 1)


class ViTEmbeddings(nnx.Module):
    """CLS token + patch embeddings (+ mask token) + position embeddings.

    position_embeddings (1, 1 + gh * gw, hidden): row 0 belongs to CLS, the others to the
    (gh, gw) patch grid of ``image_size`` in row-major order.
    """

    def __init__(
        self,
        num_channels: int,
        hidden_size: int,
        patch_hw: tuple[int, int],
        grid_hw: tuple[int, int],
        dropout_prob: float,
        use_mask_token: bool,
        *,
        dtype: DType,
        param_dtype: DType,
    ) -> None:
        self.cls_token = nnx.Param(jnp.zeros((1, 1, hidden_size), param_dtype))
        self.mask_token = nnx.Param(jnp.zeros((1, 1, hidden_size), param_dtype)) if use_mask_token else None
        self.patch_embeddings = ViTPatchEmbeddings(num_channels, hidden_size, patch_hw, dtype=dtype,
                                                   param_dtype=param_dtype)
        self.position_embeddings = nnx.Param(jnp.zeros((1, grid_hw[0] * grid_hw[1] + 1, hidden_size), param_dtype))
        self.dropout_prob = dropout_prob
        self.patch_hw = patch_hw
        self.grid_hw = grid_hw
        self.dtype = jnp.dtype(dtype)

    def interpolate_pos_encoding(self, embeddings: Array, height: int, width: int) -> Array:
        """The position table for an input of ``height`` x ``width`` pixels: (1, 1 + out_h * out_w, hidden).

        The patch rows are resampled bicubically (layers.resample_position_grid) to the input's
        grid; the CLS row passes through. A grid already of the target size is used as is.
        ``embeddings`` is accepted for transformers' signature; only its dtype matters.
        """
        position_embeddings = self.position_embeddings[...]
        out_hw = (height // self.patch_hw[0], width // self.patch_hw[1])
        if out_hw == self.grid_hw:
            return position_embeddings.astype(embeddings.dtype)
        class_pos_embed = position_embeddings[:, :1]  # (1, 1, hidden)
        patch_pos_embed = resample_position_grid(position_embeddings[:, 1:], self.grid_hw, out_hw)
        return jnp.concatenate([class_pos_embed, patch_pos_embed], axis=1).astype(embeddings.dtype)

    def __call__(
        self,
        pixel_values: Array,
        bool_masked_pos: Array | None = None,
        interpolate_pos_encoding: bool = False,
        dropout_rng: Array | None = None,
    ) -> Array:
        batch_size, _, height, width = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values)  # (batch, patches, hidden)
        if bool_masked_pos is not None:
            # SimMIM: masked patches are replaced by the learned mask token.
            mask = bool_masked_pos[..., None].astype(embeddings.dtype)  # (batch, patches, 1)
            embeddings = embeddings * (1.0 - mask) + self.mask_token[...].astype(self.dtype) * mask
        cls_tokens = jnp.broadcast_to(self.cls_token[...].astype(self.dtype),
                                      (batch_size, 1, embeddings.shape[-1]))  # (batch, 1, hidden)
        embeddings = jnp.concatenate([cls_tokens, embeddings], axis=1)  # (batch, tokens, hidden)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        else:
            embeddings = embeddings + self.position_embeddings[...].astype(self.dtype)
        return dropout(embeddings, self.dropout_prob, dropout_rng)


class ViTSelfAttention(nnx.Module):
    """Multi-head self-attention: a fused path (jax.nn.dot_product_attention) and an eager path that
    returns the probabilities.

    query/key/value kernel columns are head-major: column h * head_dim + j belongs to head h.
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, qkv_bias: bool, dropout_prob: float, *,
                 dtype: DType, param_dtype: DType) -> None:
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = hidden_size // num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size**-0.5
        self.dropout_prob = dropout_prob
        self.query = Linear(hidden_size, self.all_head_size, bias=qkv_bias, dtype=dtype, param_dtype=param_dtype)
        self.key = Linear(hidden_size, self.all_head_size, bias=qkv_bias, dtype=dtype, param_dtype=param_dtype)
        self.value = Linear(hidden_size, self.all_head_size, bias=qkv_bias, dtype=dtype, param_dtype=param_dtype)

    def __call__(
        self, hidden_states: Array, head_mask: Array | None = None, eager: bool = False,
        dropout_rng: Array | None = None,
    ) -> tuple[Array, Array | None]:
        """hidden_states (batch, tokens, hidden); head_mask (1, heads, 1, 1) or None.

        Returns context (batch, tokens, hidden) and, on the eager path (``eager``, a head mask, or
        attention dropout in training), the probabilities (batch, heads, tokens, tokens); None on
        the fused path.
        """
        batch_size, tokens, _ = hidden_states.shape
        new_shape = (batch_size, tokens, self.num_attention_heads, self.attention_head_size)
        query = self.query(hidden_states).reshape(new_shape).transpose(0, 2, 1, 3)  # (batch, heads, tokens, head_dim)
        key = self.key(hidden_states).reshape(new_shape).transpose(0, 2, 1, 3)  # (batch, heads, tokens, head_dim)
        value = self.value(hidden_states).reshape(new_shape).transpose(0, 2, 1, 3)  # (batch, heads, tokens, head_dim)
        dropout_rng = dropout_rng if self.dropout_prob > 0.0 else None
        attention_probs: Array | None = None
        if eager or head_mask is not None or dropout_rng is not None:
            context, attention_probs = eager_attention(query, key, value, self.scaling, head_mask,
                                                       self.dropout_prob, dropout_rng)
        else:
            context = fused_attention(query, key, value, self.scaling)
        context = context.transpose(0, 2, 1, 3).reshape(batch_size, tokens, self.all_head_size)  # (batch, tokens, d)
        return context, attention_probs


class ViTSelfOutput(nnx.Module):
    """Output projection of the attention; the residual is added in ViTLayer (pre-norm block)."""

    def __init__(self, hidden_size: int, dropout_prob: float, *, dtype: DType, param_dtype: DType) -> None:
        self.dense = Linear(hidden_size, hidden_size, dtype=dtype, param_dtype=param_dtype)
        self.dropout_prob = dropout_prob

    def __call__(self, hidden_states: Array, dropout_rng: Array | None = None) -> Array:
        return dropout(self.dense(hidden_states), self.dropout_prob, dropout_rng)  # (batch, tokens, hidden)


class ViTAttention(nnx.Module):
    """ViTSelfAttention followed by its output projection."""

    def __init__(self, hidden_size: int, num_attention_heads: int, qkv_bias: bool, attention_dropout_prob: float,
                 hidden_dropout_prob: float, *, dtype: DType, param_dtype: DType) -> None:
        self.attention = ViTSelfAttention(hidden_size, num_attention_heads, qkv_bias, attention_dropout_prob,
                                          dtype=dtype, param_dtype=param_dtype)
        self.output = ViTSelfOutput(hidden_size, hidden_dropout_prob, dtype=dtype, param_dtype=param_dtype)

    def __call__(
        self, hidden_states: Array, head_mask: Array | None = None, eager: bool = False,
        dropout_rng: Array | None = None,
    ) -> tuple[Array, Array | None]:
        attention_rng, output_rng = split_rng(dropout_rng, 2)
        context, attention_probs = self.attention(hidden_states, head_mask, eager, attention_rng)
        return self.output(context, output_rng), attention_probs  # (batch, tokens, hidden), probabilities or None


class ViTIntermediate(nnx.Module):
    """First MLP projection and the hidden activation: (batch, tokens, hidden) -> (batch, tokens, intermediate)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, *, dtype: DType,
                 param_dtype: DType) -> None:
        self.dense = Linear(hidden_size, intermediate_size, dtype=dtype, param_dtype=param_dtype)
        self.activation = get_activation(hidden_act)

    def __call__(self, hidden_states: Array) -> Array:
        return self.activation(self.dense(hidden_states))


class ViTOutput(nnx.Module):
    """Second MLP projection plus the residual: (batch, tokens, intermediate) -> (batch, tokens, hidden)."""

    def __init__(self, intermediate_size: int, hidden_size: int, dropout_prob: float, *, dtype: DType,
                 param_dtype: DType) -> None:
        self.dense = Linear(intermediate_size, hidden_size, dtype=dtype, param_dtype=param_dtype)
        self.dropout_prob = dropout_prob

    def __call__(self, hidden_states: Array, input_tensor: Array, dropout_rng: Array | None = None) -> Array:
        return dropout(self.dense(hidden_states), self.dropout_prob, dropout_rng) + input_tensor


class ViTLayer(nnx.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then + MLP(LN(.))."""

    def __init__(self, config: ViTConfig, *, dtype: DType, param_dtype: DType) -> None:
        d, eps = config.hidden_size, config.layer_norm_eps
        self.layernorm_before = layer_norm(d, eps, dtype=dtype, param_dtype=param_dtype)
        self.attention = ViTAttention(d, config.num_attention_heads, config.qkv_bias,
                                      config.attention_probs_dropout_prob, config.hidden_dropout_prob,
                                      dtype=dtype, param_dtype=param_dtype)
        self.layernorm_after = layer_norm(d, eps, dtype=dtype, param_dtype=param_dtype)
        self.intermediate = ViTIntermediate(d, config.intermediate_size, config.hidden_act, dtype=dtype,
                                            param_dtype=param_dtype)
        self.output = ViTOutput(config.intermediate_size, d, config.hidden_dropout_prob, dtype=dtype,
                                param_dtype=param_dtype)

    def __call__(
        self, hidden_states: Array, head_mask: Array | None = None, eager: bool = False,
        dropout_rng: Array | None = None,
    ) -> tuple[Array, Array | None]:
        """(batch, tokens, hidden) -> (batch, tokens, hidden), attention probabilities or None."""
        attention_rng, output_rng = split_rng(dropout_rng, 2)
        attention_output, attention_probs = self.attention(self.layernorm_before(hidden_states), head_mask, eager,
                                                           attention_rng)
        hidden_states = attention_output + hidden_states  # first residual
        layer_output = self.intermediate(self.layernorm_after(hidden_states))
        layer_output = self.output(layer_output, hidden_states, output_rng)  # second residual
        return layer_output, attention_probs


class ViTEncoder(nnx.Module):
    """The stack of ViTLayer; collects hidden states and attentions when asked.

    The layers run as an unrolled Python loop (one traced copy per layer): the fastest code XLA
    makes on CPU, at the price of compile time growing with depth. With ``gradient_checkpointing``
    set, each layer runs under remat: its activations are recomputed in the backward pass (the
    dropout keys are explicit inputs, so the recomputed masks are the same); without head mask or
    per-layer outputs the layers then run as one scan (see :meth:`_scanned_checkpointed`).
    """

    def __init__(self, config: ViTConfig, *, dtype: DType, param_dtype: DType) -> None:
        self.layer = nnx.List([ViTLayer(config, dtype=dtype, param_dtype=param_dtype)
                               for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.checkpoint_policy: Any = None  # a jax.checkpoint_policies entry, or None (save nothing)

    def __call__(
        self,
        hidden_states: Array,
        head_mask: Array | None = None,
        eager: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        dropout_rng: Array | None = None,
    ) -> tuple[Array, tuple[Array, ...] | None, tuple[Array, ...] | None]:
        """hidden_states (batch, tokens, hidden); head_mask (layers, 1, heads, 1, 1) or None.

        Returns the last layer's output (before the final layernorm), the hidden states
        (embeddings + every layer) and the attention probabilities of every layer (or None).
        """
        if splits_batch(hidden_states, head_mask, output_attentions, output_hidden_states, dropout_rng):
            # CPU inference on a large batch: the same layers on sub-batches (layers.run_in_sub_batches)
            return run_in_sub_batches(lambda chunk: self(chunk, None, eager)[0], hidden_states), None, None
        if (self.gradient_checkpointing and head_mask is None and not output_attentions
                and not output_hidden_states and len(self.layer) > 1):
            return self._scanned_checkpointed(hidden_states, eager, dropout_rng), None, None
        all_hidden_states: list[Array] = [hidden_states]
        all_attentions: list[Array] = []
        layer_rngs = split_rng(dropout_rng, len(self.layer))
        run_layer = self._checkpointed_layer(eager) if self.gradient_checkpointing else None
        for i, layer_module in enumerate(self.layer):
            layer_head_mask = head_mask[i] if head_mask is not None else None  # (1, heads, 1, 1)
            if run_layer is not None:
                hidden_states, attention_probs = run_layer(layer_module, hidden_states, layer_head_mask, layer_rngs[i])
            else:
                hidden_states, attention_probs = layer_module(hidden_states, layer_head_mask, eager, layer_rngs[i])
            all_hidden_states.append(hidden_states)
            if output_attentions and attention_probs is not None:
                all_attentions.append(attention_probs)
        return (
            hidden_states,
            tuple(all_hidden_states) if output_hidden_states else None,
            tuple(all_attentions) if output_attentions else None,
        )


    def _scanned_checkpointed(self, hidden_states: Array, eager: bool, dropout_rng: Array | None) -> Array:
        """The layers under gradient checkpointing, as one ``jax.lax.scan`` of a rematerialised layer
        over their stacked parameters: only each layer's input is kept for the backward pass.

        XLA on CPU does not shorten activation lifetimes for remat'ed layers of an unrolled loop
        (measured: the compiled step's temporary buffers do not shrink), but it does inside a scan,
        where the loop forces the recomputation into the backward iterations. Same layers, same
        dropout keys (split as the unrolled loop splits them), same sums in the same order.
        """
        graphdef = nnx.graphdef(self.layer[0])
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(m) for m in self.layer])
        keys = None if dropout_rng is None else jnp.stack(split_rng(dropout_rng, len(self.layer)))

        @functools.partial(jax.checkpoint, policy=self.checkpoint_policy)
        def run_layer(h: Array, state: Any, key: Array | None) -> Array:
            return nnx.merge(graphdef, state)(h, None, eager, key)[0]

        def body(h: Array, xs: Any) -> tuple[Array, None]:
            state, key = xs
            return run_layer(h, state, key), None

        hidden_states, _ = jax.lax.scan(body, hidden_states, (stacked, keys))
        return hidden_states

    def _checkpointed_layer(self, eager: bool) -> Any:
        """``layer(hidden_states, head_mask, eager, dropout_rng)`` under nnx.remat (``eager`` static)."""

        def run_layer(layer_module: ViTLayer, hidden_states: Array, head_mask: Array | None,
                      dropout_rng: Array | None) -> tuple[Array, Array | None]:
            return layer_module(hidden_states, head_mask, eager, dropout_rng)

        return nnx.remat(run_layer, policy=self.checkpoint_policy)


class ViTPooler(nnx.Module):
    """Dense + activation on the final CLS token: (batch, tokens, hidden) -> (batch, pooler size)."""

    def __init__(self, hidden_size: int, pooler_output_size: int, pooler_act: str, *, dtype: DType,
                 param_dtype: DType) -> None:
        self.dense = Linear(hidden_size, pooler_output_size, dtype=dtype, param_dtype=param_dtype)
        self.activation = get_activation(pooler_act)

    def __call__(self, hidden_states: Array) -> Array:
        return self.activation(self.dense(hidden_states[:, 0]))


class FlaxViTPreTrainedModel(nnx.Module):
    """What the three model classes share: config, construction options, init, compiled call, loading, saving.

    Not a transformers FlaxPreTrainedModel: an nnx.Module that holds its parameters, whose paths
    are the canonical weight names with Flax leaves, so the files of transformers' classes and
    ours are the same. transformers' Flax idioms still work: ``model.params`` (the same tree),
    ``model(x, params=...)``, ``model.params = ...``, ``save_pretrained(dir, params=...)``.
    """

    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    task: Task = "base"

    def _setup(self, config: ViTConfig, attn_implementation: str | None, dtype: DType, param_dtype: DType) -> None:
        """Store the config, the attention implementation and the dtypes (static attributes)."""
        if not isinstance(config, ViTConfig):
            raise TypeError(f"{type(self).__name__} needs a vit_core ViTConfig, got {type(config).__name__}")
        config.validate()
        self.config_holder = StaticConfig(config)
        self._attn_implementation = resolve_attn_implementation(attn_implementation)
        self.dtype = resolve_dtype(dtype)
        self.param_dtype = resolve_dtype(param_dtype)

    def _finish(self, rngs: nnx.Rngs | None, seed: int) -> None:
        """Initialise every parameter from the canonical table (truncated normal / zeros / ones).

        Constructors skip it with ``_do_init=False`` (transformers Flax's name): the inner
        FlaxViTModel of a task model, whose parameters the outer model's table initialises, and
        from_pretrained, which fills the parameters from the checkpoint. Parameters are then zeros.
        """
        key = (rngs if rngs is not None else nnx.Rngs(params=seed)).params()
        weights_io.init_weights(self, self.canonical_table(), self.config.initializer_range, key)

    @property
    def config(self) -> ViTConfig:
        return self.config_holder.config

    def canonical_table(self) -> list[WeightSpec]:
        """The canonical weight table of this model (names map to parameter paths by weights.flax_path)."""
        return weight_table(self.config, self.task)

    # -------------------------------------------------------------------------- properties
    @property
    def base_model(self) -> FlaxViTModel:
        return getattr(self, self.base_model_prefix, self)

    def num_parameters(self) -> int:
        return sum(int(x.size) for x in jax.tree_util.tree_leaves(nnx.state(self, nnx.Param)))

    @property
    def attn_implementation(self) -> str:
        """"sdpa" (the fused path) or "eager"; output_attentions or a head mask take the eager path anyway.

        Settable (same as :meth:`set_attn_implementation`)."""
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str | None) -> None:
        self.set_attn_implementation(value)

    def set_attn_implementation(self, attn_implementation: str | None) -> None:
        """Switch the attention path: "sdpa" or "fused" (the same fused path, the default) or
        "eager"; recompiles on the next call. ValueError listing the choices for another name."""
        implementation = resolve_attn_implementation(attn_implementation)
        for _, module in nnx.iter_modules(self):
            if isinstance(module, FlaxViTPreTrainedModel):
                module._attn_implementation = implementation

    # -------------------------------------------------------------------------- training helpers
    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing for _, m in nnx.iter_modules(self) if isinstance(m, ViTEncoder))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each encoder layer in the backward pass (nnx.remat), as vit_torch and transformers do;
        recompiles on the next call. Gradients are unchanged.

        ``gradient_checkpointing_kwargs`` may hold ``policy`` (a ``jax.checkpoint_policies`` entry:
        what to keep rather than recompute; default None, keep nothing).
        """
        options = dict(gradient_checkpointing_kwargs or {})
        policy = options.pop("policy", None)
        if options:
            raise ValueError(f"gradient_checkpointing_kwargs accepts only 'policy', got {sorted(options)}")
        for _, module in nnx.iter_modules(self):
            if isinstance(module, ViTEncoder):
                module.gradient_checkpointing = True
                module.checkpoint_policy = policy

    def gradient_checkpointing_disable(self) -> None:
        for _, module in nnx.iter_modules(self):
            if isinstance(module, ViTEncoder):
                module.gradient_checkpointing = False
                module.checkpoint_policy = None

    # -------------------------------------------------------------------------- transformers Flax params
    @property
    def params(self) -> dict[str, Any]:
        """The parameters as transformers' Flax classes hold them: a nested dict of arrays with the
        same paths and layouts (layer indices as strings), e.g. ``params["vit"]["encoder"]["layer"]["0"]``."""
        tree: dict[str, Any] = {}
        for path, value in zip(*_parameter_paths(self)[:2]):
            node = tree
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        return tree

    def __setattr__(self, name: str, value: Any) -> None:
        # ``model.params = new_params`` (transformers Flax) updates the values in place; nnx's own
        # __setattr__ checks attribute values before a property setter could run.
        if name == "params":
            nnx.update(self, nnx.state(self.with_params(value)))
            return
        if name == "attn_implementation":  # a read property with a setter, as in vit_torch / vit_tf
            self.set_attn_implementation(value)
            return
        super().__setattr__(name, value)

    def with_params(self, params: Mapping[str, Any]) -> FlaxViTPreTrainedModel:
        """A model of this architecture holding ``params`` (a tree like ``model.params``; traced
        values too, under jax.grad); this model is unchanged. Missing, unexpected and mis-shaped
        entries raise together."""
        paths, leaves, treedef = _parameter_paths(self)
        given = {path: value for path, value in _flatten(params)}
        expected = dict(zip(paths, (tuple(np.shape(leaf)) for leaf in leaves)))
        problems = ([f"missing {'/'.join(k)} {shape}" for k, shape in expected.items() if k not in given]
                    + [f"unexpected {'/'.join(k)} {np.shape(v)}" for k, v in given.items() if k not in expected]
                    + [f"{'/'.join(k)}: given {np.shape(given[k])} vs model {shape}" for k, shape in expected.items()
                       if k in given and tuple(np.shape(given[k])) != shape])
        if problems:
            raise ValueError(f"params do not fit {type(self).__name__}: " + "; ".join(problems))
        return jax.tree_util.tree_unflatten(treedef, [given[path] for path in paths])

    # -------------------------------------------------------------------------- compiled call
    def _compiled_call(
        self, inputs: dict[str, Array | None], options: dict[str, bool], return_dict: bool | None, train: bool,
        dropout_rng: Array | None, rngs: nnx.Rngs | None, params: Mapping[str, Any] | None,
    ) -> Any:
        """Run ``forward`` through the jit cache: the model goes in as a pytree (parameters traced,
        structure and static attributes in the cache key), options static. ``params``
        (transformers Flax's argument) replaces the model's own parameter values."""
        if rngs is not None:
            if dropout_rng is not None:
                raise ValueError("pass either dropout_rng= or rngs=, not both")
            dropout_rng = rngs.dropout() if train else None
        inputs = {name: None if value is None else jnp.asarray(value) for name, value in inputs.items()}
        model = self if params is None else self.with_params(params)
        # config_key: a snapshot, since the model structure in jax's cache holds the live (mutable) config
        output = _jit_forward(model, inputs, dropout_rng,
                              options=tuple(sorted(options.items())) + (("train", bool(train)),),
                              config_key=trace_key(self.config))
        return output if flag(return_dict, self.config, "return_dict", True) else output.to_tuple()

    # -------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        config: Any = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        use_safetensors: bool | None = None,
        ignore_mismatched_sizes: bool = False,
        attn_implementation: str | None = None,
        dtype: DType | None = None,
        torch_dtype: DType | None = None,
        param_dtype: DType | None = None,
        seed: int = 0,
        from_pt: bool = False,
        **kwargs: Any,
    ) -> FlaxViTPreTrainedModel:
        """Load a checkpoint directory, weights file or hub id (any format vit_core reads: safetensors,
        pytorch_model.bin, tf_model.h5, flax_model.msgpack, 4.x and 5.9+ names).

        Keywords that are config fields (e.g. ``num_labels=10``) change the checkpoint's config;
        ``config`` (a vitx or transformers ViTConfig) replaces it; any other keyword raises
        TypeError naming it (``device_map`` and ``low_cpu_mem_usage`` too, as transformers' Flax
        classes). ``use_safetensors`` True reads only model.safetensors, False never reads it.
        Heads the checkpoint lacks get a random init (seeded by ``seed``, with a warning);
        ``ignore_mismatched_sizes`` re-initialises heads whose shape differs. ``dtype`` (or
        ``torch_dtype``) is the compute dtype, ``param_dtype`` the storage dtype (both float32 by
        default). ``from_pt`` and ``trust_remote_code`` are accepted and change nothing: the format
        is read from the files. ``output_loading_info=True`` returns
        ``(model, {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"})``.
        docs/transformers-compat.md lists every option.
        """
        del from_pt  # transformers' spelling; every format is detected from its contents
        return weights_io.load_pretrained_model(
            cls, pretrained_model_name_or_path, model_kwargs={}, config=config, revision=revision,
            cache_dir=cache_dir, token=token, local_files_only=local_files_only, force_download=force_download,
            use_safetensors=use_safetensors, ignore_mismatched_sizes=ignore_mismatched_sizes,
            attn_implementation=attn_implementation, dtype=weights_io.dtype_alias(torch_dtype, dtype),
            param_dtype=param_dtype, seed=seed, config_overrides=kwargs,
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        params: Mapping[str, Any] | None = None,
        max_shard_size: int | str | None = None,
        safe_serialization: bool = True,
        *,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write ``config.json`` + ``model.safetensors`` (canonical names and PyTorch layouts, the file
        every framework and transformers read; sharded above ``max_shard_size``, e.g. "5GB").

        ``params`` (a tree like ``model.params``, transformers Flax's argument) saves those values
        instead of the model's own. ``safe_serialization=False`` writes ``flax_model.msgpack``
        instead (transformers Flax's file, one file). ``push_to_hub=True`` then uploads the written
        files to ``repo_id`` (default: the directory's name) with ``commit_message``, ``private``,
        ``token``, ``revision``, ``create_pr``, ``commit_description``.
        """
        model = self if params is None else self.with_params(params)
        weights_io.save_pretrained_model(model, save_directory, max_shard_size=max_shard_size,
                                         safe_serialization=safe_serialization)
        weights_io.push_saved(save_directory, push_to_hub, kwargs, owner=f"{type(self).__name__}.save_pretrained")

    def push_to_hub(
        self,
        repo_id: str,
        use_temp_dir: bool | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        max_shard_size: int | str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        revision: str | None = None,
        commit_description: str | None = None,
    ) -> Any:
        """Save into a temporary directory and upload it to the hub repo ``repo_id`` (created when
        absent), as transformers' ``push_to_hub``; returns huggingface_hub's CommitInfo."""
        return weights_io.push_to_hub(
            lambda directory: self.save_pretrained(directory, max_shard_size=max_shard_size,
                                                   safe_serialization=safe_serialization),
            repo_id, use_temp_dir=use_temp_dir, commit_message=commit_message, private=private, token=token,
            revision=revision, create_pr=create_pr, commit_description=commit_description,
        )


class FlaxViTModel(FlaxViTPreTrainedModel):
    """The bare ViT: embeddings, encoder, final layernorm and an optional pooler.

    ``FlaxViTModel(config, add_pooling_layer=True, use_mask_token=False, *, rngs=None, seed=0,
    dtype=jnp.float32, param_dtype=jnp.float32, attn_implementation="sdpa")``. Random init
    follows the canonical table, from ``rngs.params()`` or ``nnx.Rngs(params=seed)``.
    """

    task: Task = "base"

    def __init__(
        self,
        config: ViTConfig,
        add_pooling_layer: bool = True,
        use_mask_token: bool = False,
        *,
        rngs: nnx.Rngs | None = None,
        seed: int = 0,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        attn_implementation: str | None = None,
        _do_init: bool = True,
    ) -> None:
        self._setup(config, attn_implementation, dtype, param_dtype)
        dtype, param_dtype = self.dtype, self.param_dtype
        self.embeddings = ViTEmbeddings(config.num_channels, config.hidden_size, config.patch_hw, config.grid_hw,
                                        config.hidden_dropout_prob, use_mask_token, dtype=dtype,
                                        param_dtype=param_dtype)
        self.encoder = ViTEncoder(config, dtype=dtype, param_dtype=param_dtype)
        self.layernorm = layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.pooler = (ViTPooler(config.hidden_size, config.pooler_size, config.pooler_act, dtype=dtype,
                                 param_dtype=param_dtype) if add_pooling_layer else None)
        if _do_init:
            self._finish(rngs, seed)

    def canonical_table(self) -> list[WeightSpec]:
        return weight_table(self.config, "base", add_pooling_layer=self.pooler is not None,
                            use_mask_token=self.embeddings.mask_token is not None)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        add_pooling_layer: bool = True,
        use_mask_token: bool = False,
        config: Any = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        use_safetensors: bool | None = None,
        ignore_mismatched_sizes: bool = False,
        attn_implementation: str | None = None,
        dtype: DType | None = None,
        torch_dtype: DType | None = None,
        param_dtype: DType | None = None,
        seed: int = 0,
        from_pt: bool = False,
        **kwargs: Any,
    ) -> FlaxViTModel:
        """As FlaxViTPreTrainedModel.from_pretrained, plus FlaxViTModel's ``add_pooling_layer`` / ``use_mask_token``."""
        del from_pt  # transformers' spelling; every format is detected from its contents
        return weights_io.load_pretrained_model(
            cls, pretrained_model_name_or_path,
            model_kwargs={"add_pooling_layer": add_pooling_layer, "use_mask_token": use_mask_token},
            config=config, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
            force_download=force_download, use_safetensors=use_safetensors,
            ignore_mismatched_sizes=ignore_mismatched_sizes, attn_implementation=attn_implementation,
            dtype=weights_io.dtype_alias(torch_dtype, dtype), param_dtype=param_dtype, seed=seed,
            config_overrides=kwargs,
        )

    def __call__(
        self,
        pixel_values: Array,
        bool_masked_pos: Array | None = None,
        head_mask: Array | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        *,
        train: bool = False,
        dropout_rng: Array | None = None,
        rngs: nnx.Rngs | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> BaseModelOutputWithPooling | tuple[Array, ...]:
        """The bare ViT: pixel values -> hidden states of every token (and the pooled CLS token).

        ``forward``, jit-compiled once per input shape and option set (the options are static arguments of
        jax.jit).

        Args:
            pixel_values: (batch, channels, height, width) float pixel values, channels first (NCHW), as
                ViTImageProcessor returns them. height x width must be the config's image size unless
                interpolate_pos_encoding is set.
            bool_masked_pos: (batch, patches) bool, True where a patch embedding is replaced by the mask token
                (the model must be built with use_mask_token=True); None masks nothing.
            head_mask: (heads,) or (layers, heads) multiplying each head's attention probabilities (0 removes a
                head, the same mask for every layer when 1-D); None keeps every head. Takes the eager attention
                path.
            output_attentions: also return every layer's attention probabilities, (batch, heads, tokens, tokens)
                each. They are computed whatever the attention implementation: the call takes the eager kernel
                (the fused sdpa kernel forms no probabilities). None: the config's output_attentions (default
                False). To turn them into a map see docs/attention.md.
            output_hidden_states: also return the embeddings output and every layer's output, (batch, tokens,
                hidden) each, before the final layernorm. None: the config's output_hidden_states (default
                False).
            interpolate_pos_encoding: resample the position embeddings to the input's patch grid (bicubic, the
                kernel docs/NUMERICS.md describes), so images of another size, non-square included, run. None or
                False: the input must have the config's image size.
            return_dict: True (default): the output class; False: a tuple of its non-None fields in order. None:
                the config's return_dict.
            train: apply dropout (hidden and attention dropout of the config); needs dropout_rng= or rngs=.
                Default False (inference).
            dropout_rng: a jax.random key for the dropout masks, with train=True.
            rngs: an nnx.Rngs with a dropout stream, instead of dropout_rng=, with train=True.
            params: a parameter tree like model.params (as transformers' Flax classes take it): run with those
                values instead of the model's own, e.g. under jax.grad. None: the model's parameters.

        Returns:
            BaseModelOutputWithPooling (TFBaseModelOutputWithPooling in vit_tf), or a tuple when return_dict is
            False: last_hidden_state (batch, tokens, hidden) after the final layernorm, pooler_output (batch,
            pooler size) or None without a pooler, hidden_states (layers + 1 arrays) or None, attentions (layers
            arrays) or None.
        """
        return self._compiled_call(
            {"pixel_values": pixel_values, "bool_masked_pos": bool_masked_pos, "head_mask": head_mask},
            {"output_attentions": flag(output_attentions, self.config, "output_attentions", False),
             "output_hidden_states": flag(output_hidden_states, self.config, "output_hidden_states", False),
             "interpolate_pos_encoding": bool(interpolate_pos_encoding)},
            return_dict, train, dropout_rng, rngs, params,
        )

    def forward(
        self,
        pixel_values: Array,
        bool_masked_pos: Array | None = None,
        head_mask: Array | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        *,
        train: bool = False,
        dropout_rng: Array | None = None,
    ) -> BaseModelOutputWithPooling | tuple[Array, ...]:
        """The bare ViT: pixel values -> hidden states of every token (and the pooled CLS token).

        Traceable: use it under your own jax.jit / jax.grad / jax.vmap.

        Args:
            pixel_values: (batch, channels, height, width) float pixel values, channels first (NCHW), as
                ViTImageProcessor returns them. height x width must be the config's image size unless
                interpolate_pos_encoding is set.
            bool_masked_pos: (batch, patches) bool, True where a patch embedding is replaced by the mask token
                (the model must be built with use_mask_token=True); None masks nothing.
            head_mask: (heads,) or (layers, heads) multiplying each head's attention probabilities (0 removes a
                head, the same mask for every layer when 1-D); None keeps every head. Takes the eager attention
                path.
            output_attentions: also return every layer's attention probabilities, (batch, heads, tokens, tokens)
                each. They are computed whatever the attention implementation: the call takes the eager kernel
                (the fused sdpa kernel forms no probabilities). None: the config's output_attentions (default
                False). To turn them into a map see docs/attention.md.
            output_hidden_states: also return the embeddings output and every layer's output, (batch, tokens,
                hidden) each, before the final layernorm. None: the config's output_hidden_states (default
                False).
            interpolate_pos_encoding: resample the position embeddings to the input's patch grid (bicubic, the
                kernel docs/NUMERICS.md describes), so images of another size, non-square included, run. None or
                False: the input must have the config's image size.
            return_dict: True (default): the output class; False: a tuple of its non-None fields in order. None:
                the config's return_dict.
            train: apply dropout (hidden and attention dropout of the config); needs dropout_rng= or rngs=.
                Default False (inference).
            dropout_rng: a jax.random key for the dropout masks, with train=True.

        Returns:
            BaseModelOutputWithPooling (TFBaseModelOutputWithPooling in vit_tf), or a tuple when return_dict is
            False: last_hidden_state (batch, tokens, hidden) after the final layernorm, pooler_output (batch,
            pooler size) or None without a pooler, hidden_states (layers + 1 arrays) or None, attentions (layers
            arrays) or None.
        """
        output_attentions = flag(output_attentions, self.config, "output_attentions", False)
        output_hidden_states = flag(output_hidden_states, self.config, "output_hidden_states", False)
        return_dict = flag(return_dict, self.config, "return_dict", True)
        interpolate_pos_encoding = bool(interpolate_pos_encoding)
        dropout_rng = _check_dropout_rng(train, dropout_rng)
        gh, gw = validation.check_pixel_values(_static_shape(pixel_values), _is_floating(pixel_values), self.config,
                                               interpolate_pos_encoding)
        batch_size = pixel_values.shape[0]
        if bool_masked_pos is not None:
            if self.embeddings.mask_token is None:
                raise ValueError("bool_masked_pos needs a mask token: build the model with FlaxViTModel(config, "
                                 "use_mask_token=True) or use FlaxViTForMaskedImageModeling")
            validation.check_bool_masked_pos(_static_shape(bool_masked_pos), _static_dim(batch_size), gh * gw)
        head_mask = self._expand_head_mask(head_mask)
        eager = output_attentions or head_mask is not None or self.attn_implementation == "eager"
        embeddings_rng, encoder_rng = split_rng(dropout_rng, 2)

        embedding_output = self.embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding, embeddings_rng)
        sequence_output, hidden_states, attentions = self.encoder(
            embedding_output, head_mask, eager, output_attentions, output_hidden_states, encoder_rng
        )
        sequence_output = self.layernorm(sequence_output)  # (batch, tokens, hidden)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        output = BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output,
                                            hidden_states=hidden_states, attentions=attentions)
        return output if return_dict else output.to_tuple()

    def _expand_head_mask(self, head_mask: Array | None) -> Array | None:
        """(heads,) or (layers, heads) -> (layers, 1, heads, 1, 1), broadcast over batch and tokens."""
        if head_mask is None:
            return None
        head_mask = jnp.asarray(head_mask)
        validation.check_head_mask(head_mask.shape, self.config)
        layers, heads = self.config.num_hidden_layers, self.config.num_attention_heads
        head_mask = jnp.broadcast_to(head_mask.astype(self.dtype), (layers, heads))
        return head_mask.reshape(layers, 1, heads, 1, 1)


class FlaxViTForMaskedImageModeling(FlaxViTPreTrainedModel):
    """ViT with the SimMIM decoder: a 1x1 convolution to encoder_stride² * channels, then a pixel shuffle.

    With ``bool_masked_pos`` the loss is the L1 distance over the masked patches.
    """

    task: Task = "mim"

    def __init__(
        self,
        config: ViTConfig,
        *,
        rngs: nnx.Rngs | None = None,
        seed: int = 0,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        attn_implementation: str | None = None,
        _do_init: bool = True,
    ) -> None:
        self._setup(config, attn_implementation, dtype, param_dtype)
        dtype, param_dtype = self.dtype, self.param_dtype
        self.vit = FlaxViTModel(config, add_pooling_layer=False, use_mask_token=True, dtype=dtype,
                                param_dtype=param_dtype, attn_implementation=self.attn_implementation,
                                _do_init=False)
        self.decoder = nnx.List([
            Conv2d(config.hidden_size, config.encoder_stride**2 * config.num_channels, (1, 1), dtype=dtype,
                   param_dtype=param_dtype),
            PixelShuffle(config.encoder_stride),
        ])
        if _do_init:
            self._finish(rngs, seed)

    def __call__(
        self,
        pixel_values: Array,
        bool_masked_pos: Array | None = None,
        head_mask: Array | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        *,
        train: bool = False,
        dropout_rng: Array | None = None,
        rngs: nnx.Rngs | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> MaskedImageModelingOutput | tuple[Array, ...]:
        """SimMIM masked image modeling: pixel values -> the reconstructed image (and the masked L1 loss).

        ``forward``, jit-compiled once per input shape and option set (the options are static arguments of
        jax.jit).

        Args:
            pixel_values: (batch, channels, height, width) float pixel values, channels first (NCHW), as
                ViTImageProcessor returns them. height x width must be the config's image size unless
                interpolate_pos_encoding is set.
            bool_masked_pos: (batch, patches) bool, True where a patch is masked (its embedding replaced by the
                mask token); with it the output has the masked L1 reconstruction loss. None: no loss.
            head_mask: (heads,) or (layers, heads) multiplying each head's attention probabilities (0 removes a
                head, the same mask for every layer when 1-D); None keeps every head. Takes the eager attention
                path.
            output_attentions: also return every layer's attention probabilities, (batch, heads, tokens, tokens)
                each. They are computed whatever the attention implementation: the call takes the eager kernel
                (the fused sdpa kernel forms no probabilities). None: the config's output_attentions (default
                False). To turn them into a map see docs/attention.md.
            output_hidden_states: also return the embeddings output and every layer's output, (batch, tokens,
                hidden) each, before the final layernorm. None: the config's output_hidden_states (default
                False).
            interpolate_pos_encoding: resample the position embeddings to the input's patch grid (bicubic, the
                kernel docs/NUMERICS.md describes), so images of another size, non-square included, run. None or
                False: the input must have the config's image size.
            return_dict: True (default): the output class; False: a tuple of its non-None fields in order. None:
                the config's return_dict.
            train: apply dropout (hidden and attention dropout of the config); needs dropout_rng= or rngs=.
                Default False (inference).
            dropout_rng: a jax.random key for the dropout masks, with train=True.
            rngs: an nnx.Rngs with a dropout stream, instead of dropout_rng=, with train=True.
            params: a parameter tree like model.params (as transformers' Flax classes take it): run with those
                values instead of the model's own, e.g. under jax.grad. None: the model's parameters.

        Returns:
            MaskedImageModelingOutput (TFMaskedImageModelingOutput in vit_tf), or a tuple when return_dict is
            False: loss (scalar) or None, reconstruction (batch, channels, grid height * encoder_stride, grid
            width * encoder_stride), hidden_states or None, attentions or None.
        """
        return self._compiled_call(
            {"pixel_values": pixel_values, "bool_masked_pos": bool_masked_pos, "head_mask": head_mask},
            {"output_attentions": flag(output_attentions, self.config, "output_attentions", False),
             "output_hidden_states": flag(output_hidden_states, self.config, "output_hidden_states", False),
             "interpolate_pos_encoding": bool(interpolate_pos_encoding)},
            return_dict, train, dropout_rng, rngs, params,
        )

    def forward(
        self,
        pixel_values: Array,
        bool_masked_pos: Array | None = None,
        head_mask: Array | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        *,
        train: bool = False,
        dropout_rng: Array | None = None,
    ) -> MaskedImageModelingOutput | tuple[Array, ...]:
        """SimMIM masked image modeling: pixel values -> the reconstructed image (and the masked L1 loss).

        Traceable: use it under your own jax.jit / jax.grad / jax.vmap.

        Args:
            pixel_values: (batch, channels, height, width) float pixel values, channels first (NCHW), as
                ViTImageProcessor returns them. height x width must be the config's image size unless
                interpolate_pos_encoding is set.
            bool_masked_pos: (batch, patches) bool, True where a patch is masked (its embedding replaced by the
                mask token); with it the output has the masked L1 reconstruction loss. None: no loss.
            head_mask: (heads,) or (layers, heads) multiplying each head's attention probabilities (0 removes a
                head, the same mask for every layer when 1-D); None keeps every head. Takes the eager attention
                path.
            output_attentions: also return every layer's attention probabilities, (batch, heads, tokens, tokens)
                each. They are computed whatever the attention implementation: the call takes the eager kernel
                (the fused sdpa kernel forms no probabilities). None: the config's output_attentions (default
                False). To turn them into a map see docs/attention.md.
            output_hidden_states: also return the embeddings output and every layer's output, (batch, tokens,
                hidden) each, before the final layernorm. None: the config's output_hidden_states (default
                False).
            interpolate_pos_encoding: resample the position embeddings to the input's patch grid (bicubic, the
                kernel docs/NUMERICS.md describes), so images of another size, non-square included, run. None or
                False: the input must have the config's image size.
            return_dict: True (default): the output class; False: a tuple of its non-None fields in order. None:
                the config's return_dict.
            train: apply dropout (hidden and attention dropout of the config); needs dropout_rng= or rngs=.
                Default False (inference).
            dropout_rng: a jax.random key for the dropout masks, with train=True.

        Returns:
            MaskedImageModelingOutput (TFMaskedImageModelingOutput in vit_tf), or a tuple when return_dict is
            False: loss (scalar) or None, reconstruction (batch, channels, grid height * encoder_stride, grid
            width * encoder_stride), hidden_states or None, attentions or None.
        """
        return_dict = flag(return_dict, self.config, "return_dict", True)
        if bool_masked_pos is not None:
            validation.check_mim(self.config)
        outputs = self.vit.forward(pixel_values, bool_masked_pos, head_mask, output_attentions, output_hidden_states,
                                   interpolate_pos_encoding, return_dict=True, train=train, dropout_rng=dropout_rng)
        sequence_output = outputs.last_hidden_state[:, 1:]  # (batch, patches, hidden)
        batch_size, _, hidden_size = sequence_output.shape
        ph, pw = self.config.patch_hw
        gh, gw = pixel_values.shape[2] // ph, pixel_values.shape[3] // pw
        # the input's own grid (not a square root of the token count): non-square inputs work too
        sequence_output = sequence_output.transpose(0, 2, 1).reshape(batch_size, hidden_size, gh, gw)
        reconstructed_pixel_values = sequence_output
        for decoder_module in self.decoder:  # (batch, channels, gh * stride, gw * stride)
            reconstructed_pixel_values = decoder_module(reconstructed_pixel_values)

        masked_im_loss = None
        if bool_masked_pos is not None:
            mask = bool_masked_pos.reshape(batch_size, gh, gw)
            mask = jnp.repeat(jnp.repeat(mask, ph, axis=1), pw, axis=2)[:, None]  # (batch, 1, height, width)
            mask = mask.astype(jnp.float32)
            target = pixel_values.astype(jnp.float32)
            # the loss in float32 whatever the compute dtype
            reconstruction_loss = jnp.abs(target - reconstructed_pixel_values.astype(jnp.float32))
            masked_im_loss = (reconstruction_loss * mask).sum() / (mask.sum() + 1e-5) / self.config.num_channels

        output = MaskedImageModelingOutput(loss=masked_im_loss, reconstruction=reconstructed_pixel_values,
                                           hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


class FlaxViTForImageClassification(FlaxViTPreTrainedModel):
    """ViT with a linear classifier on the final-layernormed CLS token (identity when num_labels == 0).

    With ``labels`` the loss follows ``config.problem_type`` (inferred as transformers does when
    unset): MSE for regression, cross-entropy, or BCE-with-logits for multi-label.
    """

    task: Task = "classification"

    def __init__(
        self,
        config: ViTConfig,
        *,
        rngs: nnx.Rngs | None = None,
        seed: int = 0,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        attn_implementation: str | None = None,
        _do_init: bool = True,
    ) -> None:
        self._setup(config, attn_implementation, dtype, param_dtype)
        dtype, param_dtype = self.dtype, self.param_dtype
        self.num_labels = config.num_labels
        self.vit = FlaxViTModel(config, add_pooling_layer=False, dtype=dtype, param_dtype=param_dtype,
                                attn_implementation=self.attn_implementation, _do_init=False)
        self.classifier = (Linear(config.hidden_size, config.num_labels, dtype=dtype, param_dtype=param_dtype)
                           if config.num_labels > 0 else None)
        if _do_init:
            self._finish(rngs, seed)

    def __call__(
        self,
        pixel_values: Array,
        head_mask: Array | None = None,
        labels: Array | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        *,
        train: bool = False,
        dropout_rng: Array | None = None,
        rngs: nnx.Rngs | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> ImageClassifierOutput | tuple[Array, ...]:
        """Image classification: pixel values -> logits (and the loss with labels).

        ``forward``, jit-compiled once per input shape and option set (the options are static arguments of
        jax.jit).

        Concrete labels are checked here, before they become device arrays: a single-label class index
        outside [0, num_labels) other than -100 is a ValueError naming it.

        Args:
            pixel_values: (batch, channels, height, width) float pixel values, channels first (NCHW), as
                ViTImageProcessor returns them. height x width must be the config's image size unless
                interpolate_pos_encoding is set.
            head_mask: (heads,) or (layers, heads) multiplying each head's attention probabilities (0 removes a
                head, the same mask for every layer when 1-D); None keeps every head. Takes the eager attention
                path.
            labels: (batch,) integer class indices (cross-entropy; -100 is ignored), (batch, num_labels) floats
                (multi-label, BCE with logits) or (batch,) floats (regression, num_labels=1, MSE):
                config.problem_type decides, inferred from the labels as transformers does when unset. None: no
                loss.
            output_attentions: also return every layer's attention probabilities, (batch, heads, tokens, tokens)
                each. They are computed whatever the attention implementation: the call takes the eager kernel
                (the fused sdpa kernel forms no probabilities). None: the config's output_attentions (default
                False). To turn them into a map see docs/attention.md.
            output_hidden_states: also return the embeddings output and every layer's output, (batch, tokens,
                hidden) each, before the final layernorm. None: the config's output_hidden_states (default
                False).
            interpolate_pos_encoding: resample the position embeddings to the input's patch grid (bicubic, the
                kernel docs/NUMERICS.md describes), so images of another size, non-square included, run. None or
                False: the input must have the config's image size.
            return_dict: True (default): the output class; False: a tuple of its non-None fields in order. None:
                the config's return_dict.
            train: apply dropout (hidden and attention dropout of the config); needs dropout_rng= or rngs=.
                Default False (inference).
            dropout_rng: a jax.random key for the dropout masks, with train=True.
            rngs: an nnx.Rngs with a dropout stream, instead of dropout_rng=, with train=True.
            params: a parameter tree like model.params (as transformers' Flax classes take it): run with those
                values instead of the model's own, e.g. under jax.grad. None: the model's parameters.

        Returns:
            ImageClassifierOutput (TFImageClassifierOutput in vit_tf), or a tuple when return_dict is False:
            loss (scalar) or None, logits (batch, num_labels) from the final layernormed CLS token,
            hidden_states or None, attentions or None.
        """
        if labels is not None and not isinstance(labels, jax.core.Tracer):
            check_labels(np.asarray(labels), self.config)
        return self._compiled_call(
            {"pixel_values": pixel_values, "head_mask": head_mask, "labels": labels},
            {"output_attentions": flag(output_attentions, self.config, "output_attentions", False),
             "output_hidden_states": flag(output_hidden_states, self.config, "output_hidden_states", False),
             "interpolate_pos_encoding": bool(interpolate_pos_encoding)},
            return_dict, train, dropout_rng, rngs, params,
        )

    def forward(
        self,
        pixel_values: Array,
        head_mask: Array | None = None,
        labels: Array | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        *,
        train: bool = False,
        dropout_rng: Array | None = None,
    ) -> ImageClassifierOutput | tuple[Array, ...]:
        """Image classification: pixel values -> logits (and the loss with labels).

        Traceable: use it under your own jax.jit / jax.grad / jax.vmap.

        Args:
            pixel_values: (batch, channels, height, width) float pixel values, channels first (NCHW), as
                ViTImageProcessor returns them. height x width must be the config's image size unless
                interpolate_pos_encoding is set.
            head_mask: (heads,) or (layers, heads) multiplying each head's attention probabilities (0 removes a
                head, the same mask for every layer when 1-D); None keeps every head. Takes the eager attention
                path.
            labels: (batch,) integer class indices (cross-entropy; -100 is ignored), (batch, num_labels) floats
                (multi-label, BCE with logits) or (batch,) floats (regression, num_labels=1, MSE):
                config.problem_type decides, inferred from the labels as transformers does when unset. None: no
                loss.
            output_attentions: also return every layer's attention probabilities, (batch, heads, tokens, tokens)
                each. They are computed whatever the attention implementation: the call takes the eager kernel
                (the fused sdpa kernel forms no probabilities). None: the config's output_attentions (default
                False). To turn them into a map see docs/attention.md.
            output_hidden_states: also return the embeddings output and every layer's output, (batch, tokens,
                hidden) each, before the final layernorm. None: the config's output_hidden_states (default
                False).
            interpolate_pos_encoding: resample the position embeddings to the input's patch grid (bicubic, the
                kernel docs/NUMERICS.md describes), so images of another size, non-square included, run. None or
                False: the input must have the config's image size.
            return_dict: True (default): the output class; False: a tuple of its non-None fields in order. None:
                the config's return_dict.
            train: apply dropout (hidden and attention dropout of the config); needs dropout_rng= or rngs=.
                Default False (inference).
            dropout_rng: a jax.random key for the dropout masks, with train=True.

        Returns:
            ImageClassifierOutput (TFImageClassifierOutput in vit_tf), or a tuple when return_dict is False:
            loss (scalar) or None, logits (batch, num_labels) from the final layernormed CLS token,
            hidden_states or None, attentions or None.
        """
        return_dict = flag(return_dict, self.config, "return_dict", True)
        outputs = self.vit.forward(pixel_values, None, head_mask, output_attentions, output_hidden_states,
                                   interpolate_pos_encoding, return_dict=True, train=train, dropout_rng=dropout_rng)
        cls_output = outputs.last_hidden_state[:, 0]  # (batch, hidden)
        logits = self.classifier(cls_output) if self.classifier is not None else cls_output  # (batch, num_labels)
        loss = classification_loss(logits, jnp.asarray(labels), self.config) if labels is not None else None
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                       attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


def classification_loss(logits: Array, labels: Array, config: ViTConfig) -> Array:
    """transformers' image-classification loss for ``config.problem_type`` (inferred when unset), in float32.

    Cross-entropy skips labels equal to -100 (torch's ignore_index), averaging over the others, as
    transformers' PyTorch loss does (NaN when every label is skipped or the batch is empty, as
    torch gives). Any other label outside [0, num_labels) is a ValueError naming it when the labels
    are concrete (``model(...)`` checks them before compiling; ``forward`` under
    jax.disable_jit); under jax.jit, where they are not, such a label makes the loss NaN (never a
    finite wrong loss: no clamping, no wrap-around of -1).
    """
    is_integer = bool(jnp.issubdtype(labels.dtype, jnp.integer))
    problem = validation.problem_type(config, is_integer)
    num_labels = config.num_labels
    logits = logits.astype(jnp.float32)
    if problem == "regression":
        labels = labels.astype(jnp.float32)
        if num_labels == 1:
            return jnp.mean((logits.squeeze() - labels.squeeze()) ** 2)
        return jnp.mean((logits - labels) ** 2)
    if problem == "single_label_classification":
        flat_labels = labels.reshape(-1)
        if not isinstance(flat_labels, jax.core.Tracer):
            validation.check_class_labels(np.asarray(flat_labels), num_labels)
        ignored = flat_labels == validation.IGNORE_INDEX
        out_of_range = ~ignored & ((flat_labels < 0) | (flat_labels >= num_labels))
        safe_labels = jnp.where(ignored | out_of_range, 0, flat_labels).astype(jnp.int32)
        log_probs = jax.nn.log_softmax(logits.reshape(-1, num_labels), axis=-1)
        picked = jnp.take_along_axis(log_probs, safe_labels[:, None], axis=-1)[:, 0]  # (batch,)
        kept = (~ignored).astype(jnp.float32)
        loss = -jnp.sum(picked * kept) / jnp.sum(kept)
        return jnp.where(jnp.any(out_of_range), jnp.nan, loss)
    # multi-label: binary cross-entropy with logits, mean over every element (log1p form, stable)
    labels = labels.astype(jnp.float32)
    return jnp.mean(jnp.maximum(logits, 0.0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def check_labels(labels: np.ndarray, config: ViTConfig) -> None:
    """vit_core.validation.check_class_labels when ``labels`` are single-label class indices."""
    is_integer = bool(np.issubdtype(labels.dtype, np.integer))
    if validation.problem_type(config, is_integer) == "single_label_classification":
        validation.check_class_labels(labels, config.num_labels)


# ------------------------------------------------------------------------------ small helpers
@functools.partial(jax.jit, static_argnames=("options", "config_key"))
def _jit_forward(model: FlaxViTPreTrainedModel, inputs: dict[str, Array | None], dropout_rng: Array | None,
                 options: tuple[tuple[str, bool], ...], config_key: str) -> Any:
    """The compiled entry of every model class: ``model.forward``, with the model passed as a pytree
    (nnx modules are pytrees: flattening one is far cheaper than nnx.split, measured in
    benchmarks/RESULTS.md). jax.jit caches one executable per (model structure, options, config,
    input shapes and dtypes); changing ``model.config`` (say its ``problem_type``) retraces rather
    than reusing a stale compilation."""
    del config_key  # only a cache key
    return model.forward(**inputs, **dict(options), return_dict=True, dropout_rng=dropout_rng)


class StaticConfig:
    """The model's ViTConfig as a static attribute (part of the model's pytree structure).

    ViTConfig is mutable and so unhashable, and the pytree structure keys jax.jit's cache (and
    nnx's graphdef): this holder hashes and compares the config's :func:`trace_key`, so two models
    of one architecture share their compilations.
    """

    def __init__(self, config: ViTConfig) -> None:
        self.config = config

    def __hash__(self) -> int:
        return hash(trace_key(self.config))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StaticConfig) and trace_key(other.config) == trace_key(self.config)

    def __repr__(self) -> str:
        return f"StaticConfig({type(self.config).__name__})"


def trace_key(config: ViTConfig) -> str:
    """Every config field a trace may read, as a string: the JSON config without the label names
    (num_labels stays; id2label of a 1000-class model would make it 50 times longer)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    fields["num_labels"] = config.num_labels
    return json.dumps(fields, sort_keys=True, default=str)


def resolve_dtype(dtype: DType) -> jnp.dtype:
    """float32, bfloat16 or float16 (a jnp / numpy dtype, or a name read by
    vit_core.options.dtype_name: "bfloat16", "bf16", "jnp.float16") as a numpy dtype."""
    if isinstance(dtype, str):
        resolved = jnp.dtype(dtype_name(dtype))
    else:
        try:
            resolved = jnp.dtype(dtype)
        except TypeError:
            resolved = None
    if resolved not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"unsupported dtype {dtype!r}; use jnp.float32, jnp.bfloat16 or jnp.float16")
    if resolved == jnp.dtype(jnp.bfloat16) and jax.default_backend() == "cpu":
        cpu.warn_if_emulated("flax", "bfloat16")  # once: bf16 without AMX / avx512_bf16 is slower than float32
    return resolved


def _check_dropout_rng(train: bool, dropout_rng: Array | None) -> Array | None:
    """Dropout runs only in training, and then needs an explicit key (no hidden global RNG state)."""
    if not train:
        return None
    if dropout_rng is None:
        raise ValueError("train=True needs a dropout key: pass dropout_rng=jax.random.key(0) "
                         "(or rngs=nnx.Rngs(dropout=0) to model(...))")
    return dropout_rng


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    items: list[tuple[tuple[str, ...], Any]] = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            items += _flatten(value, prefix + (str(key),))
        else:
            items.append((prefix + (str(key),), value))
    return items


def _parameter_paths(model: nnx.Module) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    """The model's pytree leaves (its parameters) with transformers-Flax paths ("0" for nnx.List
    items, no trailing ``value``), and the treedef to rebuild the model from new leaves."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(model)
    paths = [tuple(str(k.name) if isinstance(k, jax.tree_util.GetAttrKey) else str(getattr(k, "idx", k))
                   for k in path[:-1]) for path, _ in with_paths]  # path[-1] is the Variable's .value
    return paths, [leaf for _, leaf in with_paths], treedef


def _static_dim(dim: Any) -> int:
    """A dimension as an int; a symbolic one (jax.export's batch "b") as -1, which no check compares."""
    return dim if isinstance(dim, int) else -1


def _static_shape(x: Array) -> tuple[int, ...]:
    return tuple(_static_dim(d) for d in x.shape)


def _is_floating(x: Array) -> bool:
    return bool(jnp.issubdtype(x.dtype, jnp.floating))

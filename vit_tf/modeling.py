"""The ViT family in TensorFlow / Keras 3: TFViTModel, TFViTForImageClassification, TFViTForMaskedImageModeling.

Architecture only. The layer tree is transformers 4.x's, and every Keras layer's name equals its
attribute name (list items are named ``layer.{i}`` / ``decoder.{i}``), so every weight's attribute
path is its canonical name in vit_core.weights and its Keras variable path is that name with "/"
after the model's own name. Framework primitives and CPU speed paths live in layers.py, weight
loading and saving in weights.py, the output classes in outputs.py, the options every framework
shares (attention implementation, output flags, dtype names) in vit_core.options. vit_torch/modeling.py and vit_flax/modeling.py define the same classes in the same
order with the same names.

Inputs are NCHW like every framework here; the patch convolution transposes to NHWC inside.
Weights are created (and initialised from the canonical table) at construction: no dummy forward.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import random
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from vit_core import cpu, validation
from vit_core.config import ViTConfig
from vit_core.options import ATTN_IMPLEMENTATIONS, dtype_name, flag, resolve_attn_implementation  # noqa: F401
from vit_core.weights import Task, WeightSpec, weight_table

from . import weights as weights_io
from .layers import (
    Conv2d,
    Dense,
    PixelShuffle,
    eager_attention,
    fused_attention,
    get_activation,
    layer_norm,
    patch_projection,
    resample_position_grid,
    run_in_sub_batches,
    splits_batch,
)
from .outputs import TFBaseModelOutputWithPooling, TFImageClassifierOutput, TFMaskedImageModelingOutput


class ViTPatchEmbeddings(keras.Layer):
    """(batch, channels, height, width) -> (batch, gh * gw, hidden): one token per patch."""

    def __init__(self, num_channels: int, hidden_size: int, patch_hw: tuple[int, int], *, dtype: str,
                 name: str = "patch_embeddings") -> None:
        super().__init__(name=name, dtype=dtype)
        with keras.name_scope(self.name, caller=self):
            self.projection = patch_projection(num_channels, hidden_size, patch_hw, dtype=dtype)
        self.built = True

    def call(self, pixel_values: tf.Tensor) -> tf.Tensor:
        # NCHW -> NHWC: TensorFlow's CPU convolution supports channels-last only.
        pixel_values = tf.transpose(pixel_values, (0, 2, 3, 1))  # (batch, height, width, channels)
        embeddings = self.projection(pixel_values)  # (batch, gh, gw, hidden)
        _, gh, gw, hidden_size = embeddings.shape
        return tf.reshape(embeddings, (-1, gh * gw, hidden_size))  # (batch, gh * gw, hidden), row-major grid order


class ViTEmbeddings(keras.Layer):
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
        dtype: str,
        name: str = "embeddings",
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        with keras.name_scope(self.name, caller=self):
            self.cls_token = self.add_weight(shape=(1, 1, hidden_size), initializer="zeros", name="cls_token")
            self.mask_token = (self.add_weight(shape=(1, 1, hidden_size), initializer="zeros", name="mask_token")
                               if use_mask_token else None)
            self.patch_embeddings = ViTPatchEmbeddings(num_channels, hidden_size, patch_hw, dtype=dtype)
            self.position_embeddings = self.add_weight(shape=(1, grid_hw[0] * grid_hw[1] + 1, hidden_size),
                                                       initializer="zeros", name="position_embeddings")
            self.dropout = keras.layers.Dropout(dropout_prob, dtype=dtype, name="dropout")
        self.patch_hw = tuple(patch_hw)
        self.grid_hw = tuple(grid_hw)
        self.built = True

    def interpolate_pos_encoding(self, embeddings: tf.Tensor, height: int, width: int) -> tf.Tensor:
        """The position table for an input of ``height`` x ``width`` pixels: (1, 1 + out_h * out_w, hidden).

        The patch rows are resampled bicubically (layers.resample_position_grid) to the input's
        grid; the CLS row passes through. A grid already of the target size is used as is.
        ``embeddings`` is accepted for transformers' signature; only its dtype matters.
        """
        out_hw = (height // self.patch_hw[0], width // self.patch_hw[1])
        position_embeddings = tf.convert_to_tensor(self.position_embeddings)
        if out_hw == self.grid_hw:
            return position_embeddings
        class_pos_embed = position_embeddings[:, :1]  # (1, 1, hidden)
        patch_pos_embed = resample_position_grid(position_embeddings[:, 1:], self.grid_hw, out_hw)
        return tf.cast(tf.concat([class_pos_embed, patch_pos_embed], axis=1), embeddings.dtype)

    def call(
        self,
        pixel_values: tf.Tensor,
        bool_masked_pos: tf.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        training: bool = False,
    ) -> tf.Tensor:
        _, _, height, width = pixel_values.shape
        batch_size = tf.shape(pixel_values)[0]
        embeddings = self.patch_embeddings(pixel_values)  # (batch, patches, hidden)
        if bool_masked_pos is not None:
            # SimMIM: masked patches are replaced by the learned mask token.
            mask = tf.cast(bool_masked_pos, embeddings.dtype)[..., None]  # (batch, patches, 1)
            embeddings = embeddings * (1.0 - mask) + self.mask_token * mask
        cls_tokens = tf.tile(self.cls_token, (batch_size, 1, 1))  # (batch, 1, hidden)
        embeddings = tf.concat([cls_tokens, embeddings], axis=1)  # (batch, tokens, hidden)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        else:
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings, training=training)


class ViTSelfAttention(keras.Layer):
    """Multi-head self-attention: a fused path and an eager path that returns the probabilities.

    query/key/value columns are head-major: column h * head_dim + j belongs to head h. The fused
    path returns no probabilities; the eager path (``eager``, a head mask, or attention dropout in
    training) returns them. Query, key and value are three matmuls: one matmul on their
    concatenated kernels is slower at batch 1 (the concatenation copies 7 MB per ViT-B layer on
    every call) and no faster at batch 8 (measured in benchmarks/RESULTS.md).
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, qkv_bias: bool, dropout_prob: float, *,
                 dtype: str, name: str = "attention") -> None:
        super().__init__(name=name, dtype=dtype)
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = hidden_size // num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size**-0.5
        self.dropout_prob = dropout_prob
        with keras.name_scope(self.name, caller=self):
            self.query = Dense(hidden_size, self.all_head_size, qkv_bias, dtype=dtype, name="query")
            self.key = Dense(hidden_size, self.all_head_size, qkv_bias, dtype=dtype, name="key")
            self.value = Dense(hidden_size, self.all_head_size, qkv_bias, dtype=dtype, name="value")
            self.dropout = keras.layers.Dropout(dropout_prob, dtype=dtype, name="dropout")
        self.built = True

    def call(
        self, hidden_states: tf.Tensor, head_mask: tf.Tensor | None = None, eager: bool = False, training: bool = False
    ) -> tuple[tf.Tensor, tf.Tensor | None]:
        """hidden_states (batch, tokens, hidden); head_mask (1, heads, 1, 1) or None.

        Returns context (batch, tokens, hidden) and, on the eager path, the probabilities
        (batch, heads, tokens, tokens); None on the fused path.
        """
        batch_size = tf.shape(hidden_states)[0]
        tokens = hidden_states.shape[1]
        heads, head_dim = self.num_attention_heads, self.attention_head_size
        dropout_active = bool(training) and self.dropout_prob > 0.0
        attention_probs: tf.Tensor | None = None
        new_shape = (batch_size, tokens, heads, head_dim)
        query = tf.transpose(tf.reshape(self.query(hidden_states), new_shape), (0, 2, 1, 3))  # (batch, heads, tokens, head_dim)
        key = tf.transpose(tf.reshape(self.key(hidden_states), new_shape), (0, 2, 1, 3))  # (batch, heads, tokens, head_dim)
        value = tf.transpose(tf.reshape(self.value(hidden_states), new_shape), (0, 2, 1, 3))  # (batch, heads, tokens, head_dim)
        if eager or head_mask is not None or dropout_active:
            dropout = (lambda probs: self.dropout(probs, training=True)) if dropout_active else None
            context, attention_probs = eager_attention(query, key, value, self.scaling, head_mask, dropout)
        else:
            context = fused_attention(query, key, value, self.scaling)
        context = tf.transpose(context, (0, 2, 1, 3))  # (batch, tokens, heads, head_dim)
        context = tf.reshape(context, (batch_size, tokens, self.all_head_size))  # (batch, tokens, hidden)
        return context, attention_probs


class ViTSelfOutput(keras.Layer):
    """Output projection of the attention; the residual is added in ViTLayer (pre-norm block)."""

    def __init__(self, hidden_size: int, dropout_prob: float, *, dtype: str, name: str = "output") -> None:
        super().__init__(name=name, dtype=dtype)
        with keras.name_scope(self.name, caller=self):
            self.dense = Dense(hidden_size, hidden_size, dtype=dtype, name="dense")
            self.dropout = keras.layers.Dropout(dropout_prob, dtype=dtype, name="dropout")
        self.built = True

    def call(self, hidden_states: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.dropout(self.dense(hidden_states), training=training)  # (batch, tokens, hidden)


class ViTAttention(keras.Layer):
    """ViTSelfAttention followed by its output projection."""

    # keras.Layer.output is a read-only property (a functional graph's symbolic output), and Keras'
    # weight files skip every attribute a bare keras.Layer has: the sublayer the canonical names call
    # "output" lives in ``_output`` (saved by model.save_weights under that name) and ``output``
    # returns it. These layers are never used symbolically.
    @property
    def output(self) -> ViTSelfOutput:
        return self._output

    def __init__(self, hidden_size: int, num_attention_heads: int, qkv_bias: bool, attention_dropout_prob: float,
                 hidden_dropout_prob: float, *, dtype: str, name: str = "attention") -> None:
        super().__init__(name=name, dtype=dtype)
        with keras.name_scope(self.name, caller=self):
            self.attention = ViTSelfAttention(hidden_size, num_attention_heads, qkv_bias, attention_dropout_prob,
                                              dtype=dtype)
            self._output = ViTSelfOutput(hidden_size, hidden_dropout_prob, dtype=dtype)
        self.built = True

    def call(
        self, hidden_states: tf.Tensor, head_mask: tf.Tensor | None = None, eager: bool = False, training: bool = False
    ) -> tuple[tf.Tensor, tf.Tensor | None]:
        context, attention_probs = self.attention(hidden_states, head_mask, eager=eager, training=training)
        return self.output(context, training=training), attention_probs  # (batch, tokens, hidden), probabilities or None


class ViTIntermediate(keras.Layer):
    """First MLP projection and the hidden activation: (batch, tokens, hidden) -> (batch, tokens, intermediate)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, *, dtype: str,
                 name: str = "intermediate") -> None:
        super().__init__(name=name, dtype=dtype)
        with keras.name_scope(self.name, caller=self):
            self.dense = Dense(hidden_size, intermediate_size, dtype=dtype, name="dense")
        self.activation = get_activation(hidden_act)
        self.built = True

    def call(self, hidden_states: tf.Tensor) -> tf.Tensor:
        return self.activation(self.dense(hidden_states))


class ViTOutput(keras.Layer):
    """Second MLP projection plus the residual: (batch, tokens, intermediate) -> (batch, tokens, hidden)."""

    def __init__(self, intermediate_size: int, hidden_size: int, dropout_prob: float, *, dtype: str,
                 name: str = "output") -> None:
        super().__init__(name=name, dtype=dtype)
        with keras.name_scope(self.name, caller=self):
            self.dense = Dense(intermediate_size, hidden_size, dtype=dtype, name="dense")
            self.dropout = keras.layers.Dropout(dropout_prob, dtype=dtype, name="dropout")
        self.built = True

    def call(self, hidden_states: tf.Tensor, input_tensor: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.dropout(self.dense(hidden_states), training=training) + input_tensor


class ViTLayer(keras.Layer):
    """Pre-norm transformer block: x + attention(LN(x)), then + MLP(LN(.))."""

    @property
    def output(self) -> ViTOutput:  # the canonical "output" sublayer, stored as in ViTAttention
        return self._output

    def __init__(self, config: ViTConfig, *, dtype: str, name: str) -> None:
        super().__init__(name=name, dtype=dtype)
        d, eps = config.hidden_size, config.layer_norm_eps
        with keras.name_scope(self.name, caller=self):
            self.layernorm_before = layer_norm(d, eps, dtype=dtype, name="layernorm_before")
            self.attention = ViTAttention(d, config.num_attention_heads, config.qkv_bias,
                                          config.attention_probs_dropout_prob, config.hidden_dropout_prob, dtype=dtype)
            self.layernorm_after = layer_norm(d, eps, dtype=dtype, name="layernorm_after")
            self.intermediate = ViTIntermediate(d, config.intermediate_size, config.hidden_act, dtype=dtype)
            self._output = ViTOutput(config.intermediate_size, d, config.hidden_dropout_prob, dtype=dtype)
        self.built = True

    def call(
        self, hidden_states: tf.Tensor, head_mask: tf.Tensor | None = None, eager: bool = False, training: bool = False
    ) -> tuple[tf.Tensor, tf.Tensor | None]:
        """(batch, tokens, hidden) -> (batch, tokens, hidden), attention probabilities or None."""
        attention_output, attention_probs = self.attention(self.layernorm_before(hidden_states), head_mask,
                                                           eager=eager, training=training)
        hidden_states = attention_output + hidden_states  # first residual
        layer_output = self.intermediate(self.layernorm_after(hidden_states))
        layer_output = self.output(layer_output, hidden_states, training=training)  # second residual
        return layer_output, attention_probs


class ViTEncoder(keras.Layer):
    """The stack of ViTLayer (named ``layer.{i}``); collects hidden states and attentions when asked.

    With ``gradient_checkpointing`` set and in training mode, each layer runs under
    ``tf.recompute_grad``: its activations are recomputed in the backward pass instead of kept
    (attention probabilities are not returned through it, so output_attentions turns it off).
    """

    def __init__(self, config: ViTConfig, *, dtype: str, name: str = "encoder") -> None:
        super().__init__(name=name, dtype=dtype)
        with keras.name_scope(self.name, caller=self):
            self.layer = [ViTLayer(config, dtype=dtype, name=f"layer.{i}") for i in range(config.num_hidden_layers)]
        self.gradient_checkpointing = False
        self.built = True

    def call(
        self,
        hidden_states: tf.Tensor,
        head_mask: tf.Tensor | None = None,
        eager: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        training: bool = False,
    ) -> tuple[tf.Tensor, tuple[tf.Tensor, ...] | None, tuple[tf.Tensor, ...] | None]:
        """hidden_states (batch, tokens, hidden); head_mask (layers, 1, heads, 1, 1) or None.

        Returns the last layer's output (before the final layernorm), the hidden states
        (embeddings + every layer) and the attention probabilities of every layer (or None).
        """
        if splits_batch(hidden_states, head_mask, output_attentions, output_hidden_states, training):
            # inference on a large batch: the same layers on sub-batches (layers.run_in_sub_batches)
            return run_in_sub_batches(lambda chunk: self.call(chunk, None, eager)[0], hidden_states), None, None
        all_hidden_states: list[tf.Tensor] = [hidden_states]
        all_attentions: list[tf.Tensor] = []
        for i, layer_module in enumerate(self.layer):
            layer_head_mask = head_mask[i] if head_mask is not None else None  # (1, heads, 1, 1)
            if self.gradient_checkpointing and training and not output_attentions:
                hidden_states, attention_probs = _recomputed(layer_module, layer_head_mask, eager)(hidden_states), None
            else:
                hidden_states, attention_probs = layer_module(hidden_states, layer_head_mask, eager=eager,
                                                              training=training)
            all_hidden_states.append(hidden_states)
            if output_attentions and attention_probs is not None:
                all_attentions.append(attention_probs)
        return (
            hidden_states,
            tuple(all_hidden_states) if output_hidden_states else None,
            tuple(all_attentions) if output_attentions else None,
        )


def _recomputed(layer_module: ViTLayer, head_mask: tf.Tensor | None, eager: bool) -> Any:
    """``layer_module`` in training mode as a function of its input whose activations
    tf.recompute_grad recomputes in the backward pass (gradient checkpointing).

    The recomputation restarts the layer's dropout streams where the forward pass started them,
    so it draws the same masks and the gradients equal those without checkpointing.
    """
    generators = [layer.seed_generator for layer in layer_module._flatten_layers(include_self=False, recursive=True)
                  if isinstance(layer, keras.layers.Dropout) and getattr(layer, "seed_generator", None) is not None]
    start_states = [tf.identity(generator.state.value) for generator in generators]

    @tf.recompute_grad
    def run(hidden_states: tf.Tensor) -> tf.Tensor:
        for generator, state in zip(generators, start_states):
            generator.state.assign(state)
        return layer_module(hidden_states, head_mask, eager=eager, training=True)[0]

    return run


class ViTPooler(keras.Layer):
    """Dense + activation on the final CLS token: (batch, tokens, hidden) -> (batch, pooler size)."""

    def __init__(self, hidden_size: int, pooler_output_size: int, pooler_act: str, *, dtype: str,
                 name: str = "pooler") -> None:
        super().__init__(name=name, dtype=dtype)
        with keras.name_scope(self.name, caller=self):
            self.dense = Dense(hidden_size, pooler_output_size, dtype=dtype, name="dense")
        self.activation = get_activation(pooler_act)
        self.built = True

    def call(self, hidden_states: tf.Tensor) -> tf.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class TFViTPreTrainedModel(keras.Model):
    """What the three model classes share: config, construction options, init, loading, saving, export.

    Not a transformers TFPreTrainedModel: a plain keras.Model whose weights' attribute paths are
    the canonical weight names, so transformers' checkpoints and ours are the same files.
    """

    config: ViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    task: Task = "base"
    output_class: type = TFBaseModelOutputWithPooling

    def _setup(self, config: ViTConfig, attn_implementation: str | None, seed: int | None) -> int:
        """Store the config and construction options; return the seed (drawn from Python's ``random``,
        which keras.utils.set_random_seed seeds, when ``seed`` is None)."""
        if not isinstance(config, ViTConfig):
            raise TypeError(f"{type(self).__name__} needs a vit_core ViTConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self._attn_implementation = resolve_attn_implementation(attn_implementation)  # the backbone's is read
        # Keras converts array arguments to tensors (floats to the compute dtype) before call();
        # it also refuses non-tensor positional arguments unless told otherwise: allow them, so
        # transformers-style positional calls (``model(x, None, head_mask, True)``) work.
        self._allow_non_tensor_positional_args = True
        if seed is None:
            return random.randint(0, 2**31 - 1)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        return int(seed)

    def _finish(self, seed: int) -> None:
        """Initialise the weights this class owns from the canonical table (a nested ``vit`` backbone
        initialised itself), seed the dropout streams, and mark the model built."""
        own = [spec for spec in self.canonical_table() if not spec.name.startswith(self.base_model_prefix + ".")]
        weights_io.init_weights(self, own, self.config.initializer_range, seed)
        weights_io.seed_dropout(self, seed)
        self.built = True

    def canonical_table(self) -> list[WeightSpec]:
        """The canonical weight table of this model (names equal attribute paths)."""
        return weight_table(self.config, self.task)

    # -------------------------------------------------------------------------- properties
    # No transformers-style ``base_model`` property: Keras' weight saving walks every attribute, and
    # one that returns the model itself (TFViTModel) would recurse forever in ``load_weights``.
    def _backbone(self) -> TFViTModel:
        return getattr(self, self.base_model_prefix, self)

    @property
    def attn_implementation(self) -> str:
        """"sdpa" (the fused path) or "eager"; output_attentions or a head mask take the eager path anyway.

        Settable (same as :meth:`set_attn_implementation`; "fused" is read as "sdpa")."""
        return self._backbone()._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str | None) -> None:
        self.set_attn_implementation(value)

    def set_attn_implementation(self, attn_implementation: str | None) -> None:
        """Switch the attention path: "sdpa" or "fused" (the same fused path, the default) or
        "eager"; takes effect on the next call (a tf.function traced before retraces only if its
        inputs change: call it again after switching). ValueError listing the choices otherwise."""
        implementation = resolve_attn_implementation(attn_implementation)
        self._attn_implementation = implementation
        self._backbone()._attn_implementation = implementation

    # -------------------------------------------------------------------------- gradient checkpointing
    def _encoders(self) -> list[ViTEncoder]:
        return [layer for layer in self._flatten_layers(include_self=False, recursive=True)
                if isinstance(layer, ViTEncoder)]

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(encoder.gradient_checkpointing for encoder in self._encoders())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each encoder layer in the backward pass (training mode only; tf.recompute_grad).

        ``gradient_checkpointing_kwargs`` is accepted for transformers' signature; it may hold
        ``use_reentrant`` (meaningless in TensorFlow, ignored)."""
        options = dict(gradient_checkpointing_kwargs or {})
        options.pop("use_reentrant", None)
        if options:
            raise ValueError(f"gradient_checkpointing_kwargs accepts only 'use_reentrant', got {sorted(options)}")
        for encoder in self._encoders():
            encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for encoder in self._encoders():
            encoder.gradient_checkpointing = False

    def get_input_embeddings(self) -> ViTPatchEmbeddings:
        return self._backbone().embeddings.patch_embeddings

    def num_parameters(self, only_trainable: bool = False) -> int:
        """Number of parameters: the canonical weights (dropout seed states are not parameters)."""
        variables = [weights_io.get_variable(self, spec.name) for spec in self.canonical_table()]
        return int(sum(np.prod(v.shape) for v in variables if v.trainable or not only_trainable))

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
        dtype: str | tf.DType | None = None,
        torch_dtype: str | None = None,
        attn_implementation: str | None = None,
        seed: int | None = None,
        from_pt: bool = False,
        **kwargs: Any,
    ) -> TFViTPreTrainedModel:
        """Load a checkpoint directory, weights file or hub id (any format vit_core reads: safetensors
        from PyTorch / TF / Flax, pytorch_model.bin, tf_model.h5, flax_model.msgpack).

        Keywords that are config fields (e.g. ``num_labels=10``) change the checkpoint's config;
        ``config`` (a vitx or transformers ViTConfig) replaces it; any other keyword raises
        TypeError naming it (``device_map`` and ``low_cpu_mem_usage`` too, as transformers' TF
        classes). ``use_safetensors`` True reads only model.safetensors, False never reads it.
        Heads the checkpoint lacks keep their random init (with a warning);
        ``ignore_mismatched_sizes`` re-initialises heads whose shape differs. ``dtype`` (or
        ``torch_dtype``): float32 (default), bfloat16, float16 or "auto" (the checkpoint config's).
        ``from_pt`` and ``trust_remote_code`` are accepted and change nothing: the file kind is
        detected from its contents. ``output_loading_info=True`` returns
        ``(model, {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"})``.
        docs/transformers-compat.md lists every option.
        """
        return weights_io.load_pretrained_model(
            cls, pretrained_model_name_or_path, model_kwargs={}, config=config, revision=revision,
            cache_dir=cache_dir, token=token, local_files_only=local_files_only, force_download=force_download,
            use_safetensors=use_safetensors, ignore_mismatched_sizes=ignore_mismatched_sizes,
            dtype=weights_io.dtype_alias(torch_dtype, dtype), attn_implementation=attn_implementation,
            seed=seed, config_overrides=kwargs,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str | None = None,
                        safe_serialization: bool = True, *, push_to_hub: bool = False, **kwargs: Any) -> pathlib.Path:
        """Write ``config.json`` + ``model.safetensors`` (canonical names and PyTorch layouts, the files
        vit_torch and transformers' PyTorch ViT write; sharded above ``max_shard_size``).
        ``safe_serialization=False`` writes ``tf_model.h5`` instead (transformers' TF file, one
        file). ``push_to_hub=True`` then uploads the written files to ``repo_id`` (default: the
        directory's name) with ``commit_message``, ``private``, ``token``, ``revision``,
        ``create_pr``, ``commit_description``."""
        path = weights_io.save_pretrained_model(self, save_directory, max_shard_size=max_shard_size,
                                                safe_serialization=safe_serialization)
        weights_io.push_saved(save_directory, push_to_hub, kwargs, owner=f"{type(self).__name__}.save_pretrained")
        return path

    def push_to_hub(
        self,
        repo_id: str,
        use_temp_dir: bool | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        max_shard_size: int | str | None = None,
        token: str | bool | None = None,
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

    def export_saved_model(self, export_dir: str | os.PathLike) -> pathlib.Path:
        """Write a TensorFlow SavedModel with a ``serving_default`` signature.

        The signature takes ``pixel_values`` float32 (batch, channels, height, width) with any batch
        size and the config's image size, and returns a dict of the model's main outputs
        (``last_hidden_state`` [+ ``pooler_output``], ``logits`` or ``reconstruction``) in the
        model's dtype. Reload with ``tf.saved_model.load(export_dir).serve(pixel_values)`` or
        through ``.signatures["serving_default"]``.
        """
        height, width = self.config.image_hw
        spec = tf.TensorSpec([None, self.config.num_channels, height, width], tf.float32, name="pixel_values")

        def serve(pixel_values: tf.Tensor) -> dict[str, tf.Tensor]:
            return self.serving_outputs(self(pixel_values, training=False))

        archive = keras.export.ExportArchive()
        archive.track(self)
        archive.add_endpoint(name="serve", fn=serve, input_signature=[spec])
        export_dir = pathlib.Path(export_dir)
        archive.write_out(str(export_dir), verbose=False)
        return export_dir

    def serving_outputs(self, output: Any) -> dict[str, tf.Tensor]:
        """The outputs a serving signature returns (non-None tensors of the output, no tuples)."""
        return {key: value for key, value in output.items() if isinstance(value, tf.Tensor)}

    # -------------------------------------------------------------------------- Keras training
    # compile / fit / evaluate / predict as transformers' TF models train: a batch is
    # (pixel_values, labels) or a dict of call arguments ({"pixel_values": x, "labels": y}); with no
    # loss given to compile, the model's own loss (outputs.loss, from the labels) is minimised, as
    # transformers' TFPreTrainedModel.train_step does; with one, it is applied to the main output
    # (logits, reconstruction or last_hidden_state). Metrics see the labels and the main output.
    main_output_name = "last_hidden_state"

    def _unpack_batch(self, data: Any) -> tuple[dict[str, Any], Any, Any]:
        """A dataset element -> (call arguments, labels or None, sample weights or None)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        inputs = dict(x) if isinstance(x, dict) else {self.main_input_name: x}
        takes_labels = "labels" in inspect.signature(self.call).parameters
        if takes_labels and y is None:
            y = inputs.get("labels")
        if getattr(self, "_compile_loss", None) is not None:
            inputs.pop("labels", None)  # the compiled loss uses them; the model need not
        elif takes_labels and y is not None:
            inputs["labels"] = y
        return inputs, y, sample_weight

    def _forward(self, inputs: dict[str, Any], training: bool) -> Any:
        inputs = dict(inputs)
        return self(inputs.pop(self.main_input_name), **inputs, training=training)

    def _step_loss(self, outputs: Any, y: Any, sample_weight: Any, training: bool) -> tf.Tensor:
        if getattr(self, "_compile_loss", None) is not None:
            return self.compute_loss(y=y, y_pred=outputs[self.main_output_name], sample_weight=sample_weight,
                                     training=training)
        if outputs.loss is None:
            raise ValueError(f"{type(self).__name__} was compiled without a loss and computed none: pass labels "
                             "(a (pixel_values, labels) dataset or a 'labels' key in the input dict) or compile "
                             "with loss=")
        loss = tf.cast(outputs.loss, tf.float32)
        if self.losses:
            loss = loss + tf.add_n([tf.cast(extra, tf.float32) for extra in self.losses])
        return loss

    def _track_loss(self, loss: tf.Tensor, inputs: dict[str, Any]) -> None:
        self._loss_tracker.update_state(loss, sample_weight=tf.shape(inputs[self.main_input_name])[0])

    def train_step(self, data: Any) -> dict[str, Any]:
        inputs, y, sample_weight = self._unpack_batch(data)
        with tf.GradientTape() as tape:
            outputs = self._forward(inputs, training=True)
            loss = self._step_loss(outputs, y, sample_weight, training=True)
            self._track_loss(loss, inputs)
            scaled_loss = self.optimizer.scale_loss(loss)  # mixed_float16: the LossScaleOptimizer's scale
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled_loss, variables), variables)
        return self.compute_metrics(None, y, outputs[self.main_output_name], sample_weight=sample_weight)

    def test_step(self, data: Any) -> dict[str, Any]:
        inputs, y, sample_weight = self._unpack_batch(data)
        outputs = self._forward(inputs, training=False)
        self._track_loss(self._step_loss(outputs, y, sample_weight, training=False), inputs)
        return self.compute_metrics(None, y, outputs[self.main_output_name], sample_weight=sample_weight)

    def predict_step(self, data: Any) -> dict[str, tf.Tensor]:
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        inputs = dict(x) if isinstance(x, dict) else {self.main_input_name: x}
        inputs.pop("labels", None)
        return self.serving_outputs(self._forward(inputs, training=False))

    def predict(self, x: Any, batch_size: int | None = None, verbose: Any = "auto", steps: int | None = None,
                callbacks: Any = None) -> Any:
        """keras.Model.predict, returning the model's output class with numpy arrays (as transformers'
        TF predict does): ``model.predict(x).logits`` or ``model.predict(x)["logits"]``."""
        arrays = super().predict(x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks)
        return self.output_class(**arrays)

    # -------------------------------------------------------------------------- Keras serialisation
    def get_config(self) -> dict[str, Any]:
        """What ``from_config`` needs (model.save("m.keras") / keras.models.load_model): the ViTConfig
        as a dict, the dtype policy name, the attention implementation and the name."""
        return {"config": self.config.to_dict(), "attn_implementation": self.attn_implementation,
                "dtype": self.dtype_policy.name, "name": self.name, **self._architecture_options()}

    def _architecture_options(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TFViTPreTrainedModel:
        config = dict(config)
        vit_config = config.pop("config")
        if isinstance(vit_config, dict):
            vit_config = ViTConfig.from_dict(vit_config)
        return cls(vit_config, **config)

    # -------------------------------------------------------------------------- shared forward parts
    def _prepare_pixel_values(self, pixel_values: Any, interpolate_pos_encoding: bool) -> tuple[tf.Tensor, int, int]:
        """Validate (vit_core.validation) and cast to the compute dtype; returns the tensor and its grid."""
        pixel_values = tf.convert_to_tensor(pixel_values)
        shape = _static_shape(pixel_values, "pixel_values", dynamic_ok=(0,))
        gh, gw = validation.check_pixel_values(shape, pixel_values.dtype.is_floating, self.config,
                                               interpolate_pos_encoding)
        return tf.cast(pixel_values, self.compute_dtype), gh, gw


@keras.saving.register_keras_serializable(package="vitx")
class TFViTModel(TFViTPreTrainedModel):
    """The bare ViT: embeddings, encoder, final layernorm and an optional pooler.

    ``TFViTModel(config, add_pooling_layer=True, use_mask_token=False, attn_implementation="sdpa",
    dtype="float32", seed=None)``. Random init follows the canonical table (seed with ``seed=`` or
    keras.utils.set_random_seed).
    """

    task: Task = "base"
    output_class = TFBaseModelOutputWithPooling

    def __init__(
        self,
        config: ViTConfig,
        add_pooling_layer: bool = True,
        use_mask_token: bool = False,
        *,
        attn_implementation: str | None = None,
        dtype: str | tf.DType | None = None,
        seed: int | None = None,
        name: str | None = None,
    ) -> None:
        dtype = resolve_dtype(dtype)
        super().__init__(name=name, dtype=dtype)
        seed = self._setup(config, attn_implementation, seed)
        with keras.name_scope(self.name, caller=self):
            self.embeddings = ViTEmbeddings(config.num_channels, config.hidden_size, config.patch_hw, config.grid_hw,
                                            config.hidden_dropout_prob, use_mask_token, dtype=dtype)
            self.encoder = ViTEncoder(config, dtype=dtype)
            self.layernorm = layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, name="layernorm")
            self.pooler = (ViTPooler(config.hidden_size, config.pooler_size, config.pooler_act, dtype=dtype)
                           if add_pooling_layer else None)
        self._finish(seed)

    def canonical_table(self) -> list[WeightSpec]:
        return weight_table(self.config, "base", add_pooling_layer=self.pooler is not None,
                            use_mask_token=self.embeddings.mask_token is not None)

    def _architecture_options(self) -> dict[str, Any]:
        return {"add_pooling_layer": self.pooler is not None, "use_mask_token": self.embeddings.mask_token is not None}

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
        dtype: str | tf.DType | None = None,
        torch_dtype: str | None = None,
        attn_implementation: str | None = None,
        seed: int | None = None,
        from_pt: bool = False,
        **kwargs: Any,
    ) -> TFViTModel:
        """As TFViTPreTrainedModel.from_pretrained, plus TFViTModel's ``add_pooling_layer`` / ``use_mask_token``."""
        return weights_io.load_pretrained_model(
            cls, pretrained_model_name_or_path,
            model_kwargs={"add_pooling_layer": add_pooling_layer, "use_mask_token": use_mask_token},
            config=config, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
            force_download=force_download, use_safetensors=use_safetensors,
            ignore_mismatched_sizes=ignore_mismatched_sizes, dtype=weights_io.dtype_alias(torch_dtype, dtype),
            attn_implementation=attn_implementation, seed=seed, config_overrides=kwargs,
        )

    def call(
        self,
        pixel_values: tf.Tensor,
        bool_masked_pos: tf.Tensor | None = None,
        head_mask: tf.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        training: bool = False,
    ) -> TFBaseModelOutputWithPooling | tuple[tf.Tensor, ...]:
        """The bare ViT: pixel values -> hidden states of every token (and the pooled CLS token).

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
            training: Keras' training flag: True applies dropout (hidden and attention dropout of the config).
                Default False (inference).

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
        pixel_values, gh, gw = self._prepare_pixel_values(pixel_values, interpolate_pos_encoding)
        if bool_masked_pos is not None:
            if self.embeddings.mask_token is None:
                raise ValueError("bool_masked_pos needs a mask token: build the model with TFViTModel(config, "
                                 "use_mask_token=True) or use TFViTForMaskedImageModeling")
            bool_masked_pos = tf.convert_to_tensor(bool_masked_pos)
            _check_bool_masked_pos(bool_masked_pos, pixel_values, gh * gw)
        head_mask = self._expand_head_mask(head_mask)
        eager = output_attentions or head_mask is not None or self.attn_implementation == "eager"

        embedding_output = self.embeddings(pixel_values, bool_masked_pos,
                                           interpolate_pos_encoding=interpolate_pos_encoding, training=training)
        sequence_output, hidden_states, attentions = self.encoder(
            embedding_output, head_mask, eager=eager, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, training=training,
        )
        sequence_output = self.layernorm(sequence_output)  # (batch, tokens, hidden)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        output = TFBaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output,
                                              hidden_states=hidden_states, attentions=attentions)
        return output if return_dict else output.to_tuple()

    def _expand_head_mask(self, head_mask: Any) -> tf.Tensor | None:
        """(heads,) or (layers, heads) -> (layers, 1, heads, 1, 1), broadcast over batch and tokens."""
        if head_mask is None:
            return None
        head_mask = tf.convert_to_tensor(head_mask)
        validation.check_head_mask(head_mask.shape, self.config)
        layers, heads = self.config.num_hidden_layers, self.config.num_attention_heads
        head_mask = tf.broadcast_to(tf.cast(head_mask, self.compute_dtype), (layers, heads))
        return tf.reshape(head_mask, (layers, 1, heads, 1, 1))


@keras.saving.register_keras_serializable(package="vitx")
class TFViTForMaskedImageModeling(TFViTPreTrainedModel):
    """ViT with the SimMIM decoder: a 1x1 convolution to encoder_stride² * channels, then a pixel shuffle.

    With ``bool_masked_pos`` the loss is the L1 distance over the masked patches.
    """

    task: Task = "mim"
    output_class = TFMaskedImageModelingOutput
    main_output_name = "reconstruction"

    def __init__(
        self,
        config: ViTConfig,
        *,
        attn_implementation: str | None = None,
        dtype: str | tf.DType | None = None,
        seed: int | None = None,
        name: str | None = None,
    ) -> None:
        dtype = resolve_dtype(dtype)
        super().__init__(name=name, dtype=dtype)
        seed = self._setup(config, attn_implementation, seed)
        with keras.name_scope(self.name, caller=self):
            self.vit = TFViTModel(config, add_pooling_layer=False, use_mask_token=True,
                                  attn_implementation=attn_implementation, dtype=dtype, seed=seed, name="vit")
            self.decoder = [
                Conv2d(config.hidden_size, config.encoder_stride**2 * config.num_channels, (1, 1), dtype=dtype,
                       name="decoder.0"),
                PixelShuffle(config.encoder_stride, dtype=dtype, name="decoder.1"),
            ]
        self._finish(seed)

    def call(
        self,
        pixel_values: tf.Tensor,
        bool_masked_pos: tf.Tensor | None = None,
        head_mask: tf.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        training: bool = False,
    ) -> TFMaskedImageModelingOutput | tuple[tf.Tensor, ...]:
        """SimMIM masked image modeling: pixel values -> the reconstructed image (and the masked L1 loss).

        The loss is float32 whatever the compute dtype.

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
            training: Keras' training flag: True applies dropout (hidden and attention dropout of the config).
                Default False (inference).

        Returns:
            MaskedImageModelingOutput (TFMaskedImageModelingOutput in vit_tf), or a tuple when return_dict is
            False: loss (scalar) or None, reconstruction (batch, channels, grid height * encoder_stride, grid
            width * encoder_stride), hidden_states or None, attentions or None.
        """
        return_dict = flag(return_dict, self.config, "return_dict", True)
        if bool_masked_pos is not None:
            validation.check_mim(self.config)
        outputs = self.vit(pixel_values, bool_masked_pos, head_mask, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states,
                           interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, training=training)
        sequence_output = outputs.last_hidden_state[:, 1:]  # (batch, patches, hidden)
        hidden_size = sequence_output.shape[-1]
        pixel_values = tf.convert_to_tensor(pixel_values)
        height, width = pixel_values.shape[2], pixel_values.shape[3]
        ph, pw = self.config.patch_hw
        gh, gw = height // ph, width // pw
        # the input's own grid (not a square root of the token count): non-square inputs work too;
        # channels-last, so the 1x1 convolution runs on TensorFlow's NHWC kernel
        sequence_output = tf.reshape(sequence_output, (-1, gh, gw, hidden_size))  # (batch, gh, gw, hidden)
        decoded = self.decoder[0](sequence_output)  # (batch, gh, gw, stride² * channels)
        reconstructed_pixel_values = self.decoder[1](decoded)  # (batch, channels, gh * stride, gw * stride)

        masked_im_loss = None
        if bool_masked_pos is not None:
            if height % ph or width % pw:
                raise ValueError(f"the masked-image-modeling loss needs height and width divisible by the patch "
                                 f"size {ph}x{pw}, got {height}x{width}")
            mask = tf.reshape(tf.cast(tf.convert_to_tensor(bool_masked_pos), tf.float32), (-1, gh, gw))
            mask = tf.repeat(tf.repeat(mask, ph, axis=1), pw, axis=2)[:, None]  # (batch, 1, height, width)
            # in float32 whatever the compute dtype: a sum over every pixel
            target = tf.cast(pixel_values, tf.float32)
            reconstruction_loss = tf.abs(target - tf.cast(reconstructed_pixel_values, tf.float32))
            masked_im_loss = (tf.reduce_sum(reconstruction_loss * mask) / (tf.reduce_sum(mask) + 1e-5)
                              / self.config.num_channels)

        output = TFMaskedImageModelingOutput(loss=masked_im_loss, reconstruction=reconstructed_pixel_values,
                                             hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


@keras.saving.register_keras_serializable(package="vitx")
class TFViTForImageClassification(TFViTPreTrainedModel):
    """ViT with a linear classifier on the final-layernormed CLS token (identity when num_labels == 0).

    With ``labels`` the loss follows ``config.problem_type`` (inferred as transformers does when
    unset): MSE for regression, cross-entropy, or BCE-with-logits for multi-label.
    """

    task: Task = "classification"
    output_class = TFImageClassifierOutput
    main_output_name = "logits"

    def __init__(
        self,
        config: ViTConfig,
        *,
        attn_implementation: str | None = None,
        dtype: str | tf.DType | None = None,
        seed: int | None = None,
        name: str | None = None,
    ) -> None:
        dtype = resolve_dtype(dtype)
        super().__init__(name=name, dtype=dtype)
        seed = self._setup(config, attn_implementation, seed)
        self.num_labels = config.num_labels
        with keras.name_scope(self.name, caller=self):
            self.vit = TFViTModel(config, add_pooling_layer=False, attn_implementation=attn_implementation,
                                  dtype=dtype, seed=seed, name="vit")
            self.classifier: keras.Layer = (
                Dense(config.hidden_size, config.num_labels, dtype=dtype, name="classifier") if config.num_labels > 0
                else keras.layers.Identity(dtype=dtype, name="classifier")
            )
        self._finish(seed)

    def call(
        self,
        pixel_values: tf.Tensor,
        head_mask: tf.Tensor | None = None,
        labels: tf.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        training: bool = False,
    ) -> TFImageClassifierOutput | tuple[tf.Tensor, ...]:
        """Image classification: pixel values -> logits (and the loss with labels).

        The loss is float32 whatever the compute dtype.

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
            training: Keras' training flag: True applies dropout (hidden and attention dropout of the config).
                Default False (inference).

        Returns:
            ImageClassifierOutput (TFImageClassifierOutput in vit_tf), or a tuple when return_dict is False:
            loss (scalar) or None, logits (batch, num_labels) from the final layernormed CLS token,
            hidden_states or None, attentions or None.
        """
        return_dict = flag(return_dict, self.config, "return_dict", True)
        outputs = self.vit(pixel_values, None, head_mask, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states,
                           interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, training=training)
        logits = self.classifier(outputs.last_hidden_state[:, 0])  # (batch, num_labels)
        loss = classification_loss(logits, labels, self.config) if labels is not None else None
        output = TFImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                         attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


def classification_loss(logits: tf.Tensor, labels: Any, config: ViTConfig) -> tf.Tensor:
    """transformers' image-classification loss for ``config.problem_type`` (inferred when unset).

    Computed in float32. Cross-entropy skips labels equal to -100 (torch's ignore_index), averaging
    over the others, as transformers' PyTorch loss does (NaN when every label is skipped or the
    batch is empty, as torch gives). Any other label outside [0, num_labels) is a ValueError naming
    it when the labels are concrete (eager mode); inside tf.function, where they are not, such a
    label makes the loss NaN (never a finite wrong loss).
    """
    labels = tf.convert_to_tensor(labels)
    problem = validation.problem_type(config, labels.dtype.is_integer)
    num_labels = config.num_labels
    logits = tf.cast(logits, tf.float32)
    if problem == "regression":
        labels = tf.cast(labels, tf.float32)
        if num_labels == 1:
            return tf.reduce_mean(tf.square(tf.squeeze(logits) - tf.squeeze(labels)))
        return tf.reduce_mean(tf.square(logits - labels))
    if problem == "single_label_classification":
        flat_logits = tf.reshape(logits, (-1, num_labels))
        flat_labels = tf.reshape(tf.cast(labels, tf.int64), (-1,))
        if tf.executing_eagerly():
            validation.check_class_labels(flat_labels.numpy(), num_labels)
        valid = tf.not_equal(flat_labels, validation.IGNORE_INDEX)
        out_of_range = valid & ((flat_labels < 0) | (flat_labels >= num_labels))
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.where(valid & ~out_of_range, flat_labels, tf.zeros_like(flat_labels)), logits=flat_logits)
        valid = tf.cast(valid, tf.float32)
        loss = tf.reduce_sum(losses * valid) / tf.reduce_sum(valid)
        return tf.where(tf.reduce_any(out_of_range), tf.constant(float("nan"), tf.float32), loss)
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(labels, tf.float32), logits=logits))


# ------------------------------------------------------------------------------ small helpers
def resolve_dtype(dtype: str | tf.DType | np.dtype | None) -> str:
    """float32, bfloat16 or float16, from a name (vit_core.options.dtype_name: "bfloat16",
    "bf16", "tf.float16"), a tf.DType or a numpy dtype. Weights are stored and computed in it;
    LayerNorm and softmax run in float32.

    "mixed_bfloat16" / "mixed_float16" (Keras mixed precision: float32 variables, computation in the
    half type) are kept as Keras policy names. ``None`` is Keras' global policy
    (``keras.mixed_precision.set_global_policy``; float32 unless set).
    """
    if dtype is None:
        dtype = keras.config.dtype_policy().name
    if isinstance(dtype, str):
        if dtype in MIXED_POLICIES:
            if dtype == "mixed_bfloat16":
                cpu.warn_if_emulated("tf", "bfloat16")  # once: bf16 without AMX / avx512_bf16 is slow
            return dtype
        name = dtype_name(dtype)
        if name == "bfloat16":
            cpu.warn_if_emulated("tf", "bfloat16")
        return name
    if isinstance(dtype, tf.DType):
        name = dtype.name
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'")
    if name == "bfloat16":
        cpu.warn_if_emulated("tf", "bfloat16")
    return name


MIXED_POLICIES = ("mixed_bfloat16", "mixed_float16")


def _static_shape(tensor: tf.Tensor, what: str, dynamic_ok: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The static shape, with -1 for unknown dimensions in ``dynamic_ok`` (the batch); other
    dimensions fix the position table and the patch grid, so they must be known when tracing."""
    if tensor.shape.rank is None:
        raise ValueError(f"{what} must have a known rank when traced (use a TensorSpec with a shape)")
    dims = []
    for axis, size in enumerate(tensor.shape.as_list()):
        if size is None:
            if axis not in dynamic_ok:
                raise ValueError(f"{what} dimension {axis} must be known when traced (got shape {tensor.shape}); "
                                 "only the batch dimension may be None")
            size = -1
        dims.append(int(size))
    return tuple(dims)


def _check_bool_masked_pos(bool_masked_pos: tf.Tensor, pixel_values: tf.Tensor, num_patches: int) -> None:
    """vit_core's shape check, with an unknown (traced) batch size taken from the other tensor."""
    mask_shape = list(_static_shape(bool_masked_pos, "bool_masked_pos", dynamic_ok=(0,)))
    batch = int(pixel_values.shape[0]) if pixel_values.shape[0] is not None else mask_shape[0] if mask_shape else -1
    if mask_shape and mask_shape[0] == -1:
        mask_shape[0] = batch
    validation.check_bool_masked_pos(mask_shape, batch, num_patches)

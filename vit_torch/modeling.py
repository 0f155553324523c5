"""The ViT family in PyTorch: ViTModel, ViTForImageClassification, ViTForMaskedImageModeling.

Architecture only. The module tree is transformers 4.x's, so every parameter's attribute path
(``model.state_dict()`` key) is its canonical name in vit_core.weights; framework primitives and
CPU speed paths live in layers.py, weight loading and saving in weights.py, the output classes in
outputs.py, the options every framework shares (attention implementation, output flags, dtype
names) in vit_core.options. vit_tf/modeling.py and
vit_flax/modeling.py define the same classes in the same order with the same names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from vit_core import cpu, validation
from vit_core.config import ViTConfig
from vit_core.options import ATTN_IMPLEMENTATIONS, dtype_name, flag, resolve_attn_implementation  # noqa: F401
from vit_core.weights import Task, WeightSpec, weight_table

from . import weights as weights_io
from .layers import (
    Linear,
    dense_activation,
    dense_dropout_residual,
    eager_attention,
    fused_attention,
    get_activation,
    layer_norm,
    patch_projection,
    qkv_projection,
    resample_position_grid,
    run_in_sub_batches,
    splits_batch,
)
from .outputs import BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput, inner_call, traceable


class ViTPatchEmbeddings(nn.Module):
    """(batch, channels, height, width) -> (batch, gh * gw, hidden): one token per patch."""

    def __init__(self, num_channels: int, hidden_size: int, patch_hw: tuple[int, int]) -> None:
        super().__init__()
        self.projection = patch_projection(num_channels, hidden_size, patch_hw)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.projection(pixel_values)  # (batch, hidden, gh, gw)
        return embeddings.flatten(2).transpose(1, 2)  # (batch, gh * gw, hidden), row-major grid order


class ViTEmbeddings(nn.Module):
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
    ) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if use_mask_token else None
        self.patch_embeddings = ViTPatchEmbeddings(num_channels, hidden_size, patch_hw)
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid_hw[0] * grid_hw[1] + 1, hidden_size))
        self.dropout = nn.Dropout(dropout_prob)
        self.patch_hw = patch_hw
        self.grid_hw = grid_hw

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The position table for an input of ``height`` x ``width`` pixels: (1, 1 + out_h * out_w, hidden).

        The patch rows are resampled bicubically (layers.resample_position_grid) to the input's
        grid; the CLS row passes through. A grid already of the target size is used as is.
        ``embeddings`` is accepted for transformers' signature; only its dtype matters.
        """
        out_hw = (height // self.patch_hw[0], width // self.patch_hw[1])
        # a symbolic size (torch.export of a dynamic-size model) always resamples: at the same size
        # the bicubic matrices are exactly the identity, so the values are the table's own
        symbolic = isinstance(height, torch.SymInt) or isinstance(width, torch.SymInt)
        if not symbolic and out_hw == self.grid_hw:
            return self.position_embeddings
        class_pos_embed = self.position_embeddings[:, :1]  # (1, 1, hidden)
        patch_pos_embed = resample_position_grid(self.position_embeddings[:, 1:], self.grid_hw, out_hw)
        return torch.cat([class_pos_embed, patch_pos_embed], dim=1).to(embeddings.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values)  # (batch, patches, hidden)
        if bool_masked_pos is not None:
            # SimMIM: masked patches are replaced by the learned mask token.
            mask = bool_masked_pos.unsqueeze(-1).to(embeddings.dtype)  # (batch, patches, 1)
            embeddings = embeddings * (1.0 - mask) + self.mask_token * mask
        cls_tokens = self.cls_token.expand(batch_size, -1, -1)  # (batch, 1, hidden)
        embeddings = torch.cat([cls_tokens, embeddings], dim=1)  # (batch, tokens, hidden)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        else:
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings)


class ViTSelfAttention(nn.Module):
    """Multi-head self-attention: a fused path (SDPA) and an eager path that returns the probabilities.

    query/key/value rows are head-major: row h * head_dim + j belongs to head h.
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, qkv_bias: bool, dropout_prob: float) -> None:
        super().__init__()
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = hidden_size // num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size**-0.5
        self.dropout_prob = dropout_prob
        self.query = Linear(hidden_size, self.all_head_size, bias=qkv_bias)
        self.key = Linear(hidden_size, self.all_head_size, bias=qkv_bias)
        self.value = Linear(hidden_size, self.all_head_size, bias=qkv_bias)

    def forward(
        self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None, eager: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (batch, tokens, hidden); head_mask (1, heads, 1, 1) or None.

        Returns context (batch, tokens, hidden) and, on the eager path (``eager`` or a head mask),
        the probabilities (batch, heads, tokens, tokens); None on the fused path.
        """
        batch_size, tokens, _ = hidden_states.shape
        new_shape = (batch_size, tokens, self.num_attention_heads, self.attention_head_size)
        query, key, value = qkv_projection(self.query, self.key, self.value, hidden_states)  # each (batch, tokens, hidden)
        query = query.view(new_shape).transpose(1, 2)  # (batch, heads, tokens, head_dim)
        key = key.view(new_shape).transpose(1, 2)  # (batch, heads, tokens, head_dim)
        value = value.view(new_shape).transpose(1, 2)  # (batch, heads, tokens, head_dim)
        dropout_p = self.dropout_prob if self.training else 0.0
        attention_probs: torch.Tensor | None = None
        if eager or head_mask is not None:
            context, attention_probs = eager_attention(query, key, value, self.scaling, head_mask, dropout_p)
        else:
            context = fused_attention(query, key, value, self.scaling, dropout_p)
        context = context.transpose(1, 2).reshape(batch_size, tokens, self.all_head_size)  # (batch, tokens, hidden)
        return context, attention_probs


class ViTSelfOutput(nn.Module):
    """Output projection of the attention; ViTLayer passes the block's input as ``residual`` (pre-norm
    block), added inside the GEMM on the oneDNN inference path (layers.dense_dropout_residual)."""

    def __init__(self, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.dense = Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return self.dropout(self.dense(hidden_states))  # (batch, tokens, hidden)
        return dense_dropout_residual(self.dense, self.dropout, hidden_states, residual)


class ViTAttention(nn.Module):
    """ViTSelfAttention followed by its output projection."""

    def __init__(self, hidden_size: int, num_attention_heads: int, qkv_bias: bool, attention_dropout_prob: float,
                 hidden_dropout_prob: float) -> None:
        super().__init__()
        self.attention = ViTSelfAttention(hidden_size, num_attention_heads, qkv_bias, attention_dropout_prob)
        self.output = ViTSelfOutput(hidden_size, hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None, eager: bool = False,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``residual`` (batch, tokens, hidden), when given, is added to the output projection."""
        context, attention_probs = self.attention(hidden_states, head_mask, eager)
        return self.output(context, residual), attention_probs  # (batch, tokens, hidden), probabilities or None


class ViTIntermediate(nn.Module):
    """First MLP projection and the hidden activation: (batch, tokens, hidden) -> (batch, tokens, intermediate)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.dense = Linear(hidden_size, intermediate_size)
        self.hidden_act = hidden_act
        self.activation = get_activation(hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return dense_activation(self.dense, hidden_states, self.hidden_act, self.activation)


class ViTOutput(nn.Module):
    """Second MLP projection plus the residual: (batch, tokens, intermediate) -> (batch, tokens, hidden)."""

    def __init__(self, intermediate_size: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.dense = Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return dense_dropout_residual(self.dense, self.dropout, hidden_states, input_tensor)


class ViTLayer(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then + MLP(LN(.))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.layernorm_before = layer_norm(d, eps)
        self.attention = ViTAttention(d, config.num_attention_heads, config.qkv_bias,
                                      config.attention_probs_dropout_prob, config.hidden_dropout_prob)
        self.layernorm_after = layer_norm(d, eps)
        self.intermediate = ViTIntermediate(d, config.intermediate_size, config.hidden_act)
        self.output = ViTOutput(config.intermediate_size, d, config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None, eager: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(batch, tokens, hidden) -> (batch, tokens, hidden), attention probabilities or None."""
        # first residual, added inside the output projection's GEMM on the oneDNN inference path
        hidden_states, attention_probs = self.attention(self.layernorm_before(hidden_states), head_mask, eager,
                                                        residual=hidden_states)
        layer_output = self.intermediate(self.layernorm_after(hidden_states))
        layer_output = self.output(layer_output, hidden_states)  # second residual
        return layer_output, attention_probs


class ViTEncoder(nn.Module):
    """The stack of ViTLayer; collects hidden states and attentions when asked.

    With ``gradient_checkpointing`` set and in training mode, each layer's activations are
    recomputed in the backward pass (torch.utils.checkpoint, use_reentrant=False; the RNG state is
    restored so dropout masks repeat exactly).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([ViTLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.checkpoint_use_reentrant = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        eager: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """hidden_states (batch, tokens, hidden); head_mask (layers, 1, heads, 1, 1) or None.

        Returns the last layer's output (before the final layernorm), the hidden states
        (embeddings + every layer) and the attention probabilities of every layer (or None).
        """
        if splits_batch(hidden_states, head_mask, output_attentions, output_hidden_states, self.training):
            # CPU inference on a large batch: the same layers on sub-batches (layers.run_in_sub_batches)
            return run_in_sub_batches(lambda chunk: self(chunk, None, eager)[0], hidden_states), None, None
        all_hidden_states: list[torch.Tensor] = [hidden_states]
        all_attentions: list[torch.Tensor] = []
        for i, layer_module in enumerate(self.layer):
            layer_head_mask = head_mask[i] if head_mask is not None else None  # (1, heads, 1, 1)
            if self.gradient_checkpointing and self.training:
                hidden_states, attention_probs = checkpoint(
                    layer_module, hidden_states, layer_head_mask, eager, use_reentrant=self.checkpoint_use_reentrant
                )
            else:
                hidden_states, attention_probs = layer_module(hidden_states, layer_head_mask, eager)
            all_hidden_states.append(hidden_states)
            if output_attentions and attention_probs is not None:
                all_attentions.append(attention_probs)
        return (
            hidden_states,
            tuple(all_hidden_states) if output_hidden_states else None,
            tuple(all_attentions) if output_attentions else None,
        )


class ViTPooler(nn.Module):
    """Dense + activation on the final CLS token: (batch, tokens, hidden) -> (batch, pooler size)."""

    def __init__(self, hidden_size: int, pooler_output_size: int, pooler_act: str) -> None:
        super().__init__()
        self.dense = Linear(hidden_size, pooler_output_size)
        self.activation = get_activation(pooler_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class ViTPreTrainedModel(nn.Module):
    """What the three model classes share: config, construction options, init, loading, saving.

    Not a transformers PreTrainedModel: a plain nn.Module whose ``state_dict()`` keys are the
    canonical weight names, so transformers' checkpoints and ours are the same files.
    """

    config: ViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    task: Task = "base"

    def _setup(
        self,
        config: ViTConfig,
        attn_implementation: str | None,
        torch_dtype: torch.dtype | str | None,
        dtype: torch.dtype | str | None,
    ) -> torch.dtype:
        """Store the config (and the attention implementation on it, as transformers does); return the dtype.

        ``attn_implementation=None`` keeps the config's ``_attn_implementation`` when it has one."""
        if not isinstance(config, ViTConfig):
            raise TypeError(f"{type(self).__name__} needs a vit_core ViTConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        if attn_implementation is None:
            attn_implementation = getattr(config, "_attn_implementation", None)
        self.set_attn_implementation(attn_implementation)
        return resolve_dtype(torch_dtype, dtype)

    def _finish(self, target_dtype: torch.dtype) -> None:
        """Initialise every parameter from the canonical table, then cast (init runs in float32).

        A task model's backbone (``vit``) initialised itself when it was built; only the rest is
        initialised here.
        """
        skip = self.base_model_prefix + "." if self.base_model is not self else None
        weights_io.init_weights(self, self.canonical_table(), self.config.initializer_range, skip_prefix=skip)
        if target_dtype != torch.float32:
            self.to(target_dtype)
        if target_dtype == torch.bfloat16:
            cpu.warn_if_emulated("torch", "bfloat16")  # once: bf16 without AMX / avx512_bf16 is slower than float32

    def canonical_table(self) -> list[WeightSpec]:
        """The canonical weight table of this model (names equal ``state_dict()`` keys)."""
        return weight_table(self.config, self.task)

    # -------------------------------------------------------------------------- properties
    @property
    def attn_implementation(self) -> str:
        """"sdpa" (the fused path) or "eager"; output_attentions or a head mask take the eager path anyway.

        Kept on the config (``config._attn_implementation``, as transformers does), which a task
        model shares with its backbone; settable (same as :meth:`set_attn_implementation`)."""
        return resolve_attn_implementation(getattr(self.config, "_attn_implementation", None))

    @attn_implementation.setter
    def attn_implementation(self, value: str | None) -> None:
        self.set_attn_implementation(value)

    def set_attn_implementation(self, attn_implementation: str | None) -> None:
        """Switch the attention path: "sdpa" or "fused" (the same fused path, the default) or
        "eager"; takes effect on the next call. ValueError listing the choices for another name."""
        self.config._attn_implementation = resolve_attn_implementation(attn_implementation)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, ViTEncoder))

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters (ViT has no token-embedding matrix, so ``exclude_embeddings`` changes nothing)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def get_input_embeddings(self) -> ViTPatchEmbeddings:
        return self.base_model.embeddings.patch_embeddings

    @property
    def base_model(self) -> ViTModel:
        return getattr(self, self.base_model_prefix, self)

    # -------------------------------------------------------------------------- training helpers
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each encoder layer in the backward pass (training mode only), as transformers does.

        ``gradient_checkpointing_kwargs`` may hold ``use_reentrant`` (default False).
        """
        options = dict(gradient_checkpointing_kwargs or {})
        use_reentrant = bool(options.pop("use_reentrant", False))
        if options:
            raise ValueError(f"gradient_checkpointing_kwargs accepts only 'use_reentrant', got {sorted(options)}")
        for module in self.modules():
            if isinstance(module, ViTEncoder):
                module.gradient_checkpointing = True
                module.checkpoint_use_reentrant = use_reentrant

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, ViTEncoder):
                module.gradient_checkpointing = False

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
        device_map: Any = None,
        ignore_mismatched_sizes: bool = False,
        attn_implementation: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> ViTPreTrainedModel:
        """Load a checkpoint directory, weights file or hub id (any format vit_core reads).

        Keywords that are config fields (e.g. ``num_labels=10``, ``output_attentions=True``)
        change the checkpoint's config; ``config`` (a vitx or transformers ViTConfig) replaces it.
        ``use_safetensors`` True reads only model.safetensors, False never reads it;
        ``device_map`` may be None / "cpu" / torch.device("cpu") (ValueError otherwise);
        ``low_cpu_mem_usage`` and ``trust_remote_code`` are accepted and change nothing; any other
        keyword raises TypeError naming it. Heads the checkpoint lacks keep their random init (with
        a warning); ``ignore_mismatched_sizes`` re-initialises heads whose shape differs. Returns
        the model in eval mode. ``output_loading_info=True`` returns
        ``(model, {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"})``.
        docs/transformers-compat.md lists every option.
        """
        return weights_io.load_pretrained_model(
            cls, pretrained_model_name_or_path, model_kwargs={}, config=config, revision=revision,
            cache_dir=cache_dir, token=token, local_files_only=local_files_only, force_download=force_download,
            use_safetensors=use_safetensors, device_map=device_map,
            ignore_mismatched_sizes=ignore_mismatched_sizes, attn_implementation=attn_implementation,
            dtype=resolve_dtype(torch_dtype, dtype, allow_auto=True), config_overrides=kwargs,
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        max_shard_size: int | str | None = None,
        safe_serialization: bool = True,
        *,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write ``config.json`` + ``model.safetensors`` (canonical names; sharded above ``max_shard_size``,
        e.g. "5GB"). ``safe_serialization=False`` writes ``pytorch_model.bin`` instead (torch's zip
        format holding tensors only, written without pickling any object; one file), which
        transformers 4.x and vitx load.

        transformers' keywords, as its Trainer passes them: ``state_dict`` (this model's
        ``state_dict()`` keys, e.g. gathered from a wrapped model) is saved instead of the model's
        own values, strictly (every key, no other); ``is_main_process=False`` writes nothing.
        ``push_to_hub=True`` then uploads the written files to ``repo_id`` (default: the
        directory's name) with ``commit_message``, ``private``, ``token``, ``revision``,
        ``create_pr``, ``commit_description``."""
        if not is_main_process:
            return
        weights_io.save_pretrained_model(self, save_directory, max_shard_size=max_shard_size, state_dict=state_dict,
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


class ViTModel(ViTPreTrainedModel):
    """The bare ViT: embeddings, encoder, final layernorm and an optional pooler.

    ``ViTModel(config, add_pooling_layer=True, use_mask_token=False, attn_implementation="sdpa",
    dtype=torch.float32)``. Random init follows the canonical table (seed with torch.manual_seed).
    """

    task: Task = "base"

    def __init__(
        self,
        config: ViTConfig,
        add_pooling_layer: bool = True,
        use_mask_token: bool = False,
        *,
        attn_implementation: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        target_dtype = self._setup(config, attn_implementation, torch_dtype, dtype)
        self.embeddings = ViTEmbeddings(config.num_channels, config.hidden_size, config.patch_hw, config.grid_hw,
                                        config.hidden_dropout_prob, use_mask_token)
        self.encoder = ViTEncoder(config)
        self.layernorm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.pooler = ViTPooler(config.hidden_size, config.pooler_size, config.pooler_act) if add_pooling_layer else None
        self._finish(target_dtype)

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
        device_map: Any = None,
        ignore_mismatched_sizes: bool = False,
        attn_implementation: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> ViTModel:
        """As ViTPreTrainedModel.from_pretrained, plus ViTModel's ``add_pooling_layer`` / ``use_mask_token``."""
        return weights_io.load_pretrained_model(
            cls, pretrained_model_name_or_path,
            model_kwargs={"add_pooling_layer": add_pooling_layer, "use_mask_token": use_mask_token},
            config=config, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
            force_download=force_download, use_safetensors=use_safetensors, device_map=device_map,
            ignore_mismatched_sizes=ignore_mismatched_sizes, attn_implementation=attn_implementation,
            dtype=resolve_dtype(torch_dtype, dtype, allow_auto=True), config_overrides=kwargs,
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple[torch.Tensor, ...]:
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
        gh, gw = validation.check_pixel_values(pixel_values.shape, pixel_values.is_floating_point(), self.config,
                                               interpolate_pos_encoding)
        batch_size = pixel_values.shape[0]
        if bool_masked_pos is not None:
            if self.embeddings.mask_token is None:
                raise ValueError("bool_masked_pos needs a mask token: build the model with ViTModel(config, "
                                 "use_mask_token=True) or use ViTForMaskedImageModeling")
            validation.check_bool_masked_pos(bool_masked_pos.shape, batch_size, gh * gw)
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        pixel_values = pixel_values.to(expected_dtype)  # as transformers: inputs follow the weights' dtype
        head_mask = self._expand_head_mask(head_mask, expected_dtype)
        eager = output_attentions or head_mask is not None or self.attn_implementation == "eager"

        embedding_output = self.embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        sequence_output, hidden_states, attentions = self.encoder(
            embedding_output, head_mask, eager, output_attentions, output_hidden_states
        )
        sequence_output = self.layernorm(sequence_output)  # (batch, tokens, hidden)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        output = BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output,
                                            hidden_states=hidden_states, attentions=attentions)
        return traceable(output, return_dict)

    def _expand_head_mask(self, head_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """(heads,) or (layers, heads) -> (layers, 1, heads, 1, 1), broadcast over batch and tokens."""
        if head_mask is None:
            return None
        head_mask = torch.as_tensor(head_mask)
        validation.check_head_mask(head_mask.shape, self.config)
        layers, heads = self.config.num_hidden_layers, self.config.num_attention_heads
        head_mask = head_mask.to(device=self.embeddings.cls_token.device, dtype=dtype).expand(layers, heads)
        return head_mask.reshape(layers, 1, heads, 1, 1)


class ViTForMaskedImageModeling(ViTPreTrainedModel):
    """ViT with the SimMIM decoder: a 1x1 convolution to encoder_stride² * channels, then a pixel shuffle.

    With ``bool_masked_pos`` the loss is the L1 distance over the masked patches.
    """

    task: Task = "mim"

    def __init__(
        self,
        config: ViTConfig,
        *,
        attn_implementation: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        target_dtype = self._setup(config, attn_implementation, torch_dtype, dtype)
        self.vit = ViTModel(config, add_pooling_layer=False, use_mask_token=True)
        self.decoder = nn.Sequential(
            nn.Conv2d(config.hidden_size, config.encoder_stride**2 * config.num_channels, kernel_size=1),
            nn.PixelShuffle(config.encoder_stride),
        )
        self._finish(target_dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> MaskedImageModelingOutput | tuple[torch.Tensor, ...]:
        """SimMIM masked image modeling: pixel values -> the reconstructed image (and the masked L1 loss).

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

        Returns:
            MaskedImageModelingOutput (TFMaskedImageModelingOutput in vit_tf), or a tuple when return_dict is
            False: loss (scalar) or None, reconstruction (batch, channels, grid height * encoder_stride, grid
            width * encoder_stride), hidden_states or None, attentions or None.
        """
        return_dict = flag(return_dict, self.config, "return_dict", True)
        if bool_masked_pos is not None:
            validation.check_mim(self.config)
        with inner_call():
            outputs = self.vit(pixel_values, bool_masked_pos, head_mask, output_attentions, output_hidden_states,
                               interpolate_pos_encoding, return_dict=True)
        sequence_output = outputs.last_hidden_state[:, 1:]  # (batch, patches, hidden)
        batch_size, _, hidden_size = sequence_output.shape
        ph, pw = self.config.patch_hw
        gh, gw = pixel_values.shape[2] // ph, pixel_values.shape[3] // pw
        # the input's own grid (not a square root of the token count): non-square inputs work too
        sequence_output = sequence_output.transpose(1, 2).reshape(batch_size, hidden_size, gh, gw)
        reconstructed_pixel_values = self.decoder(sequence_output)  # (batch, channels, gh * stride, gw * stride)

        masked_im_loss = None
        if bool_masked_pos is not None:
            mask = bool_masked_pos.reshape(batch_size, gh, gw)
            mask = mask.repeat_interleave(ph, 1).repeat_interleave(pw, 2).unsqueeze(1)  # (batch, 1, height, width)
            mask = mask.to(reconstructed_pixel_values.dtype)
            target = pixel_values.to(reconstructed_pixel_values.dtype)
            reconstruction_loss = F.l1_loss(target, reconstructed_pixel_values, reduction="none")
            masked_im_loss = (reconstruction_loss * mask).sum() / (mask.sum() + 1e-5) / self.config.num_channels

        output = MaskedImageModelingOutput(loss=masked_im_loss, reconstruction=reconstructed_pixel_values,
                                           hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return traceable(output, return_dict)


class ViTForImageClassification(ViTPreTrainedModel):
    """ViT with a linear classifier on the final-layernormed CLS token (identity when num_labels == 0).

    With ``labels`` the loss follows ``config.problem_type`` (inferred as transformers does when
    unset): MSE for regression, cross-entropy, or BCE-with-logits for multi-label.
    """

    task: Task = "classification"

    def __init__(
        self,
        config: ViTConfig,
        *,
        attn_implementation: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        target_dtype = self._setup(config, attn_implementation, torch_dtype, dtype)
        self.num_labels = config.num_labels
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.classifier: nn.Module = (
            Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self._finish(target_dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple[torch.Tensor, ...]:
        """Image classification: pixel values -> logits (and the loss with labels).

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

        Returns:
            ImageClassifierOutput (TFImageClassifierOutput in vit_tf), or a tuple when return_dict is False:
            loss (scalar) or None, logits (batch, num_labels) from the final layernormed CLS token,
            hidden_states or None, attentions or None.
        """
        return_dict = flag(return_dict, self.config, "return_dict", True)
        with inner_call():
            outputs = self.vit(pixel_values, None, head_mask, output_attentions, output_hidden_states,
                               interpolate_pos_encoding, return_dict=True)
        logits = self.classifier(outputs.last_hidden_state[:, 0])  # (batch, num_labels)
        loss = classification_loss(logits, labels, self.config) if labels is not None else None
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                       attentions=outputs.attentions)
        return traceable(output, return_dict)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: ViTConfig) -> torch.Tensor:
    """transformers' image-classification loss for ``config.problem_type`` (inferred when unset).

    Single-label cross-entropy skips labels equal to -100 (``ignore_index``), averaging over the
    others (NaN when every label is skipped or the batch is empty, as F.cross_entropy gives). Any
    other label outside [0, num_labels) is a ValueError naming it. Under torch.compile the labels'
    values are not known while tracing: there an out-of-range label makes the loss NaN instead
    (never a finite wrong loss), without a graph break.
    """
    labels = labels.to(logits.device)
    is_integer = not labels.is_floating_point() and labels.dtype != torch.bool and not labels.is_complex()
    problem = validation.problem_type(config, is_integer)
    num_labels = config.num_labels
    if problem == "regression":
        labels = labels.to(logits.dtype)
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if problem == "single_label_classification":
        flat_labels = labels.reshape(-1).long()
        if not torch.compiler.is_compiling():
            validation.check_class_labels(flat_labels.detach().cpu().numpy(), num_labels)
            return F.cross_entropy(logits.view(-1, num_labels), flat_labels)
        ignored = flat_labels == validation.IGNORE_INDEX
        out_of_range = ~ignored & ((flat_labels < 0) | (flat_labels >= num_labels))
        loss = F.cross_entropy(logits.view(-1, num_labels), flat_labels.masked_fill(out_of_range, validation.IGNORE_INDEX))
        return torch.where(out_of_range.any(), torch.full_like(loss, float("nan")), loss)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


# ------------------------------------------------------------------------------ small helpers
def resolve_dtype(
    torch_dtype: torch.dtype | str | None, dtype: torch.dtype | str | None, allow_auto: bool = False
) -> torch.dtype | str:
    """``dtype=`` (transformers >= 4.56 spelling) or ``torch_dtype=``: float32 (default), bfloat16 or float16.

    Strings are read by vit_core.options.dtype_name ("bfloat16", "bf16", "torch.float16").
    "auto" is returned as is when ``allow_auto`` (from_pretrained then takes the checkpoint
    config's dtype); on construction it means float32.
    """
    if torch_dtype is not None and dtype is not None and _as_dtype(torch_dtype) != _as_dtype(dtype):
        raise ValueError(f"torch_dtype={torch_dtype!r} and dtype={dtype!r} disagree; pass only one")
    chosen = _as_dtype(dtype if dtype is not None else torch_dtype if torch_dtype is not None else torch.float32)
    if chosen == "auto" and not allow_auto:
        return torch.float32
    return chosen


def _as_dtype(value: torch.dtype | str) -> torch.dtype | str:
    if value == "auto":
        return "auto"
    if isinstance(value, str):
        return getattr(torch, dtype_name(value))
    if not isinstance(value, torch.dtype) or value not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {value!r}; use torch.float32, torch.bfloat16 or torch.float16")
    return value

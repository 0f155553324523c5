"""What each training-benchmark entry runs: one optimizer step (forward + backward + AdamW).

An entry's builder gets the model's fixture directory, the dtype name ("float32", or "bfloat16":
each framework's mixed precision, float32 weights and optimizer state), the input batch and labels
(numpy) and whether to turn on gradient checkpointing; it returns a zero-argument ``step`` that
runs one optimizer step and returns the batch loss as a Python float (so a step is finished when it
returns). Every entry uses AdamW (lr 1e-5, weight decay 0.05, no decay for biases and LayerNorm
where the library has a way to say so) and the loss of integer labels over the checkpoint's 1000
classes; dropout is 0 (the checkpoint's config), so the first step's loss is the float64
reference's loss of the batch, which the worker checks.

The vitx entries are what ``vitx finetune`` runs (``<framework>.training.TrainStep``) and, for
Keras, what a transformers-TF user runs (``compile`` + ``fit``; ``train_on_batch`` is one step of
``fit``'s compiled train function). The peers are each ecosystem's documented way to train:
transformers 4.57.6 PyTorch in a plain loop, timm in a plain loop, transformers 4.57.6 TF with
Keras ``fit`` (tf-keras), transformers 4.57.6 Flax with optax under ``jax.jit``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .common import TIMM_NAMES, timm_kwargs

Step = Callable[[], float]
Builder = Callable[[pathlib.Path, str, str, np.ndarray, np.ndarray, bool], Step]

LR = 1e-5
WEIGHT_DECAY = 0.05


@dataclass(frozen=True)
class TrainEntry:
    """A training-benchmark entry: its framework, venv, whether it is vitx, and whether the library
    offers gradient checkpointing (the peak-RSS comparison runs only those)."""

    name: str
    framework: str   # torch | tf | flax
    venv: str        # main | peers
    vitx: bool
    builder: Builder
    description: str
    checkpointing: bool


def _no_checkpointing(name: str) -> None:
    raise NotImplementedError(f"{name} has no gradient checkpointing")


# ----------------------------------------------------------------------------------------- torch
def _torch_loop(module, loss_of, pixels: np.ndarray, labels: np.ndarray, dtype: str, compiled: bool) -> Step:
    """A plain PyTorch loop step: AdamW with biases / norms undecayed, autocast for bfloat16."""
    import torch

    decay = [p for n, p in module.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in module.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    module.train()
    forward = torch.compile(module) if compiled else module
    x, y = torch.from_numpy(pixels), torch.from_numpy(labels.astype(np.int64))

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = loss_of(forward, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _vitx_torch(compiled: bool) -> Builder:
    def build(directory, model, dtype, pixels, labels, checkpointing) -> Step:
        from vit_core.training import AdamW
        from vit_torch import ViTForImageClassification
        from vit_torch.training import TrainStep

        module = ViTForImageClassification.from_pretrained(directory)
        if checkpointing:
            module.gradient_checkpointing_enable()
        if compiled:
            return _torch_loop(module, lambda m, x, y: m(pixel_values=x, labels=y).loss, pixels, labels, dtype, True)
        trainer = TrainStep(module, AdamW(lr=LR, weight_decay=WEIGHT_DECAY), dtype=dtype)
        return lambda: trainer.step(pixels, labels, LR, 0)

    return build


def _hf4_torch(compiled: bool) -> Builder:
    def build(directory, model, dtype, pixels, labels, checkpointing) -> Step:
        from transformers import ViTForImageClassification

        module = ViTForImageClassification.from_pretrained(directory, attn_implementation="sdpa")
        if checkpointing:
            module.gradient_checkpointing_enable()
        return _torch_loop(module, lambda m, x, y: m(pixel_values=x, labels=y).loss, pixels, labels, dtype, compiled)

    return build


def _timm(compiled: bool) -> Builder:
    def build(directory, model, dtype, pixels, labels, checkpointing) -> Step:
        import timm
        import torch.nn.functional as F

        module = timm.create_model(TIMM_NAMES[model], pretrained=True, num_classes=1000,
                                   pretrained_cfg_overlay=dict(file=str(directory / "timm.safetensors")),
                                   **timm_kwargs(model))
        if checkpointing:
            module.set_grad_checkpointing(True)
        return _torch_loop(module, lambda m, x, y: F.cross_entropy(m(x).float(), y), pixels, labels, dtype, compiled)

    return build


# -------------------------------------------------------------------------------------------- tf
def _vitx_tf_step(directory, model, dtype, pixels, labels, checkpointing) -> Step:
    from vit_core.training import AdamW
    from vit_tf import TFViTForImageClassification
    from vit_tf.training import TrainStep

    module = TFViTForImageClassification.from_pretrained(
        directory, dtype="mixed_bfloat16" if dtype == "bfloat16" else "float32")
    if checkpointing:
        module.gradient_checkpointing_enable()
    trainer = TrainStep(module, AdamW(lr=LR, weight_decay=WEIGHT_DECAY), dtype=dtype)
    return lambda: trainer.step(pixels, labels, LR, 0)


def _vitx_tf_fit(jit_compile: bool | str) -> Builder:
    def build(directory, model, dtype, pixels, labels, checkpointing) -> Step:
        import keras
        import tensorflow as tf

        from vit_tf import TFViTForImageClassification
        from vit_tf.training import AdamW

        module = TFViTForImageClassification.from_pretrained(
            directory, dtype="mixed_bfloat16" if dtype == "bfloat16" else "float32")
        if checkpointing:
            module.gradient_checkpointing_enable()
        optimizer = AdamW(learning_rate=LR, weight_decay=WEIGHT_DECAY)
        optimizer.exclude_from_weight_decay(var_names=["bias", "layernorm", "cls_token", "position_embeddings"])
        module.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       jit_compile=jit_compile)
        x, y = tf.constant(pixels), tf.constant(labels.astype(np.int64))
        return lambda: float(np.asarray(module.train_on_batch(x, y)).reshape(-1)[0])

    return build


def _hf4_tf_fit(jit_compile: bool) -> Builder:
    def build(directory, model, dtype, pixels, labels, checkpointing) -> Step:
        if checkpointing:
            _no_checkpointing("transformers 4.57 TF")
        import tensorflow as tf
        import tf_keras

        if dtype == "bfloat16":  # transformers' TF bf16 is Keras mixed precision, set before building
            tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
        from transformers import TFViTForImageClassification

        module = TFViTForImageClassification.from_pretrained(directory, from_pt=True)
        optimizer = tf_keras.optimizers.AdamW(learning_rate=LR, weight_decay=WEIGHT_DECAY)
        optimizer.exclude_from_weight_decay(var_names=["bias", "LayerNorm", "layernorm", "cls_token",
                                                       "position_embeddings"])
        module.compile(optimizer=optimizer, loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       jit_compile=jit_compile)
        x, y = tf.constant(pixels), tf.constant(labels.astype(np.int64))
        return lambda: float(np.asarray(module.train_on_batch(x, y)).reshape(-1)[0])

    return build


# ------------------------------------------------------------------------------------------ flax
def _vitx_flax_step(directory, model, dtype, pixels, labels, checkpointing) -> Step:
    import jax.numpy as jnp

    from vit_core.training import AdamW
    from vit_flax import FlaxViTForImageClassification
    from vit_flax.training import TrainStep

    module = FlaxViTForImageClassification.from_pretrained(
        directory, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32, param_dtype=jnp.float32)
    if checkpointing:
        module.gradient_checkpointing_enable()
    trainer = TrainStep(module, AdamW(lr=LR, weight_decay=WEIGHT_DECAY), dtype=dtype)
    return lambda: trainer.step(pixels, labels, LR, 0)


def _hf4_flax_optax(directory, model, dtype, pixels, labels, checkpointing) -> Step:
    if checkpointing:
        _no_checkpointing("transformers 4.57 FlaxViTForImageClassification")
    import jax
    import jax.numpy as jnp
    import optax
    from transformers import FlaxViTForImageClassification

    # dtype: the computation dtype; params stay float32 (transformers' Flax mixed precision)
    module = FlaxViTForImageClassification.from_pretrained(
        directory, from_pt=True, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    params = module.params
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY, mask=lambda p: jax.tree_util.tree_map(lambda a: a.ndim > 1, p))
    opt_state = tx.init(params)

    def train_step(params, opt_state, x, y, rng):
        def loss_fn(p):
            logits = module(x, params=p, train=True, dropout_rng=rng).logits.astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(train_step, donate_argnums=(0, 1))
    x, y, rng = jnp.asarray(pixels), jnp.asarray(labels.astype(np.int32)), jax.random.key(0)
    state = {"params": params, "opt_state": opt_state}

    def step() -> float:
        state["params"], state["opt_state"], loss = jitted(state["params"], state["opt_state"], x, y, rng)
        return float(loss)

    return step


TRAIN_ENTRIES: dict[str, TrainEntry] = {e.name: e for e in [
    TrainEntry("vitx-torch-train", "torch", "main", True, _vitx_torch(False),
               "vit_torch TrainStep (vitx finetune's step): torch.optim.AdamW, autocast bf16", True),
    TrainEntry("vitx-torch-train-compile", "torch", "main", True, _vitx_torch(True),
               "vit_torch in a plain loop under torch.compile", True),
    TrainEntry("vitx-tf-train", "tf", "main", True, _vitx_tf_step,
               "vit_tf TrainStep (vitx finetune's step): one tf.function, mixed_bfloat16", True),
    TrainEntry("vitx-tf-fit", "tf", "main", True, _vitx_tf_fit("auto"),
               "vit_tf compile + fit step (Keras 3, jit_compile='auto')", True),
    TrainEntry("vitx-tf-fit-function", "tf", "main", True, _vitx_tf_fit(False),
               "vit_tf compile(jit_compile=False) + fit step", True),
    TrainEntry("vitx-flax-train", "flax", "main", True, _vitx_flax_step,
               "vit_flax TrainStep (vitx finetune's step): jitted optax.adamw", True),
    TrainEntry("hf4-torch-train", "torch", "main", False, _hf4_torch(False),
               "transformers 4.57 ViTForImageClassification (sdpa), plain loop", True),
    TrainEntry("hf4-torch-train-compile", "torch", "main", False, _hf4_torch(True),
               "transformers 4.57, plain loop under torch.compile", True),
    TrainEntry("timm-torch-train", "torch", "peers", False, _timm(False),
               "timm vit_*_patch16_224 (fused attention), plain loop", True),
    TrainEntry("timm-torch-train-compile", "torch", "peers", False, _timm(True),
               "timm, plain loop under torch.compile", True),
    TrainEntry("hf4-tf-fit", "tf", "main", False, _hf4_tf_fit(False),
               "transformers 4.57 TFViTForImageClassification, tf-keras compile + fit step", False),
    TrainEntry("hf4-tf-fit-xla", "tf", "main", False, _hf4_tf_fit(True),
               "transformers 4.57 TF, compile(jit_compile=True) + fit step", False),
    TrainEntry("hf4-flax-optax", "flax", "main", False, _hf4_flax_optax,
               "transformers 4.57 FlaxViTForImageClassification + optax.adamw under jax.jit", False),
]}

"""One optimizer step of a vit_torch classifier: vit_core's AdamW rule on ``torch.optim.AdamW``.

Mirrored by vit_tf/training.py and vit_flax/training.py: the same class, the same methods, the
same optimizer-state names (``exp_avg.<canonical name>``, ``exp_avg_sq.<canonical name>`` in the
canonical layout, ``step``), so a recipe (``vitx finetune``) drives every framework alike.
torch.optim.AdamW already places epsilon after the bias correction and decays before the update,
which is vit_core.training's rule; biases and LayerNorm scales go in a group without decay.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from vit_core.config import ViTConfig
from vit_core.training import AdamW, decays

from .modeling import ViTForImageClassification
from .weights import LAYOUTS, _to_numpy, _to_tensor, canonical_state, load_canonical_state

__all__ = ["SaveConfigCallback", "TrainStep", "model_for_training"]

_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


class TrainStep:
    """AdamW steps of ``model`` (a ViTForImageClassification) on numpy batches.

    ``dtype="bfloat16"`` runs forward and backward under ``torch.autocast`` (weights and optimizer
    state stay float32). The loss is the model's own (``labels=``).
    """

    def __init__(self, model: torch.nn.Module, adamw: AdamW, *, dtype: str = "float32") -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.model = model
        self.autocast = _DTYPES[dtype]
        self._specs = model.canonical_table()
        params = dict(model.named_parameters())
        self._params = [(spec, params[spec.name]) for spec in self._specs]
        groups = [
            {"params": [p for spec, p in self._params if decays(spec)], "weight_decay": adamw.weight_decay},
            {"params": [p for spec, p in self._params if not decays(spec)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=adamw.lr, betas=(adamw.beta1, adamw.beta2), eps=adamw.eps)

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if self.autocast is None:
            yield
        else:
            with torch.autocast("cpu", dtype=self.autocast):
                yield

    def step(self, pixel_values: np.ndarray, labels: np.ndarray, lr: float, seed: int) -> float:
        """One optimizer step on a batch at learning rate ``lr``; dropout drawn from ``seed``. The batch loss."""
        if not self.model.training:
            self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(seed)
        x = torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32))
        y = torch.from_numpy(np.asarray(labels, np.int64))
        with self._precision():
            loss = self.model(pixel_values=x, labels=y).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def logits(self, pixel_values: np.ndarray) -> np.ndarray:
        """Inference-mode logits (float32 numpy) of a batch."""
        if self.model.training:
            self.model.eval()
        with torch.no_grad(), self._precision():
            logits = self.model(pixel_values=torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32))).logits
        return logits.float().numpy()

    # -------------------------------------------------------------------------- state
    def weights(self) -> dict[str, np.ndarray]:
        """The model's weights, canonical names and layout."""
        return canonical_state(self.model)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW's moments (canonical names and layout) and its step count; empty before the first step."""
        state = self.optimizer.state
        if not all(p in state for _, p in self._params):
            return {}
        out: dict[str, np.ndarray] = {"step": np.asarray(int(state[self._params[0][1]]["step"]), np.int64)}
        for moment in ("exp_avg", "exp_avg_sq"):
            for spec, p in self._params:
                _, from_torch = LAYOUTS[spec.kind]
                out[f"{moment}.{spec.name}"] = from_torch(_to_numpy(state[p][moment])).astype(np.float32)
        return out

    def load_optimizer_state(self, values: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`optimizer_state` returned."""
        step = float(np.asarray(values["step"]))
        for spec, p in self._params:
            to_torch, _ = LAYOUTS[spec.kind]
            self.optimizer.state[p] = {
                "step": torch.tensor(step, dtype=torch.float32),
                **{m: _to_tensor(to_torch(values[f"{m}.{spec.name}"])).to(p.dtype) for m in ("exp_avg", "exp_avg_sq")},
            }


def model_for_training(config: ViTConfig, state: Mapping[str, np.ndarray], *, dtype: str = "float32") -> torch.nn.Module:
    """A ViTForImageClassification holding the canonical ``state``, float32 (``dtype="bfloat16"``
    trains under autocast, see :class:`TrainStep`)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    model = ViTForImageClassification(config)
    load_canonical_state(model, state, source="fine-tuning state")
    return model


class SaveConfigCallback:
    """A transformers ``Trainer`` callback that writes the model's ``config.json`` beside what the
    Trainer saves, so its directories load with ``from_pretrained`` in vitx and in transformers.

    transformers' Trainer calls ``save_pretrained`` only on its own ``PreTrainedModel`` class; for any
    other model it writes ``model.safetensors`` alone. With ``Trainer(..., callbacks=[SaveConfigCallback()])``
    every ``checkpoint-N/`` gets config.json when it is saved, and ``args.output_dir`` gets it when
    training ends (where ``trainer.save_model()`` then writes the weights). For another directory,
    call ``trainer.model.save_pretrained(directory)``.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):  # every other Trainer event: nothing to do
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    @staticmethod
    def _write(model: Any, directory: str) -> None:
        model = getattr(model, "module", model)  # DistributedDataParallel / DataParallel
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained") and os.path.isdir(directory):
            config.save_pretrained(directory)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._write(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            self._write(model, args.output_dir)

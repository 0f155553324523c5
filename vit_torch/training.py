"""One optimizer step of a vit_torch classifier: vit_core's AdamW rule on ``torch.optim.AdamW``.

Mirrored by vit_tf/training.py and vit_flax/training.py: the same class, the same methods, the
same optimizer-state names (``exp_avg.<canonical name>``, ``exp_avg_sq.<canonical name>`` in the
canonical layout, ``step``), so a recipe (``vitx finetune``) drives every framework alike.
torch.optim.AdamW already places epsilon after the bias correction and decays before the update,
which is vit_core.training's rule; biases and LayerNorm scales go in a group without decay.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from vit_core.config import ViTConfig
from vit_core.training import AdamW, decays, nonempty, worker_seed

from .modeling import ViTForImageClassification
from .weights import LAYOUTS, _to_numpy, _to_tensor, canonical_state, load_canonical_state

__all__ = ["Parallel", "SaveConfigCallback", "TrainStep", "model_for_training", "parallel"]

_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


class Parallel:
    """This process's place among data-parallel workers (``torch.distributed``, set up by torchrun):
    the process group (gloo on CPU, nccl on GPU, ``timeout`` seconds per collective), whether
    parameters are sharded (``fsdp``: FSDP2 ``fully_shard``) or replicated (DistributedDataParallel).

    The same attributes in every framework's ``Parallel``: ``rank`` and ``processes`` (this process
    among all), ``parts`` (the model replicas a global batch is split into), ``first_part`` and
    ``local_parts`` (the parts this process feeds).
    """

    def __init__(self, *, fsdp: bool = False, timeout: float = 600.0) -> None:
        import torch.distributed as dist

        self.fsdp = fsdp
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
        self.rank, self.processes = dist.get_rank(), dist.get_world_size()
        self.parts, self.first_part, self.local_parts = self.processes, self.rank, 1

    def describe(self) -> str:
        import torch.distributed as dist

        kind = "FSDP2 fully_shard" if self.fsdp else "DistributedDataParallel"
        return f"torch {kind}, {dist.get_backend()} on {self.device.type}"

    def sum(self, values: Any) -> np.ndarray:
        """``values`` (a float64 array) summed over every process."""
        import torch.distributed as dist

        tensor = torch.as_tensor(np.asarray(values, np.float64)).to(self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def parallel(*, fsdp: bool = False, timeout: float = 600.0, **unused: Any) -> Parallel | None:
    """The :class:`Parallel` of a process started by torchrun (``WORLD_SIZE`` set), else None (one
    process). ``fsdp`` needs torchrun (any number of processes)."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return Parallel(fsdp=fsdp, timeout=timeout)
    if fsdp:
        raise ValueError("--fsdp: PyTorch shards over the processes torchrun starts: run under torchrun or pass --nproc N")
    return None


class TrainStep:
    """AdamW steps of ``model`` (a ViTForImageClassification) on numpy batches.

    ``dtype="bfloat16"`` runs forward and backward under ``torch.autocast`` (weights and optimizer
    state stay float32). The loss is the model's own (``labels=``).

    With ``parallel`` (a :class:`Parallel`) the model runs under DistributedDataParallel, or FSDP2
    (``fully_shard`` on every encoder layer and on the whole model) with ``parallel.fsdp``; each
    process passes its own rows of the global batch and the global batch's size as ``count``.
    """

    def __init__(self, model: torch.nn.Module, adamw: AdamW, *, dtype: str = "float32",
                 parallel: Parallel | None = None) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.model = model
        self.parallel = parallel
        self.autocast = _DTYPES[dtype]
        self._specs = model.canonical_table()
        self._module: torch.nn.Module = model
        if parallel is not None:
            model.to(parallel.device)
            if parallel.fsdp:
                from torch.distributed.fsdp import fully_shard

                with torch.no_grad():  # FSDP frees and re-allocates storage: none may be borrowed from numpy
                    for p in model.parameters():
                        p.data = p.data.clone()
                for layer in model.vit.encoder.layer:
                    fully_shard(layer)
                fully_shard(model)
            else:
                from torch.nn.parallel import DistributedDataParallel

                self._module = DistributedDataParallel(model, device_ids=[parallel.device.index]
                                                       if parallel.device.type == "cuda" else None)
        self.device = next(model.parameters()).device
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
            with torch.autocast(self.device.type, dtype=self.autocast):
                yield

    def step(self, pixel_values: np.ndarray, labels: np.ndarray, lr: float, seed: int, *,
             count: int | None = None) -> float:
        """One optimizer step on a batch at learning rate ``lr``; dropout drawn from ``seed``. The batch loss.

        Under ``parallel``: ``pixel_values``/``labels`` are this process's rows (perhaps none) of a global
        batch of ``count`` rows; the loss and the gradients are those of the global batch's mean loss."""
        if not self.model.training:
            self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        pixel_values, labels, rows = nonempty(pixel_values, labels)
        count = rows if count is None else count
        if count < 1:
            raise ValueError("an optimizer step needs at least one image in its (global) batch")
        world = 1 if self.parallel is None else self.parallel.processes
        torch.manual_seed(seed if self.parallel is None else worker_seed(seed, self.parallel.rank))
        x = torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32)).to(self.device)
        y = torch.from_numpy(np.asarray(labels, np.int64)).to(self.device)
        with self._precision():
            loss = self._module(pixel_values=x, labels=y).loss
        share = rows / count  # this process's part of the global mean
        # DDP and FSDP average the gradients over the processes: scale so that they sum the shares
        (loss * (share * world) if share * world != 1 else loss).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.parallel is None:
            return float(loss.detach())
        return float(self.parallel.sum([float(loss.detach()) * share])[0])

    def logits(self, pixel_values: np.ndarray, *, count: int | None = None) -> np.ndarray:
        """Inference-mode logits (float32 numpy) of a batch (under ``parallel``: this process's rows, perhaps
        none, of a global batch of ``count`` rows; under FSDP every process must call it)."""
        if self.model.training:
            self.model.eval()
        pixel_values, _, rows = nonempty(pixel_values, np.zeros(len(pixel_values), np.int64))
        with torch.no_grad(), self._precision():
            x = torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32)).to(self.device)
            logits = self.model(pixel_values=x).logits
        return logits.float().cpu().numpy()[:rows]

    # -------------------------------------------------------------------------- state
    def _full(self, tensor: torch.Tensor) -> torch.Tensor:
        # an FSDP2 shard (DTensor) gathered whole, as a new tensor (numpy must never hold FSDP's own
        # storage: it would no longer be resizable, and FSDP frees it); every process must call it
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.clone()

    def weights(self) -> dict[str, np.ndarray]:
        """The model's weights, canonical names and layout (under FSDP every process must call it)."""
        if self.parallel is not None and self.parallel.fsdp:
            self.model.reshard()  # the root stays unsharded after an inference forward: shard it again
            return canonical_state(self.model, {name: self._full(p.detach()) for name, p in self.model.named_parameters()})
        return canonical_state(self.model)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW's moments (canonical names and layout) and its step count; empty before the first step."""
        state = self.optimizer.state
        if not all(p in state for _, p in self._params):
            return {}
        if self.parallel is not None and self.parallel.fsdp:
            self.model.reshard()
        out: dict[str, np.ndarray] = {"step": np.asarray(int(state[self._params[0][1]]["step"]), np.int64)}
        for moment in ("exp_avg", "exp_avg_sq"):
            for spec, p in self._params:
                _, from_torch = LAYOUTS[spec.kind]
                out[f"{moment}.{spec.name}"] = from_torch(_to_numpy(self._full(state[p][moment]))).astype(np.float32)
        return out

    def load_optimizer_state(self, values: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`optimizer_state` returned."""
        step = float(np.asarray(values["step"]))
        for spec, p in self._params:
            to_torch, _ = LAYOUTS[spec.kind]
            moments = {m: _to_tensor(to_torch(values[f"{m}.{spec.name}"])).to(p.dtype) for m in ("exp_avg", "exp_avg_sq")}
            if hasattr(p, "device_mesh"):  # an FSDP2 parameter: this process's shard of each moment
                from torch.distributed.tensor import distribute_tensor

                moments = {m: distribute_tensor(v.to(p.device), p.device_mesh, p.placements) for m, v in moments.items()}
            else:
                moments = {m: v.to(p.device) for m, v in moments.items()}
            self.optimizer.state[p] = {"step": torch.tensor(step, dtype=torch.float32), **moments}


def model_for_training(config: ViTConfig, state: Mapping[str, np.ndarray], *, dtype: str = "float32",
                       parallel: Parallel | None = None) -> torch.nn.Module:
    """A ViTForImageClassification holding the canonical ``state``, float32 (``dtype="bfloat16"``
    trains under autocast, see :class:`TrainStep`; ``parallel``: wrapped by :class:`TrainStep`)."""
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

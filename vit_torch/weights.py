"""Canonical weights <-> PyTorch parameters, random init by the table, from/save_pretrained.

The canonical weight table (vit_core.weights) names every parameter with its transformers 4.x
PyTorch name and layout. In this framework the attribute path of each parameter IS that name and
the layouts ARE PyTorch's (Linear (out, in), Conv2d (out, in, kh, kw)), so the per-kind
conversion below is the identity for every kind; it is spelled out as a table so this file reads
like vit_tf/weights.py and vit_flax/weights.py, where "linear" and "conv" transpose.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from vit_core import pretrained as core_pretrained
from vit_core.checkpoint.fit import check_state_fits_table
from vit_core.config import ViTConfig
from vit_core.weights import KINDS, WeightSpec, weight_table

if TYPE_CHECKING:  # pragma: no cover
    from .modeling import ViTPreTrainedModel


def _same_layout(array: np.ndarray) -> np.ndarray:
    return array


# kind -> (canonical -> torch layout, torch -> canonical layout). Identity: torch is the canonical layout.
LAYOUTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    kind: (_same_layout, _same_layout) for kind in KINDS
}


# ------------------------------------------------------------------------------ numpy <-> torch
def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """A numpy array (float32/16/64, or ml_dtypes bfloat16) as a CPU tensor of the same dtype and bits."""
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":  # ml_dtypes: torch cannot read it directly; reinterpret the bits
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array with the same dtype and bits (bfloat16 through ml_dtypes when it is
    installed, else widened exactly to float32)."""
    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - ml_dtypes ships with jax / tensorflow, not with torch
            return tensor.to(torch.float32).numpy().copy()
        return tensor.contiguous().view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return tensor.numpy().copy()


# ------------------------------------------------------------------------------ init
@torch.no_grad()
def init_weights(
    model: nn.Module, table: list[WeightSpec], initializer_range: float, *, skip_prefix: str | None = None
) -> None:
    """Initialise every parameter as its table entry says (transformers' ViT ``_init_weights``).

    "trunc_normal": normal with std = initializer_range, cut at +-2 std; "zeros"; "ones". Runs in
    float32, before any cast. Seed with torch.manual_seed. Entries under ``skip_prefix`` (a
    backbone that initialised itself) are left alone. Raises if the model has a parameter the
    table does not know (or the reverse).
    """
    params = dict(model.named_parameters())
    _check_same_names(set(params), {spec.name for spec in table}, "model parameters", "weight table")
    for spec in table:
        if skip_prefix is not None and spec.name.startswith(skip_prefix):
            continue
        param = params[spec.name]
        if tuple(param.shape) != spec.shape:
            raise RuntimeError(f"{spec.name}: parameter shape {tuple(param.shape)} != table shape {spec.shape}")
        if spec.init == "zeros" or (spec.init == "trunc_normal" and initializer_range == 0):
            param.zero_()
        elif spec.init == "ones":
            param.fill_(1.0)
        elif spec.init == "trunc_normal":
            param.copy_(truncated_normal(spec.shape, float(initializer_range)))
        else:
            raise ValueError(f"{spec.name}: unknown init {spec.init!r}")


def truncated_normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Normal(0, std) cut at +-2 std, float32, drawn from torch's global generator.

    Exact rejection sampling: draw normals and redraw the 4.6% that fall outside. (torch's
    nn.init.trunc_normal_ goes through erfinv and takes ~20 s for ViT-B's 86M weights on 2 cores;
    this takes well under one.)
    """
    values = torch.randn(shape, dtype=torch.float32).mul_(std)
    flat = values.view(-1)
    redraw = torch.nonzero(flat.abs() > 2.0 * std).squeeze(1)
    while redraw.numel():
        fresh = torch.randn(redraw.numel(), dtype=torch.float32).mul_(std)
        flat[redraw] = fresh
        redraw = redraw[fresh.abs() > 2.0 * std]
    return values


def _check_same_names(have: set[str], want: set[str], have_name: str, want_name: str) -> None:
    if have != want:
        raise RuntimeError(f"{have_name} and {want_name} differ: only in {have_name}: {sorted(have - want)}; "
                           f"only in {want_name}: {sorted(want - have)}")


# ------------------------------------------------------------------------------ load / export
@torch.no_grad()
def load_canonical_state(
    model: ViTPreTrainedModel,
    state: Mapping[str, np.ndarray],
    *,
    allow_missing: Iterable[str] = (),
    source: str = "state dict",
) -> None:
    """Copy a canonical state (name -> numpy array, canonical layout) into ``model``, strictly.

    Every table entry must be present (except names in ``allow_missing``, which keep their current
    values), with the table's shape; no other key may appear. All missing, unexpected and mis-shaped
    keys are collected and raised together in one CheckpointError (a ValueError) naming each with
    its shapes. Values are cast to the parameter's dtype.
    """
    table = model.canonical_table()
    specs = {spec.name: spec for spec in table}
    check_state_fits_table(state, specs.values(), allow_missing=allow_missing, source=source,
                           model_name=type(model).__name__)
    params = dict(model.named_parameters())
    for name, spec in specs.items():
        if name not in state:
            continue
        to_torch, _ = LAYOUTS[spec.kind]
        param = params[name]
        param.copy_(_to_tensor(to_torch(state[name])).to(device=param.device, dtype=param.dtype))


def canonical_state(
    model: ViTPreTrainedModel, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, np.ndarray]:
    """The model's parameters (or ``state_dict``, with the same keys) as canonical numpy arrays, in
    table order, with their own dtype.

    ``canonical_state(load_canonical_state(m, s))`` returns ``s`` bit for bit (same dtype).
    """
    params = dict(model.named_parameters())
    if state_dict is not None:
        _check_same_names(set(state_dict), set(params), "state_dict", f"{type(model).__name__} parameters")
        params = {name: state_dict[name].detach() for name in params}
    state: dict[str, np.ndarray] = {}
    for spec in model.canonical_table():
        _, from_torch = LAYOUTS[spec.kind]
        state[spec.name] = from_torch(_to_numpy(params[spec.name]))
    return state


# ------------------------------------------------------------------------------ from / save pretrained
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _auto_dtype(config: ViTConfig, state: Mapping[str, np.ndarray]) -> torch.dtype:
    """dtype="auto": the checkpoint config's ``torch_dtype`` / ``dtype``, else its first float tensor's."""
    for key in ("dtype", "torch_dtype"):
        name = config.extra.get(key)
        if isinstance(name, str) and name.removeprefix("torch.") in _DTYPE_NAMES:
            return _DTYPE_NAMES[name.removeprefix("torch.")]
    for array in state.values():
        name = np.asarray(array).dtype.name
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    return torch.float32


def load_pretrained_model(
    cls: type[ViTPreTrainedModel],
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    model_kwargs: dict[str, bool],
    config: Any,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    local_files_only: bool,
    ignore_mismatched_sizes: bool,
    attn_implementation: str | None,
    dtype: torch.dtype | str,
    config_overrides: dict[str, Any],
    force_download: bool = False,
    use_safetensors: bool | None = None,
    device_map: Any = None,
) -> ViTPreTrainedModel:
    """``cls.from_pretrained``: read with vit_core.pretrained, build ``cls`` (random init for what the
    checkpoint lacks), copy the weights in, cast to ``dtype``, return it in eval mode.

    ``config_overrides`` are from_pretrained's other keywords: config fields, or options without
    effect here (``low_cpu_mem_usage``, ``trust_remote_code``); anything else is a TypeError.
    ``output_loading_info=True`` returns (model, transformers' loading-info dict).
    """
    check_device_map(device_map)
    config_overrides = dict(config_overrides)
    with_info = core_pretrained.pop_output_loading_info(config_overrides)
    task = cls.task

    def table_fn(cfg: ViTConfig) -> list[WeightSpec]:
        return weight_table(cfg, task, **model_kwargs)

    config, state, report = core_pretrained.load_pretrained(
        pretrained_model_name_or_path, task, table_fn, config=config, revision=revision, cache_dir=cache_dir,
        token=token, local_files_only=local_files_only, force_download=force_download,
        use_safetensors=use_safetensors, ignore_mismatched_sizes=ignore_mismatched_sizes,
        config_overrides=config_overrides, owner=f"{cls.__name__}.from_pretrained",
        no_effect=core_pretrained.TORCH_NO_EFFECT_OPTIONS,
    )
    target_dtype = _auto_dtype(config, state) if dtype == "auto" else dtype
    model = cls(config, attn_implementation=attn_implementation, **model_kwargs)  # float32, random init
    keep_init = list(report.missing) + [name for name, _, _ in report.mismatched]
    load_canonical_state(model, state, allow_missing=keep_init, source=str(pretrained_model_name_or_path))
    if target_dtype != torch.float32:
        model.to(target_dtype)
    model.eval()
    return (model, core_pretrained.loading_info(report)) if with_info else model


def check_device_map(device_map: Any) -> None:
    """Accept the device maps that mean "everything on the CPU": None, "cpu", torch.device("cpu"),
    {"": "cpu"}; anything else is a ValueError (vit_torch has no accelerate-style placement)."""
    def on_cpu(device: Any) -> bool:
        return device == "cpu" or (isinstance(device, torch.device) and device.type == "cpu")

    if device_map is None or on_cpu(device_map):
        return
    if isinstance(device_map, dict) and device_map and all(on_cpu(v) for v in device_map.values()):
        return
    raise ValueError(f"device_map={device_map!r} is not supported: vit_torch loads onto the CPU only (device_map "
                     "None, 'cpu' or torch.device('cpu')); move the model afterwards with model.to(device)")


def save_pretrained_model(
    model: ViTPreTrainedModel, save_directory: str | os.PathLike, *, max_shard_size: int | str | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None, safe_serialization: bool = True,
) -> pathlib.Path:
    """Write config.json (with ``architectures`` and ``torch_dtype``, as transformers writes them) and
    model.safetensors in canonical names (the values of ``state_dict`` when given), sharded above
    ``max_shard_size``; ``safe_serialization=False``: pytorch_model.bin instead."""
    config = ViTConfig.from_dict(model.config.to_dict())
    config.extra["architectures"] = [type(model).__name__]
    config.extra["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    return core_pretrained.save_pretrained(
        config, canonical_state(model, state_dict), save_directory, max_shard_size=max_shard_size,
        weights_format="safetensors" if safe_serialization else core_pretrained.LEGACY_WEIGHTS["torch"][1],
    )


# The hub upload is the same in every framework: vit_core.pretrained's.
push_saved = core_pretrained.push_saved
push_to_hub = core_pretrained.push_to_hub

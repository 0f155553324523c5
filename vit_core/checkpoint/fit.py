"""Fitting a canonical state to a model: the one strict check, and transformers' loading rules.

Every mismatch is collected and raised together in one CheckpointError; each list in it shows at
most :data:`SHOWN` keys and says how many there are, so a hostile config (ten million layers)
cannot turn the report into a memory bomb. :func:`check_config_fits` compares the config with the
checkpoint before any weight table is built from the config.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CheckpointError
from .lazy import Lazy

logger = logging.getLogger("vitx.checkpoint")

SHOWN = 20  # keys listed per kind of mismatch; the count is always given

_QKV_BIAS = re.compile(r"(^|\.)attention\.attention\.(query|key|value)\.bias$")
_LAYER_INDEX = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def _listing(title: str, lines: list[str]) -> list[str]:
    shown = [f"    {line}" for line in lines[:SHOWN]]
    if len(lines) > SHOWN:
        shown.append(f"    ... and {len(lines) - SHOWN} more")
    return [f"  {title.format(n=len(lines))}:"] + shown


def check_config_fits(state: Mapping[str, Any], config: Any, source: str) -> None:
    """The config's depth and width against the checkpoint's, before a table is built from the config.

    A config with more layers than the checkpoint holds is refused here (the table it would give,
    and the report of every missing key, grow with the config, not the file); a checkpoint with
    stray extra layers is left to the strict fit, which lists them.
    """
    layers = {int(m.group(1)) for k in state if (m := _LAYER_INDEX.search(k))}
    depth = max(layers) + 1 if layers else 0
    if layers and config.num_hidden_layers > depth:
        raise CheckpointError(f"{source}: the config says num_hidden_layers={config.num_hidden_layers}, "
                              f"the checkpoint has {depth} encoder layers")
    for key in ("embeddings.cls_token", "vit.embeddings.cls_token"):
        if key in state and np.shape(state[key])[-1:] != (config.hidden_size,):
            raise CheckpointError(f"{source}: the config says hidden_size={config.hidden_size}, the checkpoint's "
                                  f"{key} has shape {tuple(np.shape(state[key]))}")


def drop_unused_qkv_bias(state: Mapping[str, np.ndarray], qkv_bias: bool) -> dict[str, np.ndarray]:
    """Drop q/k/v biases when the config says ``qkv_bias=False``.

    transformers' TF ViT always creates them (docs/FORMATS.md section 3), so TF checkpoints of
    qkv_bias=False models carry biases the model does not have; they are dropped with a warning
    (which says how large they were: non-zero biases mean the outputs will differ from the TF model).
    """
    state = dict(state)
    if qkv_bias:
        return state
    dropped = [k for k in state if _QKV_BIAS.search(k)]
    if dropped:
        largest = max(_max_abs(state[k]) for k in dropped)
        logger.warning("config.qkv_bias is False: dropping %d query/key/value biases from the checkpoint "
                       "(max |value| %.3g): %s", len(dropped), largest, ", ".join(dropped))
        for key in dropped:
            del state[key]
    return state


def _max_abs(value: Any) -> float:
    array = np.asarray(value.materialize() if isinstance(value, Lazy) else value)
    return float(np.max(np.abs(array.astype(np.float64)))) if array.size else 0.0


@dataclass
class LoadReport:
    """What happened when a checkpoint was fitted to a model (all keys are the model's names).

    missing: model keys the checkpoint does not provide (the model keeps its initialisation).
    unexpected: checkpoint keys the model has no use for (dropped).
    mismatched: (key, shape in the file, shape in the model) for keys left out because of their shape.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)


def _matches(key: str, patterns: list[re.Pattern[str]]) -> bool:
    return any(p.search(key) for p in patterns)


def match_state_to_model(
    state: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    *,
    prefix: str = "vit",
    allowed_missing: Iterable[str] = (),
    allowed_unexpected_patterns: Iterable[str] = (),
    ignore_mismatched_sizes: bool = False,
    source: str = "",
) -> tuple[dict[str, np.ndarray], LoadReport]:
    """Fit a canonical checkpoint state onto a model's expected keys and shapes, as transformers does.

    - The model expects ``prefix.`` keys (a task model) and the checkpoint has none (a base
      model): every checkpoint key gets the prefix (the base model's pooler then becomes an
      unexpected ``vit.pooler.*``).
    - The checkpoint has ``prefix.`` keys and the model has none (a base model): the prefix is
      stripped and the checkpoint's head keys (everything outside the prefix) are dropped with a warning.

    ``allowed_missing`` and ``allowed_unexpected_patterns`` are regular expressions, searched in
    the key (an exact key name works too): missing keys matching ``allowed_missing`` are left to
    the model's initialisation, unexpected keys matching ``allowed_unexpected_patterns`` (another
    task's head, a pooler) are dropped; both are logged. Every other missing, unexpected or
    mis-shaped key is collected and raised together in one CheckpointError that lists each key
    with its shapes. With ``ignore_mismatched_sizes=True`` mis-shaped keys are left out of the
    returned state and reported in ``LoadReport.mismatched`` (the caller re-initialises them).

    Returns (state holding only model keys with the right shapes, report).
    """
    where = source or "checkpoint"
    dotted = prefix + "." if prefix else ""
    model_prefixed = bool(dotted) and any(k.startswith(dotted) for k in expected)
    ckpt_prefixed = bool(dotted) and any(k.startswith(dotted) for k in state)
    report = LoadReport()
    heads_dropped: list[str] = []
    renamed: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}  # model-side key -> key as in the checkpoint
    for key, value in state.items():
        new = key
        if model_prefixed and not ckpt_prefixed:
            new = dotted + key
        elif ckpt_prefixed and not model_prefixed:
            if not key.startswith(dotted):
                heads_dropped.append(key)
                continue
            new = key[len(dotted):]
        renamed[new], origin[new] = value, key

    missing_ok = [re.compile(p) for p in allowed_missing]
    unexpected_ok = [re.compile(p) for p in allowed_unexpected_patterns]
    out: dict[str, np.ndarray] = {}
    bad_missing: list[str] = []
    bad_unexpected: list[str] = []
    bad_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for key, shape in expected.items():
        shape = tuple(int(s) for s in shape)
        if key not in renamed:
            report.missing.append(key)
            if not _matches(key, missing_ok):
                bad_missing.append(key)
            continue
        value = renamed[key]
        if tuple(value.shape) != shape:
            report.mismatched.append((key, tuple(value.shape), shape))
            if not ignore_mismatched_sizes:
                bad_shape.append((key, tuple(value.shape), shape))
            continue
        out[key] = value
    for key in renamed:
        if key not in expected:
            report.unexpected.append(key)
            if not (_matches(key, unexpected_ok) or _matches(origin[key], unexpected_ok)):
                bad_unexpected.append(key)
    report.unexpected.extend(heads_dropped)

    if bad_missing or bad_unexpected or bad_shape:
        raise CheckpointError(_mismatch_report(
            f"{where}: the checkpoint does not fit the model:",
            [f"{k} {tuple(expected[k])}" for k in bad_missing], "missing from the checkpoint ({n}; model shape)",
            [f"{k} {tuple(renamed[k].shape)}" for k in bad_unexpected], "unexpected in the checkpoint ({n}; file shape)",
            [f"{k}: file {fs} vs model {ms}" for k, fs, ms in bad_shape],
            "wrong shape ({n}; pass ignore_mismatched_sizes=True to re-initialise them)"))

    if heads_dropped:
        logger.warning("%s: dropping head weights a base model does not use: %s", where, ", ".join(heads_dropped))
    if report.missing:
        logger.warning("%s: not in the checkpoint, newly initialised: %s", where, ", ".join(report.missing))
    dropped = [k for k in report.unexpected if k not in heads_dropped]
    if dropped:
        logger.warning("%s: checkpoint weights not used by this model: %s", where, ", ".join(dropped))
    if report.mismatched:
        logger.warning("%s: shapes differ, newly initialised: %s", where,
                       ", ".join(f"{k} (file {fs}, model {ms})" for k, fs, ms in report.mismatched))
    return out, report


def check_state_fits_table(
    state: Mapping[str, np.ndarray],
    table: Iterable[Any],
    *,
    allow_missing: Iterable[str] = (),
    source: str = "state dict",
    model_name: str = "the model",
) -> None:
    """Strict check before copying a canonical state into a framework model (each weights.py calls it).

    Every table entry (``WeightSpec``: name, shape) must be present, except names in
    ``allow_missing``, with the table's shape, and no other key may appear. All missing,
    unexpected and mis-shaped keys are raised together in one CheckpointError naming each with its
    shapes.
    """
    specs = {spec.name: tuple(spec.shape) for spec in table}
    allowed = set(allow_missing)
    missing = [name for name in specs if name not in state and name not in allowed]
    unexpected = [name for name in state if name not in specs]
    mismatched = [(name, tuple(np.shape(state[name])), specs[name])
                  for name in specs if name in state and tuple(np.shape(state[name])) != specs[name]]
    if not (missing or unexpected or mismatched):
        return
    raise CheckpointError(_mismatch_report(
        f"{source} does not fit {model_name}:",
        [f"{name} {specs[name]}" for name in missing], "missing ({n}; model shape)",
        [f"{name} {tuple(np.shape(state[name]))}" for name in unexpected], "unexpected ({n}; given shape)",
        [f"{name}: given {given} vs model {want}" for name, given, want in mismatched], "wrong shape ({n})"))


def _mismatch_report(head: str, missing: list[str], missing_title: str, unexpected: list[str],
                     unexpected_title: str, wrong: list[str], wrong_title: str) -> str:
    """The one assembly of a fit error: each non-empty list under its title, capped at SHOWN keys."""
    lines = [head]
    for entries, title in ((missing, missing_title), (unexpected, unexpected_title), (wrong, wrong_title)):
        if entries:
            lines += _listing(title, entries)
    return "\n".join(lines)

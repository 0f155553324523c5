"""The registry of checkpoint formats: what detection, ``convert`` and ``vitx info`` loop over.

Each entry names a format, the containers it comes in, how to recognise it from the keys of a
file (``detect`` returns the format's layout record, or None), how to read it into canonical
names, and the ``convert`` targets it writes. Detection tries the entries in order; the first
that recognises the file reads it.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vit_core.checkpoint.lazy import LazyState

from . import big_vision, jax_npz, timm
from . import transformers as hf
from .base import Loaded


@dataclass
class Source:
    """One weights file being identified: its container kind, its raw lazy state (the file's own
    key names; None for containers only transformers uses), and what lies beside it."""

    weights: pathlib.Path
    kind: str
    raw: LazyState | None
    flavour: str | None  # pt / tf / flax: the names ``raw`` is in, where transformers could have written it
    config_path: pathlib.Path | None
    timm_config: dict[str, Any] | None
    timm_model_name: str | None
    where: str = field(init=False)

    def __post_init__(self) -> None:
        self.where = str(self.weights)


@dataclass(frozen=True)
class Format:
    name: str
    containers: tuple[str, ...]
    detect: Callable[[Source], Any]
    read: Callable[[Source, Any], Loaded]
    targets: tuple[str, ...]


def _timm_read(source: Source, layout: Any) -> Loaded:
    assert source.raw is not None
    return timm.read(source.raw, layout, source.where, timm_model_name=source.timm_model_name,
                     timm_config=source.timm_config, heads_hint=timm.heads_hint(source.config_path))


FORMATS: tuple[Format, ...] = (
    Format(timm.NAME, ("safetensors", "torch", "torch_legacy"), lambda s: timm.detect(set(s.raw or ())), _timm_read,
           ("timm",)),
    Format(big_vision.NAME, ("npz",), lambda s: big_vision.detect(set(s.raw or ())),
           lambda s, layout: big_vision.read(s.raw, layout, s.where), ("big_vision",)),
    Format(jax_npz.NAME, ("npz",), lambda s: jax_npz.detect(set(s.raw or ())),
           lambda s, layout: jax_npz.read(s.raw, layout, s.where), ("jax",)),
    Format(hf.NAME, ("safetensors", "torch", "torch_legacy", "h5", "msgpack", "index"),
           lambda s: True if hf.detect(s.kind, s.raw, s.flavour) else None,
           lambda s, _: hf.read(s.weights, s.config_path, s.where, s.raw, s.flavour), tuple(hf.TARGETS)),
)

TARGETS: dict[str, Format] = {target: fmt for fmt in FORMATS for target in fmt.targets}


def identify(source: Source) -> Loaded | None:
    """The first registered format that recognises ``source``, read; None if none does."""
    for fmt in FORMATS:
        if source.kind not in fmt.containers:
            continue
        layout = fmt.detect(source)
        if layout is not None:
            return fmt.read(source, layout)
    return None

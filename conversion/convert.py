"""``convert(src, dst, to=...)``: any supported checkpoint -> any writable format, streamed and atomic."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vit_core.checkpoint import npz, safetensors, staging
from vit_core.checkpoint.errors import writing
from vit_core.checkpoint.lazy import LazyState

from .detect import open_checkpoint
from .formats import TARGETS as FORMAT_OF_TARGET
from .formats import big_vision, jax_npz, timm
from .formats import transformers as hf
from .formats.base import Loaded, task_of

Progress = Callable[[int], None]  # called with the number of bytes just written

logger = logging.getLogger("vitx.conversion")

TARGETS: tuple[str, ...] = tuple(FORMAT_OF_TARGET)

# A progress callback receives (bytes written so far, total bytes).
ProgressFn = Callable[[int, int], None]


@dataclass
class Conversion:
    """What ``convert`` did: the path written, the detected source format, the target, the bytes
    of tensor data written, the seconds it took, and notes on every decision (dropped heads, ...)."""

    path: pathlib.Path
    source_format: str
    target: str
    nbytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def _tqdm_progress(total: int, description: str) -> tuple[ProgressFn, Callable[[], None]]:
    """A tqdm bar that appears only when the work lasts more than two seconds."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, delay=2.0, leave=False)

    def update(done: int, total: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close


def _single_file_target(dst: pathlib.Path, suffixes: tuple[str, ...]) -> bool:
    return dst.suffix.lower() in suffixes


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str = "safetensors",
    *,
    force: bool = False,
    force_all: bool = False,
    timm_model_name: str | None = None,
    progress: bool | ProgressFn | None = None,
) -> Conversion:
    """Convert the checkpoint at ``src`` (any supported source, detected from its contents) to ``to``.

    Targets (``dst`` is a directory unless said otherwise):

    - ``"safetensors"``: a transformers directory, ``config.json`` + ``model.safetensors`` (canonical).
    - ``"pytorch"``: ``config.json`` + ``pytorch_model.bin`` (torch zip format).
    - ``"tf"``: ``config.json`` + ``tf_model.h5`` that transformers 4.57's TFViT classes load.
    - ``"flax"``: ``config.json`` + ``flax_model.msgpack`` that transformers 4.57's FlaxViT classes load.
    - ``"timm"``: a timm state dict; ``dst`` ending in ``.safetensors`` (or ``.pth``) is that file,
      otherwise a directory with ``model.safetensors`` + timm's ``config.json`` (load it with
      ``timm.create_model("local-dir:<dst>", pretrained=True)``).
    - ``"jax"`` / ``"big_vision"``: an npz; ``dst`` ending in ``.npz`` is that file, otherwise a
      directory with ``model.npz`` + ``config.json``.

    Tensors stream one at a time from a memory-mapped source. Everything is written to a temporary
    file or directory beside ``dst`` and renamed into place at the end: an interrupted or failed
    conversion leaves nothing behind, and the new version replaces an existing ``dst`` in one atomic
    swap. An existing ``dst`` raises FileExistsError unless ``force``; with ``force`` a directory
    holding anything but checkpoint files is still refused (the message lists them) unless
    ``force_all``. Two conversions racing for a new ``dst`` without ``force``: one wins, the other
    raises FileExistsError.
    ``progress``: True for a tqdm bar (shown after two seconds), a callable ``(done, total)``, or
    None/False. Returns a :class:`Conversion`; its notes are also logged as warnings.
    """
    if to not in TARGETS:
        raise ValueError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")
    dst = pathlib.Path(dst).expanduser()
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists (pass force=True / --force to overwrite)")
    start = time.perf_counter()
    loaded = open_checkpoint(src, timm_model_name=timm_model_name)
    notes = list(loaded.notes)
    state, write = _plan(loaded, to, dst, notes, force, force_all)
    total = int(sum(v.nbytes for v in state.values()))

    close: Callable[[], None] | None = None
    callback: ProgressFn | None = None
    if progress is True:
        callback, close = _tqdm_progress(total, f"{to} <- {loaded.format}")
    elif callable(progress):
        callback = progress
    done = [0]

    def advance(nbytes: int) -> None:
        done[0] += nbytes
        if callback is not None:
            callback(done[0], total)

    try:
        path = write(advance)
    finally:
        if close is not None:
            close()
    for note in notes:
        logger.warning("%s: %s", loaded.path or src, note)
    return Conversion(path, loaded.format, to, total, time.perf_counter() - start, notes)


def _plan(loaded: Loaded, to: str, dst: pathlib.Path, notes: list[str], force: bool, force_all: bool
          ) -> tuple[LazyState, Callable[[Progress], pathlib.Path]]:
    """(the state in the target's names, a function that writes it atomically and returns the path)."""
    config, canonical = loaded.config, loaded.state
    keys = set(canonical)

    def in_dir(filename: str, writer: Callable[[pathlib.Path, Progress], None], state: LazyState,
               config_writer: Callable[[pathlib.Path], None]) -> Callable[[Progress], pathlib.Path]:
        def run(progress: Progress) -> pathlib.Path:
            with staging.staged_dir(dst, force=force, replace_anything=force_all) as temp, writing(dst):
                writer(temp / filename, progress)
                config_writer(temp)
            return dst
        return run

    def transformers_config(directory: pathlib.Path) -> None:
        hf.save_config(config, directory, keys)

    if to in hf.TARGETS:
        if to in ("tf", "flax") and task_of(keys) == "mim":
            notes.append(f"transformers 4.57 has no {to.upper() if to == 'tf' else 'Flax'} masked-image-modeling "
                         f"class: the file loads in vitx's {'TF' if to == 'tf' else 'Flax'}ViTForMaskedImageModeling")
        filename = hf.TARGETS[to][0]
        return canonical, in_dir(filename, lambda p, pr: hf.write(p, canonical, to, pr), canonical, transformers_config)
    if to == "timm":
        raw = timm.write(canonical, config, notes)
        if _single_file_target(dst, (".safetensors",)):
            return raw, _single(dst, lambda p, pr: safetensors.write(p, raw, {"format": "pt"}, pr), force)
        if _single_file_target(dst, (".pth", ".pt", ".bin")):
            return raw, _single(dst, lambda p, pr: hf.write(p, raw, "pytorch", pr), force)

        def timm_config(directory: pathlib.Path) -> None:
            data = timm.hub_config(config, set(raw))
            (directory / "config.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

        return raw, in_dir("model.safetensors", lambda p, pr: safetensors.write(p, raw, {"format": "pt"}, pr),
                           raw, timm_config)
    module: Any = jax_npz if to == "jax" else big_vision
    raw = module.write(canonical, config, notes)
    if _single_file_target(dst, (".npz",)):
        return raw, _single(dst, lambda p, pr: npz.write(p, raw, pr), force)
    return raw, in_dir("model.npz", lambda p, pr: npz.write(p, raw, pr), raw, transformers_config)


def _single(dst: pathlib.Path, writer: Callable[[pathlib.Path, Progress], None], force: bool
            ) -> Callable[[Progress], pathlib.Path]:
    def run(progress: Progress) -> pathlib.Path:
        if dst.is_dir():
            raise FileExistsError(f"{dst} is a directory; give a file name or another path")
        with staging.staged_file(dst, force=force) as temp, writing(dst):
            writer(temp, progress)
        return dst
    return run

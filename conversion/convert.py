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

from . import io
from .detect import open_checkpoint
from .formats import big_vision, jax_npz, timm
from .formats import transformers as hf
from .formats.base import Loaded, task_of
from .rules import LazyState

logger = logging.getLogger("vitx.conversion")

TARGETS: tuple[str, ...] = ("safetensors", "pytorch", "tf", "flax", "timm", "jax", "big_vision")

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
    conversion leaves nothing behind. An existing ``dst`` raises FileExistsError unless ``force``.
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
    state, write = _plan(loaded, to, dst, notes)
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


def _plan(loaded: Loaded, to: str, dst: pathlib.Path, notes: list[str]
          ) -> tuple[LazyState, Callable[[io.Progress], pathlib.Path]]:
    """(the state in the target's names, a function that writes it atomically and returns the path)."""
    config, canonical = loaded.config, loaded.state
    keys = set(canonical)

    def in_dir(filename: str, writer: Callable[[pathlib.Path, io.Progress], None], state: LazyState,
               config_writer: Callable[[pathlib.Path], None]) -> Callable[[io.Progress], pathlib.Path]:
        def run(progress: io.Progress) -> pathlib.Path:
            with io.staged_dir(dst, force=True) as temp:
                writer(temp / filename, progress)
                config_writer(temp)
            return dst
        return run

    def transformers_config(directory: pathlib.Path) -> None:
        hf.save_config(config, directory, keys)

    if to == "safetensors":
        return canonical, in_dir("model.safetensors",
                                 lambda p, pr: io.write_safetensors(p, canonical, {"format": "pt"}, pr),
                                 canonical, transformers_config)
    if to == "pytorch":
        return canonical, in_dir("pytorch_model.bin", lambda p, pr: hf.write_pytorch_bin(p, canonical, pr),
                                 canonical, transformers_config)
    if to == "tf":
        if task_of(keys) == "mim":
            notes.append("transformers 4.57 has no TF masked-image-modeling class: the file follows its naming "
                         "(decoder_._0) and loads in vitx's TFViTForMaskedImageModeling")
        return canonical, in_dir("tf_model.h5", lambda p, pr: hf.write_tf_h5(p, canonical, config, pr),
                                 canonical, transformers_config)
    if to == "flax":
        if task_of(keys) == "mim":
            notes.append("transformers 4.57 has no Flax masked-image-modeling class: the file loads in vitx's "
                         "FlaxViTForMaskedImageModeling")
        return canonical, in_dir("flax_model.msgpack", lambda p, pr: hf.write_flax_msgpack(p, canonical, config, pr),
                                 canonical, transformers_config)
    if to == "timm":
        raw = timm.write(canonical, config, notes)
        if _single_file_target(dst, (".safetensors",)):
            return raw, _single(dst, lambda p, pr: io.write_safetensors(p, raw, {"format": "pt"}, pr))
        if _single_file_target(dst, (".pth", ".pt", ".bin")):
            return raw, _single(dst, lambda p, pr: hf.write_pytorch_bin(p, raw, pr))

        def timm_config(directory: pathlib.Path) -> None:
            data = timm.hub_config(config, set(raw))
            (directory / "config.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

        return raw, in_dir("model.safetensors", lambda p, pr: io.write_safetensors(p, raw, {"format": "pt"}, pr),
                           raw, timm_config)
    module: Any = jax_npz if to == "jax" else big_vision
    raw = module.write(canonical, config, notes)
    if _single_file_target(dst, (".npz",)):
        return raw, _single(dst, lambda p, pr: io.write_npz(p, raw, pr))
    return raw, in_dir("model.npz", lambda p, pr: io.write_npz(p, raw, pr), raw, transformers_config)


def _single(dst: pathlib.Path, writer: Callable[[pathlib.Path, io.Progress], None]) -> Callable[[io.Progress], pathlib.Path]:
    def run(progress: io.Progress) -> pathlib.Path:
        if dst.is_dir():
            raise FileExistsError(f"{dst} is a directory; give a file name or another path")
        with io.staged_file(dst, force=True) as temp:
            writer(temp, progress)
        return dst
    return run

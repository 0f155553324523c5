"""Labelled images for fine-tuning, framework-neutral: a folder of class folders or a ``datasets``
dataset saved with ``save_to_disk``, checked once, split by seed, and served as numpy batches.

Everything random is a pure function of (seed, epoch, example): the shuffle order of an epoch, each
example's random-resized crop and flip. A resumed run, another framework or another number of
loader threads therefore sees exactly the same batches.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from vit_core.image_processing import ViTImageProcessor
from vit_core.image_transforms import resize_with_pillow
from vit_core.training import part_bounds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# decoded images kept in memory after the check pass, at most this many bytes (the rest are read again)
CACHE_BYTES = 1 << 30
# random-resized-crop as torchvision / timm draw it
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


class DataError(ValueError):
    """The training data cannot be used; the message names the path and the problem."""


@dataclass
class Example:
    """One labelled image: ``source`` is a file path or a row index of a datasets split."""

    source: str | int
    label: int
    split: str = "train"

    def describe(self, root: str) -> str:
        return str(self.source) if isinstance(self.source, str) else f"{root} [{self.split}] row {self.source}"


@dataclass
class ImageData:
    """A labelled image collection: class names (label i = ``classes[i]``) and its examples."""

    root: str
    kind: str  # "folder" or "datasets"
    classes: list[str]
    examples: list[Example]
    validation: list[Example] | None = None  # a datasets dataset's own validation split
    _splits: dict[str, Any] = field(default_factory=dict, repr=False)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (what, why) of unreadable images
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def decode(self, example: Example) -> np.ndarray:
        """The example's pixels, (H, W, 3) uint8 RGB."""
        if isinstance(example.source, str):
            with Image.open(example.source) as image:
                return np.asarray(image.convert("RGB"))
        value = self._splits[example.split][int(example.source)]["image"]
        if not isinstance(value, Image.Image):
            value = Image.fromarray(np.asarray(value))
        return np.asarray(value.convert("RGB"))

    def check(self, progress: Callable[[int], None] | None = None, cache_bytes: int = CACHE_BYTES) -> None:
        """Decode every image once: unreadable ones are dropped (listed in ``skipped``); images are
        kept decoded while they fit in ``cache_bytes``. A class left with no images is an error."""
        kept_bytes = 0
        for group in (self.examples, self.validation or []):
            good = []
            for example in group:
                try:
                    pixels = self.decode(example)
                    if pixels.ndim != 3 or 0 in pixels.shape:
                        raise ValueError(f"empty image of shape {pixels.shape}")
                except Exception as e:  # any decoder failure: a broken file must not stop training
                    self.skipped.append((example.describe(self.root), f"{type(e).__name__}: {e}"))
                else:
                    good.append(example)
                    if kept_bytes + pixels.nbytes <= cache_bytes:
                        self._cache[id(example)] = pixels
                        kept_bytes += pixels.nbytes
                if progress:
                    progress(1)
            group[:] = good
        present = {example.label for example in self.examples}
        empty = [self.classes[i] for i in range(len(self.classes)) if i not in present]
        if empty:
            raise DataError(f"{self.root}: no readable training image of class {', '.join(map(repr, empty))} "
                            f"({len(self.skipped)} unreadable files skipped)")

    def pixels(self, example: Example) -> np.ndarray:
        cached = self._cache.get(id(example))
        return cached if cached is not None else self.decode(example)


# ------------------------------------------------------------------------------ opening
def open_data(path: str | os.PathLike) -> ImageData:
    """A folder with one sub-folder per class (labels = sorted folder names; images anywhere below
    each, by extension) or a ``datasets`` dataset saved with ``save_to_disk`` (columns ``image`` and
    ``label``; a DatasetDict's ``train`` split, and its ``validation`` split when it has one)."""
    root = pathlib.Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: training data not found (expected a folder of class folders or a dataset "
                        "saved with datasets' save_to_disk)")
    if not root.is_dir():
        raise DataError(f"{root}: training data must be a folder (one sub-folder per class) or a saved "
                        "datasets dataset, not a file")
    if any((root / name).is_file() for name in DATASET_FILES):
        return _open_datasets(root)
    return _open_folder(root)


def _visible(entry: os.DirEntry | pathlib.Path) -> bool:
    return not entry.name.startswith(".")


def _open_folder(root: pathlib.Path) -> ImageData:
    classes = sorted(child.name for child in root.iterdir() if child.is_dir() and _visible(child))
    if not classes:
        raise DataError(f"{root}: no class folders (expected one sub-folder per class, each holding its images)")
    if len(classes) < 2:
        raise DataError(f"{root}: only one class folder ({classes[0]!r}); classification needs at least two")
    examples: list[Example] = []
    for label, name in enumerate(classes):
        files = []
        for directory, subdirs, names in os.walk(root / name):  # symlinked folders are not followed
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            files += [os.path.join(directory, n) for n in sorted(names)
                      if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise DataError(f"{root / name}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        examples += [Example(f, label) for f in files]
    return ImageData(str(root), "folder", classes, examples)


def _open_datasets(root: pathlib.Path) -> ImageData:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{root} is a saved datasets dataset: reading it needs the datasets package "
                          "(pip install 'vitx[train]')") from e
    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as e:  # datasets raises many types for a broken folder
        raise DataError(f"{root}: cannot read the saved dataset ({type(e).__name__}: {e})") from None
    splits: dict[str, Any]
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{root}: the dataset has no 'train' split (splits: {', '.join(loaded)})")
        splits = {"train": loaded["train"]}
        for name in ("validation", "valid", "val"):
            if name in loaded:
                splits["validation"] = loaded[name]
                break
    else:
        splits = {"train": loaded}
    for name, split in splits.items():
        missing = [c for c in ("image", "label") if c not in split.column_names]
        if missing:
            raise DataError(f"{root} [{name}]: no {' and no '.join(map(repr, missing))} column "
                            f"(columns: {', '.join(split.column_names)})")
    feature = splits["train"].features["label"]
    labels = {name: [int(v) for v in split["label"]] for name, split in splits.items()}
    if hasattr(feature, "names"):
        classes = list(feature.names)
    else:
        classes = [str(v) for v in sorted(set(labels["train"]))]
    index = {int(c) if not hasattr(feature, "names") else i: i for i, c in enumerate(classes)}
    if len(classes) < 2:
        raise DataError(f"{root}: only one class ({classes[0] if classes else 'none'}); classification needs at least two")
    examples = {name: [Example(i, index[v], name) for i, v in enumerate(values) if v in index]
                for name, values in labels.items()}
    unknown = sum(len(values) - len(examples[name]) for name, values in labels.items())
    if unknown:
        raise DataError(f"{root}: {unknown} rows have a label outside the train split's classes")
    present = {e.label for e in examples["train"]}
    empty = [classes[i] for i in range(len(classes)) if i not in present]
    if empty:
        raise DataError(f"{root}: class {', '.join(map(repr, empty))} has no training images")
    return ImageData(str(root), "datasets", classes, examples["train"], examples.get("validation"), splits)


# ------------------------------------------------------------------------------ split
def split(data: ImageData, fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): the dataset's own validation split where it has one, else ``fraction``
    of every class (at least one image of a class with two or more) drawn from ``seed``."""
    if data.validation is not None:
        return list(data.examples), list(data.validation)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--val-split must be in [0, 1), got {fraction}")
    train: list[Example] = []
    val: list[Example] = []
    for label in range(len(data.classes)):
        members = [e for e in data.examples if e.label == label]
        order = np.random.default_rng([seed, label, 0x5917]).permutation(len(members))
        n_val = 0 if fraction == 0 or len(members) < 2 else min(len(members) - 1, max(1, round(fraction * len(members))))
        val += [members[i] for i in sorted(order[:n_val])]
        train += [members[i] for i in sorted(order[n_val:])]
    key = {id(e): i for i, e in enumerate(data.examples)}
    return sorted(train, key=lambda e: key[id(e)]), sorted(val, key=lambda e: key[id(e)])


# ------------------------------------------------------------------------------ pixels
def random_resized_crop(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) as torchvision's RandomResizedCrop draws it."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height  # fallback: the central crop of the nearest allowed aspect
    if ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class Batches:
    """Numpy batches ``(pixel_values (b, 3, S, S) float32, labels (b,) int64)`` of some examples.

    ``augment``: a random-resized crop and a horizontal flip per example, drawn from (seed, epoch,
    example index); otherwise the processor's own resize. Rescale and normalize are the processor's.
    Batches are prepared ``prefetch`` ahead in a thread pool (Pillow releases the GIL).

    ``parts`` and ``mine`` (first part, number of parts): each batch of ``batch_size`` (the global
    batch of every worker together) is split into ``parts`` contiguous parts
    (:func:`vit_core.training.part_bounds`), and this process loads and yields only its parts
    ``mine[0] .. mine[0] + mine[1] - 1``, perhaps no rows at all. The order, the crops and the flips
    are those of the whole batch, whatever ``parts``.
    """

    def __init__(self, data: ImageData, examples: Sequence[Example], processor: ViTImageProcessor, size: int,
                 batch_size: int, *, augment: bool, seed: int, workers: int = 2, prefetch: int = 2,
                 parts: int = 1, mine: tuple[int, int] = (0, 1)) -> None:
        self.data, self.examples, self.processor = data, list(examples), processor
        self.size, self.batch_size, self.augment, self.seed = size, batch_size, augment, seed
        self.workers, self.prefetch = max(1, workers), max(1, prefetch)
        if not (parts >= 1 and 0 <= mine[0] and mine[1] >= 1 and mine[0] + mine[1] <= parts):
            raise ValueError(f"parts {mine[0]}..{mine[0] + mine[1] - 1} of {parts} do not exist")
        self.parts, self.mine = parts, mine
        self._resized: dict[int, np.ndarray] = {}  # un-augmented images at the model's size, uint8
        self._resized_bytes = 0

    def __len__(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def rows(self, index: int) -> int:
        """The rows of batch ``index`` of an epoch, every part together (the last batch may be short)."""
        return min(self.batch_size, len(self.examples) - index * self.batch_size)

    def local_bounds(self, index: int) -> np.ndarray:
        """Offsets of this process's parts within the rows it gets of batch ``index`` (``mine[1] + 1`` of them)."""
        bounds = part_bounds(self.rows(index), self.parts)[self.mine[0]:self.mine[0] + self.mine[1] + 1]
        return bounds - bounds[0]

    def order(self, epoch: int, shuffle: bool) -> np.ndarray:
        """The example order of ``epoch`` (0-based)."""
        if not shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.seed, epoch, 0x5F]).permutation(len(self.examples))

    def _one(self, index: int, epoch: int) -> np.ndarray:
        example = self.examples[index]
        resample = self.processor.resample
        if not self.augment:
            cached = self._resized.get(index)
            if cached is None:
                cached = resize_with_pillow(self.data.pixels(example), self.size, self.size, resample)
                if self._resized_bytes + cached.nbytes <= CACHE_BYTES:
                    self._resized[index] = cached
                    self._resized_bytes += cached.nbytes
            return cached
        rng = np.random.default_rng([self.seed, epoch, index, 0xA6])
        pixels = self.data.pixels(example)
        top, left, h, w = random_resized_crop(pixels.shape[0], pixels.shape[1], rng)
        crop = Image.fromarray(pixels).resize((self.size, self.size), resample=resample, box=(left, top, left + w, top + h))
        out = np.asarray(crop)
        return out[:, ::-1] if rng.random() < 0.5 else out

    def _batch(self, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if len(indices) == 0:  # a worker's empty part of a short last batch
            return np.zeros((0, 3, self.size, self.size), np.float32), np.zeros(0, np.int64)
        images = [self._one(int(i), epoch) for i in indices]
        pixel_values = self.processor(images, do_resize=False, return_tensors="np")["pixel_values"]
        labels = np.asarray([self.examples[int(i)].label for i in indices], np.int64)
        return pixel_values, labels

    def epoch(self, epoch: int, *, shuffle: bool, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The batches of ``epoch`` from batch ``start`` on."""
        order = self.order(epoch, shuffle)
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)][start:]
        if self.parts > 1:
            first, count = self.mine
            chunks = [chunk[part_bounds(len(chunk), self.parts)[first]:part_bounds(len(chunk), self.parts)[first + count]]
                      for chunk in chunks]
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            pending = [pool.submit(self._batch, chunk, epoch) for chunk in chunks[:self.prefetch]]
            for i in range(len(chunks)):
                batch = pending.pop(0).result()
                if i + self.prefetch < len(chunks):
                    pending.append(pool.submit(self._batch, chunks[i + self.prefetch], epoch))
                yield batch

"""``vitx predict``: batch inference over many image files, resumable and shardable (docs/predict.md).

```python
from conversion.predict import PredictOptions, predict
predict(PredictOptions("vit-s16/", ["photos/"], "preds.jsonl", batch_size=64, workers=4))
```

The inputs (image files, folders walked recursively, ``.txt`` files listing paths) are enumerated
lazily in a stable order; ``--shard I/N`` keeps every N-th from I. W spawned worker processes
decode and preprocess batches with the checkpoint's image processor (the one ``pipeline`` picks),
at most ``2 * W`` batches in flight, so memory stays flat however many images there are. The model
(loaded through ``pipeline``) runs in the main process and every batch's rows are appended to the
output in input order, flushed and fsynced: a killed run loses only the batches in flight, and
``--resume`` completes the file. One row per input: ``{"path", "label", "score", "top_k"}`` (+
``"embedding"``), or ``{"path", "error"}`` for a file that cannot be read. With ``--ray`` the same
job runs on Ray Data (``map_batches`` with an actor pool, each actor holding the model).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
import pathlib
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

# Folder walks take files with these extensions (lower-cased); a file named on the command line or
# in a list file is read whatever its name (a non-image file gets an error row).
logger = logging.getLogger("vitx")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                              ".pbm", ".jfif"})
LIST_EXTENSIONS = frozenset({".txt", ".lst"})
OUTPUT_FORMATS = (".jsonl", ".parquet")
SIDECAR_SUFFIX = ".partial.jsonl"  # FILE.parquet's resumable journal: FILE.parquet.partial.jsonl


@dataclasses.dataclass
class PredictOptions:
    """What ``vitx predict`` runs (the CLI options, docs/cli.md)."""

    checkpoint: str
    inputs: Sequence[str]
    output: str
    framework: str = "torch"
    batch_size: int = 32
    top_k: int = 5
    embeddings: bool = False
    workers: int = 2
    shard: tuple[int, int] = (0, 1)
    resume: bool = False
    ray: bool = False
    timm_model_name: str | None = None
    progress: bool = True


@dataclasses.dataclass
class PredictResult:
    """What a run did: rows written now, rows found from an earlier run, error rows written now."""

    output: pathlib.Path
    written: int
    skipped: int
    errors: int
    seconds: float


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N) with 0 <= I < N."""
    index, sep, count = str(text).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N with integers, e.g. 0/4") from None
    if not sep or n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return i, n


# --------------------------------------------------------------------------------------------- inputs
def check_inputs(inputs: Sequence[str]) -> None:
    """Every INPUT named on the command line exists (listed paths that do not get error rows)."""
    if not inputs:
        raise ValueError("predict needs at least one INPUT (image file, folder or .txt list of paths)")
    for item in inputs:
        if not os.path.exists(item):
            raise FileNotFoundError(f"input {item} does not exist")


def _walk(folder: str, seen: set[tuple[int, int]] | None = None) -> Iterator[str]:
    """Image files under ``folder``, recursively, entries sorted by name in every directory.

    A symlinked directory is followed, but each directory (by device and inode) is walked once, so
    a link back up the tree cannot loop; a directory that cannot be listed is yielded as an input of
    its own, so it gets an error row instead of stopping the run."""
    seen = set() if seen is None else seen
    try:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            logger.warning("%s: a directory already walked (a symlink loop or a second link): skipped", folder)
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        yield folder
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            yield from _walk(entry.path, seen)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            yield entry.path


def _listed(list_file: str) -> Iterator[str]:
    """The paths of a list file, one per line (blank lines and # comments skipped); relative paths
    are relative to the list file's folder; a listed folder is walked."""
    base = os.path.dirname(list_file)
    with open(list_file, encoding="utf-8") as f:
        for line in f:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            path = entry if os.path.isabs(entry) else os.path.join(base, entry)
            if os.path.isdir(path):
                yield from _walk(path)
            else:
                yield path


def iter_inputs(inputs: Iterable[str]) -> Iterator[str]:
    """All input image paths, lazily, in a stable order: the INPUTs in the order given; a folder's
    image files recursively (sorted per directory); a ``.txt`` / ``.lst`` file's listed paths."""
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            yield from _walk(item)
        elif os.path.splitext(item)[1].lower() in LIST_EXTENSIONS:
            yield from _listed(item)
        else:
            yield item


def sharded(paths: Iterable[str], shard: tuple[int, int]) -> Iterator[str]:
    """Every N-th path from the I-th (``shard`` = (I, N))."""
    index, count = shard
    for i, path in enumerate(paths):
        if i % count == index:
            yield path


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------- decoding
_WORKER_PROCESSOR: Any = None


def _init_worker(processor: Any) -> None:
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = processor


def _error_text(e: BaseException) -> str:
    return str(e) or type(e).__name__


def decode_batch(paths: Sequence[str], processor: Any = None) -> tuple[np.ndarray | None, list[str | None]]:
    """Decode and preprocess ``paths``: the (good images, C, H, W) float32 pixel values (None when
    no image could be read) and per path None or the error text of a file that cannot be read."""
    from .pipeline import load_image

    processor = _WORKER_PROCESSOR if processor is None else processor
    images: list[Any] = []
    errors: list[str | None] = []
    for path in paths:
        try:
            images.append(load_image(str(path)))
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - one unreadable file is one error row, never a crash
            errors.append(_error_text(e))
    if not images:
        return None, errors
    try:
        pixels = np.asarray(processor(images, return_tensors="np")["pixel_values"], dtype=np.float32)
    except Exception:  # noqa: BLE001 - find the image the processor refuses; the others still run
        kept: list[np.ndarray] = []
        good = iter(range(len(images)))
        for i, error in enumerate(errors):
            if error is not None:
                continue
            image = images[next(good)]
            try:
                kept.append(np.asarray(processor([image], return_tensors="np")["pixel_values"], dtype=np.float32)[0])
            except Exception as e:  # noqa: BLE001
                errors[i] = f"{paths[i]}: the image processor refused it ({_error_text(e)})"
        pixels = np.stack(kept) if kept else None
    return pixels, errors


# --------------------------------------------------------------------------------------------- the model
def check_checkpoint(checkpoint: str, *, embeddings: bool, timm_model_name: str | None = None) -> bool:
    """Whether the checkpoint has a classifier head (read lazily, no weights loaded); one without
    a head is refused unless ``embeddings`` (its rows hold the embedding only)."""
    from .detect import open_checkpoint
    from .formats.base import task_of

    loaded = open_checkpoint(checkpoint, timm_model_name=timm_model_name)
    classify = task_of(loaded.state) == "classification"
    if not classify and not embeddings:
        raise ValueError(f"{checkpoint}: the checkpoint has no classifier head, so there are no labels to predict; "
                         "pass --embeddings for rows with the embedding only")
    return classify


class Predictor:
    """The model of a checkpoint in one framework (loaded by ``conversion.pipeline``) and the rows
    of a batch of pixel values: top-k labels with transformers' pipeline scores (softmax; sigmoid
    for multi-label), and with ``embeddings`` the final-layernormed CLS vector (the classifier's
    input). A checkpoint without a classifier head gives embedding-only rows (``embeddings``
    required)."""

    def __init__(self, checkpoint: str, *, framework: str = "torch", top_k: int = 5, embeddings: bool = False,
                 timm_model_name: str | None = None) -> None:
        from .pipeline import ImageClassificationPipeline, ImageFeatureExtractionPipeline

        self.classify = check_checkpoint(checkpoint, embeddings=embeddings, timm_model_name=timm_model_name)
        self.embeddings = embeddings
        self.top_k = top_k
        if self.classify:
            self.pipe: Any = ImageClassificationPipeline(checkpoint, framework=framework, top_k=top_k,
                                                         timm_model_name=timm_model_name)
        else:
            self.pipe = ImageFeatureExtractionPipeline(checkpoint, framework=framework, timm_model_name=timm_model_name)
        self.framework = self.pipe.framework
        self.model = self.pipe.model
        self.image_processor = self.pipe.image_processor

    def _outputs(self, pixel_values: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(logits or None, embeddings or None) as float32 numpy arrays."""
        from .frameworks import framework_input, pinned_precision, to_numpy

        with pinned_precision(self.framework):
            x = framework_input(self.framework, pixel_values)
            if self.classify and not self.embeddings:
                return to_numpy(self.model(x).logits).astype(np.float32), None
            base = self.model.vit if self.classify else self.model
            cls = base(x).last_hidden_state[:, 0]  # (batch, hidden): the classifier's input
            logits = None
            if self.classify:
                classifier = getattr(self.model, "classifier", None)
                logits = to_numpy(classifier(cls) if classifier is not None else cls).astype(np.float32)
            return logits, to_numpy(cls).astype(np.float32)

    def _top_k(self, logits: np.ndarray) -> list[list[tuple[str, float]]]:
        """Per image the top-k (label, score) pairs, best first, as transformers' image-classification
        pipeline scores them: float32 softmax, or sigmoid for multi-label (and single-output) models;
        ties keep the lower class index first (a stable sort), k clamped to the number of labels."""
        config = self.pipe.config
        if config.problem_type == "multi_label_classification" or config.num_labels == 1:
            scores = 1.0 / (1.0 + np.exp(-logits))
        else:
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            scores = shifted / shifted.sum(axis=-1, keepdims=True)
        k = min(self.top_k, scores.shape[-1])
        order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
        names = config.id2label
        return [[(names.get(int(i), f"LABEL_{int(i)}"), row[i].item()) for i in best] for row, best in zip(scores, order)]

    def rows(self, paths: Sequence[str], pixel_values: np.ndarray | None, errors: Sequence[str | None]) -> list[dict]:
        """One row per path, in order: predictions for a decoded image, ``{"path", "error"}`` otherwise."""
        logits = features = None
        if pixel_values is not None and len(pixel_values):
            logits, features = self._outputs(pixel_values)
        top = self._top_k(logits) if logits is not None else []
        rows: list[dict] = []
        good = 0
        for path, error in zip(paths, errors):
            if error is not None:
                rows.append({"path": str(path), "error": error})
                continue
            row: dict[str, Any] = {"path": str(path)}
            if logits is not None:
                best = top[good]
                row["label"], row["score"] = best[0]
                row["top_k"] = [[label, score] for label, score in best]
            if features is not None:
                row["embedding"] = features[good].tolist()
            rows.append(row)
            good += 1
        return rows


# --------------------------------------------------------------------------------------------- output
def _output_format(output: pathlib.Path) -> str:
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(f"--output {output}: expected a .jsonl or .parquet file name")
    return suffix[1:]


def read_journal(path: pathlib.Path) -> tuple[list[str], list[int]]:
    """The paths of the complete rows of a jsonl file and the byte offset after each (a partial
    last line, a killed run's, is not a row). A corrupt complete line is a ValueError naming it."""
    paths: list[str] = []
    ends: list[int] = []
    if not path.exists():
        return paths, ends
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # the line a kill cut short
            try:
                paths.append(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}: line {number} is not a prediction row; cannot resume from it") from None
            offset += len(line)
            ends.append(offset)
    return paths, ends


def truncate_journal(path: pathlib.Path, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes (fsynced), when it is longer."""
    if path.exists() and path.stat().st_size != size:
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())


class RowWriter:
    """Appends rows to a jsonl journal, flushed and fsynced per batch. For ``.parquet`` the journal is
    ``FILE.parquet.partial.jsonl`` and ``finish`` writes the parquet file (row groups, to a temporary
    name, then renamed) and removes the journal."""

    def __init__(self, output: pathlib.Path, *, embeddings: bool) -> None:
        self.output = output
        self.format = _output_format(output)
        self.embeddings = embeddings
        self.journal = output if self.format == "jsonl" else output.with_name(output.name + SIDECAR_SUFFIX)
        self._file: Any = None

    def existing(self, resume: bool) -> tuple[list[str], list[int]] | None:
        """The paths already written and the byte offset after each (``read_journal``; None: the
        parquet file is already complete). Refuses an existing output without ``resume``."""
        if not resume:
            for path in {self.output, self.journal}:
                if path.exists():
                    raise FileExistsError(f"{path} exists; pass --resume to complete it, or choose another --output")
            return [], []
        if self.format == "parquet" and self.output.exists():
            return None
        return read_journal(self.journal)

    def write(self, rows: Sequence[dict]) -> None:
        if self._file is None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.journal, "ab")
        self._file.write(b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        self.close()
        if not self.journal.exists():  # no input at all: an empty output, not none
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            self.journal.touch()
        if self.format == "parquet":
            journal_to_parquet(self.journal, self.output, embeddings=self.embeddings)
            self.journal.unlink()


def parquet_schema(embeddings: bool) -> Any:
    import pyarrow as pa

    fields = [pa.field("path", pa.string()), pa.field("label", pa.string()), pa.field("score", pa.float64()),
              pa.field("top_k", pa.list_(pa.struct([pa.field("label", pa.string()), pa.field("score", pa.float64())])))]
    if embeddings:
        fields.append(pa.field("embedding", pa.list_(pa.float32())))
    fields.append(pa.field("error", pa.string()))
    return pa.schema(fields)


def journal_to_parquet(journal: pathlib.Path, output: pathlib.Path, *, embeddings: bool, rows_per_group: int = 4096) -> None:
    """The jsonl rows of ``journal`` as a parquet file (one row group per ``rows_per_group`` rows), written
    to a temporary name beside ``output`` and renamed."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("writing .parquet needs pyarrow (pip install 'vitx[ray]'), or write .jsonl") from None
    schema = parquet_schema(embeddings)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")

    def flush(writer: Any, group: list[dict]) -> None:
        columns = {name: [] for name in schema.names}
        for row in group:
            for name in schema.names:
                value = row.get(name)
                if name == "top_k" and value is not None:
                    value = [{"label": label, "score": score} for label, score in value]
                columns[name].append(value)
        writer.write_table(pa.table(columns, schema=schema))

    try:
        with pq.ParquetWriter(tmp, schema) as writer, open(journal, "rb") as f:
            group: list[dict] = []
            for line in f:
                group.append(json.loads(line))
                if len(group) == rows_per_group:
                    flush(writer, group)
                    group = []
            if group:
                flush(writer, group)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def read_rows(output: str | os.PathLike) -> list[dict]:
    """The rows of a ``vitx predict`` output (jsonl or parquet) as dicts in the jsonl layout."""
    output = pathlib.Path(output)
    if _output_format(output) == "jsonl":
        with open(output, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    import pyarrow.parquet as pq

    rows = []
    for row in pq.read_table(output).to_pylist():
        if row.get("error") is not None:
            rows.append({"path": row["path"], "error": row["error"]})
            continue
        out = {k: v for k, v in row.items() if k != "error" and v is not None}
        if "top_k" in out:
            out["top_k"] = [[p["label"], p["score"]] for p in out["top_k"]]
        rows.append(out)
    return rows


# --------------------------------------------------------------------------------------------- running
def _progress(enabled: bool, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(desc="vitx predict", unit="img", initial=initial, disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)


def _pending_inputs(options: PredictOptions, writer: RowWriter, done: list[str], ends: list[int]) -> tuple[int, Iterator[str]]:
    """Check the ``done`` rows are the shard's first inputs, cut the journal back to the rows kept
    and return (rows kept, the inputs still to run). A partial last line goes; while inputs remain,
    so do the complete rows of a batch a kill cut short (a multiple of --batch-size is kept), so
    that batch is redone whole and every row equals an uninterrupted run's. Nothing is cut before
    the rows are known to be this run's."""
    paths = sharded(iter_inputs(options.inputs), options.shard)
    for number, written in enumerate(done, 1):
        expected = next(paths, None)
        if expected != written:
            raise ValueError(f"{options.output}: row {number} is for {written!r} but this run's input {number} is "
                             f"{expected!r}: the output was written for other inputs or another --shard; choose "
                             "another --output")
    following = next(paths, None)
    keep = len(done)
    if following is not None:
        keep -= keep % options.batch_size
    truncate_journal(writer.journal, ends[keep - 1] if keep else 0)
    rest = itertools.chain(done[keep:], [] if following is None else [following], paths)
    return keep, rest


def check_options(options: PredictOptions) -> None:
    for name in ("batch_size", "top_k"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if isinstance(options.workers, bool) or not isinstance(options.workers, int) or options.workers < 0:
        raise ValueError(f"--workers must be an integer >= 0 (0: decode in the main process), got {options.workers!r}")
    index, count = options.shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {index}/{count}: expected I/N with 0 <= I < N")
    _output_format(pathlib.Path(options.output))
    check_inputs(options.inputs)


def predict(options: PredictOptions) -> PredictResult:
    """Run ``vitx predict``: see the module docstring and docs/predict.md."""
    start = time.perf_counter()
    check_options(options)
    output = pathlib.Path(options.output)
    writer = RowWriter(output, embeddings=options.embeddings)
    existing = writer.existing(options.resume)
    if existing is None:  # a finished parquet file: check it is this run's, nothing left to do
        have = [row["path"] for row in read_rows(output)]
        expected = list(sharded(iter_inputs(options.inputs), options.shard))
        if have != expected:
            raise ValueError(f"{output} is a finished output for other inputs or another --shard; choose another --output")
        return PredictResult(output, 0, len(have), 0, time.perf_counter() - start)
    kept, pending = _pending_inputs(options, writer, *existing)
    if options.ray:
        check_checkpoint(options.checkpoint, embeddings=options.embeddings, timm_model_name=options.timm_model_name)
        batches: Iterator[list[dict]] = run_ray(options, pending)
    else:
        predictor = Predictor(options.checkpoint, framework=options.framework, top_k=options.top_k,
                              embeddings=options.embeddings, timm_model_name=options.timm_model_name)
        batches = _run_local(predictor, pending, batch_size=options.batch_size, workers=options.workers)
    written = errors = 0
    bar = _progress(options.progress, kept)
    try:
        for rows in batches:
            writer.write(rows)
            written += len(rows)
            errors += sum("error" in row for row in rows)
            bar.update(len(rows))
        writer.finish()
    finally:
        writer.close()
        bar.close()
    return PredictResult(output, written, kept, errors, time.perf_counter() - start)


def _run_local(predictor: Predictor, paths: Iterator[str], *, batch_size: int, workers: int) -> Iterator[list[dict]]:
    """Rows per batch, in input order: W spawned workers decode and preprocess, at most 2 W batches
    in flight (workers=0: everything in this process)."""
    if workers == 0:
        for batch in batched(paths, batch_size):
            yield predictor.rows(batch, *decode_batch(batch, predictor.image_processor))
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # not fork: torch / TF / JAX threads
    pool = context.Pool(workers, initializer=_init_worker, initargs=(predictor.image_processor,))
    in_flight: collections.deque = collections.deque()
    try:
        for batch in batched(paths, batch_size):
            in_flight.append((batch, pool.apply_async(decode_batch, (batch,))))
            if len(in_flight) >= 2 * workers:
                batch, result = in_flight.popleft()
                yield predictor.rows(batch, *result.get())
        while in_flight:
            batch, result = in_flight.popleft()
            yield predictor.rows(batch, *result.get())
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------------------------- Ray
class RayPredictor:
    """The callable class of ``map_batches``: each actor of the pool holds one ``Predictor`` and
    turns each dataset row (one batch of --batch-size paths) into that batch's rows, as JSON text
    (error rows and prediction rows share one column)."""

    def __init__(self, checkpoint: str, framework: str, top_k: int, embeddings: bool,
                 timm_model_name: str | None) -> None:
        self.predictor = Predictor(checkpoint, framework=framework, top_k=top_k, embeddings=embeddings,
                                   timm_model_name=timm_model_name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for paths in batch["paths"]:
            paths = [str(p) for p in paths]
            rows = self.predictor.rows(paths, *decode_batch(paths, self.predictor.image_processor))
            out.append(json.dumps(rows, ensure_ascii=False))
        return {"rows": np.array(out, dtype=object)}


def _ray_init() -> bool:
    """Connect to the cluster ``ray.init()`` finds (RAY_ADDRESS or a running local one), or start a
    local one bound to 127.0.0.1 without a dashboard. True when this call connected."""
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray Data: pip install 'vitx[ray]'") from None
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["_node_ip_address"] = "127.0.0.1"
    ray.init(**kwargs)
    return True


def run_ray(options: PredictOptions, paths: Iterator[str]) -> Iterator[list[dict]]:
    """Rows in input order from Ray Data: ``from_items`` over the batches of paths (one dataset row
    per --batch-size paths, so the model sees the batches a local run gives it and the rows are
    equal), ``map_batches`` on a pool of ``max(1, workers)`` actors (one CPU each) holding the
    model, order preserved."""
    started = _ray_init()
    import ray
    import ray.data

    try:
        items = [{"paths": batch} for batch in batched(paths, options.batch_size)]
        if not items:
            return
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            RayPredictor, batch_size=1, batch_format="numpy", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, options.workers)),
            fn_constructor_kwargs={"checkpoint": options.checkpoint, "framework": options.framework,
                                   "top_k": options.top_k, "embeddings": options.embeddings,
                                   "timm_model_name": options.timm_model_name})
        for batch in dataset.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
            for text in batch["rows"]:
                yield json.loads(text)
    finally:
        if started:
            ray.shutdown()


__all__ = [
    "IMAGE_EXTENSIONS",
    "PredictOptions",
    "PredictResult",
    "Predictor",
    "RowWriter",
    "decode_batch",
    "iter_inputs",
    "parse_shard",
    "predict",
    "read_journal",
    "truncate_journal",
    "read_rows",
    "sharded",
]

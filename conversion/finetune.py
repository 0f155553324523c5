"""``vitx finetune``: one fine-tuning recipe, run by torch, TensorFlow or Flax with the same result.

The recipe (docs/training.md): a checkpoint's backbone with a classification head sized to the
data (kept when the checkpoint already has the data's class names, else drawn in numpy from the
seed), AdamW with decoupled weight decay, linear warm-up then cosine decay, random-resized-crop +
flip augmentation, validation each epoch, an atomic checkpoint after each epoch, and a final
directory that every framework and transformers load. Everything that decides the numbers
(data order, crops, head, schedule, dropout seeds) is computed here in numpy, once for every
framework; each framework only runs its ``training.TrainStep``.

Output directory while training: ``checkpoint/`` (the last finished epoch: model, optimizer state,
trainer_state.json; replaced in one atomic swap). At the end: ``config.json``,
``model.safetensors``, ``preprocessor_config.json``, ``metrics.json``, and ``checkpoint/`` removed.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import pathlib
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vit_core.checkpoint import CheckpointError, staging
from vit_core.checkpoint import safetensors as safetensors_file
from vit_core.checkpoint.files import read_state_dict, save_weights_file
from vit_core.checkpoint.lazy import lazy_from_array, materialize
from vit_core.config import ViTConfig
from vit_core.image_processing import ViTImageProcessor
from vit_core.resample import resample_position_embeddings
from vit_core.training import AdamW, Schedule, new_head, step_seed

from . import data as datamod
from .frameworks import FRAMEWORKS, pinned_precision, unavailable

logger = logging.getLogger("vitx")

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
METRICS_FILE = "metrics.json"
# what a resumed run must share with the run it continues (the rest, e.g. --log or --quiet, may change)
RUN_FIELDS = ("data", "model", "framework", "epochs", "max_steps", "batch_size", "lr", "weight_decay",
              "warmup_steps", "image_size", "val_split", "seed", "augment", "shuffle", "dtype")


@dataclass
class FinetuneOptions:
    """The arguments of ``vitx finetune`` (see ``vitx finetune --help``)."""

    data: str
    model: str
    output: str
    framework: str = "torch"
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    image_size: int | None = None
    val_split: float = 0.1
    seed: int = 0
    augment: bool = True
    shuffle: bool = True
    log: str | None = None
    resume: bool = False
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    quiet: bool = False
    workers: int = 2
    # more than one process (docs/training.md, "More than one process"); batch_size is per worker
    nproc: int = 1
    fsdp: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    collective_timeout: float = 600.0
    # stop (as if killed) after this many optimizer steps of this invocation: for tests of --resume
    stop_after_steps: int | None = field(default=None, repr=False)

    def check(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"--framework must be one of {', '.join(FRAMEWORKS)}, got {self.framework!r}")
        problems = []
        for name, value, low in (("epochs", self.epochs, 1), ("batch-size", self.batch_size, 1),
                                 ("warmup-steps", self.warmup_steps, 0), ("workers", self.workers, 1)):
            if value < low:
                problems.append(f"--{name} must be >= {low}, got {value}")
        if self.nproc < 1:
            problems.append(f"--nproc must be >= 1, got {self.nproc}")
        if not (self.collective_timeout > 0 and math.isfinite(self.collective_timeout)):
            problems.append(f"--collective-timeout must be a positive number of seconds, got {self.collective_timeout}")
        jax_flags = (self.coordinator_address, self.num_processes, self.process_id)
        if any(v is not None for v in jax_flags):
            if self.framework != "flax":
                problems.append("--coordinator-address, --num-processes and --process-id are for --framework flax "
                                "(torch: torchrun, tf: TF_CONFIG)")
            elif any(v is None for v in jax_flags):
                problems.append("--coordinator-address, --num-processes and --process-id go together")
            elif not (self.num_processes >= 1 and 0 <= self.process_id < self.num_processes):
                problems.append(f"--process-id must be in [0, --num-processes), got {self.process_id} of {self.num_processes}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"--max-steps must be >= 1, got {self.max_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"--lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            problems.append(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.val_split < 1.0:
            problems.append(f"--val-split must be in [0, 1), got {self.val_split}")
        if self.image_size is not None and self.image_size < 1:
            problems.append(f"--image-size must be positive, got {self.image_size}")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def run_record(self, parts: int = 1) -> dict[str, Any]:
        record = {name: getattr(self, name) for name in RUN_FIELDS}
        record["data"] = str(pathlib.Path(self.data).expanduser().resolve())
        if parts > 1:  # the global batch is parts * batch_size: a resumed run needs as many workers
            record["data_parallel_workers"] = parts
        return record


@dataclass
class FinetuneResult:
    output: pathlib.Path
    metrics: dict[str, Any]
    steps: int
    finished: bool


# ------------------------------------------------------------------------------ the model to train
def _classification_state(loaded: Any, classes: list[str], seed: int, image_size: int | None,
                          notes: list[str]) -> tuple[dict[str, np.ndarray], ViTConfig]:
    """The checkpoint's weights as a ViTForImageClassification state for ``classes``, and its config."""
    config = ViTConfig.from_dict(loaded.config.to_dict())
    state = {k: np.asarray(v) for k, v in materialize(loaded.state).items()}
    task = loaded.task
    if task == "base":  # a bare backbone: the task models prefix it with "vit."
        state = {f"vit.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items()
             if not (k.startswith(("vit.pooler.", "decoder.")) or k == "vit.embeddings.mask_token")}
    old_labels = [config.id2label[i] for i in sorted(config.id2label)] if task == "classification" else []
    config.id2label = {i: name for i, name in enumerate(classes)}
    config.label2id = {name: i for i, name in enumerate(classes)}
    if task == "classification" and old_labels == classes:
        notes.append(f"kept the checkpoint's classifier: it already has these {len(classes)} classes")
    else:
        if task == "classification":
            notes.append(f"new classifier for {len(classes)} classes (the checkpoint's had {len(old_labels)} "
                         "other labels), drawn from --seed")
        state.update(new_head(config, seed))
    if image_size is not None and config.image_hw != (image_size, image_size):
        grid = config.grid_hw
        config.image_size = image_size
        key = "vit.embeddings.position_embeddings"
        table = state[key]
        state[key] = resample_position_embeddings(table, grid, config.grid_hw).astype(table.dtype)
        notes.append(f"position table resampled from a {grid[0]}x{grid[1]} to a {config.grid_hw[0]}x"
                     f"{config.grid_hw[1]} patch grid (bicubic, once at load)")
    config.validate()
    return state, config


def _processor(loaded: Any, model: str, size: int) -> ViTImageProcessor:
    beside = pathlib.Path(loaded.path).parent / "preprocessor_config.json" if loaded.path else None
    if beside is not None and beside.is_file():
        processor = ViTImageProcessor.from_json_file(beside)
    else:
        processor = ViTImageProcessor()
    processor.size = {"height": size, "width": size}
    return processor


def _framework(name: str) -> Any:
    why = unavailable(name)
    if why:
        raise ImportError(f"--framework {name}: {why}")
    return importlib.import_module(f"vit_{name}.training")


# ------------------------------------------------------------------------------ files
def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


def _save_checkpoint(directory: pathlib.Path, weights: Mapping[str, np.ndarray], optimizer: Mapping[str, np.ndarray],
                     config: ViTConfig, processor: ViTImageProcessor, record: dict[str, Any]) -> None:
    """``directory/checkpoint``: all or nothing (a staged directory swapped in)."""
    with staging.staged_dir(directory / CHECKPOINT_DIR, force=True, replace_anything=True) as temp:
        save_weights_file(weights, temp / "model.safetensors", "safetensors")
        safetensors_file.write(temp / OPTIMIZER_FILE, {k: lazy_from_array(np.asarray(v)) for k, v in optimizer.items()})
        config.save_pretrained(temp)
        processor.save_pretrained(temp)
        (temp / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _finish(directory: pathlib.Path, checkpoint: pathlib.Path, metrics: dict[str, Any]) -> None:
    """The final directory from the last checkpoint: every file replaced atomically, then the checkpoint removed."""
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        with staging.staged_file(directory / name, force=True) as temp:
            shutil.copyfile(checkpoint / name, temp)
    staging.write_text(directory / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(checkpoint, ignore_errors=True)
    staging.fsync_path(directory)


def _trim_log(path: pathlib.Path, last_step: int) -> None:
    """Keep the log lines of steps up to ``last_step`` (a resumed run redoes the steps after it)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a half-written last line of a killed run
    staging.write_text(path, "".join(f"{line}\n" for line in kept))


# ------------------------------------------------------------------------------ the run
def finetune(options: FinetuneOptions) -> FinetuneResult:
    """Fine-tune ``options.model`` on ``options.data`` into ``options.output`` (see the module docstring)."""
    options.check()
    out = pathlib.Path(options.output).expanduser()
    checkpoint = out / CHECKPOINT_DIR
    fw = _framework(options.framework)
    parallel = fw.parallel(fsdp=options.fsdp, timeout=options.collective_timeout,
                           coordinator_address=options.coordinator_address, num_processes=options.num_processes,
                           process_id=options.process_id)
    try:
        return _finetune(options, out, checkpoint, fw, parallel)
    finally:
        if parallel is not None:
            parallel.close()


def _finetune(options: FinetuneOptions, out: pathlib.Path, checkpoint: pathlib.Path, fw: Any,
              parallel: Any) -> FinetuneResult:
    main = parallel is None or parallel.rank == 0
    parts = 1 if parallel is None else parallel.parts
    if not main:  # rank 0 alone speaks, logs and writes
        options = dataclasses.replace(options, quiet=True, log=None)
    record = options.run_record(parts)
    resumed: dict[str, Any] | None = None
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if options.resume:
        if (checkpoint / STATE_FILE).is_file():
            resumed = _read_json(checkpoint / STATE_FILE)
            changed = [f"--{k.replace('_', '-')} ({resumed['run'].get(k)!r} there, {record.get(k)!r} now)"
                       for k in {**resumed["run"], **record} if resumed["run"].get(k) != record.get(k)]
            if changed:
                raise ValueError(f"--resume: {out} holds a run with other settings: {'; '.join(changed)}")
        elif (out / METRICS_FILE).is_file():
            metrics = _read_json(out / METRICS_FILE)
            if metrics.get("run") == record:
                _say(options, f"{out}: this run already finished (metrics.json); nothing to resume")
                return FinetuneResult(out, metrics, int(metrics.get("steps", 0)), True)
            raise ValueError(f"--resume: {out} holds a finished run with other settings")
        elif out.exists() and any(out.iterdir()):
            raise FileExistsError(f"--resume: {out} holds no vitx finetune checkpoint ({CHECKPOINT_DIR}/{STATE_FILE})")
        else:
            _say(options, f"{out}: no checkpoint yet, starting from the beginning")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty: pass --resume to continue the run there, "
                              "or choose another --output")

    from .detect import open_checkpoint

    data = datamod.open_data(options.data)
    loaded = open_checkpoint(options.model)
    notes: list[str] = []
    state, config = _classification_state(loaded, data.classes, options.seed, options.image_size, notes)
    size = config.image_hw[0]
    if config.image_hw[0] != config.image_hw[1]:
        raise ValueError(f"{options.model}: image_size {config.image_hw} is not square; pass --image-size N")
    processor = _processor(loaded, options.model, size)

    total_images = len(data.examples) + len(data.validation or [])
    with _bar(options, total_images, "checking images", "img") as bar:
        data.check(progress=bar.update)
    if data.skipped:
        _say(options, f"skipped {len(data.skipped)} unreadable image(s), e.g. {data.skipped[0][0]}: {data.skipped[0][1]}")
    train, val = datamod.split(data, options.val_split, options.seed)
    if not train:
        raise datamod.DataError(f"{data.root}: no training images left after the validation split")
    # --batch-size is one worker's batch: the global batch of every step is parts * batch_size images,
    # and this process loads its parts of it
    mine = (0, 1) if parallel is None else (parallel.first_part, parallel.local_parts)
    global_batch = options.batch_size * parts
    loader = datamod.Batches(data, train, processor, size, global_batch, augment=options.augment,
                             seed=options.seed, workers=options.workers, parts=parts, mine=mine)
    val_loader = datamod.Batches(data, val, processor, size, global_batch, augment=False,
                                 seed=options.seed, workers=options.workers, parts=parts, mine=mine)
    steps_per_epoch = len(loader)
    total_steps = options.max_steps or options.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    schedule = Schedule(options.lr, total_steps, options.warmup_steps)
    for note in notes:
        _say(options, note)
    _say(options, f"{len(data.classes)} classes, {len(train)} training / {len(val)} validation images; "
                  f"{epochs} epoch(s) of {steps_per_epoch} step(s), {total_steps} steps, {options.framework} {options.dtype}")
    if parallel is not None:
        _say(options, f"data parallel: {parts} workers in {parallel.processes} process(es) ({parallel.describe()}), "
                      f"{options.batch_size} images per worker, global batch {global_batch}")
    if resumed is not None:  # the weights of the last finished epoch
        state = read_state_dict(checkpoint / "model.safetensors")
    # float32 matmuls at full precision in TF and JAX (torch's CPU default already is); not for bfloat16
    precise = options.dtype == "float32" and options.framework != "torch"
    with pinned_precision(options.framework) if precise else _nothing():
        model = fw.model_for_training(config, state, dtype=options.dtype, parallel=parallel)
        if options.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        trainer = fw.TrainStep(model, AdamW(lr=options.lr, weight_decay=options.weight_decay), dtype=options.dtype,
                               parallel=parallel)
        history: list[dict[str, Any]] = []
        step, start_epoch = 0, 0
        if resumed is not None:
            optimizer_state, _ = safetensors_file.read(checkpoint / OPTIMIZER_FILE)
            trainer.load_optimizer_state(optimizer_state)
            step, start_epoch, history = int(resumed["step"]), int(resumed["epoch"]), list(resumed["epochs"])
            _say(options, f"resuming after epoch {start_epoch} (step {step} of {total_steps})")
        log_path = pathlib.Path(options.log).expanduser() if options.log else None
        if log_path is not None and main:
            _trim_log(log_path, step)
        started_steps = step
        for epoch in range(start_epoch, epochs):
            if step >= total_steps:
                break
            seconds, losses, images = time.perf_counter(), [], 0
            batches = min(steps_per_epoch, total_steps - step)
            with _bar(options, batches, f"epoch {epoch + 1}/{epochs}", "step") as bar, \
                    (open(log_path, "a", encoding="utf-8") if log_path else _nothing()) as log:
                for index, (pixel_values, labels) in enumerate(loader.epoch(epoch, shuffle=options.shuffle)):
                    if step >= total_steps:
                        break
                    step += 1
                    lr = schedule.lr(step)
                    if parallel is None:
                        loss = trainer.step(pixel_values, labels, lr, step_seed(options.seed, step))
                    else:
                        loss = trainer.step(pixel_values, labels, lr, step_seed(options.seed, step),
                                            count=loader.rows(index))
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"step {step}: the loss is {loss} (lower --lr, or check the data)")
                    losses.append(loss)
                    images += loader.rows(index)
                    if log is not None:
                        log.write(json.dumps({"step": step, "loss": loss, "lr": lr, "epoch": epoch + 1}) + "\n")
                        log.flush()
                    elapsed = time.perf_counter() - seconds
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images / max(elapsed, 1e-9):.1f}")
                    if options.stop_after_steps is not None and step - started_steps >= options.stop_after_steps:
                        raise KeyboardInterrupt(f"stopped after {options.stop_after_steps} steps (stop_after_steps)")
            train_seconds = time.perf_counter() - seconds
            val_loss, val_accuracy = _evaluate(trainer, val_loader, parallel)
            history.append({"epoch": epoch + 1, "steps": step, "train_loss": float(np.mean(losses)),
                            "val_loss": val_loss, "val_accuracy": val_accuracy, "seconds": round(train_seconds, 3),
                            "images_per_s": round(images / max(train_seconds, 1e-9), 3)})
            shown = "" if val_loss is None else f", val loss {val_loss:.4f}, val accuracy {val_accuracy:.4f}"
            _say(options, f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}{shown} "
                          f"({history[-1]['images_per_s']:.1f} img/s)")
            weights, optimizer_state = trainer.weights(), trainer.optimizer_state()  # every process (FSDP gathers)
            if main:
                out.mkdir(parents=True, exist_ok=True)
                _save_checkpoint(out, weights, optimizer_state, config, processor,
                                 {"run": record, "step": step, "epoch": epoch + 1, "epochs": history,
                                  "total_steps": total_steps, "skipped": len(data.skipped)})
            if parallel is not None:  # no process starts the next epoch (or ends) before rank 0 has written
                parallel.sum([0.0])
    last = history[-1] if history else {}
    metrics = {"val_accuracy": last.get("val_accuracy"), "val_loss": last.get("val_loss"), "epochs": history,
               "steps": step, "classes": data.classes, "train_images": len(train), "val_images": len(val),
               "skipped_images": len(data.skipped), "skipped": [list(s) for s in data.skipped[:100]],
               "framework": options.framework, "run": record}
    if parallel is not None:
        metrics["data_parallel"] = {"workers": parts, "processes": parallel.processes, "global_batch_size": global_batch,
                                    "fsdp": options.fsdp}
    if not main:
        return FinetuneResult(out, metrics, step, True)
    _finish(out, checkpoint, metrics)
    _say(options, f"wrote {out} (config.json, model.safetensors, preprocessor_config.json, metrics.json)")
    return FinetuneResult(out, metrics, step, True)


def _evaluate(trainer: Any, loader: datamod.Batches, parallel: Any = None) -> tuple[float | None, float | None]:
    """(mean cross-entropy, accuracy) over the validation examples, in float64 from float32 logits;
    under ``parallel`` each process scores its parts and the sums are added over the processes."""
    if not loader.examples:
        return None, None
    total, correct, count = 0.0, 0, 0
    for index, (pixel_values, labels) in enumerate(loader.epoch(0, shuffle=False)):
        if parallel is None:
            logits = trainer.logits(pixel_values).astype(np.float64)
        else:
            logits = trainer.logits(pixel_values, count=loader.rows(index)).astype(np.float64)
        if not len(labels):
            continue
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total += float(-log_probs[np.arange(len(labels)), labels].sum())
        correct += int((logits.argmax(axis=1) == labels).sum())
        count += len(labels)
    if parallel is not None:
        total, correct, count = (float(v) for v in parallel.sum([total, correct, count]))
    return total / count, correct / count


# ------------------------------------------------------------------------------ output
class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class _Silent:
    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass


def _bar(options: FinetuneOptions, total: int, desc: str, unit: str) -> Any:
    if options.quiet:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=None)


def _say(options: FinetuneOptions, message: str) -> None:
    if not options.quiet:
        print(f"vitx finetune: {message}", file=sys.stderr, flush=True)


def launch_from_args(args: Any, argv: list[str]) -> int:
    """``vitx finetune --nproc N``: N local workers of ``args.framework`` (conversion.distributed.launch)."""
    from .distributed import launch

    options_from_args(args).check()
    return launch(args.framework, args.nproc, argv)


def options_from_args(args: Any) -> FinetuneOptions:
    """FinetuneOptions from the parsed ``vitx finetune`` arguments."""
    names = {f.name for f in dataclasses.fields(FinetuneOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return FinetuneOptions(**values)


__all__ = ["FinetuneOptions", "FinetuneResult", "finetune", "launch_from_args", "options_from_args"]

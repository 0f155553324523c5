"""One measurement, run by the harness in a fresh child process.

    python -m benchmarks.worker speed --entry vitx-torch-sdpa --model B/16 --dtype float32 --batch 8
    python -m benchmarks.worker cold --entry vitx-torch --model B/16
    python -m benchmarks.worker train --entry vitx-torch-train --model S/16 --dtype bfloat16 --batch 32

Prints one ``BENCH_RESULT {json}`` line (benchmarks.common.emit). The parent sets the thread
environment before this process starts; here the framework's own thread pools are pinned too.
"""

from __future__ import annotations

import time

_PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from .common import (  # noqa: E402
    TIMM_NAMES,
    emit,
    fixture_dir,
    load_average,
    load_inputs,
    peak_rss_mb,
    set_threads,
    time_calls,
    timm_kwargs,
    versions,
)

FRAMEWORK_MODULES = ["torch", "tensorflow", "keras", "tf_keras", "jax", "jaxlib", "flax", "transformers", "timm", "numpy",
                     "onnxruntime", "openvino", "nncf"]


def logits_check(logits: np.ndarray, model: str) -> dict[str, Any]:
    """Image 0's logits against the float64 reference: max |diff| and whether top-1 agrees."""
    reference = np.load(fixture_dir(model) / "reference_logits.npy")
    got = np.asarray(logits[0], dtype=np.float64)
    return {"logits_max_abs_diff": float(np.max(np.abs(got - reference))),
            "logits_cosine": float(got @ reference / (np.linalg.norm(got) * np.linalg.norm(reference))),
            "top1_matches_reference": bool(int(np.argmax(got)) == int(np.argmax(reference)))}


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    from .entries import ENTRIES

    entry = ENTRIES[args.entry]
    set_threads(entry.framework, args.threads)
    pixels = load_inputs(args.model, args.batch)
    t0 = time.perf_counter()
    call = entry.builder(fixture_dir(args.model), args.model, args.dtype, pixels)
    setup_s = time.perf_counter() - t0
    timing = time_calls(call, min_runs=args.min_runs, min_time_s=args.min_time, max_runs=args.max_runs,
                        max_time_s=args.max_time)
    logits = call()
    times_ms = np.asarray(timing.times) * 1e3
    result = {
        "kind": "speed", "entry": args.entry, "framework": entry.framework, "vitx": entry.vitx,
        "model": args.model, "dtype": args.dtype, "batch": args.batch, "threads": args.threads,
        "setup_s": setup_s, "first_call_s": timing.first_call_s, "warmup_calls": timing.warmup_calls,
        "times_s": timing.times, "median_s": timing.median_s,
        "median_cpu_s": statistics.median(timing.cpu_times), "runs": len(timing.times),
        "images_per_s": args.batch / timing.median_s,
        # per-call latency of this batch size (serving runs at batch 1): p50 / p90 over the timed calls
        "latency_ms": {"p50": float(np.percentile(times_ms, 50)), "p90": float(np.percentile(times_ms, 90))},
        "peak_rss_mb": peak_rss_mb(), "versions": versions(FRAMEWORK_MODULES),
    }
    if entry.vitx:  # the speed paths vit_core.cpu chose on this CPU (vitx entries run in the main venv)
        from vit_core import cpu

        if args.dtype in cpu.DTYPES:  # int8 rows: their float layers take the float32 plan's paths
            result["plan"] = cpu.current_plan(entry.framework, args.dtype).as_dict()
    result.update(logits_check(logits, args.model))
    return result


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """One training cell: images/s of optimizer steps, the first step's loss against the float64
    reference loss of the batch, and the process's peak RSS (with or without checkpointing)."""
    import json

    from .train_entries import TRAIN_ENTRIES

    entry = TRAIN_ENTRIES[args.entry]
    set_threads(entry.framework, args.threads)
    directory = fixture_dir(args.model)
    pixels = load_inputs(args.model, args.batch)
    labels = np.load(directory / f"train-labels-{args.batch}.npy")
    reference = json.loads((directory / f"train-{args.batch}.json").read_text())["reference_loss"]
    t0 = time.perf_counter()
    step = entry.builder(directory, args.model, args.dtype, pixels, labels, args.checkpointing)
    setup_s = time.perf_counter() - t0
    losses: list[float] = []
    timing = time_calls(lambda: losses.append(step()), min_runs=args.min_runs, min_time_s=args.min_time,
                        max_runs=args.max_runs, max_time_s=args.max_time)
    if not all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite training loss: {losses}")
    return {
        "kind": "train", "entry": args.entry, "framework": entry.framework, "vitx": entry.vitx,
        "model": args.model, "dtype": args.dtype, "batch": args.batch, "threads": args.threads,
        "checkpointing": args.checkpointing,
        "setup_s": setup_s, "first_call_s": timing.first_call_s, "warmup_calls": timing.warmup_calls,
        "times_s": timing.times, "median_s": timing.median_s,
        "median_cpu_s": statistics.median(timing.cpu_times), "runs": len(timing.times),
        "images_per_s": args.batch / timing.median_s,
        "first_loss": losses[0], "reference_loss": reference,
        "first_loss_rel_diff": abs(losses[0] - reference) / abs(reference),
        "last_loss": losses[-1], "steps": len(losses),
        "peak_rss_mb": peak_rss_mb(), "versions": versions(FRAMEWORK_MODULES),
    }


# ----------------------------------------------------------------------------------- cold start
def _cold_vitx_torch(directory, pixels):
    t = time.perf_counter()
    import torch

    from vit_torch import ViTForImageClassification
    imported = time.perf_counter() - t
    t = time.perf_counter()
    model = ViTForImageClassification.from_pretrained(directory).eval()
    loaded = time.perf_counter() - t
    return imported, loaded, lambda: _no_grad(torch, lambda: model(torch.from_numpy(pixels)).logits.numpy())


def _cold_hf5_torch(directory, pixels):
    t = time.perf_counter()
    import torch
    from transformers import ViTForImageClassification
    imported = time.perf_counter() - t
    t = time.perf_counter()
    model = ViTForImageClassification.from_pretrained(directory).eval()
    loaded = time.perf_counter() - t
    return imported, loaded, lambda: _no_grad(torch, lambda: model(torch.from_numpy(pixels)).logits.numpy())


def _cold_timm(directory, pixels, model):
    t = time.perf_counter()
    import timm
    import torch
    imported = time.perf_counter() - t
    t = time.perf_counter()
    model = timm.create_model(TIMM_NAMES[model], pretrained=True, num_classes=1000,
                              pretrained_cfg_overlay=dict(file=str(directory / "timm.safetensors")),
                              **timm_kwargs(model)).eval()
    loaded = time.perf_counter() - t
    return imported, loaded, lambda: _no_grad(torch, lambda: model(torch.from_numpy(pixels)).numpy())


def _no_grad(torch, fn):
    with torch.inference_mode():
        return fn()


def _cold_vitx_tf(directory, pixels):
    t = time.perf_counter()
    from vit_tf import TFViTForImageClassification
    imported = time.perf_counter() - t
    t = time.perf_counter()
    model = TFViTForImageClassification.from_pretrained(directory)
    loaded = time.perf_counter() - t
    return imported, loaded, lambda: np.asarray(model(pixels, training=False).logits)


def _cold_hf4_tf(directory, pixels):
    t = time.perf_counter()
    from transformers import TFViTForImageClassification
    imported = time.perf_counter() - t
    t = time.perf_counter()
    model = TFViTForImageClassification.from_pretrained(directory, from_pt=True)
    loaded = time.perf_counter() - t
    return imported, loaded, lambda: np.asarray(model(pixel_values=pixels, training=False).logits)


def _cold_vitx_flax(directory, pixels):
    t = time.perf_counter()
    from vit_flax import FlaxViTForImageClassification
    imported = time.perf_counter() - t
    t = time.perf_counter()
    model = FlaxViTForImageClassification.from_pretrained(directory)
    loaded = time.perf_counter() - t
    return imported, loaded, lambda: np.asarray(model(pixels).logits)


def _cold_hf4_flax(directory, pixels):
    t = time.perf_counter()
    from transformers import FlaxViTForImageClassification
    imported = time.perf_counter() - t
    t = time.perf_counter()
    model = FlaxViTForImageClassification.from_pretrained(directory, from_pt=True)
    loaded = time.perf_counter() - t
    return imported, loaded, lambda: np.asarray(model(pixels).logits)


# name -> (framework, venv, vitx, loader). The call is each library's plain documented one
# (model(pixels)), no compilation: what a user's first logits cost.
COLD: dict[str, tuple[str, str, bool, Callable[..., Any]]] = {
    "vitx-torch": ("torch", "main", True, _cold_vitx_torch),
    "hf5-torch": ("torch", "peers", False, _cold_hf5_torch),
    "timm-torch": ("torch", "peers", False, _cold_timm),
    "vitx-tf": ("tf", "main", True, _cold_vitx_tf),
    "hf4-tf": ("tf", "main", False, _cold_hf4_tf),
    "vitx-flax": ("flax", "main", True, _cold_vitx_flax),
    "hf4-flax": ("flax", "main", False, _cold_hf4_flax),
}


def run_cold(args: argparse.Namespace) -> dict[str, Any]:
    framework, _, vitx, loader = COLD[args.entry]
    pixels = load_inputs(args.model, 1)
    directory = fixture_dir(args.model)
    started = time.perf_counter()
    extra = (args.model,) if args.entry == "timm-torch" else ()
    import_s, load_s, call = loader(directory, pixels, *extra)
    set_threads(framework, args.threads)
    t = time.perf_counter()
    logits = call()
    first_call_s = time.perf_counter() - t
    result = {
        "kind": "cold", "entry": args.entry, "framework": framework, "vitx": vitx, "model": args.model,
        "import_s": import_s, "from_pretrained_s": load_s, "first_call_s": first_call_s,
        "time_to_first_logits_s": time.perf_counter() - started,
        "since_interpreter_main_s": time.perf_counter() - _PROCESS_START,
        "peak_rss_mb": peak_rss_mb(), "versions": versions(FRAMEWORK_MODULES),
    }
    result.update(logits_check(logits, args.model))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("kind", choices=["speed", "cold", "train"])
    parser.add_argument("--entry", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-runs", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=3.0)
    parser.add_argument("--max-runs", type=int, default=50)
    parser.add_argument("--max-time", type=float, default=20.0)
    parser.add_argument("--checkpointing", action="store_true", help="train: gradient checkpointing on")
    args = parser.parse_args(argv)
    load_before = load_average()
    try:
        result = {"speed": run_speed, "cold": run_cold, "train": run_train}[args.kind](args)
    except Exception as exc:  # the parent records the failure in the table rather than dying
        traceback.print_exc()
        result = {"kind": args.kind, "entry": args.entry, "model": args.model, "dtype": args.dtype,
                  "batch": args.batch, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        if isinstance(exc, NotImplementedError):  # the library has no such mode: not a failure
            result = {**result, "unsupported": True}
    result["load_average_before"] = load_before
    result["load_average_after"] = load_average()
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pieces shared by the harness and its child processes.

This module imports numpy and the standard library only: it runs in the main .venv and in the
peers' venv (which has no vit_core dependencies such as Pillow), so anything that needs vit_core
(checkpoints, the float64 reference) is prepared by the parent in :mod:`benchmarks.fixtures`.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

BENCH_DIR = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = RESULTS_DIR / "cache"

# ViT sizes measured (docs/FORMATS.md section 8): (hidden, layers, heads, mlp, image, patch). "tiny" is
# the --quick smoke test's model. num_labels 1000 as the ImageNet checkpoints; layer_norm_eps 1e-6
# (timm's and the JAX originals'; transformers' models read it from config.json).
MODEL_SPECS: dict[str, dict[str, int]] = {
    "S/16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                 image_size=224, patch_size=16),
    "B/16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 image_size=224, patch_size=16),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 image_size=32, patch_size=8),
}
NUM_LABELS = 1000
NUM_CHANNELS = 3
LAYER_NORM_EPS = 1e-6
TIMM_NAMES = {"S/16": "vit_small_patch16_224", "B/16": "vit_base_patch16_224", "tiny": "vit_small_patch16_224"}


def timm_kwargs(model: str) -> dict[str, Any]:
    """timm.create_model overrides that give the benchmark model's shape (none for S/16, B/16)."""
    if model in ("S/16", "B/16"):
        return {}
    s = MODEL_SPECS[model]
    return dict(img_size=s["image_size"], patch_size=s["patch_size"], embed_dim=s["hidden_size"],
                depth=s["num_hidden_layers"], num_heads=s["num_attention_heads"],
                mlp_ratio=s["intermediate_size"] / s["hidden_size"])


def model_slug(model: str) -> str:
    """'B/16' -> 'B16' (a file-name-safe key)."""
    return model.replace("/", "")


def config_fields(model: str) -> dict[str, Any]:
    """The config.json fields of a benchmark model (transformers ViTConfig names)."""
    spec = MODEL_SPECS[model]
    return dict(spec, num_channels=NUM_CHANNELS, encoder_stride=spec["patch_size"], layer_norm_eps=LAYER_NORM_EPS,
                hidden_act="gelu", qkv_bias=True, num_labels=NUM_LABELS)


def model_flops(model: str) -> float:
    """Forward FLOPs of one image through ViTForImageClassification (2 per multiply-add).

    Counts the matmuls only (patch projection, q/k/v/out projections, q.k^T and probs.v, the MLP,
    the classifier); LayerNorm, softmax, GELU and adds are < 1% and memory-bound. ViT-B/16@224:
    35.1 GFLOP, ViT-S/16@224: 9.2 GFLOP.
    """
    s = MODEL_SPECS[model]
    d, m, p, layers = s["hidden_size"], s["intermediate_size"], s["patch_size"], s["num_hidden_layers"]
    n = (s["image_size"] // p) ** 2
    t = n + 1
    patch = 2 * n * NUM_CHANNELS * p * p * d
    per_layer = 2 * t * d * 3 * d + 2 * t * t * d * 2 + 2 * t * d * d + 2 * t * d * m * 2
    head = 2 * d * NUM_LABELS
    return float(patch + layers * per_layer + head)


def mlp_gemm_shape(model: str, batch: int) -> tuple[int, int, int]:
    """(rows, in, out) of the model's first MLP GEMM at ``batch`` images: (batch x tokens, hidden,
    intermediate). The two MLP GEMMs hold two thirds of the model's FLOPs and the other projections
    run on the same rows, so the rate at this shape stands for the model's GEMMs."""
    s = MODEL_SPECS[model]
    tokens = (s["image_size"] // s["patch_size"]) ** 2 + 1
    return (batch * tokens, s["hidden_size"], s["intermediate_size"])


def fixture_dir(model: str) -> pathlib.Path:
    """Where :mod:`benchmarks.fixtures` keeps a model's checkpoint, timm weights, inputs and reference."""
    return CACHE_DIR / model_slug(model)


def load_inputs(model: str, batch: int) -> np.ndarray:
    """The first ``batch`` images of the model's seeded input set (batch, 3, H, W) float32: the
    same numbers for every entry and every batch size (image 0 is always the same image)."""
    pixels = np.load(fixture_dir(model) / "pixels.npy", mmap_mode="r")
    if batch > pixels.shape[0]:
        raise ValueError(f"batch {batch} > {pixels.shape[0]} prepared images for {model}")
    return np.array(pixels[:batch], dtype=np.float32, copy=True)


def set_threads(framework: str, threads: int) -> None:
    """Pin the framework's thread pools to ``threads`` (intra-op) and 1 (inter-op).

    Environment variables cover OpenMP / MKL / oneDNN and XLA's Eigen pool; they must be set before
    the framework is imported, so the parent also puts them in the child's environment.
    """
    if framework == "torch":
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set once in this process
            pass
    elif framework == "tf":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TF already initialised (a cold-start run): TF_NUM_*_THREADS set it
            pass


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a child: thread counts and quiet logs, set before any framework import."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "JAX_PLATFORMS": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: Linux's VmHWM (the high-water mark of this
    process image, reset by exec). Not ``ru_maxrss``: a child started by fork + exec reports its
    parent's peak there when that is larger (measured: a 813 MiB parent's fresh ``python -c``
    child read 813), which floored every benchmark cell at the harness's own peak. ``ru_maxrss``
    (KiB) only where /proc is missing."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Timing:
    """Per-call wall times of the timed runs (seconds), after warm-up."""

    first_call_s: float
    warmup_calls: int
    times: list[float]
    cpu_times: list[float]  # process CPU seconds per call (all threads): a load-independent cross-check

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def time_calls(call: Callable[[], Any], *, min_runs: int, min_time_s: float, max_runs: int,
               max_time_s: float, warmup_calls: int = 2) -> Timing:
    """Warm up (the first call compiles / traces / prepacks), then time calls until both
    ``min_runs`` and ``min_time_s`` are reached, stopping at ``max_runs`` or ``max_time_s``.

    ``call`` must return only once the result is computed on the host (numpy logits).
    """
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    for _ in range(warmup_calls - 1):
        call()
    times: list[float] = []
    cpu_times: list[float] = []
    began = time.perf_counter()
    while True:
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        spent = time.perf_counter() - began
        if len(times) >= max_runs or (spent >= max_time_s and len(times) >= 3):
            break
        if len(times) >= min_runs and spent >= min_time_s:
            break
    return Timing(first_call_s=first, warmup_calls=warmup_calls, times=times, cpu_times=cpu_times)


def emit(result: dict[str, Any]) -> None:
    """Hand the child's result to the parent: one JSON line prefixed so log noise can't confuse it."""
    sys.stdout.write("BENCH_RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def parse_emitted(stdout: str) -> dict[str, Any] | None:
    """The result line a child printed with :func:`emit`, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    return None


def versions(modules: list[str]) -> dict[str, str]:
    """__version__ of the named modules that are importable in this process."""
    out: dict[str, str] = {}
    for name in modules:
        module = sys.modules.get(name)
        if module is not None:
            out[name] = str(getattr(module, "__version__", "?"))
    return out


def cpu_name() -> str:
    """The CPU model line of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def load_average() -> tuple[float, float, float]:
    """os.getloadavg(): other processes on the machine make timings noisy; recorded with each run."""
    return os.getloadavg()


def cpu_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat; None off Linux."""
    try:
        fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds used so far by this process's finished children (ru_utime + ru_stime)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def foreign_load(seconds: float = 1.0) -> float | None:
    """Cores kept busy by other processes over the next ``seconds`` (this process sleeps)."""
    before = cpu_busy_seconds()
    if before is None:
        return None
    time.sleep(seconds)
    after = cpu_busy_seconds()
    return None if after is None else (after - before) / seconds

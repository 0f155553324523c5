"""This machine's GEMM throughput per framework: the ceilings that model FLOP utilisation uses.

    python -m benchmarks.gemm torch|tf|xla [--quick]

Runs in a fresh child (one framework per process), prints a ``BENCH_RESULT`` line with GFLOP/s
for each (method, dtype, shape). Shapes are ViT's own: the MLP GEMM of ViT-S/16 and ViT-B/16 at
batch 1, 8 and 32 (ViT-B/16 batch 32: 6304 tokens x 768 -> 3072), plus a square 2048 GEMM; the
best of them is the framework's rate (the MFU denominator), and the rate at each model's own shape
is its GEMM bound (benchmarks.report). Methods:

- torch ``linear``: ``F.linear`` (what nn.Linear runs: MKL sgemm in float32, oneDNN in bf16);
- torch ``mkldnn_prepacked``: ``torch.ops.mkldnn._linear_pointwise`` on a weight reordered once by
  ``torch.ops.mkldnn._reorder_linear_weight`` (oneDNN's blocked layout);
- tf ``matmul``: ``tf.matmul`` inside a ``tf.function``; tf ``xla``: the same with jit_compile;
  tf ``xla_f32_result`` (bfloat16 only): under jit_compile, ``BatchMatMulV3`` with a float32
  result rounded to bfloat16, what vit_tf runs under XLA on bf16 hardware (see xla below);
- xla ``dot``: ``jax.jit(jnp.dot)``; xla ``dot_f32_result`` (bfloat16 only): the same with
  ``preferred_element_type=float32`` and the result rounded to bfloat16, what vit_flax runs: XLA's
  CPU backend widens the operands of a bfloat16-result dot to float32 but feeds the CPU's bf16
  instructions when asked for a float32 result (about twice the rate).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .common import emit, load_average, mlp_gemm_shape, set_threads

SHAPES: list[tuple[int, int, int]] = [mlp_gemm_shape(model, batch) for model in ("S/16", "B/16")
                                      for batch in (1, 8, 32)] + [(2048, 2048, 2048)]
QUICK_SHAPES: list[tuple[int, int, int]] = [(256, 256, 256)]


def rate(call: Callable[[], Any], flops: float, min_time_s: float) -> float:
    """Best-of GFLOP/s over repeated calls after two warm-up calls (best, not median: a ceiling)."""
    call()
    call()
    best = float("inf")
    began = time.perf_counter()
    runs = 0
    while runs < 3 or time.perf_counter() - began < min_time_s:
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return flops / best / 1e9


def torch_rates(shapes: list[tuple[int, int, int]], min_time_s: float) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    out = []
    for m, k, n in shapes:
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            x = torch.randn(m, k).to(dtype)
            w = torch.randn(n, k).to(dtype)
            b = torch.randn(n).to(dtype)
            flops = 2.0 * m * k * n
            with torch.inference_mode():
                out.append(dict(method="linear", dtype=dtype_name, shape=[m, k, n],
                                gflops=rate(lambda: F.linear(x, w, b), flops, min_time_s)))
                if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                    continue  # oneDNN's bf16 GEMM needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: not on AVX2
                packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
                out.append(dict(method="mkldnn_prepacked", dtype=dtype_name, shape=[m, k, n], gflops=rate(
                    lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""), flops, min_time_s)))
    return out


def tf_rates(shapes: list[tuple[int, int, int]], min_time_s: float) -> list[dict[str, Any]]:
    import tensorflow as tf

    out = []
    for m, k, n in shapes:
        for dtype_name, dtype in (("float32", tf.float32), ("bfloat16", tf.bfloat16)):
            x = tf.cast(tf.random.normal((m, k)), dtype)
            w = tf.cast(tf.random.normal((k, n)), dtype)
            flops = 2.0 * m * k * n
            for method, jit in (("matmul", False), ("xla", True)):
                fn = tf.function(lambda a, b: tf.matmul(a, b), jit_compile=jit)
                out.append(dict(method=method, dtype=dtype_name, shape=[m, k, n],
                                gflops=rate(lambda: fn(x, w).numpy(), flops, min_time_s)))
            if dtype_name == "bfloat16":
                wide = tf.function(lambda a, b: tf.cast(tf.raw_ops.BatchMatMulV3(x=a, y=b, Tout=tf.float32), a.dtype),
                                   jit_compile=True)
                out.append(dict(method="xla_f32_result", dtype=dtype_name, shape=[m, k, n],
                                gflops=rate(lambda: wide(x, w).numpy(), flops, min_time_s)))
    return out


def xla_rates(shapes: list[tuple[int, int, int]], min_time_s: float) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    out = []
    dot = jax.jit(jnp.dot)
    dot_f32_result = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    for m, k, n in shapes:
        for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.standard_normal((m, k)), dtype=dtype)
            w = jnp.asarray(rng.standard_normal((k, n)), dtype=dtype)
            flops = 2.0 * m * k * n
            out.append(dict(method="dot", dtype=dtype_name, shape=[m, k, n],
                            gflops=rate(lambda: dot(x, w).block_until_ready(), flops, min_time_s)))
            if dtype_name == "bfloat16":
                out.append(dict(method="dot_f32_result", dtype=dtype_name, shape=[m, k, n],
                                gflops=rate(lambda: dot_f32_result(x, w).block_until_ready(), flops, min_time_s)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gemm")
    parser.add_argument("framework", choices=["torch", "tf", "xla"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--min-time", type=float, default=1.0)
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    min_time = 0.05 if args.quick else args.min_time
    load_before = load_average()
    set_threads({"xla": "flax"}.get(args.framework, args.framework), args.threads)
    measure = {"torch": torch_rates, "tf": tf_rates, "xla": xla_rates}[args.framework]
    try:
        rows = measure(shapes, min_time)
        result: dict[str, Any] = {"kind": "gemm", "framework": args.framework, "rows": rows}
    except Exception as exc:
        result = {"kind": "gemm", "framework": args.framework, "error": f"{type(exc).__name__}: {exc}"}
    result["load_average_before"] = load_before
    result["load_average_after"] = load_average()
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

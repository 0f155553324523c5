"""The matmul bound of one model cell at vitx's own shapes: every product of a forward pass timed alone.

    python -m benchmarks.kernel_bound torch --model S/16 --batch 8 --dtype bfloat16 [--weights 12] [--quick]

benchmarks.gemm's GEMM bound prices all of a model's FLOPs at the rate of its MLP GEMM. The other
products are smaller and slower: the q/k/v and output projections have a quarter of the MLP's
columns, and attention's q.k^T and probs.v are batched products over a 64-wide head dimension.
This prices each product at its own measured time instead, on the rows vitx runs it on (its
sub-batches of 2048 token rows), with the kernels of vit_torch's eager path on this CPU: the
plan's GEMM (oneDNN on a prepacked weight, ``torch.ops.mkldnn._linear_pointwise``, with q, k and
v as one GEMM; ``F.linear`` where the plan says so), attention's products as batched
``torch.matmul`` over (images, heads).

torch only: an eager op is one kernel call, as in the model. TF and XLA products timed alone are
not the model's (XLA picks layouts and fusions for the whole graph: a batched q.k^T alone ran
31-67 GFLOP/s against the model's attention at 100+), so their sums bound nothing.

The sum over the forward pass (patch projection, 4 or 6 projections and 2 attention products per
layer, the classifier) is the time the model would take if everything between the products
(LayerNorm, GELU, softmax, adds, casts, layout copies) were free and each product ran as fast as
it runs alone: ``bound_images_per_s`` is batch / that time, the most any implementation on these
kernels reaches. Each projection cycles through ``--weights`` distinct weights one after another (default 12, one
per layer, as the model's GEMMs meet their weights: not in cache); attention's products run on
one pair of operands (the model's are activations just computed, in cache). Prints a ``BENCH_RESULT`` line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .common import MODEL_SPECS, NUM_CHANNELS, NUM_LABELS, emit, load_average, set_threads
from .gemm import rate

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CHUNK_ROWS = 2048  # vit_torch.layers.INFERENCE_CHUNK_ROWS (not imported: the parent process stays torch-free)


def sub_batches(batch: int, tokens: int, chunked: bool = True) -> list[int]:
    """The images per encoder run vitx uses for ``batch`` (the whole batch when it fits one run or
    the path does not split, ``chunked`` False)."""
    if not chunked or batch == 1 or batch * tokens <= CHUNK_ROWS:
        return [batch]
    images = max(1, CHUNK_ROWS // tokens)
    return [images] * (batch // images) + ([batch % images] if batch % images else [])


def products(model: str, batch: int, chunked: bool = True, fused_qkv: bool = True) -> list[dict[str, Any]]:
    """Every product of one forward pass: name, kind ("linear" (rows, in, out) or "batched"
    (batch, m, k, n)), shape and how many times it runs (q, k and v as one GEMM, or three)."""
    s = MODEL_SPECS[model]
    d, m, p, layers, heads = (s["hidden_size"], s["intermediate_size"], s["patch_size"], s["num_hidden_layers"],
                              s["num_attention_heads"])
    patches = (s["image_size"] // p) ** 2
    tokens = patches + 1
    out = [dict(name="patch projection", kind="linear", shape=[batch * patches, NUM_CHANNELS * p * p, d], count=1)]
    runs: dict[int, int] = {}
    for images in sub_batches(batch, tokens, chunked):
        runs[images] = runs.get(images, 0) + 1
    for images, count in runs.items():
        rows, n = images * tokens, count * layers
        if fused_qkv:
            out.append(dict(name="q/k/v projection (fused)", kind="linear", shape=[rows, d, 3 * d], count=n))
        else:
            out.append(dict(name="q/k/v projections", kind="linear", shape=[rows, d, d], count=3 * n))
        out += [
            dict(name="attention q.k^T", kind="batched", shape=[images * heads, tokens, d // heads, tokens], count=n),
            dict(name="attention probs.v", kind="batched", shape=[images * heads, tokens, tokens, d // heads], count=n),
            dict(name="output projection", kind="linear", shape=[rows, d, d], count=n),
            dict(name="MLP in", kind="linear", shape=[rows, d, m], count=n),
            dict(name="MLP out", kind="linear", shape=[rows, m, d], count=n),
        ]
    out.append(dict(name="classifier", kind="linear", shape=[batch, d, NUM_LABELS], count=1))
    return out


def flops(product: dict[str, Any]) -> float:
    shape = product["shape"]
    return 2.0 * float(np.prod(shape))


Timer = Callable[[dict[str, Any], float, int], float]  # (product, min_time_s, weights) -> seconds per call


def best_seconds(call: Callable[[], Any], runs_per_call: int, min_time_s: float) -> float:
    """The best time of one of ``runs_per_call`` products that ``call`` runs in a row."""
    return 1.0 / rate(call, 1e9, min_time_s) / runs_per_call


def torch_timer(dtype_name: str) -> tuple[Any, Timer]:
    """(this CPU's path plan, timer) for vit_torch's eager path, with the plan's GEMM (oneDNN
    prepacked, in float32 on bfloat16 values where the plan says so, or ``F.linear``)."""
    import torch
    import torch.nn.functional as F

    from vit_core import cpu

    plan = cpu.current_plan("torch", dtype_name)
    dtype = torch.float32 if plan.gemm == "onednn_prepacked_float32" else getattr(torch, dtype_name)

    def seconds(product: dict[str, Any], min_time_s: float, weights: int) -> float:
        shape = product["shape"]
        with torch.inference_mode():
            if product["kind"] == "linear":
                rows, k, n = shape
                x, b = torch.randn(rows, k).to(dtype), torch.randn(n).to(dtype)
                ws = [torch.randn(n, k).to(dtype) for _ in range(weights)]
                if plan.gemm.startswith("onednn"):
                    packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in ws]
                    call = lambda: [torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "") for w in packed]  # noqa: E731
                else:
                    call = lambda: [F.linear(x, w, b) for w in ws]  # noqa: E731
                return best_seconds(call, weights, min_time_s)
            batch, m, k, n = shape
            a, b2 = torch.randn(batch, m, k).to(dtype), torch.randn(batch, k, n).to(dtype)
            return best_seconds(lambda: torch.matmul(a, b2), 1, min_time_s)

    return plan, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_bound")
    parser.add_argument("framework", choices=["torch"])
    parser.add_argument("--model", default="S/16", choices=sorted(MODEL_SPECS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per product")
    parser.add_argument("--weights", type=int, default=12,
                        help="distinct weights each projection cycles through, one after another (the model's "
                             "layers each have their own, so none is in cache when its GEMM starts; 1: one weight, hot)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 0.01 s per product")
    args = parser.parse_args(argv)
    min_time = 0.01 if args.quick else args.min_time
    load_before = load_average()
    set_threads(args.framework, args.threads)
    from vit_core import cpu

    plan, seconds = torch_timer(args.dtype)
    rows = []
    for product in products(args.model, args.batch, plan.sub_batches, plan.fused_qkv):
        took = seconds(product, min_time, args.weights)
        rows.append(dict(product, seconds=took, gflops=flops(product) / took / 1e9))
    total = sum(r["seconds"] * r["count"] for r in rows)
    emit({"kind": "kernel_bound", "framework": args.framework, "model": args.model, "batch": args.batch,
          "dtype": args.dtype, "weights": args.weights, "plan": plan.as_dict(), "host": cpu.cpu_features().describe(),
          "cpu_features": cpu.cpu_features().summary(), "rows": rows,
          "seconds_per_batch": total, "bound_images_per_s": args.batch / total,
          "load_average_before": load_before, "load_average_after": load_average()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

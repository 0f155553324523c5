"""vit_torch speed: the attention formulations alone, or the whole model with each speed path of the plan switched.

    python -m benchmarks.torch_speed --attention [--variant B/16] [--batch 8] [--dtype bfloat16]
    python -m benchmarks.torch_speed --paths [--variant S/16] [--batch 8] [--dtype bfloat16] [--rounds 10]

Milliseconds per call (median of ``--iters`` after warm-up, autograd off, 2 threads by default):
vit_torch's ``fused_attention`` (what the sdpa implementation runs: in bfloat16 CPU inference the
eager formula one image at a time), ``F.scaled_dot_product_attention`` (torch's CPU flash kernel),
and ``eager_attention`` on the whole batch. The whole-model numbers are ``make bench``'s.

``--paths`` is the A/B of vit_core.cpu's plan on this CPU (docs/performance.md): the seeded
classifier in eval mode under ``torch.inference_mode()``, once with the plan as chosen and once
with each of its switches flipped (q / k / v as one GEMM, the GEMM epilogues, the other bfloat16
attention kernel), alternating in one process, the minimum over ``--rounds``: images/s and the
ratio to the plan as chosen. What an AMX host should run before trusting the AMX row of the table.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> dict[str, float | int | str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--attention", action="store_true", help="time the attention formulations")
    mode.add_argument("--paths", action="store_true", help="A/B the whole model with each plan switch flipped")
    parser.add_argument("--rounds", type=int, default=10, help="--paths: alternating rounds (the minimum is kept)")
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)

    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:  # called in-process (the tests do): give the caller its thread count back, or its later GEMMs round differently
        return _measure(args)
    finally:
        torch.set_num_threads(previous)


def _measure(args: argparse.Namespace) -> dict[str, float | int | str]:
    import torch
    import torch.nn.functional as F

    from vit_core import ViTConfig
    from vit_torch.layers import eager_attention, fused_attention

    config = ViTConfig.from_variant(args.variant, image_size=args.image_size)
    if args.paths:
        return _paths(args, config)
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    shape = (args.batch, heads, config.num_patches + 1, head_dim)
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    q, k, v = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    scaling = head_dim**-0.5
    paths = {
        "fused_attention": lambda: fused_attention(q, k, v, scaling, 0.0),
        "scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(q, k, v, scale=scaling),
        "eager_attention_whole_batch": lambda: eager_attention(q, k, v, scaling, None, 0.0),
    }
    result: dict[str, float | int | str] = {"variant": args.variant, "batch": args.batch, "dtype": args.dtype}
    with torch.inference_mode():
        for name, fn in paths.items():
            for _ in range(3):
                fn()
            times = []
            for _ in range(args.iters):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            result[f"{name}_ms"] = round(sorted(times)[len(times) // 2] * 1e3, 3)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>34}: {v}" for k, v in result.items()))
    return result


def _paths(args: argparse.Namespace, config: object) -> dict[str, float | int | str]:
    import dataclasses

    import torch

    from vit_core import cpu
    from vit_torch import ViTForImageClassification
    from vit_torch import layers

    dtype = getattr(torch, args.dtype)
    plan = cpu.current_plan("torch", args.dtype)
    other_attention = "sdpa" if plan.attention == "matmul_per_image" else "matmul_per_image"
    variants = {"plan": {}, "fused_qkv off": {"fused_qkv": False}, "gemm_epilogues off": {"gemm_epilogues": False}}
    if args.dtype == "bfloat16":
        variants[f"attention={other_attention}"] = {"attention": other_attention}
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval().to(dtype)
    pixels = torch.randn((args.batch, config.num_channels, args.image_size, args.image_size),
                         generator=torch.Generator().manual_seed(0)).to(dtype)
    real = layers.speed_plan
    best = {name: float("inf") for name in variants}
    logits: dict[str, torch.Tensor] = {}
    try:
        with torch.inference_mode():
            for timed in [False] + [True] * args.rounds:  # an untimed round first: prepacking, first calls
                for name, changes in variants.items():
                    layers.speed_plan = (lambda d, c=changes: None if real(d) is None else dataclasses.replace(real(d), **c))
                    start = time.perf_counter()
                    logits[name] = model(pixels).logits.float()
                    if timed:
                        best[name] = min(best[name], time.perf_counter() - start)
    finally:
        layers.speed_plan = real
    result: dict[str, float | int | str] = {"variant": args.variant, "batch": args.batch, "dtype": args.dtype,
                                            "isa": plan.isa, "rounds": args.rounds}
    for name in variants:
        result[f"{name}_images_per_s"] = round(args.batch / best[name], 3)
        result[f"{name}_vs_plan"] = round(best["plan"] / best[name], 3)
        result[f"{name}_max_abs_logit_diff"] = float((logits[name] - logits["plan"]).abs().max())
    print(json.dumps(result) if args.json else "\n".join(f"{k:>44}: {v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()

"""vit_torch attention speed: the formulations of the attention block alone, at a variant's shapes.

    python -m benchmarks.torch_speed --attention [--variant B/16] [--batch 8] [--dtype bfloat16]

Milliseconds per call (median of ``--iters`` after warm-up, autograd off, 2 threads by default):
vit_torch's ``fused_attention`` (what the sdpa implementation runs: in bfloat16 CPU inference the
eager formula one image at a time), ``F.scaled_dot_product_attention`` (torch's CPU flash kernel),
and ``eager_attention`` on the whole batch. The whole-model numbers are ``make bench``'s.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> dict[str, float | int | str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attention", action="store_true", required=True,
                        help="time the attention formulations (the only mode)")
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from vit_core import ViTConfig
    from vit_torch.layers import eager_attention, fused_attention

    torch.set_num_threads(args.threads)
    config = ViTConfig.from_variant(args.variant, image_size=args.image_size)
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


if __name__ == "__main__":
    main()

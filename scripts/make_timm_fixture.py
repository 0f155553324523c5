"""Make the timm and npz test fixtures once, with the real timm as the oracle. CI only reads them.

Writes (all small, seeded, deterministic):

tests/fixtures/timm/
  vit_tiny/                       timm.create_model + timm's own save_for_hf: model.safetensors (a timm
                                  state dict, fused qkv; 2 blocks, D=32, 4 heads) + timm's config.json
  vit_tiny_no_embed_class/        the same with no_embed_class=True (no CLS position row)
  outputs.npz                     pixel_values and timm's forward of both models: hidden states
                                  (embeddings + each block), forward_features (final norm), logits
  variants.json                   key -> shape of the timm variants vitx refuses (registers,
                                  LayerScale, qk-norm, fc_norm/avg, norm_pre, MAP, no class token)
tests/fixtures/npz/
  jax.npz                         original Google JAX layout (pre-Linen numbering), built from
                                  docs/FORMATS.md section 6 (not from vitx's converter)
  jax_in21k.npz                   same backbone + pre_logits + an all-zero in21k-style head
  big_vision.npz                  big_vision layout: params/ prefix, scanned blocks, no CLS row
  outputs.npz                     timm's forward after timm's own npz loader (_load_weights) read
                                  jax.npz / jax_in21k.npz / big_vision.npz into timm models

Run it with a Python that has torch and timm. timm imports torchvision, which this project never
installs; the script puts an empty stand-in module for torchvision on sys.meta_path (nothing of
torchvision is used by VisionTransformer). Used here:

    python -m venv /tmp/timmenv && /tmp/timmenv/bin/pip install --no-deps timm
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/timmenv/lib/python3.11/site-packages/vitx.pth
    /tmp/timmenv/bin/python scripts/make_timm_fixture.py
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import pathlib
import sys
import types
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMM_DIR = ROOT / "tests" / "fixtures" / "timm"
NPZ_DIR = ROOT / "tests" / "fixtures" / "npz"

# The tiny model every fixture uses (the same as tests/cases.py's TINY, with an MLP of 64 for npz).
D, DEPTH, HEADS, PATCH, IMAGE, LABELS = 32, 2, 4, 8, 32, 5
HD = D // HEADS
TIMM_MLP = 37     # timm: int(32 * 37/32) = 37, an MLP size that is not a multiple of D
NPZ_MLP = 64
GRID = IMAGE // PATCH
N = GRID * GRID


def install_torchvision_stand_in() -> None:
    """timm imports names from torchvision at import time; VisionTransformer uses none of them."""

    class _Module(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            # timm probes `from torchvision.transforms.functional import InterpolationMode` and falls
            # back when it is missing; every other name becomes an inert class.
            if name.startswith("__") or name == "InterpolationMode":
                raise AttributeError(name)
            return type(name, (), {"__init__": lambda self, *a, **k: None})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec: Any) -> types.ModuleType:
            return _Module(spec.name)

        def exec_module(self, module: types.ModuleType) -> None:
            module.__path__ = []  # type: ignore[attr-defined]

    sys.meta_path.insert(0, _Finder())


def seeded_like(shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    """Values large enough that every term matters (as tests/cases.py make_state)."""
    if kind == "norm":
        value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif kind == "bias":
        value = 0.05 * rng.standard_normal(shape)
    elif kind == "embedding":
        value = 0.5 * rng.standard_normal(shape)
    else:  # a kernel: 1/sqrt(fan_in)
        value = rng.standard_normal(shape) / np.sqrt(shape[0] if kind == "kernel_in_first" else np.prod(shape[1:]))
    return value.astype(np.float32)


def record_forward(model: Any, pixel_values: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    """hidden_states[0] = input of block 0 (embeddings), hidden_states[i + 1] = output of block i,
    features = forward_features (after the final norm), logits = forward_head."""
    import torch

    hidden: list[np.ndarray] = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, args: hidden.append(args[0].detach().numpy().copy()))]
    for block in model.blocks:
        hooks.append(block.register_forward_hook(lambda m, args, output: hidden.append(output.detach().numpy().copy())))
    with torch.no_grad():
        features = model.forward_features(pixel_values)
        logits = model.forward_head(features)
    for h in hooks:
        h.remove()
    for i, h in enumerate(hidden):
        out[f"{prefix}/hidden_states_{i}"] = h
    out[f"{prefix}/last_hidden_state"] = features.numpy()
    out[f"{prefix}/logits"] = logits.numpy()


def timm_state_dict_fixtures(torch: Any, timm: Any, pixel_values: Any) -> None:
    from timm.models._hub import save_for_hf
    from timm.models.vision_transformer import VisionTransformer

    outputs: dict[str, np.ndarray] = {"pixel_values": pixel_values.numpy()}
    for name, kwargs in (("vit_tiny", {}), ("vit_tiny_no_embed_class", {"no_embed_class": True})):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, patch_size=PATCH,
                                  embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=TIMM_MLP / D,
                                  num_classes=LABELS, **kwargs).eval()
        rng = np.random.default_rng(0)
        state = {}
        for key, tensor in model.state_dict().items():
            shape = tuple(tensor.shape)
            kind = ("norm" if ("norm" in key and key.endswith("weight")) else "bias" if key.endswith("bias")
                    else "embedding" if key in ("cls_token", "pos_embed") else "kernel")
            state[key] = seeded_like(shape, kind, rng)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        assert model.blocks[0].mlp.fc1.weight.shape[0] == TIMM_MLP
        save_for_hf(model, str(TIMM_DIR / name), safe_serialization=True)
        record_forward(model, pixel_values, name, outputs)
    np.savez(TIMM_DIR / "outputs.npz", **outputs)

    variants = {
        "register tokens": dict(reg_tokens=2),
        "LayerScale": dict(init_values=1e-5),
        "qk-norm": dict(qk_norm=True),
        "fc_norm": dict(global_pool="avg"),
        "norm_pre": dict(pre_norm=True),
        "MAP pooling": dict(global_pool="map"),
        "no class token": dict(class_token=False, global_pool="avg", fc_norm=False),
    }
    shapes = {}
    for feature, kwargs in variants.items():
        model = VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                  mlp_ratio=2.0, num_classes=LABELS, **kwargs)
        shapes[feature] = {k: list(v.shape) for k, v in model.state_dict().items()}
    (TIMM_DIR / "variants.json").write_text(json.dumps(shapes, indent=1) + "\n")


def jax_arrays(rng: np.random.Generator, block_names: tuple[str, str, str, str]) -> dict[str, np.ndarray]:
    """An original-JAX-layout ViT, straight from docs/FORMATS.md section 6 (no prefix)."""
    ln0, mha, ln1, mlp = block_names
    a: dict[str, np.ndarray] = {
        "embedding/kernel": (rng.standard_normal((PATCH, PATCH, 3, D)) / np.sqrt(PATCH * PATCH * 3)),
        "embedding/bias": 0.05 * rng.standard_normal(D),
        "cls": 0.5 * rng.standard_normal((1, 1, D)),
        "Transformer/posembed_input/pos_embedding": 0.5 * rng.standard_normal((1, N + 1, D)),
        "Transformer/encoder_norm/scale": 1 + 0.1 * rng.standard_normal(D),
        "Transformer/encoder_norm/bias": 0.05 * rng.standard_normal(D),
        "head/kernel": rng.standard_normal((D, LABELS)) / np.sqrt(D),
        "head/bias": 0.05 * rng.standard_normal(LABELS),
    }
    for i in range(DEPTH):
        b = f"Transformer/encoderblock_{i}"
        a[f"{b}/{ln0}/scale"] = 1 + 0.1 * rng.standard_normal(D)
        a[f"{b}/{ln0}/bias"] = 0.05 * rng.standard_normal(D)
        for name in ("query", "key", "value"):
            a[f"{b}/{mha}/{name}/kernel"] = rng.standard_normal((D, HEADS, HD)) / np.sqrt(D)
            a[f"{b}/{mha}/{name}/bias"] = 0.05 * rng.standard_normal((HEADS, HD))
        a[f"{b}/{mha}/out/kernel"] = rng.standard_normal((HEADS, HD, D)) / np.sqrt(D)
        a[f"{b}/{mha}/out/bias"] = 0.05 * rng.standard_normal(D)
        a[f"{b}/{ln1}/scale"] = 1 + 0.1 * rng.standard_normal(D)
        a[f"{b}/{ln1}/bias"] = 0.05 * rng.standard_normal(D)
        a[f"{b}/{mlp}/Dense_0/kernel"] = rng.standard_normal((D, NPZ_MLP)) / np.sqrt(D)
        a[f"{b}/{mlp}/Dense_0/bias"] = 0.05 * rng.standard_normal(NPZ_MLP)
        a[f"{b}/{mlp}/Dense_1/kernel"] = rng.standard_normal((NPZ_MLP, D)) / np.sqrt(NPZ_MLP)
        a[f"{b}/{mlp}/Dense_1/bias"] = 0.05 * rng.standard_normal(D)
    return {k: np.asarray(v, dtype=np.float32) for k, v in a.items()}


def npz_fixtures(torch: Any, timm: Any, pixel_values: Any) -> None:
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    outputs: dict[str, np.ndarray] = {"pixel_values": pixel_values.numpy()}

    def oracle(path: pathlib.Path, name: str, **kwargs: Any) -> None:
        # The JAX and big_vision ViTs use the tanh GELU and LayerNorm eps 1e-6 (timm's default eps).
        model = VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                  mlp_ratio=NPZ_MLP / D, num_classes=LABELS, act_layer="gelu_tanh", **kwargs).eval()
        with torch.no_grad():
            _load_weights(model, str(path))
        record_forward(model, pixel_values, name, outputs)

    # Original JAX, pre-Linen numbering (the published ViT-B_16.npz layout).
    arrays = jax_arrays(np.random.default_rng(10), ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                                                    "MlpBlock_3"))
    np.savez(NPZ_DIR / "jax.npz", **arrays)
    oracle(NPZ_DIR / "jax.npz", "jax")

    # in21k style: pre_logits (Dense D -> D, tanh in the JAX model) and an all-zero head of 7 labels.
    rng = np.random.default_rng(11)
    in21k = dict(arrays)
    in21k["pre_logits/kernel"] = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    in21k["pre_logits/bias"] = (0.05 * rng.standard_normal(D)).astype(np.float32)
    in21k["head/kernel"] = np.zeros((D, 7), np.float32)
    in21k["head/bias"] = np.zeros(7, np.float32)
    np.savez(NPZ_DIR / "jax_in21k.npz", **in21k)
    # timm drops the representation layer; its forward_features (the backbone) is the oracle.
    oracle(NPZ_DIR / "jax_in21k.npz", "jax_in21k")

    # big_vision: params/ prefix, Linen numbering, scanned blocks, (1, N, D) position table without CLS row.
    linen = jax_arrays(np.random.default_rng(12), ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                                                   "MlpBlock_0"))
    bv: dict[str, np.ndarray] = {}
    for key, value in linen.items():
        if key == "Transformer/posembed_input/pos_embedding":
            bv["params/pos_embedding"] = value[:, 1:]
        elif key.startswith("Transformer/encoderblock_"):
            continue
        else:
            bv[f"params/{key}"] = value
    for rest in sorted({k.split("/", 2)[2] for k in linen if k.startswith("Transformer/encoderblock_")}):
        bv[f"params/Transformer/encoderblock/{rest}"] = np.stack(
            [linen[f"Transformer/encoderblock_{i}/{rest}"] for i in range(DEPTH)])
    np.savez(NPZ_DIR / "big_vision.npz", **bv)
    # big_vision adds position embeddings to the patches only, then concatenates CLS: timm's
    # no_embed_class=True is that order.
    oracle(NPZ_DIR / "big_vision.npz", "big_vision", no_embed_class=True)
    np.savez(NPZ_DIR / "outputs.npz", **outputs)


def main() -> None:
    install_torchvision_stand_in()
    import timm
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    TIMM_DIR.mkdir(parents=True, exist_ok=True)
    NPZ_DIR.mkdir(parents=True, exist_ok=True)
    pixel_values = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, IMAGE, IMAGE)).astype(np.float32))
    timm_state_dict_fixtures(torch, timm, pixel_values)
    npz_fixtures(torch, timm, pixel_values)
    (TIMM_DIR / "VERSION").write_text(f"timm {timm.__version__}, torch {torch.__version__}\n")
    for path in sorted(list(TIMM_DIR.iterdir()) + list(NPZ_DIR.iterdir())):
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()

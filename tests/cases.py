"""The one table of model cases, crossed with every framework (STYLE.md "Tests").

A case is a config, a model class, an input and the forward options. ``make_state`` and
``make_inputs`` build seeded canonical weights and inputs as numpy, so every framework, the
float64 reference and transformers see exactly the same numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vit_core import ViTConfig, cpu
from vit_core.weights import weight_table

TINY: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                            image_size=32, patch_size=8, encoder_stride=8, num_labels=5)


@dataclass(frozen=True)
class Case:
    name: str
    task: str = "base"                      # base | classification | mim
    config: dict[str, Any] = field(default_factory=dict)  # overrides of TINY
    batch: int = 3
    image_hw: tuple[int, int] | None = None  # None: the config's image size
    interpolate_pos_encoding: bool = False
    add_pooling_layer: bool = True
    use_mask_token: bool = False
    bool_masked_pos: bool = False
    head_mask: str | None = None             # None | "1d" | "2d"
    labels: str | None = None                # None | "int" | "float" | "regression"

    @property
    def vit_config(self) -> ViTConfig:
        fields = dict(TINY)
        fields.update(self.config)
        return ViTConfig(**fields)

    @property
    def table_kwargs(self) -> dict[str, bool]:
        if self.task == "base":
            return {"add_pooling_layer": self.add_pooling_layer, "use_mask_token": self.use_mask_token}
        return {}


CASES: list[Case] = [
    Case("tiny"),
    Case("tiny-batch1", batch=1),
    Case("non-square", config=dict(image_size=(32, 48), patch_size=8)),
    Case("non-square-patch", config=dict(image_size=(24, 32), patch_size=(4, 8), encoder_stride=8)),
    Case("qkv-bias-off", config=dict(qkv_bias=False)),
    Case("gelu-tanh", config=dict(hidden_act="gelu_new")),
    Case("gelu-pytorch-tanh-eps1e-6", config=dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)),
    Case("quick-gelu", config=dict(hidden_act="quick_gelu")),
    Case("no-pooler", add_pooling_layer=False),
    Case("pooler-size-relu", config=dict(pooler_output_size=24, pooler_act="relu")),
    Case("mask-token", use_mask_token=True, bool_masked_pos=True),
    Case("head-mask-1d", head_mask="1d"),
    Case("head-mask-2d", head_mask="2d", batch=1),
    Case("interp-up", image_hw=(48, 56), interpolate_pos_encoding=True),
    Case("interp-down", image_hw=(16, 24), interpolate_pos_encoding=True, batch=1),
    Case("interp-same", interpolate_pos_encoding=True),
    Case("cls", task="classification"),
    Case("cls-single-label", task="classification", labels="int"),
    Case("cls-multi-label", task="classification", labels="float"),
    Case("cls-regression", task="classification", labels="regression", config=dict(num_labels=1)),
    Case("cls-problem-type-set", task="classification", labels="float",
         config=dict(problem_type="multi_label_classification")),
    Case("cls-interp-head-mask", task="classification", image_hw=(40, 40), interpolate_pos_encoding=True, head_mask="2d"),
    Case("mim", task="mim"),
    Case("mim-masked", task="mim", bool_masked_pos=True),
    Case("mim-masked-interp", task="mim", bool_masked_pos=True, image_hw=(40, 48), interpolate_pos_encoding=True, batch=1),
]


def make_state(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded canonical float32 weights, larger than a fresh init so every term matters."""
    return seeded_state(case.vit_config, case.task, seed, **case.table_kwargs)


def seeded_state(config: ViTConfig, task: str, seed: int = 0, **table_kwargs: Any) -> dict[str, np.ndarray]:
    """Seeded canonical float32 weights of any config: 1/sqrt(fan_in) matrices (activations with a
    trained model's spread), LayerNorm scales near 1, small non-zero biases."""
    rng = np.random.default_rng(seed)
    state = {}
    for spec in weight_table(config, task, **table_kwargs):
        if spec.kind == "norm":
            value = 1.0 + 0.1 * rng.standard_normal(spec.shape)
        elif spec.kind == "bias":
            value = 0.05 * rng.standard_normal(spec.shape)
        else:
            fan_in = int(np.prod(spec.shape[1:])) if spec.kind in ("linear", "conv") else 1
            scale = 1.0 / np.sqrt(fan_in) if spec.kind in ("linear", "conv") else 0.5
            value = scale * rng.standard_normal(spec.shape)
        state[spec.name] = value.astype(np.float32)
    return state


def init_state(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Checkpoint-scale float32 weights of the case, drawn as a fresh model initialises them
    (the table's init: truncated normal with std initializer_range cut at +-2 std, zeros, ones),
    in numpy so every framework gets the same numbers. Hidden states stay |h| <~ 1, where
    reduced-precision comparisons mean what they do on a real checkpoint."""
    config = case.vit_config
    rng = np.random.default_rng(seed)
    state = {}
    for spec in weight_table(config, case.task, **case.table_kwargs):
        if spec.init == "zeros":
            value = np.zeros(spec.shape)
        elif spec.init == "ones":
            value = np.ones(spec.shape)
        else:
            value = rng.standard_normal(spec.shape)
            while (outside := np.abs(value) > 2).any():
                value[outside] = rng.standard_normal(int(outside.sum()))
            value *= config.initializer_range
        state[spec.name] = value.astype(np.float32)
    return state


def make_inputs(case: Case, seed: int = 1) -> dict[str, Any]:
    """pixel_values (batch, C, H, W) float32 and, as the case asks, bool_masked_pos, head_mask, labels."""
    rng = np.random.default_rng(seed)
    config = case.vit_config
    h, w = case.image_hw or config.image_hw
    ph, pw = config.patch_hw
    inputs: dict[str, Any] = {
        "pixel_values": rng.standard_normal((case.batch, config.num_channels, h, w)).astype(np.float32)
    }
    if case.bool_masked_pos:
        inputs["bool_masked_pos"] = rng.random((case.batch, (h // ph) * (w // pw))) < 0.4
    if case.head_mask == "1d":
        inputs["head_mask"] = np.array([1.0, 0.0, 0.5, 1.0], dtype=np.float32)[: config.num_attention_heads]
    elif case.head_mask == "2d":
        inputs["head_mask"] = rng.random((config.num_hidden_layers, config.num_attention_heads)).astype(np.float32)
    if case.labels == "int":
        inputs["labels"] = rng.integers(0, config.num_labels, size=(case.batch,)).astype(np.int64)
    elif case.labels == "float":
        inputs["labels"] = (rng.random((case.batch, config.num_labels)) < 0.5).astype(np.float32)
    elif case.labels == "regression":
        inputs["labels"] = rng.standard_normal((case.batch,)).astype(np.float32)
    return inputs


def forward_options(case: Case) -> dict[str, bool]:
    """The flags every framework's forward gets in the case table."""
    return {"output_hidden_states": True, "output_attentions": True,
            "interpolate_pos_encoding": case.interpolate_pos_encoding}


def max_diffs(expected: dict[str, Any], actual: Any, *, what: str) -> dict[str, float]:
    """max |diff| of every output, hidden state and attention map; names each entry."""
    diffs: dict[str, float] = {}
    for key in ("last_hidden_state", "pooler_output", "logits", "reconstruction", "loss"):
        ref = expected.get(key)
        got = actual.get(key) if hasattr(actual, "get") else getattr(actual, key, None)
        if ref is None:
            assert got is None, f"{what}: {key} should be None"
            continue
        assert got is not None, f"{what}: {key} missing"
        got = np.asarray(got, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        assert got.shape == ref.shape, f"{what}: {key} shape {got.shape} != {ref.shape}"
        diffs[key] = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    for key in ("hidden_states", "attentions"):
        ref_list = expected.get(key)
        got_list = actual.get(key) if hasattr(actual, "get") else getattr(actual, key, None)
        if ref_list is None:
            continue
        assert got_list is not None and len(got_list) == len(ref_list), f"{what}: {key} count differs"
        for i, (ref, got) in enumerate(zip(ref_list, got_list)):
            got = np.asarray(got, dtype=np.float64)
            assert got.shape == np.shape(ref), f"{what}: {key}[{i}] shape {got.shape} != {np.shape(ref)}"
            diffs[f"{key}[{i}]"] = float(np.max(np.abs(got - ref)))
    return diffs


def assert_close(diffs: dict[str, float], bound: float, *, what: str) -> None:
    """Fail naming the first entry (in layer order) over the bound and its max |diff|."""
    for name, value in diffs.items():
        if not value <= bound:
            raise AssertionError(f"{what}: {name} differs by {value:.3e} > {bound:.0e} (all: {diffs})")



def _reference_forward(case: Case) -> dict[str, Any]:
    from vit_core.reference import forward

    inputs = make_inputs(case)
    extra = {k: v for k, v in inputs.items() if k != "pixel_values"}
    return forward(make_state(case), case.vit_config, inputs["pixel_values"], case.task,
                   interpolate_pos_encoding=case.interpolate_pos_encoding, add_pooling_layer=case.add_pooling_layer,
                   **extra)


@functools.lru_cache(maxsize=None)
def _table_reference(name: str) -> dict[str, Any]:
    return _reference_forward(next(c for c in CASES if c.name == name))


def reference(case: Case) -> dict[str, Any]:
    """The float64 numpy reference outputs of a case (once per process for the cases of CASES)."""
    if any(c == case for c in CASES):
        return _table_reference(case.name)
    return _reference_forward(case)


def force_cpu_level(monkeypatch: Any, level: str) -> None:
    """Make vit_core.cpu plan for ISA ``level`` (``VITX_CPU_FEATURES``), without its emulated-bf16 warnings."""
    monkeypatch.setenv(cpu.ENV_VAR, level)
    monkeypatch.setattr(cpu, "_WARNED", {(f, i) for f in cpu.FRAMEWORKS for i in cpu.ISA_LEVELS})

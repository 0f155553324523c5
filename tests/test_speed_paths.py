"""The inference fast paths of issue #6 really run, and keep parity (docs/NUMERICS.md bounds).

vit_torch: in eval mode with autograd off, every Linear multiplies by a oneDNN-prepacked weight
(torch.ops.mkldnn._linear_pointwise), the MLP's GELU and its residual add ride in the GEMM, the
patch convolution is one prepacked matmul, and a large CPU batch runs through the encoder in
sub-batches. tests/test_models.py runs the whole case table (torch backend)
under torch.no_grad (so through these paths) against the float64 reference; here: that the paths
are taken, that they equal the plain path, that the packed-weight cache follows weight changes,
and that training / autograd never use them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.cases import CASES, make_inputs, make_state  # noqa: E402
from vit_core import ViTConfig  # noqa: E402
from vit_core.reference import forward as reference_forward  # noqa: E402
from vit_torch import ViTForImageClassification, ViTModel  # noqa: E402
from vit_torch import layers as torch_layers  # noqa: E402
from vit_torch import modeling as torch_modeling  # noqa: E402

ONEDNN = torch.backends.mkldnn.is_available()
pytestmark = pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")
CASE = next(c for c in CASES if c.name == "cls")
BF16_ONEDNN = ONEDNN and torch_layers._onednn_runs(torch.bfloat16)


@pytest.fixture(autouse=True)
def _avx512_bf16_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check the paths vit_core.cpu picks for an avx512_bf16 CPU (the project machine's),
    whatever CPU runs them; tests/test_cpu_paths.py covers the other ISA levels."""
    monkeypatch.setenv("VITX_CPU_FEATURES", "avx512_bf16")


def classifier(case=CASE, dtype=torch.float32) -> Any:
    state = make_state(case)
    model = ViTForImageClassification(case.vit_config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return model.to(dtype).eval(), state


def op_counts(fn: Any) -> dict[str, int]:
    """How many times each aten / mkldnn op ran inside ``fn`` (torch profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


def test_inference_uses_prepacked_onednn_linear_with_fused_gelu() -> None:
    model, _ = classifier()
    layers_n = CASE.vit_config.num_hidden_layers
    x = torch.from_numpy(make_inputs(CASE)["pixel_values"])
    with torch.inference_mode():
        counts = op_counts(lambda: model(x))
    # per layer q, k, v as one GEMM, attention output (+ residual), MLP in (GELU fused), MLP out
    # (+ residual); + the patch embedding as one matmul and the classifier
    assert counts.get("mkldnn::_linear_pointwise") == 4 * layers_n + 2, counts
    assert "aten::gelu" not in counts and "aten::linear" not in counts and "aten::convolution" not in counts, counts
    assert counts.get("aten::add") == 1, counts  # only the position embeddings: both residuals are fused
    counts = op_counts(lambda: model(x))  # autograd on: the plain path
    assert "mkldnn::_linear_pointwise" not in counts and counts.get("aten::gelu") == layers_n, counts


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("tiny", "gelu-tanh", "gelu-pytorch-tanh-eps1e-6",
                                                                   "quick-gelu", "qkv-bias-off")], ids=lambda c: c.name)
def test_fast_path_matches_reference_and_plain_path(case: Any, grad_mode: str) -> None:
    state = make_state(case)
    model = ViTModel(case.vit_config).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x = torch.from_numpy(make_inputs(case)["pixel_values"])
    context = torch.no_grad if grad_mode == "no_grad" else torch.inference_mode
    with context():
        fast = model(x).last_hidden_state.double().numpy()
    plain = model(x).last_hidden_state.detach().double().numpy()  # autograd on: F.linear path
    expected = reference_forward(state, case.vit_config, make_inputs(case)["pixel_values"])["last_hidden_state"]
    assert np.max(np.abs(fast - expected)) <= 1e-5, f"{case.name}: fast path vs reference {np.max(np.abs(fast - expected)):.2e}"
    assert np.max(np.abs(fast - plain)) <= 1e-5, f"{case.name}: fast vs plain path {np.max(np.abs(fast - plain)):.2e}"


def test_packed_weight_cache_follows_weight_changes() -> None:
    torch.manual_seed(0)
    layer = torch_layers.Linear(16, 8).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        first = layer(x)
        packed = layer.packed_weight()
        assert layer.packed_weight() is packed  # cached
        layer.weight.mul_(2.0)  # in-place edit bumps the version counter
        assert torch.allclose(layer(x), 2.0 * first - layer.bias, atol=1e-5)
        layer.load_state_dict({"weight": torch.zeros(8, 16), "bias": torch.ones(8)})
        assert torch.equal(layer(x), torch.ones(4, 8))
    assert "_packed" not in layer.state_dict() and set(layer.state_dict()) == {"weight", "bias"}


def test_a_model_that_ran_inference_deepcopies_and_pickles() -> None:
    """The prepacked weights (per Linear, the fused q/k/v, the patch projection) are opaque oneDNN
    tensors: copy.deepcopy (EMA copies, quantization) and torch.save(model) leave them behind, and
    the copy packs its own on first use, with the same logits."""
    import copy
    import io

    model, _ = classifier()
    x = torch.from_numpy(make_inputs(CASE)["pixel_values"])
    with torch.inference_mode():
        expected = model(x).logits
    assert any(getattr(m, "_packed", None) is not None for m in model.modules())
    copied = copy.deepcopy(model)
    assert all(getattr(m, "_packed", None) is None and getattr(m, "_qkv_packed", None) is None
               for m in copied.modules())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # our own bytes, written just above
    with torch.inference_mode():
        assert torch.equal(copied(x).logits, expected) and torch.equal(loaded(x).logits, expected)


def test_training_and_autograd_use_plain_linear() -> None:
    layer = torch_layers.Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert not layer.onednn_ready(x)  # training mode
    layer.eval()
    assert not layer.onednn_ready(x)  # autograd on
    out = layer(x)
    out.sum().backward()
    assert layer.weight.grad is not None and layer._packed is None
    with torch.no_grad():
        assert layer.onednn_ready(x)
        assert not layer.onednn_ready(x.double())


def test_large_batch_runs_in_sub_batches_with_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    case = next(c for c in CASES if c.name == "tiny")
    state = make_state(case)
    model = ViTModel(case.vit_config).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    tokens = case.vit_config.num_patches + 1
    monkeypatch.setattr(torch_layers, "INFERENCE_CHUNK_ROWS", 2 * tokens)  # 2 images per sub-batch
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32))
    calls = []
    real_layer_forward = torch_modeling.ViTLayer.forward

    def spy(self: Any, hidden_states: torch.Tensor, *args: Any) -> Any:
        calls.append(hidden_states.shape[0])
        return real_layer_forward(self, hidden_states, *args)

    monkeypatch.setattr(torch_modeling.ViTLayer, "forward", spy)
    with torch.no_grad():
        split = model(x).last_hidden_state
        assert calls == [2, 2, 2, 2, 1, 1], calls  # 2 layers x sub-batches of 2, 2, 1
        calls.clear()
        whole = model(x, output_hidden_states=True).last_hidden_state  # per-layer outputs: one batch
        assert calls == [5, 5]
    assert torch.max(torch.abs(split - whole)).item() <= 1e-6
    expected = reference_forward(state, case.vit_config, x.numpy())["last_hidden_state"]
    assert np.max(np.abs(split.double().numpy() - expected)) <= 1e-5


def test_bfloat16_fast_path_stays_close_to_float32() -> None:
    if not BF16_ONEDNN:
        pytest.skip("oneDNN bfloat16 unsupported on this CPU")
    model32, _ = classifier()
    model16, _ = classifier(dtype=torch.bfloat16)
    x = torch.from_numpy(make_inputs(CASE)["pixel_values"])
    with torch.inference_mode():
        logits32 = model32(x).logits
        logits16 = model16(x.bfloat16()).logits.float()
    assert torch.max(torch.abs(logits32 - logits16)).item() <= 1e-1


@pytest.mark.parametrize("image_hw", [(32, 32), (35, 42)], ids=["exact", "partial-patches"])
def test_patch_embedding_matmul_matches_convolution(image_hw: tuple[int, int]) -> None:
    """The matmul form equals the convolution, also when pixels past the last whole patch are dropped."""
    torch.manual_seed(0)
    projection = torch_layers.patch_projection(3, 24, (8, 8)).eval()
    x = torch.randn(2, 3, *image_hw)
    expected = torch.nn.functional.conv2d(x.double(), projection.weight.double(), projection.bias.double(), stride=8)
    with torch.no_grad():
        fast = projection(x)
    assert fast.shape == expected.shape
    assert torch.max(torch.abs(fast.double() - expected)).item() <= 1e-5
    fast.flatten(2)  # the (batch, hidden, gh, gw) view flattens without a copy
    assert fast.flatten(2).transpose(1, 2).is_contiguous()


def test_bfloat16_inference_attention_runs_the_eager_formula_per_image() -> None:
    """bf16 CPU inference on avx512_bf16: fused_attention is eager_attention's formula image by
    image (one scaled baddbmm, a softmax with float32 statistics, one bmm per image, no copies of
    contiguous inputs) instead of torch's CPU flash kernel; with autograd on it is sdpa."""
    if not BF16_ONEDNN:
        pytest.skip("oneDNN bfloat16 unsupported on this CPU")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn((3, 4, 17, 16), generator=generator).bfloat16() for _ in range(3))
    with torch.inference_mode():
        counts = op_counts(lambda: torch_layers.fused_attention(q, k, v, 0.25, 0.0))
        fused = torch_layers.fused_attention(q, k, v, 0.25, 0.0)
        eager = torch_layers.eager_attention(q, k, v, 0.25, None, 0.0)[0]
        strided = torch_layers.fused_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, 0.25, 0.0)
    assert counts.get("aten::baddbmm", 0) == 3 and counts.get("aten::bmm", 0) == 3, counts
    assert "aten::scaled_dot_product_attention" not in counts and "aten::copy_" not in counts, counts
    assert torch.equal(fused, strided)  # strided inputs: copied once, same result
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * 0.25
    exact = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), v.double())
    error_fused = torch.max(torch.abs(fused.double() - exact)).item()
    error_eager = torch.max(torch.abs(eager.double() - exact)).item()
    assert error_fused <= 1e-2 and error_fused <= 1.5 * error_eager + 1e-3, (error_fused, error_eager)
    with torch.enable_grad():
        counts = op_counts(lambda: torch_layers.fused_attention(q, k, v, 0.25, 0.0))
    assert counts.get("aten::scaled_dot_product_attention", 0) == 1, counts


def test_fused_qkv_equals_three_projections_and_follows_weight_changes() -> None:
    """q, k, v as one GEMM on the concatenated prepacked weight: the same sums as three Linear
    calls; the cache follows in-place edits of any of the three weights and is dropped by train()."""
    torch.manual_seed(0)
    layers = [torch_layers.Linear(32, 32).eval() for _ in range(3)]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        fused = torch_layers.qkv_projection(*layers, x)
        separate = [torch.nn.functional.linear(x, m.weight, m.bias) for m in layers]
        for a, b in zip(fused, separate):
            assert torch.max(torch.abs(a - b)).item() <= 1e-5
        packed = layers[0]._qkv_packed
        assert packed is not None
        layers[2].weight.mul_(3.0)
        fused = torch_layers.qkv_projection(*layers, x)
        assert layers[0]._qkv_packed is not packed
        assert torch.max(torch.abs(fused[2] - torch.nn.functional.linear(x, layers[2].weight, layers[2].bias))).item() <= 1e-5
    layers[0].train()
    assert layers[0]._qkv_packed is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_paths_ab_tool_flips_each_switch_of_the_plan(dtype: str) -> None:
    """``python -m benchmarks.torch_speed --paths``: the whole model with the plan as chosen and with
    each switch flipped; every variant computes the same logits within the dtype's bound."""
    if dtype == "bfloat16" and not BF16_ONEDNN:
        pytest.skip("oneDNN bfloat16 unsupported on this CPU")
    from benchmarks import torch_speed

    result = torch_speed.main(["--paths", "--variant", "S/16", "--image-size", "32", "--batch", "2", "--rounds", "1",
                               "--threads", "1", "--dtype", dtype, "--json"])
    variants = ["plan", "fused_qkv off", "gemm_epilogues off"] + (["attention=sdpa"] if dtype == "bfloat16" else [])
    assert result["isa"] == "avx512_bf16" and result["plan_vs_plan"] == 1.0
    bound = 1e-5 if dtype == "float32" else 1e-1
    for name in variants:
        assert result[f"{name}_images_per_s"] > 0 and result[f"{name}_max_abs_logit_diff"] <= bound, (name, result)
    assert torch_layers.speed_plan is not None and torch_layers.speed_plan(torch.float32).fused_qkv  # restored

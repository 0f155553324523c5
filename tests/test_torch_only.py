"""What only vit_torch has: gradient checkpointing, torch.compile, the dtype= / torch_dtype=
spellings, transformers-style conveniences and config._attn_implementation, float64 activations,
torch's own bicubic interpolate, and ViT-B/16 on a real photo against transformers.

Everything every framework shares (the case table against the reference and transformers,
fused vs eager, weights, init, errors, outputs, dropout, primitives, packaging) is in
tests/test_models.py, crossed with tests/backends.py's BACKENDS.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vit_core.activations import ACTIVATIONS as NP_ACTIVATIONS  # noqa: E402
from vit_core.reference import backbone as reference_backbone  # noqa: E402
from vit_core.resample import resample_position_embeddings  # noqa: E402
from vit_core.tolerances import TOLERANCES  # noqa: E402
from vit_torch import (  # noqa: E402
    ViTConfig,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTModel,
    canonical_state,
)
from vit_torch import layers  # noqa: E402

from .backends import BACKENDS_BY_NAME  # noqa: E402
from .cases import CASES, TINY, Case, assert_close, make_inputs, max_diffs  # noqa: E402

SMALL = TOLERANCES["small"]
BASE_REAL = TOLERANCES["base_real_images"]
FIXTURE_IMAGES = pathlib.Path(__file__).parent / "fixtures" / "images"
BACKEND = BACKENDS_BY_NAME["torch"]
CASES_BY_NAME = {case.name: case for case in CASES}


@pytest.fixture(autouse=True)
def _pin_precision() -> None:
    """docs/NUMERICS.md: no TF32 anywhere (it only matters on GPU; pinned so the bound means the same)."""
    BACKEND.require()


def build(case: Case) -> torch.nn.Module:
    """The case's vit_torch model with the case's seeded canonical weights, in eval mode."""
    return BACKEND.build(case)


def torch_inputs(case: Case) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in make_inputs(case).items()}


def as_numpy(output: Any) -> dict[str, Any]:
    return BACKEND.outputs_to_numpy(output)


# ------------------------------------------------------------------------------ dtypes
def test_dtype_arguments() -> None:
    config = ViTConfig(**TINY)
    assert ViTModel(config, dtype="bfloat16").dtype == torch.bfloat16
    assert ViTModel(config, torch_dtype="torch.float16").dtype == torch.float16
    assert ViTModel(config).dtype == torch.float32
    with pytest.raises(ValueError, match="disagree"):
        ViTModel(config, dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unsupported dtype"):
        ViTModel(config, dtype=torch.int8)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("spelling", ["dtype", "torch_dtype"])
def test_both_dtype_spellings_store_and_compute_in_the_dtype(dtype_name: str, spelling: str) -> None:
    """dtype= (transformers >= 4.56) and torch_dtype=: every parameter and the logits in the dtype,
    on float32 inputs (cast to the weights' dtype, as transformers does)."""
    dtype = getattr(torch, dtype_name)
    model = ViTForImageClassification(ViTConfig(**TINY), **{spelling: dtype}).eval()
    assert model.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32)).logits
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()


# ------------------------------------------------------------------------------ training features
def _grads(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(seed)
    model(x, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_gradients(dropout: float) -> None:
    """Checkpointed layers recompute in backward; gradients equal the plain ones (dropout masks
    replay because the RNG state is restored)."""
    config = ViTConfig(**TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    model = ViTForImageClassification(config, attn_implementation="eager").train()
    x = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 3, 1])
    plain = _grads(model, x, labels, seed=5)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    calls = []
    handle = torch.utils.checkpoint.checkpoint
    import vit_torch.modeling as modeling

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("use_reentrant"))
        return handle(*args, **kwargs)

    modeling.checkpoint, original = spy, modeling.checkpoint
    try:
        checkpointed = _grads(model, x, labels, seed=5)
    finally:
        modeling.checkpoint = original
    assert calls == [False] * config.num_hidden_layers
    for name in plain:
        diff = (plain[name] - checkpointed[name]).abs().max().item()
        assert diff <= 1e-7, f"{name}: gradient differs by {diff:.3e} with checkpointing"
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable({"preserve": True})


def test_torch_compile_fullgraph() -> None:
    """No graph breaks in any task, interpolation included (the bicubic matrices are torch ops, so
    dynamic shapes trace too); the compiled MIM model gives the eager model's outputs."""
    torch._dynamo.reset()
    case = next(c for c in CASES if c.name == "mim-masked")
    model = build(case)
    inputs = torch_inputs(case)
    for task_case in (next(c for c in CASES if c.name == "tiny"), next(c for c in CASES if c.name == "cls-single-label")):
        explanation = torch._dynamo.explain(build(task_case))(**torch_inputs(task_case), output_hidden_states=True)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    for height, width in ((40, 48), (24, 32)):  # interpolation, two shapes (dynamo goes dynamic on the second)
        x = torch.randn(1, 3, height, width)
        mask = torch.rand(1, (height // 8) * (width // 8)) < 0.5
        explanation = torch._dynamo.explain(model)(x, mask, interpolate_pos_encoding=True, output_attentions=True)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got = compiled(**inputs, output_hidden_states=True)
        expected = model(**inputs, output_hidden_states=True)
    diffs = max_diffs(as_numpy(expected), as_numpy(got), what="compiled")
    assert_close(diffs, SMALL, what="torch.compile vs eager mode")
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ transformers-style API
def test_model_conveniences() -> None:
    model = ViTForMaskedImageModeling(ViTConfig(**TINY))
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.get_input_embeddings() is model.vit.embeddings.patch_embeddings
    assert model.base_model is model.vit and model.vit.base_model is model.vit
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    model.vit.embeddings.cls_token.requires_grad_(False)
    assert model.num_parameters(only_trainable=True) == model.num_parameters() - TINY["hidden_size"]


def test_attn_implementation_options() -> None:
    config = ViTConfig(**TINY)
    assert ViTModel(config).config._attn_implementation == "sdpa"
    config = ViTConfig(**TINY)
    config._attn_implementation = "eager"
    assert ViTForImageClassification(config).vit.config._attn_implementation == "eager"
    assert ViTModel(ViTConfig(**TINY), attn_implementation="eager").config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="flash_attention_2"):
        ViTModel(ViTConfig(**TINY), attn_implementation="flash_attention_2")


# ------------------------------------------------------------------------------ primitives (torch only)
@pytest.mark.parametrize("name", sorted(NP_ACTIVATIONS))
def test_activation_in_float64_is_the_numpy_one(name: str) -> None:
    """torch runs the activations in float64 too: equal to the reference to 1e-12 there."""
    x = np.linspace(-8, 8, 4001)
    got = layers.get_activation(name)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, NP_ACTIVATIONS[name](x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid,out", [((4, 4), (7, 7)), ((7, 7), (4, 4)), ((3, 5), (6, 2)), ((4, 6), (5, 3))])
def test_position_resampling_is_torch_interpolate(grid: tuple[int, int], out: tuple[int, int]) -> None:
    """The bicubic matrices equal torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False), which transformers' PyTorch ViT calls."""
    rng = np.random.default_rng(0)
    # position tables are ~0.02 in scale (initializer_range); float32 rounding of 16 taps ~1e-9 there
    table = (0.02 * rng.standard_normal((1, 1 + grid[0] * grid[1], 16))).astype(np.float32)
    ours = layers.resample_position_grid(torch.from_numpy(table[:, 1:]), grid, out).double().numpy()
    assert np.abs(ours - resample_position_embeddings(table, grid, out)[:, 1:]).max() <= 1e-7
    torch_grid = torch.from_numpy(table[:, 1:]).reshape(1, *grid, 16).permute(0, 3, 1, 2)
    interp = torch.nn.functional.interpolate(torch_grid, size=out, mode="bicubic", align_corners=False)
    assert np.abs(ours - interp.permute(0, 2, 3, 1).reshape(1, -1, 16).double().numpy()).max() <= 1e-7


def test_state_dict_order_is_the_table_order() -> None:
    """state_dict() lists the weights in the canonical table's order (transformers' order)."""
    for case in CASES:
        model = BACKEND.new_model(case.vit_config, case.task, **case.table_kwargs)
        assert list(model.state_dict()) == [spec.name for spec in model.canonical_table()], case.name


# ------------------------------------------------------------------------------ ViT-B/16 on a real photo
@pytest.mark.slow
def test_vit_base_on_real_photo_matches_transformers() -> None:
    """Seeded ViT-B/16 at 224 on a bundled photo: logits and last_hidden_state vs the float64
    reference and transformers (eager and sdpa) within the docs/NUMERICS.md real-image bound."""
    transformers = pytest.importorskip("transformers")
    images = sorted(FIXTURE_IMAGES.glob("*.png")) + sorted(FIXTURE_IMAGES.glob("*.jpg"))
    if not images:
        pytest.skip("no fixture images")
    from PIL import Image

    from vit_core import ViTImageProcessor

    pixel_values = ViTImageProcessor()([Image.open(images[0])], return_tensors="np")["pixel_values"]
    x = torch.from_numpy(pixel_values)
    config = ViTConfig.from_variant("B/16", num_labels=1000)
    torch.manual_seed(0)
    ours = ViTForImageClassification(config).eval()
    with torch.device("meta"):  # no init: every weight comes from ours
        theirs = transformers.ViTForImageClassification(transformers.ViTConfig(**config.to_dict()))
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in canonical_state(ours).items()}, strict=True, assign=True)
    theirs.eval()

    def run(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        captured = []
        handle = model.vit.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
        try:
            with torch.no_grad():
                logits = model(x).logits
        finally:
            handle.remove()
        return logits, captured[0]

    got_logits, got_last = run(ours)
    state = canonical_state(ours)
    ref = reference_backbone(state, config, pixel_values.astype(np.float64), prefix="vit.")["last_hidden_state"]
    ref_logits = ref[:, 0] @ state["classifier.weight"].T.astype(np.float64) + state["classifier.bias"]
    for name, got, expected in (("logits", got_logits, ref_logits), ("last_hidden_state", got_last, ref)):
        diff = float(np.abs(got.double().numpy() - expected).max())
        assert diff <= BASE_REAL, f"{name} differs from the float64 reference by {diff:.3e}"
        print(f"ViT-B/16 {images[0].name} vs float64 reference: {name} {diff:.2e}")
    for implementation in ("eager", "sdpa"):
        theirs.config._attn_implementation = implementation
        expected_logits, expected_last = run(theirs)
        logits_diff = (got_logits - expected_logits).abs().max().item()
        last_diff = (got_last - expected_last).abs().max().item()
        assert logits_diff <= BASE_REAL, f"{implementation}: logits differ by {logits_diff:.3e}"
        assert last_diff <= BASE_REAL, f"{implementation}: last_hidden_state differs by {last_diff:.3e}"
        print(f"ViT-B/16 {images[0].name} vs transformers {implementation}: "
              f"logits {logits_diff:.2e}, last_hidden_state {last_diff:.2e}")

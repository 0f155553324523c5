"""The shared test matrix: every backend of tests/backends.py x every case of tests/cases.py.

Every case runs on every path of every framework (fused, eager, fused forced eager by
output_attentions, and the framework's compiled / uncompiled call) against vit_core's float64
reference; fused against eager in float32 and bfloat16; every framework against every other and
against transformers 4.57.6 (PyTorch, TF through tf_keras, Flax) where it has the case. Then the
behaviour every framework shares: canonical parameter table, bitwise state round trips in every
dtype, strict loading, init statistics, errors, outputs and labels, dropout, reduced precision,
the layer primitives against the numpy reference, and packaging. Bounds come from
vit_core/tolerances.py (docs/NUMERICS.md) and are never loosened.

What exists in one framework only is in tests/test_torch_only.py, test_tf_only.py, test_flax_only.py.
"""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from vit_core import ViTConfig
from vit_core.activations import ACTIVATIONS as NP_ACTIVATIONS
from vit_core.reference import layer_norm as np_layer_norm
from vit_core.reference import patch_embed as np_patch_embed
from vit_core.reference import pixel_shuffle as np_pixel_shuffle
from vit_core.reference import softmax as np_softmax
from vit_core.resample import bicubic_matrix as np_bicubic_matrix
from vit_core.resample import resample_position_embeddings
from vit_core.tolerances import TOLERANCES
from vit_core.weights import parameter_count, weight_table

from .backends import (
    ALL_FRAMEWORK_MODULES,
    BACKENDS,
    BACKENDS_BY_NAME,
    ORACLE_CASES,
    REPO,
    Backend,
    Oracle,
    cached_model,
    cast_state,
    oracle_outputs,
    output_dtype,
    path_outputs,
)
from .cases import (
    CASES,
    TINY,
    Case,
    assert_close,
    init_state,
    make_inputs,
    make_state,
    max_diffs,
    reference,
    seeded_state,
)

SMALL = TOLERANCES["small"]
FUSED_EAGER_F32 = TOLERANCES["fused_vs_eager_float32"]
FUSED_EAGER_BF16 = TOLERANCES["fused_vs_eager_bfloat16"]
BF16_LOGITS = TOLERANCES["bfloat16_vs_float32_logits"]

CASES_BY_NAME = {case.name: case for case in CASES}
DTYPES = ["float32", "bfloat16", "float16"]


def by_backend(**kwargs: Any) -> Any:
    return pytest.mark.parametrize("backend", BACKENDS, ids=str, **kwargs)


by_case = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
# (backend, path) pairs: each backend's own PATHS
BACKEND_PATHS = [pytest.param(b, p, id=f"{b.name}-{p.name}") for b in BACKENDS for p in b.paths]


def seeded(backend: Backend, config: ViTConfig, task: str, **table_kwargs: bool) -> Any:
    """A model of any config holding cases.seeded_state weights (no framework init: Flax's runs
    op by op and costs seconds)."""
    model = backend.new_model(config, task, init=False, **table_kwargs)
    backend.load_state(model, seeded_state(config, task, **table_kwargs))
    return model


def without(outputs: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in outputs.items() if k not in keys}


def fused_path(backend: Backend) -> Any:
    return next(p for p in backend.paths if p.attn == "fused" and not p.output_attentions and p.mode == "call")


def eager_path(backend: Backend) -> Any:
    return next(p for p in backend.paths if p.attn == "eager" and not p.output_attentions and p.mode == "call")


def attentions_path(backend: Backend) -> Any:
    return next(p for p in backend.paths if p.output_attentions and p.mode == "call")


# ================================================================================ the case table
@by_case
@pytest.mark.parametrize("backend,path", BACKEND_PATHS)
def test_case_matches_reference(backend: Backend, path: Any, case: Case) -> None:
    """Every output, hidden state, attention map (where asked) and loss at the 1e-5 bound."""
    got = path_outputs(backend, case, path)
    expected = reference(case) if path.output_attentions else without(reference(case), "attentions")
    what = f"{backend}/{case.name}/{path.name}"
    assert_close(max_diffs(expected, got, what=what), SMALL, what=f"{what} vs reference")


@by_case
@by_backend()
def test_fused_matches_eager(backend: Backend, case: Case) -> None:
    """Same weights, same inputs: the fused and the written-out attention agree to 1e-5 in float32."""
    fused = path_outputs(backend, case, fused_path(backend))
    eager = path_outputs(backend, case, eager_path(backend))
    assert_close(max_diffs(eager, fused, what=case.name), FUSED_EAGER_F32,
                 what=f"{backend}/{case.name}: fused vs eager")


@by_case
@by_backend()
def test_fused_matches_eager_bfloat16(backend: Backend, case: Case) -> None:
    """bfloat16 fused vs eager at the 1e-2 bound of docs/NUMERICS.md.

    Weights are checkpoint-scale init weights (cases.init_state: hidden states |h| <~ 1) rather
    than the case table's deliberately large ones (|h| ~ 5, where one bfloat16 step is 0.03 and
    both paths sit 0.04 from the float64 reference). Hidden states and losses are held to 1e-2
    absolute. The final-layernormed outputs reach |x| ~ 3, where one bfloat16 step (2^-7 * 2) is
    0.0156 > 1e-2: the paths round differently inside attention, so they are held to 1e-2
    relative to their magnitude (1e-2 * max(1, max |x|)), about 1.3 steps there.
    """
    fused_p, eager_p = fused_path(backend), eager_path(backend)
    fused = path_outputs(backend, case, fused_p, state="init", dtype="bfloat16")
    eager = path_outputs(backend, case, eager_p, state="init", dtype="bfloat16")
    assert output_dtype(backend, case, fused_p, "init", "bfloat16") == "bfloat16"
    assert output_dtype(backend, case, eager_p, "init", "bfloat16") == "bfloat16"
    diffs = max_diffs(fused, eager, what=case.name)
    for key, diff in diffs.items():
        name = key.split("[")[0]
        scale = 1.0 if name in ("hidden_states", "loss") else max(1.0, float(np.abs(fused[name]).max()))
        assert diff <= FUSED_EAGER_BF16 * scale, (
            f"{backend}/{case.name}: bf16 fused vs eager {key} differs by {diff:.3e} (all: {diffs})")


CROSS = [pytest.param(a, b, id=f"{a.name}-vs-{b.name}") for a, b in itertools.combinations(BACKENDS, 2)]


@by_case
@pytest.mark.parametrize("first,second", CROSS)
def test_case_matches_other_framework(first: Backend, second: Backend, case: Case) -> None:
    """Two frameworks on the same canonical weights and inputs: every output, hidden state and
    attention map agrees to 1e-5 (not just each to the reference)."""
    a = path_outputs(first, case, attentions_path(first))
    b = path_outputs(second, case, attentions_path(second))
    assert_close(max_diffs(a, b, what=case.name), SMALL, what=f"{case.name}: vit_{first} vs vit_{second}")


ORACLE_PARAMS = [pytest.param(o, b, c, id=f"{o.name}-{b.name}-{c.name}") for o, c in ORACLE_CASES for b in BACKENDS]


@pytest.mark.parametrize("oracle,backend,case", ORACLE_PARAMS)
def test_case_matches_transformers(oracle: Oracle, backend: Backend, case: Case) -> None:
    """transformers 4.57.6 (PyTorch eager and sdpa, TF via tf_keras, Flax) on the same weights:
    every output it has, every hidden state and attention map, at 1e-5. Eager oracles are compared
    with the path that returns attention maps, the sdpa oracle with the fused path."""
    backend.require()
    expected = oracle_outputs(oracle, case)
    got = path_outputs(backend, case, fused_path(backend) if oracle.fused else attentions_path(backend))
    if "loss" not in expected:  # transformers' TF loss is per example (its mean is kept where comparable)
        got = without(got, "loss")
    assert set(got) == set(expected), f"{oracle.name}: outputs {sorted(expected)} vs ours {sorted(got)}"
    assert_close(max_diffs(expected, got, what=case.name), SMALL, what=f"{case.name}: vit_{backend} vs {oracle.name}")


@by_backend()
def test_fused_path_really_runs_the_fused_kernel(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without attentions or a head mask the fused kernel runs, never the eager one; with either,
    the eager one (a head mask or output_attentions is never silently ignored); set_attn("eager")
    takes the eager kernel everywhere, set_attn("fused") goes back."""
    backend.require()
    modeling = importlib.import_module(backend.module + ".modeling")
    calls = {"fused": 0, "eager": 0}

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(modeling, "fused_attention", counting("fused", modeling.fused_attention))
    monkeypatch.setattr(modeling, "eager_attention", counting("eager", modeling.eager_attention))
    case = CASES_BY_NAME["tiny"]
    model = backend.build(case)
    n = case.vit_config.num_hidden_layers
    x = {"pixel_values": make_inputs(case)["pixel_values"]}
    backend.forward_python(model, x)
    assert calls == {"fused": n, "eager": 0}
    backend.forward_python(model, x, output_attentions=True)
    assert calls == {"fused": n, "eager": n}
    backend.forward_python(model, {**x, "head_mask": np.ones(case.vit_config.num_attention_heads, np.float32)})
    assert calls == {"fused": n, "eager": 2 * n}
    backend.set_attn(model, "eager")
    assert backend.get_attn(model) == "eager"
    backend.forward_python(model, x)
    assert calls == {"fused": n, "eager": 3 * n}
    backend.set_attn(model, "fused")
    assert backend.get_attn(model) == "sdpa"
    backend.forward_python(model, x)
    assert calls == {"fused": 2 * n, "eager": 3 * n}


# ================================================================================ weights
@by_case
@by_backend()
def test_parameters_are_the_canonical_table(backend: Backend, case: Case) -> None:
    """The framework registers exactly one parameter per table entry, under the canonical name,
    in its layout; the parameter count is the table's."""
    model = cached_model(backend, case)
    table = weight_table(case.vit_config, case.task, **case.table_kwargs)
    got = backend.parameter_shapes(model)
    assert got == {spec.name: backend.framework_shape(spec) for spec in table}
    assert [spec.name for spec in model.canonical_table()] == [spec.name for spec in table]
    assert backend.num_parameters(model) == parameter_count(case.vit_config, case.task, **case.table_kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@by_case
@by_backend()
def test_canonical_state_round_trip_is_bitwise(backend: Backend, case: Case, dtype: str) -> None:
    """canonical_state(load_canonical_state(model, state)) == state, bit for bit, in the model's dtype.

    float32 and bfloat16 reuse the cached models of the case (loading a state is what the test
    does; the cached weights are put back after), float16 builds one."""
    state = cast_state(make_state(case), dtype)
    if dtype == "float16":
        model, restore = backend.build(case, state, dtype=dtype), None
    else:
        source = "case" if dtype == "float32" else "init"
        model = cached_model(backend, case, source, dtype)
        restore = cast_state(make_state(case) if source == "case" else init_state(case), dtype)
        backend.load_state(model, state)
    try:
        assert backend.parameter_dtypes(model) == {dtype}
        back = backend.canonical_state(model)
        assert list(back) == list(state)
        for name, value in state.items():
            assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
            assert back[name].tobytes() == value.tobytes(), name
    finally:
        if restore is not None:
            backend.load_state(model, restore)


@by_case
@by_backend()
def test_strict_loading_reports_every_bad_key(backend: Backend, case: Case) -> None:
    """Missing, unexpected and mis-shaped keys are all named (with shapes) in one error, and a
    failed load changes nothing."""
    table = weight_table(case.vit_config, case.task, **case.table_kwargs)
    state = make_state(case)
    missing, misshaped, last = table[3], table[1], table[-1]
    del state[missing.name]
    del state[last.name]
    prefix = "vit." if case.task != "base" else ""
    state[prefix + "extra.weight"] = np.zeros((2, 3), np.float32)
    bad_shape = (misshaped.shape[0] + 1, *misshaped.shape[1:])
    state[misshaped.name] = np.zeros(bad_shape, np.float32)
    model = cached_model(backend, case)  # holds make_state(case); put back whatever happens
    try:
        before = backend.canonical_state(model)
        assert [k for k in before if not np.array_equal(before[k], make_state(case)[k])] == []
        with pytest.raises(ValueError) as info:
            backend.load_state(model, state)
        message = str(info.value)
        for expected in (f"{missing.name} {missing.shape}", f"{last.name} {last.shape}",
                         f"{prefix}extra.weight (2, 3)",
                         f"{misshaped.name}: given {bad_shape} vs model {misshaped.shape}"):
            assert expected in message, (expected, message)
        after = backend.canonical_state(model)
        assert [k for k in before if not np.array_equal(before[k], after[k])] == [], "a failed load changed weights"
    finally:
        backend.load_state(model, make_state(case))


@pytest.mark.parametrize("task", ["base", "mim"])  # between them every kind of weight: pooler, mask token, decoder
@by_backend()
def test_random_init_follows_the_table(backend: Backend, task: str) -> None:
    """trunc_normal: std = initializer_range cut at +-2 std; zeros; ones. The same seed gives the
    same weights, another seed others."""
    config = ViTConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 256, "initializer_range": 0.05})
    state = backend.canonical_state(backend.new_model(config, task, seed=3))
    again = backend.canonical_state(backend.new_model(config, task, seed=3))
    other = backend.canonical_state(backend.new_model(config, task, seed=4))
    assert list(state) == [spec.name for spec in weight_table(config, task)]
    for spec in weight_table(config, task):
        value = state[spec.name].astype(np.float64)
        assert np.array_equal(value, again[spec.name]), f"{spec.name}: not reproducible from the seed"
        if spec.init == "zeros":
            assert not value.any(), spec.name
        elif spec.init == "ones":
            assert (value == 1).all(), spec.name
        else:
            assert np.abs(value).max() <= 2 * 0.05 + 1e-7, f"{spec.name}: not cut at 2 std"
            assert not np.array_equal(value, other[spec.name]), f"{spec.name}: the seed does not change it"
            if value.size >= 4096:
                # a normal cut at +-2 std has std 0.8796 * sigma
                assert abs(value.std() - 0.8796 * 0.05) < 0.004, f"{spec.name}: std {value.std():.4f}"


# ================================================================================ dtypes
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@by_backend()
def test_reduced_precision_runs_and_stays_close(backend: Backend, dtype: str) -> None:
    """Weights stored and computed in bf16 / fp16 (on float32 inputs) keep the float32 logits
    within the docs/NUMERICS.md bf16-vs-fp32 bound with the same top class; eager attention maps are
    softmaxed in float32 (rows sum to 1 before the cast)."""
    case = CASES_BY_NAME["cls"]
    weights = init_state(case)
    full = backend.build(case, weights)
    half = backend.build(case, cast_state(weights, dtype), dtype=dtype)
    assert backend.parameter_dtypes(half) == {dtype}
    x = {"pixel_values": np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)}
    expected = backend.to_numpy(backend.forward(full, x).logits)
    out = backend.forward(half, x, output_attentions=True)
    assert backend.dtype_name(out.logits) == dtype
    got = backend.to_numpy(out.logits)
    assert np.abs(got - expected).max() <= BF16_LOGITS
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))
    rows = backend.to_numpy(out.attentions[0]).sum(-1)
    assert np.abs(rows - 1).max() < 1e-2


@by_backend()
def test_bad_construction_arguments(backend: Backend) -> None:
    config = ViTConfig(**TINY)
    with pytest.raises(ValueError, match="unsupported dtype"):
        backend.new_model(config, "base", dtype="int8")
    with pytest.raises(ValueError, match="attn_implementation"):
        backend.new_model(config, "base", attn="flash_attention_2")
    with pytest.raises(TypeError, match="ViTConfig"):
        backend.new_model(dict(TINY), "base")  # type: ignore[arg-type]


# ================================================================================ errors
BAD_INPUT_PARAMS = [pytest.param(b, *bad, id=f"{b.name}-{bad[0]}") for b in BACKENDS for bad in b.bad_inputs]


@pytest.mark.parametrize("backend,name,task,make_x,kwargs,message", BAD_INPUT_PARAMS)
def test_bad_inputs_raise_clear_errors(backend: Backend, name: str, task: str, make_x: Any, kwargs: dict[str, Any],
                                       message: str) -> None:
    model = backend.new_model(ViTConfig(**TINY), task, init=False)
    with pytest.raises(ValueError, match=message):
        backend.forward(model, {"pixel_values": make_x(), **kwargs})


@by_backend()
def test_mim_requires_patch_size_equal_encoder_stride(backend: Backend) -> None:
    model = seeded(backend, ViTConfig(**{**TINY, "encoder_stride": 4}), "mim")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    out = backend.forward(model, {"pixel_values": x})
    assert tuple(out.reconstruction.shape) == (1, 3, 16, 16)  # allowed without a mask, as in transformers
    assert np.isfinite(backend.to_numpy(out.reconstruction)).all()
    with pytest.raises(ValueError, match="`patch_size` must be equal to `encoder_stride`"):
        backend.forward(model, {"pixel_values": x, "bool_masked_pos": np.zeros((1, 16), bool)})


# ================================================================================ outputs and labels
# The calls below use the options of the fused and attention paths (hidden states on, the case's
# interpolation flag), so Flax reuses the executables the case table compiled.
@by_backend()
def test_return_dict_false_and_output_access(backend: Backend) -> None:
    """Outputs index by position and by name, list only what is set, and come as tuples with
    return_dict=False; transformers-style positional flags work."""
    case = CASES_BY_NAME["cls-single-label"]
    model = cached_model(backend, case)
    backend.set_attn(model, "fused")
    inputs = make_inputs(case)
    out = backend.forward(model, inputs, output_hidden_states=True, interpolate_pos_encoding=False)
    assert list(out.keys()) == ["loss", "logits", "hidden_states"]
    assert out[0] is out.loss and out[1] is out.logits and out["logits"] is out.logits
    assert out.attentions is None and "attentions" not in out
    as_tuple = backend.forward(model, inputs, output_hidden_states=True, interpolate_pos_encoding=False,
                               return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    assert np.array_equal(backend.to_numpy(as_tuple[0]), backend.to_numpy(out.loss))
    assert np.array_equal(backend.to_numpy(as_tuple[1]), backend.to_numpy(out.logits))
    assert len(as_tuple[2]) == case.vit_config.num_hidden_layers + 1
    unlabelled = CASES_BY_NAME["cls"]
    cls_model = cached_model(backend, unlabelled)
    backend.set_attn(cls_model, "fused")
    x = make_inputs(unlabelled)["pixel_values"]
    plain = backend.forward(cls_model, {"pixel_values": x}, output_hidden_states=True, interpolate_pos_encoding=False,
                            return_dict=False)
    assert len(plain) == 2 and len(plain[1]) == case.vit_config.num_hidden_layers + 1  # no loss without labels
    np.testing.assert_allclose(backend.to_numpy(plain[0]), reference(unlabelled)["logits"], atol=SMALL, rtol=0)
    # positional flags as in transformers: (pixel_values, head_mask, labels, output_attentions, output_hidden_states)
    positional = cls_model(backend.tensor(x), None, None, True, True)
    assert len(positional.attentions) == case.vit_config.num_hidden_layers
    assert len(positional.hidden_states) == case.vit_config.num_hidden_layers + 1
    for name, keys in (("no-pooler", ["last_hidden_state", "hidden_states"]),
                       ("mim", ["reconstruction", "hidden_states"])):
        other = CASES_BY_NAME[name]
        other_model = cached_model(backend, other)
        backend.set_attn(other_model, "fused")
        other_out = backend.forward(other_model, {"pixel_values": make_inputs(other)["pixel_values"]},
                                    output_hidden_states=True, interpolate_pos_encoding=False)
        assert list(other_out.keys()) == keys, name
        assert len(other_out.to_tuple()) == 2, name
        assert getattr(other_out, "pooler_output" if name == "no-pooler" else "loss") is None, name


@by_backend()
def test_config_output_flags_are_defaults(backend: Backend) -> None:
    """transformers-style config fields output_attentions / output_hidden_states / return_dict
    are the call's defaults; explicit arguments win."""
    x = {"pixel_values": make_inputs(CASES_BY_NAME["tiny"])["pixel_values"]}
    config = ViTConfig(**TINY, output_attentions=True, output_hidden_states=True, return_dict=False)
    model = seeded(backend, config, "base")
    as_tuple = backend.forward(model, x)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 4  # last, pooler, hidden states, attentions
    assert len(as_tuple[2]) == 3 and len(as_tuple[3]) == 2
    out = backend.forward(model, x, output_attentions=False, output_hidden_states=False, return_dict=True)
    assert out.attentions is None and out.hidden_states is None
    # the tuple came through the eager kernel (attention maps asked for), this one the fused
    diff = np.abs(backend.to_numpy(out.last_hidden_state) - backend.to_numpy(as_tuple[0])).max()
    assert diff <= FUSED_EAGER_F32, diff


@by_backend()
def test_labels_problem_types_and_ignore_index(backend: Backend) -> None:
    """Integer labels of any int dtype give the same cross-entropy; label -100 is ignored as
    torch's cross-entropy does (the mean over the other examples)."""
    case = CASES_BY_NAME["cls-single-label"]
    model = cached_model(backend, case)
    backend.set_attn(model, "fused")
    x = make_inputs(case)["pixel_values"]
    labels = np.array([2, -100, 4])
    options = {"output_hidden_states": True, "interpolate_pos_encoding": False}
    loss64, loss32 = (backend.to_numpy(backend.forward(model, {"pixel_values": x, "labels": labels.astype(dtype)},
                                                       **options).loss) for dtype in (np.int64, np.int32))
    assert np.array_equal(loss64, loss32)
    logits = reference(case)["logits"]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -(log_probs[0, 2] + log_probs[2, 4]) / 2
    assert abs(float(loss64) - want) < SMALL, f"ignore_index -100: loss {float(loss64)} vs {want}"


@by_backend()
def test_num_labels_zero_is_an_identity_classifier(backend: Backend) -> None:
    """num_labels == 0: no classifier weights; the logits are the final CLS features."""
    config = ViTConfig(**{**TINY, "num_labels": 0})
    model = seeded(backend, config, "classification")
    x = {"pixel_values": make_inputs(CASES_BY_NAME["cls"])["pixel_values"]}
    logits = backend.to_numpy(backend.forward(model, x).logits)
    assert logits.shape == (3, TINY["hidden_size"])
    features = backend.to_numpy(backend.forward(backend.backbone(model), x).last_hidden_state)[:, 0]
    assert np.array_equal(logits, features)
    assert not [name for name in backend.parameter_shapes(model) if name.startswith("classifier")]
    assert not [spec for spec in weight_table(config, "classification") if spec.name.startswith("classifier")]


# ================================================================================ dropout
@by_backend()
def test_train_applies_dropout_and_eval_is_deterministic(backend: Backend) -> None:
    """Inference ignores dropout (equal to the same weights without dropout); training applies it
    on the fused and the eager path, with new masks per seed; attention dropout alone changes the
    outputs."""
    config = ViTConfig(**TINY, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model = seeded(backend, config, "base")
    plain = seeded(backend, ViTConfig(**TINY), "base")  # the same weights (seeded_state), no dropout
    x = {"pixel_values": make_inputs(CASES_BY_NAME["tiny"])["pixel_values"]}
    a = backend.to_numpy(backend.forward(model, x).last_hidden_state)
    b = backend.to_numpy(backend.forward(model, x).last_hidden_state)
    c = backend.to_numpy(backend.forward(plain, x).last_hidden_state)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    for implementation in ("fused", "eager"):
        backend.set_attn(model, implementation)
        d = backend.to_numpy(backend.forward(model, x, train=True, seed=1).last_hidden_state)
        e = backend.to_numpy(backend.forward(model, x, train=True, seed=2).last_hidden_state)
        assert np.abs(d - e).max() > 1e-3, f"{implementation}: new seeds did not draw new masks"
        assert np.abs(d - a).max() > 1e-3, f"{implementation}: training did not apply dropout"
    attention_only = seeded(backend, ViTConfig(**TINY, attention_probs_dropout_prob=0.5), "base")
    trained = backend.to_numpy(backend.forward(attention_only, x, train=True, seed=1).last_hidden_state)
    assert np.abs(trained - c).max() > 1e-3, "attention dropout alone did not change the outputs"


# ================================================================================ primitives vs vit_core
@pytest.mark.parametrize("name", sorted(NP_ACTIVATIONS))
@by_backend()
def test_activation_matches_numpy_reference(backend: Backend, name: str) -> None:
    x = np.linspace(-8, 8, 4001).astype(np.float32)
    got = backend.activation(name, x)
    # float32 rounding of values up to 8
    assert np.abs(got - NP_ACTIVATIONS[name](x.astype(np.float64))).max() <= 2e-6, name


@by_backend()
def test_unknown_activation(backend: Backend) -> None:
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        backend.activation("mish", np.zeros(3, np.float32))


@pytest.mark.parametrize("eps", [1e-12, 1e-6])
@by_backend()
def test_layer_norm_two_pass_matches_reference(backend: Backend, eps: float) -> None:
    """Inputs with a common offset of 10: the two-pass variance stays within 1e-5 of the reference
    (E[x^2] - E[x]^2, as flax.nnx.LayerNorm computes it, is off by ~7e-5 there)."""
    rng = np.random.default_rng(0)
    x = (10.0 + 4 * rng.standard_normal((2, 5, 48))).astype(np.float32)
    weight = (1 + 0.1 * rng.standard_normal(48)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(48)).astype(np.float32)
    want = np_layer_norm(x.astype(np.float64), weight, bias, eps)
    assert np.abs(backend.layer_norm(x, weight, bias, eps).astype(np.float64) - want).max() <= SMALL


@by_backend()
def test_layer_norm_statistics_in_float32(backend: Backend) -> None:
    """bfloat16 LayerNorm: statistics in float32, so the result is the float32 LayerNorm of the
    bfloat16 inputs and weights, rounded once to bfloat16."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    x16 = (rng.standard_normal((4, 64)) * 3 + 5).astype(ml_dtypes.bfloat16)
    weight = (1 + 0.1 * rng.standard_normal(64)).astype(ml_dtypes.bfloat16)
    bias = (0.1 * rng.standard_normal(64)).astype(ml_dtypes.bfloat16)
    got = backend.layer_norm(x16, weight, bias, 1e-6, dtype="bfloat16")
    assert got.dtype == ml_dtypes.bfloat16
    want32 = backend.layer_norm(x16.astype(np.float32), weight.astype(np.float32), bias.astype(np.float32), 1e-6)
    assert np.array_equal(got, want32.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("sizes", [(4, 7), (7, 4), (3, 6), (6, 2), (14, 24), (24, 14), (2, 9), (5, 5), (1, 3)])
@by_backend()
def test_bicubic_matrix_is_the_numpy_one(backend: Backend, sizes: tuple[int, int]) -> None:
    got = backend.bicubic_matrix(*sizes)
    assert got.dtype == np.float32
    assert np.abs(got.astype(np.float64) - np_bicubic_matrix(*sizes, dtype=np.float32)).max() <= 1e-7


@pytest.mark.parametrize("grid,out", [((4, 4), (7, 7)), ((7, 7), (4, 4)), ((3, 5), (6, 2)), ((4, 6), (5, 3)),
                                      ((14, 14), (24, 24))])
@by_backend()
def test_position_resampling_matches_reference(backend: Backend, grid: tuple[int, int], out: tuple[int, int]) -> None:
    """Up, down, square and non-square: torch's bicubic kernel (a = -0.75, no antialiasing)."""
    rng = np.random.default_rng(0)
    table = (0.5 * rng.standard_normal((1, 1 + grid[0] * grid[1], 16))).astype(np.float32)
    got = backend.resample_position_grid(table[:, 1:], grid, out)
    assert np.abs(got - resample_position_embeddings(table, grid, out)[:, 1:]).max() <= 1e-6


@pytest.mark.parametrize("patch", [(8, 8), (4, 8), (8, 4)])
@by_backend()
def test_patch_embedding_matches_reference(backend: Backend, patch: tuple[int, int]) -> None:
    """The patch convolution equals the reference's patches @ kernel, pixels past the last whole
    patch dropped."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 35, 37)).astype(np.float32)
    weight = (rng.standard_normal((24, 3, *patch)) / np.sqrt(3 * patch[0] * patch[1])).astype(np.float32)
    bias = (0.1 * rng.standard_normal(24)).astype(np.float32)
    got = backend.patch_embed(x, weight, bias)
    assert np.abs(got - np_patch_embed(x.astype(np.float64), weight, bias)).max() <= SMALL


@by_backend()
def test_pixel_shuffle_matches_reference(backend: Backend) -> None:
    x = np.arange(2 * 12 * 3 * 4, dtype=np.float32).reshape(2, 12, 3, 4)
    assert np.array_equal(backend.pixel_shuffle(x, 2), np_pixel_shuffle(x, 2))


@by_backend()
def test_attention_kernels_match_reference(backend: Backend) -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 9, 8)).astype(np.float32) for _ in range(3))
    mask = np.array([1.0, 0.0, 0.5], np.float32).reshape(1, 3, 1, 1)
    probs = np_softmax(q.astype(np.float64) @ k.transpose(0, 1, 3, 2) / np.sqrt(8))
    context, got_probs = backend.eager_attention(q, k, v, 8**-0.5, mask)
    assert np.abs(got_probs - probs * mask).max() <= 1e-6
    assert np.abs(context - (probs * mask) @ v).max() <= SMALL
    assert np.abs(backend.fused_attention(q, k, v, 8**-0.5) - probs @ v).max() <= SMALL
    _, unmasked = backend.eager_attention(q, k, v, 8**-0.5, None)
    assert np.abs(unmasked.sum(-1) - 1).max() <= 1e-6


# ================================================================================ packaging
@by_backend()
def test_import_imports_no_other_framework(backend: Backend) -> None:
    """`import vit_X` imports its framework only: never another one, tf_keras or transformers."""
    backend.require()
    foreign = tuple(m for m in ALL_FRAMEWORK_MODULES if m not in backend.own_modules)
    code = (f"import sys, {backend.module}; "
            f"print(sorted(m for m in {foreign!r} if sys.modules.get(m) is not None))")
    # transformers' TF classes (imported by other tests) set TF_USE_LEGACY_KERAS=1, which makes
    # TensorFlow itself import tf_keras: the check runs in a clean environment.
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=REPO).stdout
    assert out.strip().splitlines()[-1] == "[]"


MISSING = [pytest.param(b, m, id=f"{b.name}-without-{m}") for b in BACKENDS for m in b.blockable]


@pytest.mark.parametrize("backend,blocked", MISSING)
def test_missing_framework_names_the_extra(backend: Backend, blocked: str) -> None:
    """With the framework unimportable, `import vit_X` says which extra to install."""
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            f"try:\n    import {backend.module}\nexcept ImportError as e:\n    print(e)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=REPO).stdout
    assert f"pip install vitx[{backend.extra}]" in out


def test_every_backend_is_in_the_table() -> None:
    """The matrix covers the three packages, each once."""
    assert sorted(b.module for b in BACKENDS) == ["vit_flax", "vit_tf", "vit_torch"]
    assert set(BACKENDS_BY_NAME) == {"torch", "tf", "flax"}

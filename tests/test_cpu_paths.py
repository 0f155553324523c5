"""vit_core.cpu: CPU feature detection and the per-ISA path-selection table (issue #14).

Every ISA branch of :func:`vit_core.cpu.select_paths` (AMX, avx512_bf16, AVX-512 only, AVX2 only,
non-x86 / unknown) is checked with faked feature sets, so no test needs that hardware; the
detection reads real /proc/cpuinfo texts of each kind. Then each plan is forced through
``VITX_CPU_FEATURES`` and the models' outputs compared with the float64 reference: every plan
this machine can run keeps docs/NUMERICS.md's float32 bound (and bfloat16 its logits bound).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import pytest

from vit_core import cpu
from vit_core.tolerances import TOLERANCES

from .backends import BACKENDS_BY_NAME
from .cases import CASES, force_cpu_level, make_inputs, reference

SMALL = TOLERANCES["small"]
LEVELS = ("amx", "avx512_bf16", "avx512", "avx2", "none")

# /proc/cpuinfo excerpts of each kind (flags abridged to what matters plus neighbours)
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
"""
EPYC_GENOA = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse sse2 fma avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni
"""
SKYLAKE_X = """vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags\t\t: fpu sse sse2 fma avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl
"""
ZEN2 = """vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7742 64-Core Processor
flags\t\t: fpu sse sse2 fma avx f16c avx2 sha_ni
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
"""


def features_of(text: str, arch: str = "x86_64") -> cpu.CPUFeatures:
    vendor, model, flags = cpu._read_cpuinfo(text)
    return cpu.CPUFeatures(arch=arch, vendor=vendor, model=model, flags=flags)


# ================================================================================ detection
@pytest.mark.parametrize("text, arch, isa, model", [
    (SAPPHIRE_RAPIDS, "x86_64", "amx", "Intel(R) Xeon(R) Platinum 8480+"),
    (EPYC_GENOA, "x86_64", "avx512_bf16", "AMD EPYC 9654 96-Core Processor"),
    (SKYLAKE_X, "x86_64", "avx512", "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz"),
    (ZEN2, "x86_64", "avx2", "AMD EPYC 7742 64-Core Processor"),
    (GRAVITON3, "aarch64", "other", ""),
], ids=["amx", "avx512_bf16", "avx512", "avx2", "arm64"])
def test_cpuinfo_texts_give_their_isa_level(text: str, arch: str, isa: str, model: str) -> None:
    features = features_of(text, arch)
    assert features.isa == isa and features.model == model
    summary = features.summary()
    assert summary["isa"] == isa and summary["arch"] == arch
    if isa == "amx":
        assert {"amx_bf16", "amx_tile", "avx512_bf16", "avx2"} <= set(summary["vector_flags"])
    if arch == "aarch64":
        assert features.vendor == "0x41" and "bf16" in features.flags and cpu.bf16_native(features)


def test_isa_level_needs_every_flag_of_a_level() -> None:
    full = cpu._level_flags("amx")
    assert cpu.isa_level(full) == "amx"
    assert cpu.isa_level(full - {"amx_tile"}) == "avx512_bf16"  # AMX needs the tile unit too
    assert cpu.isa_level(full - {"amx_bf16", "avx512_bf16"}) == "avx512"
    assert cpu.isa_level(full - {"avx512bw"}) == "avx2"  # no oneDNN bf16 / torch AVX512 kernels without BW
    assert cpu.isa_level({"avx2"}) == "other"  # AVX2 without FMA
    assert cpu.isa_level(full, arch="aarch64") == "other"  # x86 flag names mean nothing elsewhere


@pytest.mark.parametrize("level", LEVELS)
def test_override_names_a_level(level: str) -> None:
    features = cpu.parse_override(level)
    assert features.isa == ("other" if level == "none" else level)
    assert features.source == "env"


def test_override_reads_flags_arch_and_vendor() -> None:
    features = cpu.parse_override("avx2, avx512f avx512bw avx512vl avx512dq vendor=GenuineIntel")
    assert features.isa == "avx512" and features.vendor == "GenuineIntel"
    features = cpu.parse_override("arch=aarch64 bf16")
    assert features.isa == "other" and cpu.bf16_native(features)
    for bad, word in (("", "empty"), ("speed=fast", "speed=fast"), ("arch=", "arch=")):
        with pytest.raises(ValueError, match=word):
            cpu.parse_override(bad)


def test_cpu_features_reads_the_env_override_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu.ENV_VAR, "avx2")
    first = cpu.cpu_features()
    assert first.isa == "avx2" and first.source == "env" and cpu.cpu_features() is first  # cached
    assert cpu.current_plan("torch", "float32").isa == "avx2"
    monkeypatch.setenv(cpu.ENV_VAR, "amx")
    assert cpu.cpu_features().isa == "amx" and cpu.current_plan("torch", "bfloat16").attention == "sdpa"
    monkeypatch.delenv(cpu.ENV_VAR)
    real = cpu.cpu_features()
    assert real.source in ("cpuinfo", "none") and real.isa in cpu.ISA_LEVELS


def test_this_machine_is_detected_from_proc_cpuinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    real = cpu.cpu_features()
    assert real.flags == cpu._read_cpuinfo(text)[2]
    torch = pytest.importorskip("torch")
    # with torch imported its ATen kernel level is recorded too; it agrees with the flags
    capability = cpu.cpu_features().torch_capability
    assert capability == torch.backends.cpu.get_cpu_capability()
    if real.isa in ("amx", "avx512_bf16", "avx512") and capability is not None:
        assert capability in ("AVX512", "AVX2")  # ATEN_CPU_CAPABILITY may cap it lower


# ================================================================================ the table
def plan(level: str, framework: str, dtype: str) -> cpu.PathPlan:
    return cpu.select_paths(cpu.parse_override(level), framework, dtype)


@pytest.mark.parametrize("level, gemm, attention, native", [
    ("amx", "onednn_prepacked", "sdpa", True),
    ("avx512_bf16", "onednn_prepacked", "matmul_per_image", True),
    ("avx512", "onednn_prepacked", "sdpa", False),
    ("avx2", "onednn_prepacked_float32", "sdpa", False),  # no oneDNN bf16 GEMM: float32 on the bf16 values
    ("none", "aten_linear", "sdpa", False),
])
def test_torch_bfloat16_plan_per_isa(level: str, gemm: str, attention: str, native: bool) -> None:
    p = plan(level, "torch", "bfloat16")
    assert (p.gemm, p.attention, p.bf16_native) == (gemm, attention, native)
    assert p.gemm_epilogues == p.fused_qkv == gemm.startswith("onednn_prepacked")
    assert p.sub_batches
    assert any("emulated" in r for r in p.reasons) == (not native)


@pytest.mark.parametrize("level, gemm", [("amx", "onednn_prepacked"), ("avx512_bf16", "onednn_prepacked"),
                                         ("avx512", "onednn_prepacked"), ("avx2", "onednn_prepacked"),
                                         ("none", "aten_linear")])
def test_torch_float32_plan_per_isa(level: str, gemm: str) -> None:
    p = plan(level, "torch", "float32")
    assert p.gemm == gemm and p.attention == "sdpa" and p.bf16_native is None
    assert p.gemm_epilogues == p.fused_qkv == (gemm == "onednn_prepacked")
    assert p.reasons and all(isinstance(r, str) and r for r in p.reasons)


@pytest.mark.parametrize("level", LEVELS)
def test_tf_and_flax_plans_per_isa(level: str) -> None:
    """TF and Flax leave GEMMs and fusions to their compilers; what the ISA changes is whether
    bfloat16 is native (and with it TF's bf16 dots under XLA). float32 runs in sub-batches in
    both; TF's bfloat16 runs whole."""
    native = level in ("amx", "avx512_bf16")
    tf32, tf16 = plan(level, "tf", "float32"), plan(level, "tf", "bfloat16")
    assert (tf32.gemm, tf32.attention, tf32.sub_batches, tf32.bf16_native) == ("matmul", "batched_matmul", True, None)
    assert (tf16.sub_batches, tf16.bf16_native) == (False, native)
    # bf16 x bf16 -> float32 dots under XLA where bf16 is native; TF's bf16 matmul elsewhere
    assert tf16.gemm == ("matmul_xla_f32_result" if native else "matmul")
    fx32, fx16 = plan(level, "flax", "float32"), plan(level, "flax", "bfloat16")
    assert (fx32.gemm, fx32.attention, fx32.sub_batches) == ("dot", "batched_dot", True)
    assert (fx16.gemm, fx16.sub_batches, fx16.bf16_native) == ("dot_f32_result", True, native)


def test_select_paths_is_pure_and_checks_its_arguments() -> None:
    features = cpu.parse_override("avx512_bf16")
    again = cpu.parse_override("avx512_bf16")
    assert cpu.select_paths(features, "torch", "float32") == cpu.select_paths(again, "torch", "float32")
    assert cpu.select_paths(features, "torch", "float16").bf16_native is None
    with pytest.raises(ValueError, match="framework 'mxnet'"):
        cpu.select_paths(features, "mxnet", "float32")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        cpu.select_paths(features, "torch", "int8")
    record = cpu.select_paths(features, "torch", "bfloat16").as_dict()
    assert record["attention"] == "matmul_per_image" and record["isa"] == "avx512_bf16"


@pytest.mark.parametrize("text, saturates", [
    ("avx2", True),  # vpmaddubsw: u8 x s8 pairs in saturating int16
    ("avx2 avx512f avx512bw avx512vl avx512dq", True),  # Skylake-X: AVX-512 without VNNI
    ("avx512", False),  # the level includes avx512_vnni (Cascade Lake and later, Zen 4)
    ("avx2 avx_vnni", False),  # Alder Lake's VEX VNNI
    ("avx512_bf16", False),
    ("amx", False),
    ("none", True),  # an x86 CPU with no known flag: the safe range
    ("arch=aarch64", False),  # arm's sdot / udot accumulate in int32
])
def test_int8_weight_range_per_cpu(text: str, saturates: bool) -> None:
    features = cpu.parse_override(text)
    assert cpu.int8_dot_saturates(features) is saturates
    assert cpu.int8_weight_max(features) == (63 if saturates else 127)
    assert 2 * 255 * cpu.int8_weight_max(features) <= 32767 or not saturates  # no int16 pair overflows


def test_emulated_bfloat16_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_WARNED", set())
    monkeypatch.setenv(cpu.ENV_VAR, "avx512")
    with pytest.warns(RuntimeWarning, match="bfloat16 is emulated on this CPU \\(avx512"):
        assert cpu.warn_if_emulated("torch", "bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu.warn_if_emulated("torch", "bfloat16")  # once
        assert not cpu.warn_if_emulated("torch", "float32")
        monkeypatch.setenv(cpu.ENV_VAR, "amx")
        assert not cpu.warn_if_emulated("tf", "bfloat16")  # native: no warning


# ================================================================================ parity on every plan
def _outputs(backend: Any, case: Any, dtype: str = "float32") -> dict[str, np.ndarray]:
    model = backend.build(case, dtype=dtype)
    out = backend.forward(model, {"pixel_values": make_inputs(case)["pixel_values"]})
    return {k: backend.to_numpy(out[k]) for k in ("last_hidden_state", "logits") if k in out and out[k] is not None}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case_name", ["cls", "qkv-bias-off"])
def test_torch_float32_within_bounds_on_every_plan(monkeypatch: pytest.MonkeyPatch, level: str, case_name: str) -> None:
    """Each plan forced on this machine: the fused / prepacked paths it picks (or the plain ones)
    stay within the float32 bound of the float64 reference."""
    backend = BACKENDS_BY_NAME["torch"]
    backend.require()
    force_cpu_level(monkeypatch, level)
    case = next(c for c in CASES if c.name == case_name)
    expected = reference(case)
    for key, got in _outputs(backend, case).items():
        diff = float(np.max(np.abs(got - expected[key])))
        assert diff <= SMALL, f"{level} {case_name} {key}: {diff:.2e} > {SMALL:.0e}"


@pytest.mark.parametrize("level", LEVELS)
def test_torch_bfloat16_close_on_every_plan_this_cpu_runs(monkeypatch: pytest.MonkeyPatch, level: str) -> None:
    backend = BACKENDS_BY_NAME["torch"]
    torch = pytest.importorskip("torch")
    backend.require()
    from vit_torch import layers

    force_cpu_level(monkeypatch, level)
    p = cpu.current_plan("torch", "bfloat16")
    if p.gemm == "onednn_prepacked" and not layers._onednn_runs(torch.bfloat16):
        pytest.skip("this CPU has no oneDNN bfloat16 GEMM")
    case = next(c for c in CASES if c.name == "cls")
    logits = _outputs(backend, case, "bfloat16")["logits"]
    diff = float(np.max(np.abs(logits - reference(case)["logits"])))
    assert diff <= TOLERANCES["bfloat16_vs_float32_logits"], f"{level}: bf16 logits {diff:.2e}"


@pytest.mark.parametrize("framework", ["tf", "flax"])
@pytest.mark.parametrize("level", ["amx", "none"])
def test_tf_flax_float32_within_bounds_on_forced_plans(monkeypatch: pytest.MonkeyPatch, framework: str, level: str) -> None:
    """TF and Flax float32 plans are the same on every ISA (test_tf_and_flax_plans_per_isa); the
    computation of the highest and the lowest level stays within the float32 bound."""
    backend = BACKENDS_BY_NAME[framework]
    backend.require()
    force_cpu_level(monkeypatch, level)
    case = next(c for c in CASES if c.name == "cls")
    expected = reference(case)
    for key, got in _outputs(backend, case).items():
        diff = float(np.max(np.abs(got - expected[key])))
        assert diff <= SMALL, f"{framework} {level} {key}: {diff:.2e}"


def test_models_read_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan that turns a path off turns it off in the model: no oneDNN GEMM when gemm is
    "aten_linear", no sub-batches when sub_batches is False."""
    torch = pytest.importorskip("torch")
    from vit_torch import layers

    real = cpu.current_plan
    monkeypatch.setattr(cpu, "current_plan", lambda fw, dt: dataclasses.replace(real(fw, dt), gemm="aten_linear",
                                                                               sub_batches=False))
    linear = layers.Linear(8, 8).eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert not linear.onednn_ready(x)
        assert not layers.splits_batch(torch.randn(64, 65, 8), None, False, False, False)
    monkeypatch.undo()
    monkeypatch.setenv(cpu.ENV_VAR, "avx512_bf16")
    with torch.no_grad():
        assert linear.onednn_ready(x) == layers._onednn_runs(torch.float32)
        assert layers.splits_batch(torch.randn(64, 65, 8), None, False, False, False)


def test_bfloat16_on_avx2_runs_the_float32_onednn_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The avx2 bfloat16 plan (oneDNN has no bf16 GEMM there): the Linear layers, their GELU and
    residual epilogues and the fused q / k / v run oneDNN's float32 GEMM on the widened bf16 values
    and round once: each output is the float32 result of the same bf16 operands, rounded to bf16."""
    torch = pytest.importorskip("torch")
    from vit_torch import layers

    monkeypatch.setenv(cpu.ENV_VAR, "avx2")
    if not layers._onednn_runs(torch.float32):
        pytest.skip("this torch build has no oneDNN")
    assert layers.gemm_dtype(torch.bfloat16) == torch.float32 and layers.onednn_gemm(torch.bfloat16)
    assert layers.gemm_dtype(torch.float32) == torch.float32
    torch.manual_seed(0)
    linear = layers.Linear(64, 96).eval().to(torch.bfloat16)
    x, residual = torch.randn(3, 10, 64).bfloat16(), torch.randn(3, 10, 96).bfloat16()
    exact = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    with torch.no_grad():
        assert linear.onednn_ready(x) and linear.fuses(x, "gelu")
        plain, gelu, added = linear(x), linear(x, post_op="gelu"), linear(x, residual=residual)
        assert linear.packed_weight().dtype == torch.float32
    assert plain.dtype == gelu.dtype == added.dtype == torch.bfloat16
    for got, want in ((plain, exact), (gelu, torch.nn.functional.gelu(exact)), (added, exact + residual.double())):
        # one rounding to bf16 of a float32 result: within half a bf16 ulp (2^-8 relative) plus float32 noise
        assert float(((got.double() - want).abs() / want.abs().clamp_min(1e-3)).max()) <= 2.0 ** -8 + 1e-5

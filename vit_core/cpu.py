"""The CPU the code runs on, and the speed paths chosen for it (issue #14).

Two halves:

- :func:`cpu_features` detects what the CPU can do: the ISA flags of ``/proc/cpuinfo`` (or
  ``VITX_CPU_FEATURES``, an override for tests and debugging), summarised as one ISA level
  (:data:`ISA_LEVELS`: ``amx``, ``avx512_bf16``, ``avx512``, ``avx2``, ``other``), plus
  ``torch.backends.cpu.get_cpu_capability()`` where torch is already imported. Cached.
- :func:`select_paths` is a pure function of those features, the framework and the dtype: which
  GEMM backend, which attention kernel, which fusions, whether bfloat16 runs on bf16 hardware or
  is emulated, how large a batch runs whole. The models of the three frameworks read its
  :class:`PathPlan` (vit_torch/layers.py, vit_tf/layers.py, vit_flax/layers.py) instead of
  deciding by themselves, so a path is chosen by the CPU's ISA, never by what won on one host;
  tests/test_cpu_paths.py checks every branch with faked features and runs each plan this machine
  can execute against the float64 reference.

Every plan computes the same sums within docs/NUMERICS.md's bounds (float32: another blocking of
the same float32 products; bfloat16: bf16 operands, float32 accumulation and float32 softmax
statistics). Why each entry is what it is (the rates measured per ISA) is in
docs/performance.md, "Speed paths per CPU".

``VITX_CPU_FEATURES`` (comma- or space-separated): ISA level names (``amx``, ``avx512_bf16``,
``avx512``, ``avx2``; each implies the flags of the levels below it), raw ``/proc/cpuinfo`` flag
names, ``arch=NAME`` and ``vendor=NAME``; ``none`` alone stands for a CPU with no known
vector ISA. It changes only which paths vitx picks: the libraries below still run what the real
CPU supports (oneDNN runs bfloat16 without AMX on avx512_bf16, for example), so a forced plan is
a valid computation wherever its kernels exist.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import platform
import sys
import warnings
from dataclasses import dataclass, field

ENV_VAR = "VITX_CPU_FEATURES"
ISA_LEVELS = ("amx", "avx512_bf16", "avx512", "avx2", "other")
FRAMEWORKS = ("torch", "tf", "flax")
DTYPES = ("float32", "bfloat16", "float16")

# /proc/cpuinfo flags that make up each level (a level implies the flags of the ones after it).
_LEVEL_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2": ("avx", "avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni"),
    "avx512_bf16": ("avx512_bf16",),
    "amx": ("amx_bf16", "amx_tile", "amx_int8"),
}
_X86_ARCHS = ("x86_64", "amd64", "x86", "i686", "i386")
_LEVEL_ORDER = ("avx2", "avx512", "avx512_bf16", "amx")  # low to high


def _level_flags(level: str) -> frozenset[str]:
    """The flags a CPU of ``level`` has: its own and those of every level below it."""
    flags: set[str] = set()
    for name in _LEVEL_ORDER[: _LEVEL_ORDER.index(level) + 1]:
        flags.update(_LEVEL_FLAGS[name])
    return frozenset(flags)


@dataclass(frozen=True)
class CPUFeatures:
    """What the CPU can do. ``isa`` is the summary level (:func:`isa_level` of the flags)."""

    arch: str  # platform.machine(): x86_64, aarch64, arm64, ...
    vendor: str  # GenuineIntel, AuthenticAMD, ... ("" when unknown)
    model: str  # the "model name" line ("" when unknown)
    flags: frozenset[str]
    source: str = "cpuinfo"  # "cpuinfo", "env" (VITX_CPU_FEATURES) or "none" (nothing readable)
    torch_capability: str | None = None  # torch.backends.cpu.get_cpu_capability(), if torch is imported

    @property
    def isa(self) -> str:
        return isa_level(self.flags, self.arch)

    def describe(self) -> str:
        """One line naming the host kind: the CPU model and its ISA level in words
        ("AMD EPYC, AVX-512 + avx512_bf16, no AMX"); what benchmarks/RESULTS.md heads each table with."""
        words = {"amx": "AMX + avx512_bf16 + AVX-512", "avx512_bf16": "AVX-512 + avx512_bf16, no AMX",
                 "avx512": "AVX-512 without bf16 (bfloat16 emulated)", "avx2": "AVX2, no AVX-512 (bfloat16 emulated)",
                 "other": f"{self.arch}, no x86 vector ISA"}[self.isa]
        return f"{self.model or self.vendor or 'unknown CPU'}, {words}"

    def summary(self) -> dict[str, object]:
        """A JSON-able record: what the benchmarks store with every result."""
        vector = sorted(f for f in self.flags if f.startswith(("avx", "amx", "fma", "sse4", "f16c")) or f in ("bf16", "sve", "asimd"))
        return {"model": self.model, "vendor": self.vendor, "arch": self.arch, "isa": self.isa, "host": self.describe(),
                "vector_flags": vector, "torch_capability": self.torch_capability, "source": self.source}


def isa_level(flags: frozenset[str] | set[str], arch: str = "x86_64") -> str:
    """The highest ISA level of :data:`ISA_LEVELS` whose flags are all present ("other" for
    non-x86 CPUs and x86 ones without AVX2 + FMA). AMX needs amx_bf16 and amx_tile (and AVX-512
    beneath it); avx512 needs F, BW, VL and DQ (what oneDNN's bf16 and torch's AVX512 kernels use)."""
    if arch.lower() not in _X86_ARCHS:
        return "other"
    has = set(flags)
    avx2 = {"avx2", "fma"} <= has
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= has
    if avx512 and {"amx_bf16", "amx_tile"} <= has:
        return "amx"
    if avx512 and "avx512_bf16" in has:
        return "avx512_bf16"
    if avx512:
        return "avx512"
    if avx2:
        return "avx2"
    return "other"


def parse_override(text: str) -> CPUFeatures:
    """The features ``VITX_CPU_FEATURES=text`` stands for (see the module docstring).
    ValueError naming the token for an empty value or an ``arch=`` / ``vendor=`` without a value."""
    tokens = [t for t in text.replace(",", " ").split() if t]
    if not tokens:
        raise ValueError(f"{ENV_VAR} is empty; give ISA levels ({', '.join(ISA_LEVELS[:-1])}), "
                         "cpuinfo flags, arch=NAME or vendor=NAME, or 'none'")
    arch, vendor, flags = "x86_64", "", set()
    for token in tokens:
        lowered = token.lower()
        if "=" in lowered:
            name, _, value = lowered.partition("=")
            if name not in ("arch", "vendor") or not value:
                raise ValueError(f"{ENV_VAR}: cannot read {token!r}; expected arch=NAME or vendor=NAME")
            if name == "arch":
                arch = value
            else:
                vendor = token.partition("=")[2]
        elif lowered in ("none", "other"):
            continue
        elif lowered in _LEVEL_FLAGS:
            flags |= _level_flags(lowered)
        else:
            flags.add(lowered)
    return CPUFeatures(arch=arch, vendor=vendor, model=f"{ENV_VAR}={text}", flags=frozenset(flags), source="env")


def _read_cpuinfo(text: str) -> tuple[str, str, frozenset[str]]:
    """(vendor, model name, flags) of the first processor in /proc/cpuinfo's text (x86 "flags",
    arm64 "Features", "CPU implementer" as the vendor there)."""
    vendor = model = ""
    flags: frozenset[str] = frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        if name in ("vendor_id", "cpu implementer") and not vendor:
            vendor = value
        elif name in ("model name", "cpu model") and not model:
            model = value
        elif name in ("flags", "features") and not flags:
            flags = frozenset(value.lower().split())
    return vendor, model, flags


def _torch_capability() -> str | None:
    """torch's ATen CPU kernel level, only where torch is already imported (vit_core never imports it)."""
    torch = sys.modules.get("torch")
    try:
        return str(torch.backends.cpu.get_cpu_capability()) if torch is not None else None
    except Exception:  # an old or partial torch: the flags decide alone
        return None


@functools.lru_cache(maxsize=8)
def _detect(override: str | None) -> CPUFeatures:
    if override is not None:
        return parse_override(override)
    arch = platform.machine() or "unknown"
    try:
        vendor, model, flags = _read_cpuinfo(pathlib.Path("/proc/cpuinfo").read_text())
        source = "cpuinfo"
    except OSError:  # not Linux: no flags, "other" unless the arch says more
        vendor, model, flags, source = "", platform.processor(), frozenset(), "none"
    return CPUFeatures(arch=arch, vendor=vendor, model=model, flags=flags, source=source)


_FEATURES: dict[tuple[str | None, bool], CPUFeatures] = {}


def cpu_features() -> CPUFeatures:
    """The CPU's features: ``VITX_CPU_FEATURES`` when set, else /proc/cpuinfo, with torch's CPU
    capability filled in once torch is imported. Cached per override value."""
    override = os.environ.get(ENV_VAR) or None
    key = (override, "torch" in sys.modules)
    features = _FEATURES.get(key)
    if features is None:
        features = _detect(override)
        if override is None and key[1]:
            features = dataclasses.replace(features, torch_capability=_torch_capability())
        _FEATURES[key] = features
    return features


# ------------------------------------------------------------------------------ the selection table
@dataclass(frozen=True)
class PathPlan:
    """The CPU speed paths of one framework and dtype on one ISA level.

    gemm: torch "onednn_prepacked" (weights reordered once into oneDNN's blocked layout,
        ``torch.ops.mkldnn._linear_pointwise``), "onednn_prepacked_float32" (bfloat16 where oneDNN
        has no bf16 GEMM: operands widened to float32, the float32 GEMM, the result rounded to
        bf16) or "aten_linear" (``F.linear``: MKL sgemm in float32);
        tf "matmul" / "matmul_xla_f32_result" (bfloat16 on bf16 hardware: under XLA, bf16 operands
        and a float32 result, rounded once after the bias; TF's bf16 matmul outside XLA);
        flax "dot" (float32) / "dot_f32_result" (bf16 operands, float32 result).
    gemm_epilogues: bias + GELU and the residual adds run inside the GEMM (torch oneDNN only).
    fused_qkv: query, key and value as one GEMM on the concatenated weight (torch oneDNN only).
    attention: torch "sdpa" (``F.scaled_dot_product_attention``: its CPU flash kernel, bf16
        products with float32 softmax statistics in bfloat16) or "matmul_per_image" (the eager
        formula image by image: bf16 batched matmuls, float32 softmax); tf "batched_matmul";
        flax "batched_dot" (both: (batch, heads)-leading batched products, float32 softmax).
    bf16_native: bfloat16 products run on bf16 hardware (AMX tiles, avx512_bf16 dot products);
        False: emulated (converted to float32), no faster than float32. None for other dtypes.
    sub_batches: large inference batches run in sub-batches of the framework's
        ``INFERENCE_CHUNK_ROWS`` token rows (torch 2048, TF and Flax 1024: operands stay in cache);
        False: the batch runs whole.
    reasons: one line per choice, what it rests on (measured rates per ISA).
    """

    framework: str
    dtype: str
    isa: str
    gemm: str
    attention: str
    gemm_epilogues: bool = False
    fused_qkv: bool = False
    bf16_native: bool | None = None
    sub_batches: bool = False
    reasons: tuple[str, ...] = field(default=(), compare=False)

    def as_dict(self) -> dict[str, object]:
        return {"framework": self.framework, "dtype": self.dtype, "isa": self.isa, "gemm": self.gemm,
                "attention": self.attention, "gemm_epilogues": self.gemm_epilogues, "fused_qkv": self.fused_qkv,
                "bf16_native": self.bf16_native, "sub_batches": self.sub_batches}


def bf16_native(features: CPUFeatures) -> bool:
    """Whether the CPU multiplies bfloat16 in hardware: AMX or avx512_bf16 on x86, the BF16
    extension ("bf16" in /proc/cpuinfo Features) on arm64."""
    return features.isa in ("amx", "avx512_bf16") or (features.isa == "other" and "bf16" in features.flags)


# flags of an x86 int8 dot product that accumulates u8 x s8 products straight into int32
_INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
INT8_WEIGHT_MAX_FULL = 127
INT8_WEIGHT_MAX_REDUCED = 63


def int8_dot_saturates(features: CPUFeatures | None = None) -> bool:
    """Whether this CPU's (or ``features``') uint8 x int8 GEMM kernels (oneDNN, ONNX Runtime's MLAS,
    OpenVINO) saturate.

    Without VNNI (AVX2, AVX-512 before Cascade Lake) they multiply with ``vpmaddubsw``, which adds
    each pair of u8 x s8 products into a *saturating int16*: 2 x 255 x 127 = 64,770 overflows
    32,767. Measured on an AVX2 AMD EPYC: one 256 -> 64 Linear off exact integer arithmetic by
    0.30 (the whole of its int8 error), the fine-tuned test ViT's worst-image logit cosine 0.9950
    against float32. With weights in [-63, 63] (2 x 255 x 63 = 32,130) the kernel is exact again
    (2e-7). VNNI (``vpdpbusd``), AMX and arm's dot products accumulate in int32. x86 only."""
    features = cpu_features() if features is None else features
    if features.arch.lower() not in _X86_ARCHS:
        return False
    return not any(flag in features.flags for flag in _INT8_DOT_FLAGS)


def int8_weight_max(features: CPUFeatures | None = None) -> int:
    """The largest int8 weight magnitude to quantize to on this CPU (or ``features``): 127, or 63
    where :func:`int8_dot_saturates` (ONNX Runtime's ``reduce_range``, NNCF's overflow fix)."""
    return INT8_WEIGHT_MAX_REDUCED if int8_dot_saturates(features) else INT8_WEIGHT_MAX_FULL


def select_paths(features: CPUFeatures, framework: str, dtype: str) -> PathPlan:
    """The speed paths of ``framework`` ("torch", "tf", "flax") in ``dtype`` ("float32",
    "bfloat16", "float16") on a CPU with ``features``. Pure: the same features give the same plan.
    ValueError for an unknown framework or dtype."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework {framework!r} is not one of {FRAMEWORKS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    isa = features.isa
    native = bf16_native(features) if dtype == "bfloat16" else None
    reasons: list[str] = []
    if native is False:
        reasons.append(f"bfloat16 is emulated on {isa} (no AMX / avx512_bf16): float32 accumulate, "
                       "no faster than float32")
    if framework == "torch":
        return _select_torch(isa, dtype, native, reasons)
    if framework == "tf":
        # TF's matmul is oneDNN / Eigen whatever vitx does; the fusions are Grappler's / XLA's.
        reasons.append("float32: sub-batches of 1024 rows (TF's GEMMs lose rate on 6k-row operands, AVX-512 "
                       "measured); bfloat16 runs whole (TF's bf16 matmul gains rate with rows)")
        gemm = "matmul"
        if native:
            gemm = "matmul_xla_f32_result"
            reasons.append("bfloat16 under XLA (jit_compile): bf16 x bf16 -> float32 dots (BatchMatMulV3 with "
                           "Tout=float32), which XLA CPU runs on the bf16 instructions; a bf16-result dot has its "
                           "operands widened to float32 (XLA dot 438 vs 896 GFLOP/s, AMD avx512_bf16). TF's graph "
                           "kernels have no such signature: outside XLA TF's bf16 matmul. On emulated bf16 (AVX2) "
                           "the float32-result dot measured slower (80-96 vs 100-145 GFLOP/s): not taken. Under XLA "
                           "these run in 1024-row sub-batches, as vit_flax")
        return PathPlan("tf", dtype, isa, gemm, "batched_matmul", bf16_native=native,
                        sub_batches=dtype == "float32", reasons=tuple(reasons))
    gemm = "dot_f32_result" if dtype == "bfloat16" else "dot"
    if dtype == "bfloat16":
        reasons.append("bf16 x bf16 -> float32 dots: XLA CPU widens the operands of a bf16-result dot "
                       "(896 vs 438 GFLOP/s on avx512_bf16); the same float32 sums on every ISA, the "
                       "bias added before the one rounding (on AVX2 a bf16-result dot measured 1.31x "
                       "faster at ViT-S/16 batch 8 but rounds twice: not taken)")
    reasons.append("sub-batches of 1024 rows: XLA CPU dots lose rate on 6k-row operands")
    return PathPlan("flax", dtype, isa, gemm, "batched_dot", bf16_native=native, sub_batches=True,
                    reasons=tuple(reasons))


def _select_torch(isa: str, dtype: str, native: bool | None, reasons: list[str]) -> PathPlan:
    x86 = isa != "other"
    # oneDNN's bf16 kernels need AVX-512 (BW/VL/DQ) at least; on AVX2 bfloat16 runs oneDNN's float32 GEMM.
    onednn = x86 and dtype in ("float32", "bfloat16")
    if onednn and dtype == "bfloat16" and isa == "avx2":
        gemm = "onednn_prepacked_float32"
        reasons.append("bfloat16 on AVX2: oneDNN has no bf16 GEMM here and F.linear's bf16 fallback runs "
                       "13-15 GFLOP/s; the bf16 values widened exactly to float32 run oneDNN's float32 "
                       "GEMM (141-185 GFLOP/s, AMD EPYC AVX2) and the result is rounded to bf16")
    elif onednn:
        gemm = "onednn_prepacked"
        if dtype == "float32" and isa in ("avx512", "avx512_bf16"):
            reasons.append("float32 oneDNN prepacked 502 GFLOP/s vs MKL F.linear 209 on AMD AVX-512: 2.4x")
        elif dtype == "float32" and isa == "amx":
            reasons.append("float32 oneDNN = MKL (~376 GFLOP/s) on Intel AMX: prepacked keeps the GEMM epilogues")
        elif dtype == "float32":
            reasons.append("float32 on AVX2: oneDNN prepacked 141-185 GFLOP/s vs MKL F.linear 117-137 "
                           "(AMD EPYC AVX2, 2 threads): 1.1-1.4x")
        else:
            reasons.append("bfloat16 oneDNN prepacked (AMX tiles / avx512_bf16 dot products inside oneDNN)")
    else:
        gemm = "aten_linear"
        reasons.append("F.linear: no oneDNN prepacked GEMM for this ISA / dtype")
    if dtype == "bfloat16" and isa == "avx512_bf16":
        attention = "matmul_per_image"
        reasons.append("bf16 attention image by image (oneDNN bf16 matmuls, float32 softmax in cache): "
                       "faster than torch's CPU flash kernel on avx512_bf16")
    else:
        attention = "sdpa"
        if dtype == "bfloat16" and isa == "amx":
            reasons.append("bf16 attention: torch's CPU flash kernel (bf16 QK^T / PV on AMX, float32 softmax "
                           "statistics); the per-image matmul path was 0.70x of the compiled peers on AMX")
    # Fusing q, k and v into one GEMM: fewer, wider GEMMs; worth it where the GEMM is fast and the
    # per-call overhead shows (measured on avx512_bf16 in float32 and bfloat16, see docs/performance.md)
    fused_qkv = onednn
    return PathPlan("torch", dtype, isa, gemm, attention, gemm_epilogues=onednn, fused_qkv=fused_qkv,
                    bf16_native=native, sub_batches=True, reasons=tuple(reasons))


_PLANS: dict[tuple[str | None, str, str], PathPlan] = {}


def current_plan(framework: str, dtype: str) -> PathPlan:
    """:func:`select_paths` for this machine's CPU (or ``VITX_CPU_FEATURES``); cached per override
    value, so the models can ask on every call (a dict lookup)."""
    key = (os.environ.get(ENV_VAR) or None, framework, dtype)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = select_paths(cpu_features(), framework, dtype)
    return plan


_WARNED: set[tuple[str, str]] = set()


def warn_if_emulated(framework: str, dtype: str) -> bool:
    """Warn once per (framework, CPU) when ``dtype`` is bfloat16 and the CPU has no bf16 hardware:
    the model then computes in float32 and converts, slower than float32. Returns whether it warned."""
    if dtype != "bfloat16":
        return False
    plan = current_plan(framework, dtype)
    key = (framework, plan.isa)
    if plan.bf16_native or key in _WARNED:
        return False
    _WARNED.add(key)
    warnings.warn(f"vitx: bfloat16 is emulated on this CPU ({plan.isa}: no AMX or avx512_bf16), so {framework} "
                  "computes it in float32 and converts: expect float32 speed or slower; float32 is the faster "
                  f"choice here (override the detection with {ENV_VAR})", RuntimeWarning, stacklevel=3)
    return True

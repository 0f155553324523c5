"""vit_core.checkpoint: every weight format, checked against transformers 4.57.6 as the oracle writer.

Oracle cases save transformers' PyTorch models (and the TF / Flax models converted from them with
``from_pt=True``) in each format transformers writes and require ``read_state_dict`` to give back
exactly (bitwise, same dtype) the PyTorch model's ``state_dict``. Round trips write with this module
and load with transformers (same outputs as the PyTorch model, docs/NUMERICS.md bound 1e-5) or read
back bitwise. The rest is table-driven: hostile and broken files, base/task fitting, the hub cache.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import zipfile
from typing import Any, Callable

import numpy as np
import pytest

from vit_core.checkpoint import safetensors as st_container
from vit_core.checkpoint import staging
from vit_core.checkpoint import (
    WEIGHT_FILES,
    CheckpointError,
    CheckpointNotFoundError,
    drop_unused_qkv_bias,
    find_weights_file,
    match_state_to_model,
    read_state_dict,
    resolve_pretrained,
    save_state_dict,
    to_legacy_names,
    to_new_names,
    write_flax_msgpack,
    write_tf_h5,
)

# Tiny ViT: D=32, 2 layers, 4 heads, M=37, 32x32 images, P=8 (T = 17 tokens), 3 labels, stride 8.
D, LAYERS, M, P, C, T, K, STRIDE = 32, 2, 37, 8, 3, 17, 3, 8
TINY = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=M, image_size=32,
            patch_size=P, encoder_stride=STRIDE, num_labels=K)
TASKS = ("base", "cls", "mim")
ATOL = 1e-5  # docs/NUMERICS.md: every output, small configs, any two frameworks


# --------------------------------------------------------------------------------------------
# Canonical states without any framework (docs/FORMATS.md section 1)
# --------------------------------------------------------------------------------------------


def canonical_shapes(task: str, *, qkv_bias: bool = True) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of transformers' PT ViTModel / ViTForImageClassification / ViTForMaskedImageModeling."""
    pre = "" if task == "base" else "vit."
    s: dict[str, tuple[int, ...]] = {f"{pre}embeddings.cls_token": (1, 1, D)}
    if task == "mim":
        s[f"{pre}embeddings.mask_token"] = (1, 1, D)
    s[f"{pre}embeddings.position_embeddings"] = (1, T, D)
    s[f"{pre}embeddings.patch_embeddings.projection.weight"] = (D, C, P, P)
    s[f"{pre}embeddings.patch_embeddings.projection.bias"] = (D,)
    for i in range(LAYERS):
        layer = f"{pre}encoder.layer.{i}"
        for name in ("query", "key", "value"):
            s[f"{layer}.attention.attention.{name}.weight"] = (D, D)
            if qkv_bias:
                s[f"{layer}.attention.attention.{name}.bias"] = (D,)
        s[f"{layer}.attention.output.dense.weight"], s[f"{layer}.attention.output.dense.bias"] = (D, D), (D,)
        s[f"{layer}.intermediate.dense.weight"], s[f"{layer}.intermediate.dense.bias"] = (M, D), (M,)
        s[f"{layer}.output.dense.weight"], s[f"{layer}.output.dense.bias"] = (D, M), (D,)
        for norm in ("layernorm_before", "layernorm_after"):
            s[f"{layer}.{norm}.weight"], s[f"{layer}.{norm}.bias"] = (D,), (D,)
    s[f"{pre}layernorm.weight"], s[f"{pre}layernorm.bias"] = (D,), (D,)
    if task == "base":
        s["pooler.dense.weight"], s["pooler.dense.bias"] = (D, D), (D,)
    elif task == "cls":
        s["classifier.weight"], s["classifier.bias"] = (K, D), (K,)
    else:
        s["decoder.0.weight"], s["decoder.0.bias"] = (STRIDE * STRIDE * C, D, 1, 1), (STRIDE * STRIDE * C,)
    return s


def canonical_state(task: str, *, qkv_bias: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in canonical_shapes(task, qkv_bias=qkv_bias).items()}


def assert_same_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Same keys, and every array bitwise equal with the same dtype and shape."""
    assert sorted(got) == sorted(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    for key, value in want.items():
        assert got[key].dtype == value.dtype, (key, got[key].dtype, value.dtype)
        assert got[key].shape == value.shape, (key, got[key].shape, value.shape)
        assert np.array_equal(got[key], value), key


# --------------------------------------------------------------------------------------------
# The transformers oracle: each task x format written once per session
# --------------------------------------------------------------------------------------------

PT_FORMATS = ("pt-safetensors", "pt-bin", "pt-sharded-safetensors", "pt-sharded-bin")
TF_FORMATS = ("tf-h5", "tf-safetensors", "tf-sharded-h5", "tf-sharded-safetensors")
FLAX_FORMATS = ("flax-msgpack", "flax-safetensors", "flax-sharded-msgpack")
SHARD = "10KB"  # ~8 shards for the tiny model


class Oracle:
    """Builds (lazily, once) transformers models and their saved checkpoints under one directory."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.models: dict[str, Any] = {}
        self.dirs: dict[tuple[str, str], pathlib.Path] = {}

    def config(self, task: str) -> Any:
        transformers = pytest.importorskip("transformers")
        extra = {"qkv_bias": False} if task.endswith("-noqkvbias") else {}
        return transformers.ViTConfig(**TINY, **extra)

    def pt_model(self, task: str) -> Any:
        if task not in self.models:
            torch = pytest.importorskip("torch")
            transformers = pytest.importorskip("transformers")
            cls = {"base": transformers.ViTModel, "cls": transformers.ViTForImageClassification,
                   "mim": transformers.ViTForMaskedImageModeling}[task.split("-")[0]]
            torch.manual_seed(sum(map(ord, task)))
            model = cls(self.config(task)).eval()
            with torch.no_grad():  # non-trivial norms and biases, so a swapped weight/bias cannot pass
                for name, param in model.named_parameters():
                    if name.endswith("bias") or "layernorm" in name:
                        param.add_(torch.randn_like(param) * 0.1)
            self.models[task] = model
        return self.models[task]

    def pt_state(self, task: str) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy() for k, v in self.pt_model(task).state_dict().items()}

    def checkpoint(self, task: str, fmt: str) -> pathlib.Path:
        if (task, fmt) in self.dirs:
            return self.dirs[(task, fmt)]
        directory = self.root / f"{task}--{fmt}"
        family = fmt.split("-")[0]
        sharded = {"max_shard_size": SHARD} if "sharded" in fmt else {}
        if family == "pt":
            self.pt_model(task).save_pretrained(directory, safe_serialization="bin" not in fmt, **sharded)
        else:
            source = self.checkpoint(task, "pt-safetensors")
            model = self.foreign_class(task, family).from_pretrained(source, from_pt=True)
            model.save_pretrained(directory, safe_serialization="safetensors" in fmt, **sharded)
        self.dirs[(task, fmt)] = directory
        return directory

    def foreign_class(self, task: str, family: str) -> Any:
        if family == "tf":
            pytest.importorskip("tensorflow")
            os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # transformers' TF models need tf-keras
            pytest.importorskip("tf_keras")
        else:
            pytest.importorskip("jax")
            pytest.importorskip("flax")
        transformers = pytest.importorskip("transformers")
        prefix = "TF" if family == "tf" else "Flax"
        name = {"base": "ViTModel", "cls": "ViTForImageClassification"}[task.split("-")[0]]
        return getattr(transformers, prefix + name)

    def pixel_values(self) -> np.ndarray:
        return np.random.default_rng(7).standard_normal((2, C, 32, 32)).astype(np.float32)

    def pt_outputs(self, task: str) -> dict[str, np.ndarray]:
        torch = pytest.importorskip("torch")
        with torch.no_grad():
            out = self.pt_model(task)(torch.from_numpy(self.pixel_values()))
        return {k: v.numpy() for k, v in out.items() if k in ("logits", "last_hidden_state", "pooler_output")}


@pytest.fixture(scope="session")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Oracle:
    return Oracle(tmp_path_factory.mktemp("oracle"))


ORACLE_CASES = (
    [(task, fmt) for task in TASKS for fmt in PT_FORMATS]
    + [(task, fmt) for task in ("base", "cls") for fmt in TF_FORMATS + FLAX_FORMATS]
)


@pytest.mark.parametrize("task,fmt", ORACLE_CASES, ids=[f"{t}-{f}" for t, f in ORACLE_CASES])
def test_read_transformers_checkpoint(oracle: Oracle, task: str, fmt: str) -> None:
    """Every format transformers 4.57.6 writes reads back as the PyTorch model's state_dict, bitwise."""
    directory = oracle.checkpoint(task, fmt)
    if "sharded" in fmt:
        assert len([p for p in directory.iterdir() if "-of-" in p.name]) > 1, "oracle did not shard"
    assert_same_state(read_state_dict(directory), oracle.pt_state(task))


SINGLE_FILES = [("pt-safetensors", "model.safetensors"), ("pt-bin", "pytorch_model.bin"), ("tf-h5", "tf_model.h5"),
                ("tf-safetensors", "model.safetensors"), ("flax-msgpack", "flax_model.msgpack"),
                ("flax-safetensors", "model.safetensors")]


@pytest.mark.parametrize("fmt,filename", SINGLE_FILES)
def test_format_is_detected_from_contents(oracle: Oracle, tmp_path: pathlib.Path, fmt: str, filename: str) -> None:
    """A weights file renamed to something meaningless is still read correctly."""
    blob = tmp_path / "weights.dat"
    shutil.copy(oracle.checkpoint("cls", fmt) / filename, blob)
    assert_same_state(read_state_dict(blob), oracle.pt_state("cls"))


def test_canonical_shapes_match_transformers(oracle: Oracle) -> None:
    """The numpy-only states used below have exactly transformers' keys and shapes."""
    for task in TASKS:
        want = {k: tuple(v.shape) for k, v in oracle.pt_state(task).items()}
        assert canonical_shapes(task) == want


# --------------------------------------------------------------------------------------------
# Writers, checked by transformers loading them
# --------------------------------------------------------------------------------------------


def _foreign_outputs(model: Any, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
    out = model(pixel_values)
    return {k: np.asarray(getattr(out, k)) for k in ("logits", "last_hidden_state", "pooler_output")
            if getattr(out, k, None) is not None}


def _assert_outputs_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want), (set(got), set(want))
    for key in want:
        diff = float(np.max(np.abs(got[key] - want[key])))
        assert diff <= ATOL, f"{key}: max |diff| {diff:.3g} > {ATOL}"


WRITE_CASES = ["base", "cls", "cls-noqkvbias"]


@pytest.mark.parametrize("task", WRITE_CASES)
def test_write_tf_h5_loads_in_transformers(oracle: Oracle, tmp_path: pathlib.Path, task: str) -> None:
    """write_tf_h5 -> transformers TFViT* loads every weight (nothing missing) -> same outputs as PT."""
    cls = oracle.foreign_class(task, "tf")
    oracle.config(task).save_pretrained(tmp_path)
    write_tf_h5(oracle.pt_state(task), tmp_path / "tf_model.h5")
    model, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    _assert_outputs_close(_foreign_outputs(model, oracle.pixel_values()), oracle.pt_outputs(task))


@pytest.mark.parametrize("task", WRITE_CASES)
def test_write_flax_msgpack_loads_in_transformers(oracle: Oracle, tmp_path: pathlib.Path, task: str) -> None:
    """write_flax_msgpack -> transformers FlaxViT* loads it -> same outputs as PT (pooler included)."""
    cls = oracle.foreign_class(task, "flax")
    oracle.config(task).save_pretrained(tmp_path)
    write_flax_msgpack(oracle.pt_state(task), tmp_path / "flax_model.msgpack")
    model = cls.from_pretrained(tmp_path)
    from flax.traverse_util import flatten_dict

    loaded = {"/".join(k): np.asarray(v) for k, v in flatten_dict(model.params).items()}
    assert len(loaded) == len(oracle.pt_state(task))  # nothing was left to random initialisation
    _assert_outputs_close(_foreign_outputs(model, oracle.pixel_values()), oracle.pt_outputs(task))


def test_save_state_dict_loads_in_transformers(oracle: Oracle, tmp_path: pathlib.Path) -> None:
    """A sharded save_state_dict directory is a transformers PyTorch checkpoint (identical logits)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    oracle.config("cls").save_pretrained(tmp_path)
    written = save_state_dict(oracle.pt_state("cls"), tmp_path, max_shard_size=5000)
    assert written[-1].name == "model.safetensors.index.json" and len(written) > 3
    model = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(oracle.pixel_values())).logits.numpy()
    assert np.array_equal(logits, oracle.pt_outputs("cls")["logits"])


# --------------------------------------------------------------------------------------------
# Round trips without any framework
# --------------------------------------------------------------------------------------------

ROUND_TRIPS: dict[str, Callable[[dict[str, np.ndarray], pathlib.Path], pathlib.Path]] = {
    "safetensors": lambda s, d: save_state_dict(s, d)[0],
    "safetensors-sharded": lambda s, d: save_state_dict(s, d, max_shard_size=3000)[-1],
    "tf-h5": lambda s, d: write_tf_h5(s, d / "tf_model.h5"),
    "flax-msgpack": lambda s, d: write_flax_msgpack(s, d / "flax_model.msgpack"),
}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("fmt", list(ROUND_TRIPS))
def test_write_then_read_is_bitwise(tmp_path: pathlib.Path, fmt: str, task: str) -> None:
    state = canonical_state(task)
    path = ROUND_TRIPS[fmt](state, tmp_path)
    assert_same_state(read_state_dict(path), state)
    assert_same_state(read_state_dict(tmp_path), state)  # the directory finds the same file
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("fmt", ["tf-h5", "flax-msgpack", "safetensors"])
def test_round_trip_without_qkv_bias(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, fmt: str) -> None:
    """TF always has q/k/v biases: write_tf_h5 adds zeros, drop_unused_qkv_bias removes them with a warning."""
    state = canonical_state("cls", qkv_bias=False)
    got = read_state_dict(ROUND_TRIPS[fmt](state, tmp_path))
    if fmt == "tf-h5":
        extra = sorted(set(got) - set(state))
        assert len(extra) == 3 * LAYERS and all(k.endswith(".bias") for k in extra)
        assert all(not got[k].any() for k in extra)
    with caplog.at_level(logging.WARNING, logger="vitx"):
        got = drop_unused_qkv_bias(got, qkv_bias=False)
    assert_same_state(got, state)
    assert (fmt == "tf-h5") == ("qkv_bias is False" in caplog.text)
    assert drop_unused_qkv_bias(canonical_state("cls"), qkv_bias=True).keys() == canonical_state("cls").keys()


def test_round_trip_dtypes(tmp_path: pathlib.Path) -> None:
    """float16 / float64 / int / bool, non-contiguous inputs and bfloat16 survive safetensors and msgpack."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(1)
    base = rng.standard_normal((4, 6)).astype(np.float32)
    state = {
        "a.weight": base.astype(np.float16), "b.weight": base.astype(np.float64), "c": np.arange(5, dtype=np.int64),
        "d": np.array([True, False]), "e.weight": base.T, "f": base.astype(ml_dtypes.bfloat16), "g": np.zeros((0, 3), np.float32),
    }
    for path in (save_state_dict(state, tmp_path / "st")[0], write_flax_msgpack(state, tmp_path / "flax_model.msgpack")):
        assert_same_state(read_state_dict(path), {k: np.ascontiguousarray(v) for k, v in state.items()})
    with pytest.MonkeyPatch.context() as patch:  # without ml_dtypes: bfloat16 is read as exact float32
        from vit_core.checkpoint import dtypes

        patch.setattr(dtypes, "ml_dtype", lambda name: None)
        fallback = read_state_dict(tmp_path / "st")["f"]
        flax_fallback = read_state_dict(tmp_path / "flax_model.msgpack")["f"]
    assert flax_fallback.dtype == np.float32 and np.array_equal(flax_fallback, state["f"].astype(np.float32))
    assert fallback.dtype == np.float32 and np.array_equal(fallback, state["f"].astype(np.float32))
    safetensors_torch = pytest.importorskip("safetensors.torch")
    loaded = safetensors_torch.load_file(tmp_path / "st" / "model.safetensors")  # the reference reader agrees
    assert str(loaded["f"].dtype) == "torch.bfloat16"
    assert np.array_equal(loaded["f"].view(dtype=__import__("torch").int16).numpy().view(np.uint16), state["f"].view(np.uint16))


def test_save_state_dict_layout(tmp_path: pathlib.Path) -> None:
    """File names, metadata, index contents, stale files and permissions."""
    from safetensors import safe_open

    state = canonical_state("cls")
    single = save_state_dict(state, tmp_path, metadata={"source": "test"})
    assert [p.name for p in single] == ["model.safetensors"]
    with safe_open(single[0], "np") as f:
        assert f.metadata() == {"format": "pt", "source": "test"}
    assert (single[0].stat().st_mode & 0o777) == 0o666 & ~staging.umask()

    written = save_state_dict(state, tmp_path, max_shard_size=4000)
    n = len(written) - 1
    assert [p.name for p in written[:-1]] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads(written[-1].read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in state.values())
    assert sorted(index["weight_map"]) == sorted(state) and set(index["weight_map"].values()) == {p.name for p in written[:-1]}
    assert not (tmp_path / "model.safetensors").exists(), "a stale single file would shadow the shards"
    assert find_weights_file(tmp_path).name == "model.safetensors.index.json"

    save_state_dict(state, tmp_path)  # back to one file: the shards and the index go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_save_state_dict_is_atomic(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing shards leaves the previous checkpoint untouched and no temporary files."""
    old = canonical_state("cls", seed=1)
    save_state_dict(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = st_container.write
    calls = []

    def failing(path: pathlib.Path, state: Any, metadata: Any = None, progress: Any = None) -> None:
        calls.append(path)
        if len(calls) == 3:
            path.write_bytes(b"half")
            raise OSError(28, "No space left on device")
        real(path, state, metadata, progress)

    monkeypatch.setattr(st_container, "write", failing)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_state_dict(canonical_state("cls", seed=2), tmp_path, max_shard_size=3000)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(CheckpointError):
        save_state_dict({"x": np.array([object()])}, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --------------------------------------------------------------------------------------------
# transformers 5.9+ names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_new_names_round_trip(tmp_path: pathlib.Path, task: str) -> None:
    state = canonical_state(task)
    new = to_new_names(state)
    pre = "" if task == "base" else "vit."
    for key in ("layers.0.attention.q_proj.weight", "layers.1.attention.k_proj.bias", "layers.0.attention.v_proj.weight",
                "layers.0.attention.o_proj.weight", "layers.1.mlp.fc1.bias", "layers.0.mlp.fc2.weight",
                "layers.0.layernorm_before.weight", "layernorm.bias", "embeddings.cls_token"):
        assert pre + key in new, key
    assert not any("encoder" in k or "output.dense" in k or "intermediate" in k for k in new)
    assert to_legacy_names(new) == state and to_legacy_names(state) == state
    save_state_dict(new, tmp_path)
    assert_same_state(read_state_dict(tmp_path), state)  # reading renames to 4.x
    write_tf_h5(new, tmp_path / "tf_model.h5")  # writers accept either spelling
    assert_same_state(read_state_dict(tmp_path / "tf_model.h5"), state)


def test_new_names_in_torch_bin(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    state = canonical_state("cls")
    torch.save({k: torch.from_numpy(v) for k, v in to_new_names(state).items()}, tmp_path / "pytorch_model.bin")
    assert_same_state(read_state_dict(tmp_path), state)


# --------------------------------------------------------------------------------------------
# pytorch_model.bin without torch: what the restricted unpickler rebuilds, and what it refuses
# --------------------------------------------------------------------------------------------


def test_torch_bin_tensors(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Views into shared storages (offset, stride), every storage dtype, Parameters, 0-d and empty tensors."""
    torch = pytest.importorskip("torch")
    base = torch.randn(6, 5)
    bf16 = torch.randn(3, 4).to(torch.bfloat16)
    tensors = {
        "offset": base[2:5], "transposed": base.t(), "column": base[:, 1], "f16": base.half(), "f64": base.double(),
        "i64": torch.arange(7), "i32": torch.arange(3, dtype=torch.int32), "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([250, 1], dtype=torch.uint8), "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3), "param": torch.nn.Parameter(torch.randn(2, 2)), "bf16": bf16,
    }
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    got = read_state_dict(tmp_path / "pytorch_model.bin")
    reference = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert sorted(got) == sorted(tensors)
    for key, tensor in reference.items():
        if key == "bf16":
            assert got[key].dtype.name == "bfloat16"
            assert np.array_equal(got[key].view(np.uint16), tensor.view(torch.int16).numpy().view(np.uint16))
        else:
            assert got[key].dtype == tensor.detach().numpy().dtype and np.array_equal(got[key], tensor.detach().numpy()), key
    # Without ml_dtypes, bfloat16 becomes float32 holding exactly the same values.
    from vit_core.checkpoint import dtypes

    monkeypatch.setattr(dtypes, "ml_dtype", lambda name: None)
    fallback = read_state_dict(tmp_path / "pytorch_model.bin")["bf16"]
    assert fallback.dtype == np.float32 and np.array_equal(fallback, bf16.float().numpy())


class _RunsCode:
    """A pickle payload that runs a command when unpickled by a plain unpickler."""

    def __init__(self, func: Any, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple:
        return (self.func, (self.arg,))


def _handmade_torch_zip(path: pathlib.Path, obj: Any) -> None:
    """Torch's zip layout, written without torch: <archive>/data.pkl (+ version), no storages."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("archive/version", "3\n")


MALICIOUS = ["os.system-handmade", "eval-handmade", "os.system-inside-state-dict", "os.system-torch.save"]


@pytest.mark.parametrize("case", MALICIOUS)
def test_malicious_bin_is_refused_not_run(tmp_path: pathlib.Path, case: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    if case == "os.system-handmade":
        _handmade_torch_zip(path, _RunsCode(os.system, f"touch {marker}"))
        refused = f"{os.system.__module__}.system"  # posix.system on Linux
    elif case == "eval-handmade":
        _handmade_torch_zip(path, _RunsCode(eval, f"open({str(marker)!r}, 'w').close()"))
        refused = "builtins.eval"
    elif case == "os.system-inside-state-dict":
        _handmade_torch_zip(path, {"w": 1, "payload": _RunsCode(os.system, f"touch {marker}")})
        refused = f"{os.system.__module__}.system"
    else:
        torch = pytest.importorskip("torch")
        torch.save({"w": torch.zeros(2), "payload": _RunsCode(os.system, f"touch {marker}")}, path)
        refused = f"{os.system.__module__}.system"
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    assert refused in str(error.value) and "refused" in str(error.value) and str(path) in str(error.value)
    assert not marker.exists()


def test_legacy_torch_pickle_loads_safely(tmp_path: pathlib.Path) -> None:
    """torch's pre-1.6 (non-zip) format goes through the same restricted unpickler as the zip format."""
    torch = pytest.importorskip("torch")
    state = canonical_state("cls")
    path = tmp_path / "pytorch_model.bin"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"  # a bare pickle, not a zip archive
    assert_same_state(read_state_dict(tmp_path), state)


# --------------------------------------------------------------------------------------------
# Broken files: always a CheckpointError naming the file
# --------------------------------------------------------------------------------------------


def _truncate(path: pathlib.Path, keep: float | int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])


def _make_safetensors(d: pathlib.Path) -> pathlib.Path:
    return save_state_dict(canonical_state("cls"), d)[0]


def _make_bin(d: pathlib.Path) -> pathlib.Path:
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v) for k, v in canonical_state("cls").items()}, d / "pytorch_model.bin")
    return d / "pytorch_model.bin"


def _bad_safetensors_header(d: pathlib.Path) -> pathlib.Path:
    path = _make_safetensors(d)
    data = bytearray(path.read_bytes())
    data[8:12] = b"{{{{"
    path.write_bytes(bytes(data))
    return path


def _bad_safetensors_offsets(d: pathlib.Path) -> pathlib.Path:
    path = d / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    return path


def _bin_with_bad_crc(d: pathlib.Path) -> pathlib.Path:
    path = _make_bin(d)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(next(n for n in z.namelist() if n.endswith("/data/0")))
    data = bytearray(path.read_bytes())
    # The local header's extra field (torch pads it for alignment) differs from the central directory's.
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_len + extra_len] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _index_missing_shard(d: pathlib.Path) -> pathlib.Path:
    written = save_state_dict(canonical_state("cls"), d, max_shard_size=3000)
    written[1].unlink()
    return written[-1]


def _index_escaping(d: pathlib.Path) -> pathlib.Path:
    path = d / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    return path


def _random_bytes(name: str) -> Callable[[pathlib.Path], pathlib.Path]:
    def make(d: pathlib.Path) -> pathlib.Path:
        (d / name).write_bytes(bytes([0x13]) + np.random.default_rng(3).bytes(4095))
        return d / name
    return make


def _then(make: Callable[[pathlib.Path], pathlib.Path], keep: float | int) -> Callable[[pathlib.Path], pathlib.Path]:
    def build(d: pathlib.Path) -> pathlib.Path:
        path = make(d)
        _truncate(path, keep)
        return path
    return build


BROKEN: dict[str, Callable[[pathlib.Path], pathlib.Path]] = {
    "safetensors-truncated-data": _then(_make_safetensors, 0.6),
    "safetensors-truncated-header": _then(_make_safetensors, 40),
    "safetensors-size-only": _then(_make_safetensors, 8),
    "safetensors-5-bytes": _then(_make_safetensors, 5),
    "safetensors-bad-json": _bad_safetensors_header,
    "safetensors-bad-offsets": _bad_safetensors_offsets,
    "h5-truncated": _then(lambda d: write_tf_h5(canonical_state("cls"), d / "tf_model.h5"), 0.5),
    "h5-signature-only": _then(lambda d: write_tf_h5(canonical_state("cls"), d / "tf_model.h5"), 8),
    "msgpack-truncated": _then(lambda d: write_flax_msgpack(canonical_state("cls"), d / "flax_model.msgpack"), 0.5),
    "bin-truncated": _then(_make_bin, 0.5),
    "bin-bad-crc": _bin_with_bad_crc,
    "index-missing-shard": _index_missing_shard,
    "index-escaping": _index_escaping,
    "index-truncated": _then(lambda d: save_state_dict(canonical_state("cls"), d, max_shard_size=3000)[-1], 0.5),
    "random-bytes-named-safetensors": _random_bytes("model.safetensors"),
    "random-bytes-no-suffix": _random_bytes("weights.dat"),
    "empty-file": _then(_make_safetensors, 0),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_files_raise_checkpoint_error(tmp_path: pathlib.Path, case: str) -> None:
    path = BROKEN[case](tmp_path)
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    assert path.name in str(error.value)


def test_find_weights_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(CheckpointNotFoundError) as error:
        find_weights_file(tmp_path)
    assert all(name in str(error.value) for name in WEIGHT_FILES)
    assert isinstance(error.value, FileNotFoundError)
    for name in reversed(WEIGHT_FILES):  # each newly added file with higher priority wins
        (tmp_path / name).write_bytes(b"")
        assert find_weights_file(tmp_path).name == name


# --------------------------------------------------------------------------------------------
# Flax msgpack details: flax's own serializer as the writer
# --------------------------------------------------------------------------------------------


def test_reads_flax_serialization_extensions(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked large arrays, bfloat16 and numpy scalars as flax.serialization writes them."""
    serialization = pytest.importorskip("flax.serialization")
    import ml_dtypes

    rng = np.random.default_rng(5)
    # the layouts follow the weight table's kinds: "classifier" is a linear layer, "layernorm" a norm
    tree = {"classifier": {"kernel": rng.standard_normal((3, 5)).astype(np.float32), "bias": np.arange(5, dtype=np.float32)},
            "layernorm": {"scale": rng.standard_normal(4).astype(ml_dtypes.bfloat16)}}
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 16)  # force flax to chunk every array
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    got = read_state_dict(tmp_path)
    assert_same_state(got, {"classifier.weight": tree["classifier"]["kernel"].T, "classifier.bias": tree["classifier"]["bias"],
                            "layernorm.weight": tree["layernorm"]["scale"]})
    assert got["classifier.weight"].flags.c_contiguous


# --------------------------------------------------------------------------------------------
# Fitting a checkpoint onto a model
# --------------------------------------------------------------------------------------------

HEADS = {"base": (r"^pooler\.", r"^embeddings\.mask_token$"), "cls": (r"^classifier\.",),
         "mim": (r"^decoder\.", r"^vit\.embeddings\.mask_token$")}
FOREIGN = (r"^classifier\.", r"^decoder\.", r"^(vit\.)?pooler\.", r"^(vit\.)?embeddings\.mask_token$")

# (checkpoint task, model task, expected missing, expected unexpected) -- as transformers behaves.
FITS = [
    ("base", "cls", ["classifier.weight", "classifier.bias"], ["vit.pooler.dense.weight", "vit.pooler.dense.bias"]),
    ("cls", "base", ["pooler.dense.weight", "pooler.dense.bias"], ["classifier.weight", "classifier.bias"]),
    ("base", "mim", ["vit.embeddings.mask_token", "decoder.0.weight", "decoder.0.bias"],
     ["vit.pooler.dense.weight", "vit.pooler.dense.bias"]),
    ("mim", "base", ["pooler.dense.weight", "pooler.dense.bias"],
     ["embeddings.mask_token", "decoder.0.weight", "decoder.0.bias"]),
    ("mim", "cls", ["classifier.weight", "classifier.bias"], ["vit.embeddings.mask_token", "decoder.0.weight", "decoder.0.bias"]),
    ("cls", "mim", ["vit.embeddings.mask_token", "decoder.0.weight", "decoder.0.bias"], ["classifier.weight", "classifier.bias"]),
    ("cls", "cls", [], []),
]


@pytest.mark.parametrize("src,dst,missing,unexpected", FITS, ids=[f"{s}-into-{d}" for s, d, *_ in FITS])
def test_match_state_to_model(caplog: pytest.LogCaptureFixture, src: str, dst: str, missing: list, unexpected: list) -> None:
    state = canonical_state(src)
    expected = canonical_shapes(dst)
    with caplog.at_level(logging.WARNING, logger="vitx"):
        out, report = match_state_to_model(state, expected, allowed_missing=HEADS[dst],
                                           allowed_unexpected_patterns=FOREIGN, source="ckpt-dir")
    assert sorted(report.missing) == sorted(missing) and sorted(report.unexpected) == sorted(unexpected)
    assert report.mismatched == []
    assert sorted(out) == sorted(set(expected) - set(missing))
    for key, value in out.items():  # the backbone arrays are passed through untouched
        source_key = key if key in state else ("vit." + key if "vit." + key in state else key[len("vit."):])
        assert value is state[source_key]
    for key in missing + unexpected:
        assert key in caplog.text


def test_match_state_reports_everything_in_one_error() -> None:
    state = canonical_state("cls")
    del state["vit.layernorm.bias"], state["vit.encoder.layer.1.attention.attention.key.weight"]
    state["vit.encoder.layer.9.output.dense.weight"] = np.zeros((D, M), np.float32)
    state["vit.encoder.layer.0.intermediate.dense.weight"] = np.zeros((M + 1, D), np.float32)
    state["classifier.weight"], state["classifier.bias"] = np.zeros((5, D), np.float32), np.zeros(5, np.float32)
    with pytest.raises(CheckpointError) as error:
        match_state_to_model(state, canonical_shapes("cls"), allowed_missing=HEADS["cls"], source="my-ckpt")
    message = str(error.value)
    for text in ("my-ckpt", "vit.layernorm.bias (32,)", "vit.encoder.layer.1.attention.attention.key.weight (32, 32)",
                 "vit.encoder.layer.9.output.dense.weight (32, 37)",
                 "vit.encoder.layer.0.intermediate.dense.weight: file (38, 32) vs model (37, 32)",
                 "classifier.weight: file (5, 32) vs model (3, 32)", "classifier.bias: file (5,) vs model (3,)"):
        assert text in message, text


def test_ignore_mismatched_sizes() -> None:
    state = canonical_state("cls")
    state["classifier.weight"], state["classifier.bias"] = np.zeros((5, D), np.float32), np.zeros(5, np.float32)
    out, report = match_state_to_model(state, canonical_shapes("cls"), allowed_missing=HEADS["cls"],
                                       ignore_mismatched_sizes=True)
    assert "classifier.weight" not in out and "classifier.bias" not in out and len(out) == len(state) - 2
    assert report.mismatched == [("classifier.weight", (5, D), (K, D)), ("classifier.bias", (5,), (K,))]
    del state["vit.layernorm.weight"]  # a real hole still raises
    with pytest.raises(CheckpointError, match="vit.layernorm.weight"):
        match_state_to_model(state, canonical_shapes("cls"), ignore_mismatched_sizes=True)


def test_unexpected_keys_raise_without_patterns() -> None:
    with pytest.raises(CheckpointError) as error:
        match_state_to_model(canonical_state("base"), canonical_shapes("cls"), allowed_missing=HEADS["cls"])
    assert "vit.pooler.dense.weight (32, 32)" in str(error.value) and "classifier" not in str(error.value)


# --------------------------------------------------------------------------------------------
# Hub ids through a local huggingface_hub cache, offline
# --------------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root: pathlib.Path, repo: str, *, sharded: bool = False) -> pathlib.Path:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "vit", **TINY}))
    save_state_dict(canonical_state("cls"), snapshot, max_shard_size=3000 if sharded else None)
    return snapshot


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("revision", [None, COMMIT])
def test_resolve_hub_id_from_cache(tmp_path: pathlib.Path, offline: None, sharded: bool, revision: str | None) -> None:
    snapshot = _hub_cache(tmp_path, "org/tiny-vit", sharded=sharded)
    resolved = resolve_pretrained("org/tiny-vit", cache_dir=tmp_path, revision=revision)
    assert resolved == snapshot
    assert_same_state(read_state_dict(resolved), canonical_state("cls"))
    assert resolve_pretrained("org/tiny-vit", cache_dir=tmp_path, filenames=("config.json",)) == snapshot


def test_resolve_errors(tmp_path: pathlib.Path, offline: None) -> None:
    with pytest.raises(CheckpointNotFoundError) as error:
        resolve_pretrained("org/not-there", cache_dir=tmp_path)
    assert "org/not-there" in str(error.value) and "model.safetensors" in str(error.value)
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        resolve_pretrained(tmp_path / "missing" / "dir" / "x")
    snapshot = _hub_cache(tmp_path, "org/only-config")
    for name in os.listdir(snapshot):
        if name != "config.json":
            (snapshot / name).unlink()
    with pytest.raises(CheckpointNotFoundError, match="org/only-config"):
        resolve_pretrained("org/only-config", cache_dir=tmp_path)


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download: a remote repo (name -> bytes) and a cache directory."""

    def __init__(self, root: pathlib.Path, files: dict[str, bytes], *, reachable: bool = True) -> None:
        self.snapshot = root / "snapshot"
        self.snapshot.mkdir()
        self.files, self.reachable = files, reachable
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, repo_id: str, filename: str, *, revision: Any = None, cache_dir: Any = None, token: Any = None,
                 local_files_only: bool = False) -> str:
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

        assert (repo_id, revision, token) == ("org/remote", "v1", "secret")
        self.calls.append((filename, local_files_only))
        cached = self.snapshot / filename
        if local_files_only or not self.reachable:
            if cached.exists():
                return str(cached)
            raise LocalEntryNotFoundError(f"{filename} not cached")
        if filename not in self.files:
            raise EntryNotFoundError(f"404 {filename}")
        cached.write_bytes(self.files[filename])
        return str(cached)


def test_resolve_online_fetches_one_weights_format(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config.json, then the first weights file the repo has (with its shards); other formats are never fetched."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    shards = tmp_path / "shards"
    written = save_state_dict(canonical_state("cls"), shards, max_shard_size=3000)
    files = {p.name: p.read_bytes() for p in written}
    files.update({"config.json": b"{}", "pytorch_model.bin": b"unused", "tf_model.h5": b"unused"})
    hub = FakeHub(tmp_path, files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    resolved = resolve_pretrained("org/remote", revision="v1", token="secret")
    assert resolved == hub.snapshot
    names = [name for name, _ in hub.calls]
    assert names[:3] == ["config.json", "model.safetensors", "model.safetensors.index.json"]
    assert sorted(names[3:]) == [p.name for p in written[:-1]]  # every shard, nothing else
    assert_same_state(read_state_dict(resolved), canonical_state("cls"))


def test_resolve_unreachable_hub_falls_back_to_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the hub cannot be reached once, the remaining candidates are looked up in the cache only."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = FakeHub(tmp_path, {}, reachable=False)
    save_state_dict(canonical_state("cls"), hub.snapshot)  # cached earlier
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    assert resolve_pretrained("org/remote", revision="v1", token="secret") == hub.snapshot
    assert hub.calls == [("config.json", False), ("model.safetensors", True)]
    (hub.snapshot / "model.safetensors").unlink()
    hub.calls.clear()
    with pytest.raises(CheckpointNotFoundError, match=r"org/remote \(revision v1\) \[offline"):
        resolve_pretrained("org/remote", revision="v1", token="secret")
    assert [offline for _, offline in hub.calls] == [False] + [True] * len(WEIGHT_FILES)


def test_resolve_local_paths_unchanged(tmp_path: pathlib.Path) -> None:
    path = save_state_dict(canonical_state("cls"), tmp_path)[0]
    assert resolve_pretrained(tmp_path) == tmp_path and resolve_pretrained(str(path)) == path


def test_import_pulls_in_no_framework() -> None:
    code = ("import sys, vit_core.checkpoint, vit_core.checkpoint_io; "
            "bad = [m for m in ('torch', 'tensorflow', 'jax', 'flax', 'keras') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

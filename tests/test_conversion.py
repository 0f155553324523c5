"""conversion: every source format in, every format out, bitwise round trips, refusals, failures.

Sources are the committed fixtures made by scripts/make_timm_fixture.py with the real timm
(timm's own save_for_hf; npz files built from docs/FORMATS.md and read by timm's own npz loader as the
oracle), plus variants built here from them by the documented renames. Framework runs are in
test_conversion_parity.py; transformers-made checkpoints in test_conversion_transformers.py.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from conversion import CheckpointError, convert, load_checkpoint, open_checkpoint
from vit_core.checkpoint import npz as npz_container
from vit_core.checkpoint import safetensors as st_container
from vit_core.checkpoint.lazy import Lazy, lazify, materialize
from vit_core.checkpoint.rules import Split, Stack, Template, ZeroClsRow
from vit_core.reference import forward

from .cases import assert_close

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TIMM = FIXTURES / "timm"
NPZ = FIXTURES / "npz"
BOUND = 1e-5  # docs/NUMERICS.md: small configs


def read_raw_arrays(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A file's tensors in its own names, in memory."""
    from vit_core.checkpoint import materialize, read_raw

    return materialize(read_raw(path)[0])


def read_raw(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A source file's own arrays (its names and layouts), for bitwise comparisons."""
    if path.is_dir():
        path = next(p for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".npz", ".pth", ".bin"))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    

    return read_raw_arrays(path)


def assert_bitwise(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))}"
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, f"{what}: {key} dtype/shape"
        assert np.array_equal(a[key], b[key]), f"{what}: {key} differs"


# ---------------------------------------------------------------------------------------------
# Sources built from the fixtures by docs/FORMATS.md renames
# ---------------------------------------------------------------------------------------------


def make_jax_linen(tmp: pathlib.Path) -> pathlib.Path:
    """jax.npz with the Linen numbering (MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0)
    under an opt/target/ prefix (docs/FORMATS.md section 6)."""
    arrays = read_raw(NPZ / "jax.npz")
    renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
               "MlpBlock_3": "MlpBlock_0"}
    out = {}
    for key, value in arrays.items():
        for old, new in renames.items():
            key = key.replace(f"/{old}/", f"/{new}/")
        out["opt/target/" + key] = value
    path = tmp / "jax_linen.npz"
    np.savez(path, **out)
    return path


def make_big_vision_img(tmp: pathlib.Path) -> pathlib.Path:
    """big_vision.npz unscanned, under params/img/ (two-tower), with a text tower beside it."""
    arrays = read_raw(NPZ / "big_vision.npz")
    out = {}
    for key, value in arrays.items():
        rest = key[len("params/"):]
        if rest.startswith("Transformer/encoderblock/"):
            sub = rest[len("Transformer/encoderblock/"):]
            for i in range(value.shape[0]):
                out[f"params/img/Transformer/encoderblock_{i}/{sub}"] = value[i]
        else:
            out["params/img/" + rest] = value
    out["params/txt/Embed_0/embedding"] = np.ones((10, 4), np.float32)
    out["params/t"] = np.ones((1,), np.float32)
    path = tmp / "big_vision_img.npz"
    np.savez(path, **out)
    return path


def make_timm_pth(tmp: pathlib.Path) -> pathlib.Path:
    """timm's state dict saved by torch.save (the .pth users have), beside timm's config.json."""
    torch = pytest.importorskip("torch")
    state = read_raw(TIMM / "vit_tiny")
    directory = tmp / "timm_pth"
    directory.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, directory / "vit_tiny.pth")
    (directory / "config.json").write_text((TIMM / "vit_tiny" / "config.json").read_text())
    return directory / "vit_tiny.pth"


@dataclass(frozen=True)
class Source:
    name: str
    format: str
    task: str
    oracle: str | None          # key prefix in the fixture outputs.npz
    outputs: pathlib.Path | None
    hidden_act: str
    build: Any = None            # tmp_path -> path, for sources made in the test
    path: pathlib.Path | None = None

    def resolve(self, tmp: pathlib.Path) -> pathlib.Path:
        return self.build(tmp) if self.build is not None else self.path  # type: ignore[return-value]


SOURCES = [
    Source("timm", "timm", "classification", "vit_tiny", TIMM / "outputs.npz", "gelu", path=TIMM / "vit_tiny"),
    Source("timm-no-embed-class", "timm", "classification", "vit_tiny_no_embed_class", TIMM / "outputs.npz", "gelu",
           path=TIMM / "vit_tiny_no_embed_class"),
    Source("timm-pth", "timm", "classification", "vit_tiny", TIMM / "outputs.npz", "gelu", build=make_timm_pth),
    Source("jax", "jax", "classification", "jax", NPZ / "outputs.npz", "gelu_new", path=NPZ / "jax.npz"),
    Source("jax-linen-opt-target", "jax", "classification", "jax", NPZ / "outputs.npz", "gelu_new",
           build=make_jax_linen),
    Source("jax-in21k", "jax", "base", "jax_in21k", NPZ / "outputs.npz", "gelu_new", path=NPZ / "jax_in21k.npz"),
    Source("big_vision", "big_vision", "classification", "big_vision", NPZ / "outputs.npz", "gelu_new",
           path=NPZ / "big_vision.npz"),
    Source("big_vision-img-unscanned", "big_vision", "classification", "big_vision", NPZ / "outputs.npz", "gelu_new",
           build=make_big_vision_img),
]


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
def test_detected_from_contents_with_faithful_config(source: Source, tmp_path: pathlib.Path) -> None:
    path = source.resolve(tmp_path)
    loaded = open_checkpoint(path)
    assert loaded.format == source.format and loaded.task == source.task
    c = loaded.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.image_size, c.patch_size) == (32, 2, 4, 32, 8)
    assert c.layer_norm_eps == 1e-6 and c.hidden_act == source.hidden_act
    # The same content under a misleading name is still detected from the contents.
    if path.is_file():
        (tmp_path / "disguised").mkdir()
        disguised = tmp_path / "disguised" / "weights.bin"
        disguised.write_bytes(path.read_bytes())
        if (path.parent / "config.json").is_file():  # timm's head count comes from its config.json
            (tmp_path / "disguised" / "config.json").write_bytes((path.parent / "config.json").read_bytes())
        assert open_checkpoint(disguised).format == source.format


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
def test_outputs_equal_the_source_implementation(source: Source, tmp_path: pathlib.Path) -> None:
    """The converted weights through vit_core's reference forward reproduce timm's forward (timm's own
    model for timm files; timm's own npz loader for the JAX / big_vision files) at 1e-5."""
    state, config = load_checkpoint(source.resolve(tmp_path))
    oracle = np.load(source.outputs)
    ref = forward(state, config, oracle["pixel_values"], source.task, add_pooling_layer="pooler.dense.weight" in state)
    expected = {f"hidden_states[{i}]": oracle[f"{source.oracle}/hidden_states_{i}"] for i in range(3)}
    got = {f"hidden_states[{i}]": ref["hidden_states"][i] for i in range(3)}
    if source.task == "classification":
        expected["logits"], got["logits"] = oracle[f"{source.oracle}/logits"], ref["logits"]
    else:
        expected["last_hidden_state"] = oracle[f"{source.oracle}/last_hidden_state"]
        got["last_hidden_state"] = ref["last_hidden_state"]
    diffs = {k: float(np.max(np.abs(got[k] - expected[k]))) for k in expected}
    assert_close(diffs, BOUND, what=source.name)


def test_in21k_pre_logits_is_the_pooler_and_zero_head_is_dropped(tmp_path: pathlib.Path) -> None:
    """pooler_output == tanh(pre_logits(CLS)) computed by hand from the npz arrays."""
    loaded = open_checkpoint(NPZ / "jax_in21k.npz")
    assert "pooler.dense.weight" in loaded.state and not any(k.startswith("classifier") for k in loaded.state)
    assert any("all zeros" in n for n in loaded.notes)
    state, config = load_checkpoint(NPZ / "jax_in21k.npz")
    raw = read_raw(NPZ / "jax_in21k.npz")
    oracle = np.load(NPZ / "outputs.npz")
    cls = oracle["jax_in21k/last_hidden_state"][:, 0].astype(np.float64)
    by_hand = np.tanh(cls @ raw["pre_logits/kernel"] + raw["pre_logits/bias"])
    ref = forward(state, config, oracle["pixel_values"], "base")
    assert np.max(np.abs(ref["pooler_output"] - by_hand)) < BOUND


TARGETS_VIA = ["safetensors", "pytorch", "tf", "flax"]


@pytest.mark.parametrize("via", TARGETS_VIA)
@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
def test_round_trip_is_bitwise(source: Source, via: str, tmp_path: pathlib.Path) -> None:
    """src -> canonical (written as `via`) -> src: the same keys, dtypes and bytes."""
    path = source.resolve(tmp_path)
    original, _ = load_checkpoint(path)
    middle = convert(path, tmp_path / "middle", to=via)
    again, _ = load_checkpoint(middle.path)
    assert_bitwise(original, again, f"{source.name} canonical via {via}")
    back = convert(middle.path, tmp_path / ("back.npz" if source.format != "timm" else "back"), to=source.format)
    expected = read_raw(path)
    if source.name == "big_vision-img-unscanned":  # the text tower is not part of the ViT
        expected = {k: v for k, v in expected.items() if k.startswith("params/img/")}
    assert_bitwise(expected, read_raw(back.path), f"{source.name} via {via}")


def test_transformers_checkpoint_to_every_source_format_and_back(tmp_path: pathlib.Path) -> None:
    """A canonical checkpoint written as timm / jax / big_vision comes back bitwise."""
    state, config = load_checkpoint(NPZ / "jax.npz")
    from vit_core.pretrained import save_pretrained

    config.extra.pop("vitx_source")  # as if it had come from transformers
    state["vit.embeddings.position_embeddings"][:, 0] = 0  # big_vision has no place for a CLS row
    save_pretrained(config, state, tmp_path / "hf")
    for to in ("timm", "jax", "big_vision"):
        written = convert(tmp_path / "hf", tmp_path / to, to=to)
        back, back_config = load_checkpoint(written.path)
        assert_bitwise(state, back, f"via {to}")
        assert back_config.num_attention_heads == 4
    timm_config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert timm_config["model_args"]["num_heads"] == 4 and timm_config["model_args"]["act_layer"] == "gelu_tanh"
    assert timm_config["num_classes"] == 5
    # the timm file has exactly the keys and shapes timm's own model has
    timm_keys = {k: list(v.shape) for k, v in read_raw(TIMM / "vit_tiny").items()}
    written_keys = {k: list(v.shape) for k, v in read_raw(tmp_path / "timm").items()}
    assert set(written_keys) == set(timm_keys)
    assert all(written_keys[k][1:] == timm_keys[k][1:] for k in timm_keys if "fc" not in k)


# ---------------------------------------------------------------------------------------------
# Refused variants
# ---------------------------------------------------------------------------------------------

TIMM_VARIANTS = json.loads((TIMM / "variants.json").read_text())
VARIANT_MESSAGES = {
    "register tokens": "register tokens", "LayerScale": "LayerScale", "qk-norm": "qk-norm",
    "fc_norm": "average pooling", "norm_pre": "norm_pre", "MAP pooling": "MAP pooling",
    "no class token": "no class token",
}


@pytest.mark.parametrize("feature", sorted(TIMM_VARIANTS))
def test_timm_variants_are_refused_naming_the_feature(feature: str, tmp_path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    state = {k: np.zeros(shape, np.float32) for k, shape in TIMM_VARIANTS[feature].items()}
    save_file(state, str(tmp_path / "variant.safetensors"))
    with pytest.raises(CheckpointError, match=VARIANT_MESSAGES[feature]):
        load_checkpoint(tmp_path / "variant.safetensors", timm_model_name="vit_small_patch16_224")


@pytest.mark.parametrize("name,message", [
    ("vit_base_patch16_reg4_gap_256", "register tokens"),
    ("vit_medium_patch16_gap_256", "average pooling"),
    ("vit_so400m_patch14_siglip_224", "MAP pooling|not a plain ViT"),
    ("resnet50", "not a plain ViT"),
])
def test_timm_model_names_of_unsupported_variants_are_refused(name: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(TIMM / "vit_tiny" / "model.safetensors", timm_model_name=name)


def test_timm_heads_need_a_name_or_config_for_nonstandard_sizes(tmp_path: pathlib.Path) -> None:
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((TIMM / "vit_tiny" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="number of heads"):
        load_checkpoint(bare)
    with pytest.raises(CheckpointError, match="hidden size 768"):
        load_checkpoint(bare, timm_model_name="vit_base_patch16_224")


def test_timm_standard_size_heads_from_table_and_from_name(tmp_path: pathlib.Path) -> None:
    """D=192 (ViT-Ti): 3 heads from the table (and said so), or from the model name."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    d, m = 192, 768
    state = {"cls_token": rng.standard_normal((1, 1, d)), "pos_embed": rng.standard_normal((1, 5, d)),
             "patch_embed.proj.weight": rng.standard_normal((d, 3, 16, 16)), "patch_embed.proj.bias": np.zeros(d),
             "norm.weight": np.ones(d), "norm.bias": np.zeros(d)}
    for name, shape in {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
                        "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
                        "mlp.fc1.weight": (m, d), "mlp.fc1.bias": (m,), "mlp.fc2.weight": (d, m), "mlp.fc2.bias": (d,)}.items():
        state[f"blocks.0.{name}"] = rng.standard_normal(shape)
    save_file({k: np.asarray(v, np.float32) for k, v in state.items()}, str(tmp_path / "ti.safetensors"))
    loaded = open_checkpoint(tmp_path / "ti.safetensors")
    assert loaded.config.num_attention_heads == 3 and loaded.config.image_size == 32 and loaded.task == "base"
    assert any("standard ViT size table" in n for n in loaded.notes)
    named = open_checkpoint(tmp_path / "ti.safetensors", timm_model_name="vit_tiny_patch16_224.augreg_in21k")
    assert named.config.num_attention_heads == 3 and any("model name" in n for n in named.notes)


def _with(path: pathlib.Path, tmp: pathlib.Path, add: dict[str, np.ndarray] | None = None,
          drop: tuple[str, ...] = ()) -> pathlib.Path:
    arrays = {k: v for k, v in read_raw(path).items() if not any(k.startswith(d) for d in drop)}
    arrays.update(add or {})
    out = tmp / ("variant-" + path.name)
    np.savez(out, **arrays)
    return out


@pytest.mark.parametrize("source,add,drop,message", [
    ("big_vision.npz", {"params/MAPHead_0/probe": np.zeros((1, 1, 32), np.float32)}, (), "MAP pooling"),
    ("big_vision.npz", None, ("params/cls",), "no class token"),
    ("big_vision.npz", None, ("params/pos_embedding",), "sincos2d"),
    ("jax.npz", {"MAPHead_0/probe": np.zeros((1, 1, 32), np.float32)}, (), "MAPHead_0"),
    ("jax.npz", {"conv_root/kernel": np.zeros((7, 7, 3, 8), np.float32)}, (), "hybrid ResNet"),
    ("jax.npz", {"Transformer/encoderblock_0/extra/kernel": np.zeros((2, 2), np.float32)}, (), "no rule maps"),
])
def test_npz_variants_are_refused(source: str, add: Any, drop: tuple[str, ...], message: str,
                                  tmp_path: pathlib.Path) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_with(NPZ / source, tmp_path, add, drop))


def test_big_vision_write_refuses_a_nonzero_cls_position_row(tmp_path: pathlib.Path) -> None:
    written = convert(NPZ / "jax.npz", tmp_path / "hf", to="safetensors")
    with pytest.raises(CheckpointError, match="CLS row of the position table is not zero"):
        convert(written.path, tmp_path / "bv.npz", to="big_vision")
    assert not (tmp_path / "bv.npz").exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]


# ---------------------------------------------------------------------------------------------
# Failures: truncated, unknown, destination exists, interrupted
# ---------------------------------------------------------------------------------------------


def _truncate(src: pathlib.Path, dst: pathlib.Path, keep: float) -> pathlib.Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.mark.parametrize("source,keep", [
    (TIMM / "vit_tiny" / "model.safetensors", 0.5),
    (TIMM / "vit_tiny" / "model.safetensors", 0.001),
    (NPZ / "jax.npz", 0.5),
    (NPZ / "big_vision.npz", 0.9),
])
def test_truncated_files_give_a_clear_error(source: pathlib.Path, keep: float, tmp_path: pathlib.Path) -> None:
    path = _truncate(source, tmp_path / source.name, keep)
    with pytest.raises(CheckpointError, match="truncated|corrupt|not a valid"):
        load_checkpoint(path)


def test_truncated_h5_torch_and_msgpack_files(tmp_path: pathlib.Path) -> None:
    convert(NPZ / "jax.npz", tmp_path / "tf", to="tf")
    convert(NPZ / "jax.npz", tmp_path / "pt", to="pytorch")
    convert(NPZ / "jax.npz", tmp_path / "flax", to="flax")
    for name in ("tf/tf_model.h5", "pt/pytorch_model.bin", "flax/flax_model.msgpack"):
        path = _truncate(tmp_path / name, tmp_path / pathlib.Path(name).name, 0.6)
        with pytest.raises(CheckpointError, match="truncated|corrupt|not a valid"):
            load_checkpoint(path)


@pytest.mark.parametrize("content,message", [
    (b"hello, I am not a checkpoint at all" * 10, "unrecognised checkpoint format"),
    (b'{"weight_map": 3}', "index"),
])
def test_unknown_formats(content: bytes, message: str, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mystery.dat"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_unknown_npz_and_safetensors_contents(tmp_path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    np.savez(tmp_path / "other.npz", a=np.zeros(3), b=np.ones(2))
    with pytest.raises(CheckpointError, match="neither big_vision nor jax names"):
        load_checkpoint(tmp_path / "other.npz")
    save_file({"conv1.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(CheckpointError, match="neither timm nor transformers names"):
        load_checkpoint(tmp_path / "resnet.safetensors")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as z:
        z.write(tmp_path / "objects.npy", "embedding/kernel.npy")
    with pytest.raises(CheckpointError, match="not a numeric tensor type|Python objects|pickle"):
        load_checkpoint(tmp_path / "pickled.npz")


def test_missing_source(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(tmp_path / "nothing-here.npz")


def test_destination_exists_needs_force(tmp_path: pathlib.Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(dst)):
        convert(NPZ / "jax.npz", dst, to="safetensors")
    assert (dst / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match=r"not part of a checkpoint \(keep.txt\)"):  # --force alone keeps it
        convert(NPZ / "jax.npz", dst, to="safetensors", force=True)
    assert (dst / "keep.txt").read_text() == "mine"
    convert(NPZ / "jax.npz", dst, to="safetensors", force=True, force_all=True)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    convert(NPZ / "jax.npz", dst, to="tf", force=True)  # a checkpoint directory is replaced with force alone
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "tf_model.h5"]
    single = tmp_path / "w.npz"
    single.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="w.npz"):
        convert(NPZ / "jax.npz", single, to="jax")
    assert single.read_bytes() == b"old"


@pytest.mark.parametrize("to,dst", [("safetensors", "out"), ("tf", "out"), ("flax", "out"), ("pytorch", "out"),
                                    ("timm", "out.safetensors"), ("jax", "out.npz")])
def test_interrupted_write_leaves_nothing(to: str, dst: str, tmp_path: pathlib.Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure midway (the fifth tensor cannot be produced) leaves no file, no temp file, and an
    existing destination untouched (with force)."""
    calls = {"n": 0}
    original = Lazy.materialize

    def failing(self: Lazy) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk unplugged (simulated)")
        return original(self)

    monkeypatch.setattr(Lazy, "materialize", failing)
    with pytest.raises(CheckpointError, match=rf"/{dst}(/[\w.]+)?: cannot write: disk unplugged .simulated."):
        convert(NPZ / "jax.npz", tmp_path / dst, to=to)
    assert list(tmp_path.iterdir()) == []
    # with an existing destination and force: the old one survives the failure
    calls["n"] = 0
    (tmp_path / dst).write_bytes(b"previous") if "." in dst else (tmp_path / dst).mkdir()
    with pytest.raises(CheckpointError, match="simulated"):
        convert(NPZ / "jax.npz", tmp_path / dst, to=to, force=True)
    assert [p.name for p in tmp_path.iterdir()] == [dst]


# ---------------------------------------------------------------------------------------------
# Engine and containers
# ---------------------------------------------------------------------------------------------


def test_rules_are_reversible_bitwise() -> None:
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((12, 4)).astype(np.float32)
    state = lazify({"blocks.0.attn.qkv.weight": qkv, "other": np.ones(2)})
    split = Split("blocks.{i}.attn.qkv.{wb}", "blocks.{i}.attn.{part}.{wb}", ("query", "key", "value"))
    parts = split.forward(state, {})
    assert np.array_equal(parts["blocks.0.attn.key.weight"].materialize(), qkv[4:8])
    assert np.array_equal(split.backward(parts, {})["blocks.0.attn.qkv.weight"].materialize(), qkv)
    stacked = rng.standard_normal((3, 5)).astype(np.float32)
    stack = Stack("T/encoderblock/{path}", "T/encoderblock_{i}/{path}")
    layers = stack.forward(lazify({"T/encoderblock/ln/scale": stacked}), {})
    assert sorted(layers) == [f"T/encoderblock_{i}/ln/scale" for i in range(3)]
    assert np.array_equal(stack.backward(layers, {})["T/encoderblock/ln/scale"].materialize(), stacked)
    assert Template("a.{i}.b.{wb}").match("a.12.b.bias") == {"i": "12", "wb": "bias"}
    op = ZeroClsRow("why")
    table = rng.standard_normal((1, 4, 2))
    assert np.array_equal(op.backward(op.forward(table, {}), {}, "k"), table)
    with pytest.raises(CheckpointError, match="not zero"):
        op.backward(table, {}, "k")


def test_safetensors_and_npz_reads_are_memory_mapped() -> None:
    state, _ = st_container.read_lazy(TIMM / "vit_tiny" / "model.safetensors")
    assert isinstance(state["pos_embed"].load().base, np.memmap) or isinstance(state["pos_embed"].load(), np.memmap)
    npz = npz_container.read_lazy(NPZ / "jax.npz")
    assert isinstance(npz["cls"].load(), np.memmap)
    assert np.array_equal(materialize(npz)["cls"], read_raw(NPZ / "jax.npz")["cls"])


def test_own_torch_zip_writer_loads_in_torch(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    from vit_core.checkpoint import torch_zip

    state, _ = load_checkpoint(NPZ / "jax.npz")
    state["an_int_tensor"] = np.arange(6, dtype=np.int64).reshape(2, 3)
    torch_zip.write(tmp_path / "own.bin", lazify(state))
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "own.bin", weights_only=True, mmap=mmap)
        assert list(loaded) == list(state)
        assert all(np.array_equal(loaded[k].numpy(), v) for k, v in state.items())
    from vit_core.checkpoint import read_state_dict

    again = read_state_dict(tmp_path / "own.bin")
    assert all(np.array_equal(again[k], v) for k, v in state.items())


def test_import_conversion_imports_no_framework() -> None:
    code = ("import sys, conversion, conversion.cli, conversion.compare, conversion.pipeline; "
            "print([m for m in ('torch', 'tensorflow', 'jax', 'flax', 'keras') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_progress_reports_every_byte(tmp_path: pathlib.Path) -> None:
    seen: list[tuple[int, int]] = []
    result = convert(NPZ / "jax.npz", tmp_path / "out", to="tf", progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1] == (result.nbytes, result.nbytes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # tqdm bar variant (shown only after two seconds; must not break a fast conversion)
    convert(NPZ / "jax.npz", tmp_path / "out2", to="flax", progress=True)
    assert (tmp_path / "out2" / "flax_model.msgpack").is_file()

"""conversion with transformers 4.57.6 as the source and the consumer of its files.

Checkpoints are made by transformers itself (PyTorch safetensors and bin, sharded, TF h5 via
TFViT from_pt, Flax msgpack via FlaxViT from_pt); converted files are loaded back by
transformers' PyTorch, TF and Flax classes and must give the PyTorch model's logits.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from conversion import convert, load_checkpoint

from .test_conversion import NPZ, TIMM, assert_bitwise, read_raw

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BOUND = 1e-5


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """A tiny transformers ViTForImageClassification and ViTModel (with pooler) in every file kind."""
    tmp = tmp_path_factory.mktemp("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                    image_size=32, patch_size=8, encoder_stride=8, num_labels=5,
                                    id2label={i: f"class {i}" for i in range(5)})
    torch.manual_seed(0)
    paths: dict[str, pathlib.Path] = {}
    for name, cls in (("cls", transformers.ViTForImageClassification), ("base", transformers.ViTModel)):
        model = cls(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(tmp / f"{name}-pt")
        model.save_pretrained(tmp / f"{name}-bin", safe_serialization=False)
        model.save_pretrained(tmp / f"{name}-sharded", max_shard_size="20KB")
        paths.update({f"{name}-pt": tmp / f"{name}-pt", f"{name}-bin": tmp / f"{name}-bin",
                      f"{name}-sharded": tmp / f"{name}-sharded"})
    for name, tf_cls, flax_cls in (("cls", "TFViTForImageClassification", "FlaxViTForImageClassification"),
                                   ("base", "TFViTModel", "FlaxViTModel")):
        getattr(transformers, tf_cls).from_pretrained(tmp / f"{name}-pt", from_pt=True).save_pretrained(tmp / f"{name}-tf")
        getattr(transformers, flax_cls).from_pretrained(tmp / f"{name}-pt", from_pt=True).save_pretrained(tmp / f"{name}-flax")
        paths[f"{name}-tf"], paths[f"{name}-flax"] = tmp / f"{name}-tf", tmp / f"{name}-flax"
    assert (tmp / "cls-tf" / "tf_model.h5").is_file() and (tmp / "cls-flax" / "flax_model.msgpack").is_file()
    assert (tmp / "cls-sharded" / "model.safetensors.index.json").is_file()
    return paths


PIXELS = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)


def read_raw_arrays(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A file's tensors in its own names, in memory (TF names without the Keras model name, which
    Keras numbers per process, "tf_vi_t_model_9", and every loader ignores)."""
    from vit_core.checkpoint import materialize, read_raw
    from vit_core.checkpoint.names import strip_tf_model_name

    raw, flavour = read_raw(path)
    arrays = materialize(raw)
    return {strip_tf_model_name(k): v for k, v in arrays.items()} if flavour == "tf" else arrays


def pt_outputs(path: pathlib.Path, task: str) -> np.ndarray:
    cls = transformers.ViTForImageClassification if task == "cls" else transformers.ViTModel
    with torch.no_grad():
        out = cls.from_pretrained(path).eval()(torch.from_numpy(PIXELS))
    return (out.logits if task == "cls" else out.pooler_output).numpy()


@pytest.mark.parametrize("kind", ["bin", "sharded", "tf", "flax"])
@pytest.mark.parametrize("task", ["cls", "base"])
def test_every_transformers_file_reads_to_the_same_canonical_state(made, task: str, kind: str) -> None:
    reference, config = load_checkpoint(made[f"{task}-pt"])
    state, config2 = load_checkpoint(made[f"{task}-{kind}"])
    assert_bitwise(reference, state, f"{task}-{kind}")
    assert config2.num_attention_heads == 4 and config2.id2label[3] == "class 3"
    if task == "base":
        assert "pooler.dense.weight" in state and not any(k.startswith("vit.") for k in state)


@pytest.mark.parametrize("to", ["safetensors", "pytorch", "tf", "flax"])
@pytest.mark.parametrize("task", ["cls", "base"])
def test_converted_files_load_in_transformers(made, task: str, to: str, tmp_path: pathlib.Path) -> None:
    """Written by vitx, loaded by transformers 4.57 in the matching framework: same outputs."""
    expected = pt_outputs(made[f"{task}-pt"], task)
    out = convert(made[f"{task}-pt"], tmp_path / to, to=to).path
    if to in ("safetensors", "pytorch"):
        got = pt_outputs(out, task)
    elif to == "tf":
        cls = transformers.TFViTForImageClassification if task == "cls" else transformers.TFViTModel
        result = cls.from_pretrained(out)(PIXELS)
        got = (result.logits if task == "cls" else result.pooler_output).numpy()
    else:
        cls = transformers.FlaxViTForImageClassification if task == "cls" else transformers.FlaxViTModel
        result = cls.from_pretrained(out)(PIXELS)
        got = np.asarray(result.logits if task == "cls" else result.pooler_output)
    diff = float(np.max(np.abs(got - expected)))
    assert diff <= BOUND, f"{task} via {to}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("kind", ["tf", "flax", "bin"])
def test_transformers_files_round_trip_bitwise(made, kind: str, tmp_path: pathlib.Path) -> None:
    """A file transformers wrote -> canonical safetensors -> the same kind: same names and bytes."""
    target = {"tf": "tf", "flax": "flax", "bin": "pytorch"}[kind]
    middle = convert(made[f"cls-{kind}"], tmp_path / "middle", to="safetensors").path
    back = convert(middle, tmp_path / "back", to=target).path
    name = {"tf": "tf_model.h5", "flax": "flax_model.msgpack", "bin": "pytorch_model.bin"}[kind]
    

    assert_bitwise(read_raw_arrays(made[f"cls-{kind}"] / name), read_raw_arrays(back / name), kind)


def test_timm_and_npz_sources_run_in_transformers(tmp_path: pathlib.Path) -> None:
    """timm and JAX checkpoints converted to transformers files give transformers the timm logits."""
    for src, oracle, prefix in ((TIMM / "vit_tiny", TIMM / "outputs.npz", "vit_tiny"),
                                (NPZ / "jax.npz", NPZ / "outputs.npz", "jax")):
        outputs = np.load(oracle)
        out = convert(src, tmp_path / prefix, to="pytorch").path
        model = transformers.ViTForImageClassification.from_pretrained(out, attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(outputs["pixel_values"])).logits.numpy()
        diff = float(np.max(np.abs(logits - outputs[f"{prefix}/logits"])))
        assert diff <= BOUND, f"{prefix}: max |diff| {diff:.2e}"


def test_5x_names_are_read(made, tmp_path: pathlib.Path) -> None:
    """A state dict saved with transformers 5.9+ names (docs/FORMATS.md section 2) reads to 4.x names."""
    from safetensors.numpy import save_file

    from vit_core.checkpoint import to_new_names

    state, _ = load_checkpoint(made["cls-pt"])
    directory = tmp_path / "v5"
    directory.mkdir()
    save_file(to_new_names(state), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text((made["cls-pt"] / "config.json").read_text())
    again, _ = load_checkpoint(directory)
    assert_bitwise(state, again, "5.9+ names")
    assert read_raw(directory)  # the raw file really has the new names
    assert any(".q_proj." in k for k in read_raw(directory))

"""The attention options are one list in every framework: "sdpa" and "fused" (the fused path) and
"eager"; the constructor argument, ``set_attn_implementation`` and the ``attn_implementation``
property behave the same; fused and eager agree within TOLERANCES["small"]."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from vit_core import ViTConfig
from vit_core.options import ATTN_IMPLEMENTATIONS, resolve_attn_implementation
from vit_core.tolerances import TOLERANCES

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8, num_labels=3)
CANONICAL = {"sdpa": "sdpa", "fused": "sdpa", "eager": "eager"}
TASKS = ("base", "classification", "mim")


def _torch() -> tuple[dict[str, Callable[..., Any]], Callable[[Any, np.ndarray], np.ndarray]]:
    import torch

    from vit_torch import ViTForImageClassification, ViTForMaskedImageModeling, ViTModel

    def run(model: Any, x: np.ndarray) -> np.ndarray:
        torch.manual_seed(0)
        with torch.no_grad():
            return model(torch.from_numpy(x))[0].numpy()

    def seeded(cls: Any) -> Callable[..., Any]:
        def build(config: ViTConfig, **kw: Any) -> Any:
            torch.manual_seed(0)
            return cls(config, **kw).eval()
        return build

    return {"base": seeded(ViTModel), "classification": seeded(ViTForImageClassification),
            "mim": seeded(ViTForMaskedImageModeling)}, run


def _tf() -> tuple[dict[str, Callable[..., Any]], Callable[[Any, np.ndarray], np.ndarray]]:
    from vit_tf import TFViTForImageClassification, TFViTForMaskedImageModeling, TFViTModel

    def run(model: Any, x: np.ndarray) -> np.ndarray:
        return np.asarray(model(x)[0])

    return {"base": lambda c, **kw: TFViTModel(c, seed=0, **kw),
            "classification": lambda c, **kw: TFViTForImageClassification(c, seed=0, **kw),
            "mim": lambda c, **kw: TFViTForMaskedImageModeling(c, seed=0, **kw)}, run


def _flax() -> tuple[dict[str, Callable[..., Any]], Callable[[Any, np.ndarray], np.ndarray]]:
    from vit_flax import FlaxViTForImageClassification, FlaxViTForMaskedImageModeling, FlaxViTModel

    def run(model: Any, x: np.ndarray) -> np.ndarray:
        return np.asarray(model(x)[0])

    return {"base": FlaxViTModel, "classification": FlaxViTForImageClassification,
            "mim": FlaxViTForMaskedImageModeling}, run


BACKENDS = [
    pytest.param(factory, id=name,
                 marks=pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} not installed"))
    for name, module, factory in (("torch", "torch", _torch), ("tf", "tensorflow", _tf), ("flax", "flax", _flax))
]


def pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)


def test_one_list_of_choices() -> None:
    assert ATTN_IMPLEMENTATIONS == ("sdpa", "fused", "eager")
    assert [resolve_attn_implementation(n) for n in ATTN_IMPLEMENTATIONS] == ["sdpa", "sdpa", "eager"]
    assert resolve_attn_implementation(None) == "sdpa"
    for bad in ("flash_attention_2", "SDPA", "", 1):
        with pytest.raises(ValueError, match=r"choose one of \('sdpa', 'fused', 'eager'\)"):
            resolve_attn_implementation(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", BACKENDS)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", ATTN_IMPLEMENTATIONS)
def test_constructor_accepts_every_name(factory: Callable[[], Any], task: str, name: str) -> None:
    builders, _ = factory()
    model = builders[task](ViTConfig(**TINY), attn_implementation=name)
    assert model.attn_implementation == CANONICAL[name]
    assert builders[task](ViTConfig(**TINY)).attn_implementation == "sdpa"  # the default


@pytest.mark.parametrize("factory", BACKENDS)
@pytest.mark.parametrize("task", TASKS)
def test_set_attn_implementation_and_property(factory: Callable[[], Any], task: str) -> None:
    builders, run = factory()
    model = builders[task](ViTConfig(**TINY))
    x = pixels()
    fused = run(model, x)
    for name in ("eager", "fused", "sdpa", "eager"):
        model.set_attn_implementation(name)
        assert model.attn_implementation == CANONICAL[name]
        backbone = getattr(model, "vit", model)  # a task model switches its backbone too
        assert backbone.attn_implementation == CANONICAL[name]
    eager = run(model, x)
    assert np.abs(fused.astype(np.float64) - eager).max() <= TOLERANCES["small"]
    model.attn_implementation = "fused"  # the setter is the same switch
    assert model.attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"'flash'.*choose one of \('sdpa', 'fused', 'eager'\)"):
        model.set_attn_implementation("flash")
    assert model.attn_implementation == "sdpa"  # unchanged by the refused name
    with pytest.raises(ValueError, match=r"choose one of \('sdpa', 'fused', 'eager'\)"):
        builders[task](ViTConfig(**TINY), attn_implementation="flash")


@pytest.mark.parametrize("factory", BACKENDS)
@pytest.mark.parametrize("task", TASKS)
def test_fused_and_eager_agree(factory: Callable[[], Any], task: str) -> None:
    """The same weights (same seed) built with each name: the outputs within TOLERANCES["small"],
    "sdpa" and "fused" bit for bit (they are the same path)."""
    builders, run = factory()
    x = pixels()
    outputs = {name: run(builders[task](ViTConfig(**TINY), attn_implementation=name), x)
               for name in ATTN_IMPLEMENTATIONS}
    assert np.array_equal(outputs["sdpa"], outputs["fused"])
    assert np.abs(outputs["sdpa"].astype(np.float64) - outputs["eager"]).max() <= TOLERANCES["small"]
    assert np.abs(outputs["sdpa"]).max() > 1e-3  # not trivially equal


def test_torch_keeps_config_attn_implementation_in_sync() -> None:
    pytest.importorskip("torch")
    from vit_torch import ViTForImageClassification

    config = ViTConfig(**TINY)
    model = ViTForImageClassification(config, attn_implementation="fused")
    assert config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    assert config._attn_implementation == "eager" and model.vit.config._attn_implementation == "eager"
    config._attn_implementation = "sdpa"  # transformers' switch, read at every call
    assert model.attn_implementation == "sdpa" and model.vit.attn_implementation == "sdpa"

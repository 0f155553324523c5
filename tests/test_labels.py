"""Single-label classification labels and batch 0, the same in every framework.

Label -100 is ignored as torch's ``F.cross_entropy(ignore_index=-100)`` ignores it (mean over the
other labels; NaN when all are ignored); any other label outside [0, num_labels) is a ValueError
naming it and num_labels in eager use, and a NaN loss (never a finite wrong one) where the values
are not known while tracing (torch.compile, tf.function, jax.jit). Batch 0 gives empty outputs and
a NaN loss, as torch does.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from vit_core import ViTConfig

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8, num_labels=3)
TOKENS = (32 // 8) ** 2 + 1


@dataclass(frozen=True)
class Backend:
    """One framework: build a classifier / a bare model, run it eagerly and traced, to numpy."""

    name: str
    module: str
    classifier: Callable[[ViTConfig], Any]
    base: Callable[[ViTConfig], Any]
    run: Callable[[Any, np.ndarray, np.ndarray | None], tuple[float | None, np.ndarray]]
    run_traced: Callable[[Any, np.ndarray, np.ndarray], float]
    hidden: Callable[[Any, np.ndarray], np.ndarray]


def _torch() -> Backend:
    import torch

    from vit_torch import ViTForImageClassification, ViTModel
    from vit_torch.modeling import classification_loss

    def run(model: Any, x: np.ndarray, labels: np.ndarray | None) -> tuple[float | None, np.ndarray]:
        with torch.no_grad():
            out = model(torch.from_numpy(x), labels=None if labels is None else torch.from_numpy(labels))
        return (None if out.loss is None else float(out.loss)), out.logits.numpy()

    def run_traced(model: Any, x: np.ndarray, labels: np.ndarray) -> float:
        # the loss function alone under torch.compile (the model's graph is tested in test_torch_only.py)
        with torch.no_grad():
            logits = model(torch.from_numpy(x)).logits
        torch._dynamo.reset()
        compiled = torch.compile(lambda lg, lb: classification_loss(lg, lb, model.config), fullgraph=True)
        loss = float(compiled(logits, torch.from_numpy(labels)))
        torch._dynamo.reset()
        return loss

    def hidden(model: Any, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).last_hidden_state.numpy()

    return Backend("torch", "torch", lambda c: ViTForImageClassification(c).eval(), lambda c: ViTModel(c).eval(),
                   run, run_traced, hidden)


def _tf() -> Backend:
    import tensorflow as tf

    from vit_tf import TFViTForImageClassification, TFViTModel

    def run(model: Any, x: np.ndarray, labels: np.ndarray | None) -> tuple[float | None, np.ndarray]:
        out = model(x, labels=labels)
        return (None if out.loss is None else float(out.loss)), np.asarray(out.logits)

    def run_traced(model: Any, x: np.ndarray, labels: np.ndarray) -> float:
        return float(tf.function(lambda x, labels: model(x, labels=labels).loss)(tf.constant(x), tf.constant(labels)))

    def hidden(model: Any, x: np.ndarray) -> np.ndarray:
        return np.asarray(model(x).last_hidden_state)

    return Backend("tf", "tensorflow", lambda c: TFViTForImageClassification(c, seed=0),
                   lambda c: TFViTModel(c, seed=0), run, run_traced, hidden)


def _flax() -> Backend:
    import jax

    from vit_flax import FlaxViTForImageClassification, FlaxViTModel

    def run(model: Any, x: np.ndarray, labels: np.ndarray | None) -> tuple[float | None, np.ndarray]:
        out = model(x, labels=labels)
        return (None if out.loss is None else float(out.loss)), np.asarray(out.logits)

    def run_traced(model: Any, x: np.ndarray, labels: np.ndarray) -> float:
        return float(jax.jit(lambda m, x, labels: m.forward(x, labels=labels).loss)(model, x, labels))

    def hidden(model: Any, x: np.ndarray) -> np.ndarray:
        return np.asarray(model(x).last_hidden_state)

    return Backend("flax", "flax", lambda c: FlaxViTForImageClassification(c), lambda c: FlaxViTModel(c),
                   run, run_traced, hidden)


BACKENDS = [
    pytest.param(factory, id=name,
                 marks=pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} not installed"))
    for name, module, factory in (("torch", "torch", _torch), ("tf", "tensorflow", _tf), ("flax", "flax", _flax))
]

_BUILT: dict[str, tuple[Backend, Any]] = {}


def classifier(factory: Callable[[], Backend]) -> tuple[Backend, Any]:
    """The backend and its TINY classifier (built once per framework)."""
    if factory.__name__ not in _BUILT:
        backend = factory()
        _BUILT[factory.__name__] = (backend, backend.classifier(ViTConfig(**TINY)))
    return _BUILT[factory.__name__]


def pixels(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def torch_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The reference: torch's F.cross_entropy with ignore_index=-100, in float64."""
    torch = pytest.importorskip("torch")
    return float(torch.nn.functional.cross_entropy(torch.from_numpy(logits.astype(np.float64)),
                                                   torch.from_numpy(labels.astype(np.int64)), ignore_index=-100))


# ------------------------------------------------------------------------------ -100 is ignored
@pytest.mark.parametrize("factory", BACKENDS)
@pytest.mark.parametrize("labels", [[0, -100, 2, 1], [-100, 1, -100, -100], [2, 2, 0, 1]], ids=str)
def test_ignored_labels_match_torch_cross_entropy(factory: Callable[[], Backend], labels: list[int]) -> None:
    backend, model = classifier(factory)
    labels_np = np.asarray(labels, np.int64)
    loss, logits = backend.run(model, pixels(4), labels_np)
    expected = torch_cross_entropy(logits, labels_np)
    assert np.isfinite(expected) and abs(loss - expected) <= 1e-6, (backend.name, loss, expected)
    kept = labels_np != -100  # the same as the loss of the kept examples alone
    kept_loss, _ = backend.run(model, pixels(4)[kept], labels_np[kept])
    assert abs(kept_loss - expected) <= 1e-6


@pytest.mark.parametrize("factory", BACKENDS)
def test_all_labels_ignored_gives_nan_as_torch(factory: Callable[[], Backend]) -> None:
    backend, model = classifier(factory)
    labels = np.full(3, -100, np.int64)
    loss, logits = backend.run(model, pixels(3), labels)
    assert np.isnan(torch_cross_entropy(logits, labels))
    assert np.isnan(loss), (backend.name, loss)


@pytest.mark.parametrize("factory", BACKENDS)
def test_traced_loss_ignores_minus_100(factory: Callable[[], Backend]) -> None:
    backend, model = classifier(factory)
    labels = np.asarray([1, -100, 0], np.int64)
    _, logits = backend.run(model, pixels(3), None)
    assert abs(backend.run_traced(model, pixels(3), labels) - torch_cross_entropy(logits, labels)) <= 1e-6


# ------------------------------------------------------------------------------ out of range
@pytest.mark.parametrize("factory", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 3, 2**40, -101])
def test_out_of_range_label_is_a_value_error(factory: Callable[[], Backend], bad: int) -> None:
    backend, model = classifier(factory)
    labels = np.asarray([0, bad, 1], np.int64)
    with pytest.raises(ValueError, match=rf"num_labels=3.*got label {bad}\b"):
        backend.run(model, pixels(3), labels)


@pytest.mark.parametrize("factory", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 3])
def test_out_of_range_label_under_tracing_gives_nan(factory: Callable[[], Backend], bad: int) -> None:
    """Values unknown while tracing: no ValueError possible, and the loss is NaN, not finite and wrong."""
    backend, model = classifier(factory)
    loss = backend.run_traced(model, pixels(3), np.asarray([0, bad, 1], np.int64))
    assert np.isnan(loss), (backend.name, loss)


# ------------------------------------------------------------------------------ batch 0
@pytest.mark.parametrize("factory", BACKENDS)
def test_batch_zero_gives_empty_outputs_and_nan_loss(factory: Callable[[], Backend]) -> None:
    backend, model = classifier(factory)
    loss, logits = backend.run(model, pixels(0), np.zeros(0, np.int64))
    assert logits.shape == (0, 3)
    assert np.isnan(loss) and np.isnan(torch_cross_entropy(logits, np.zeros(0, np.int64)))
    loss, logits = backend.run(model, pixels(0), None)
    assert loss is None and logits.shape == (0, 3)
    base = backend.base(ViTConfig(**TINY))
    assert backend.hidden(base, pixels(0)).shape == (0, TOKENS, 32)

"""Training: vit_torch under transformers' Trainer, a plain loop and torch.compile; vit_flax under a
jit-compiled nnx.Optimizer step; gradient checkpointing in Flax (nnx.remat) with unchanged gradients.

Saved models are reloaded by vit_torch, vit_tf, vit_flax and transformers with the same logits.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
from flax import nnx  # noqa: E402

from vit_core import ViTConfig  # noqa: E402
from safetensors.numpy import load_file as read_safetensors  # noqa: E402
from vit_flax import FlaxViTForImageClassification, FlaxViTForMaskedImageModeling, FlaxViTModel  # noqa: E402
from vit_torch import SaveConfigCallback, ViTForImageClassification  # noqa: E402

from .cases import TINY  # noqa: E402

LOGITS_ATOL = 1e-5  # the reload checks: same float32 weights, different frameworks
GRAD_ATOL = 1e-6    # nnx.remat recomputes the same ops: gradients equal to float rounding


def dataset(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, TINY["num_labels"], (n,), generator=generator)


@torch.no_grad()
def mean_loss(model: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    loss = model(x, labels=y).loss.item()
    model.train(was_training)
    return loss


def reload_logits(directory: pathlib.Path, x: np.ndarray, config: ViTConfig | None = None) -> dict[str, np.ndarray]:
    """Logits of ``directory`` loaded by every framework and by transformers (``config`` for a
    directory without config.json)."""
    import transformers

    from vit_tf import TFViTForImageClassification

    kwargs = {} if config is None else {"config": config}
    their_kwargs = {} if config is None else {"config": transformers.ViTConfig(**config.to_dict())}
    with torch.no_grad():
        ours = ViTForImageClassification.from_pretrained(directory, **kwargs)(torch.from_numpy(x)).logits.numpy()
        theirs = transformers.ViTForImageClassification.from_pretrained(directory, **their_kwargs).eval()
        theirs = theirs(torch.from_numpy(x)).logits.numpy()
    tf_logits = np.asarray(TFViTForImageClassification.from_pretrained(directory, **kwargs)(x).logits)
    flax_logits = np.asarray(FlaxViTForImageClassification.from_pretrained(directory, **kwargs)(x).logits)
    return {"vit_torch": ours, "transformers": theirs, "vit_tf": tf_logits, "vit_flax": flax_logits}


def assert_reloads(directory: pathlib.Path, expected: np.ndarray, x: np.ndarray, config: ViTConfig | None = None) -> None:
    for name, logits in reload_logits(directory, x, config).items():
        diff = float(np.max(np.abs(logits - expected)))
        assert diff <= LOGITS_ATOL, f"{directory.name} reloaded by {name}: logits differ by {diff:.3e}"


# ------------------------------------------------------------------------------ PyTorch
def test_trainer_trains_and_what_it_saves_reloads_everywhere(tmp_path: pathlib.Path) -> None:
    """transformers' Trainer, unchanged, trains a vit_torch model from ``labels``. Its checkpoints'
    model.safetensors are canonical and load with ``config=``; with ``callbacks=[SaveConfigCallback()]``
    every checkpoint-N/ and the ``trainer.save_model()`` directory also hold config.json, so vitx and
    transformers load them as they are."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    x, y = dataset()
    sample = x[:3].numpy()
    trained = {}
    for callbacks in ([], [SaveConfigCallback()]):
        torch.manual_seed(0)
        config = ViTConfig(**TINY)
        model = ViTForImageClassification(config)
        before = mean_loss(model, x, y)
        run = tmp_path / f"run-{len(callbacks)}"
        args = transformers.TrainingArguments(
            output_dir=str(run), max_steps=32, per_device_train_batch_size=8, learning_rate=2e-3,
            save_strategy="steps", save_steps=16, lr_scheduler_type="constant", report_to=[], use_cpu=True,
            logging_steps=1, disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=model, args=args, callbacks=callbacks,
                                       train_dataset=[{"pixel_values": x[i], "labels": y[i]} for i in range(len(x))])
        trainer.train()
        after = mean_loss(model, x, y)
        print(f"Trainer: loss {before:.4f} -> {after:.4f}")
        assert after < 0.7 * before, f"Trainer did not train: loss {before:.4f} -> {after:.4f}"
        with torch.no_grad():
            trained[len(callbacks)] = model.eval()(x[:3]).logits.numpy()
        trainer.save_model()
        parameter_names = set(dict(model.named_parameters()))
        for step in (16, 32):
            checkpoint = run / f"checkpoint-{step}"
            assert set(read_safetensors(checkpoint / "model.safetensors")) == parameter_names
            assert (checkpoint / "config.json").is_file() == bool(callbacks)
        if not callbacks:  # Trainer alone writes no config.json: the weights load with config=
            assert_reloads(run / "checkpoint-32", trained[0], sample, config=config)
        else:  # the last checkpoint and the save_model() directory hold the trained model, as they are
            assert_reloads(run / "checkpoint-32", trained[1], sample)
            assert_reloads(run, trained[1], sample)
    np.testing.assert_array_equal(trained[0], trained[1])  # the callback changes nothing in training

    model.save_pretrained(tmp_path / "saved")
    trainer_style = tmp_path / "trainer-style"
    model.save_pretrained(trainer_style, state_dict=model.state_dict(), safe_serialization=True)
    for directory in (tmp_path / "saved", trainer_style):
        assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
        assert_reloads(directory, trained[1], sample)


def test_save_pretrained_takes_trainers_keywords(tmp_path: pathlib.Path) -> None:
    """``state_dict=`` saves those values (strictly: the model's keys, no other); ``is_main_process=False``
    writes nothing."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY))
    state = {name: value + 1.0 for name, value in model.state_dict().items()}
    model.save_pretrained(tmp_path / "given", state_dict=state)
    saved = read_safetensors(tmp_path / "given" / "model.safetensors")
    name = "classifier.weight"
    np.testing.assert_array_equal(np.asarray(saved[name]), state[name].numpy())
    model.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()
    with pytest.raises(RuntimeError, match="classifier.bias"):
        model.save_pretrained(tmp_path / "short", state_dict={k: v for k, v in state.items() if k != "classifier.bias"})


def _train_torch(step: Any, model: Any, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    before = mean_loss(model, x, y)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        step(x, y).backward()
        optimizer.step()
    return before, mean_loss(model, x, y)


def test_plain_training_loop_and_torch_compile_step() -> None:
    """A plain AdamW loop, eager and with the model under torch.compile: the loss falls, and the
    compiled model's first loss and gradients equal the eager model's."""
    x, y = dataset()
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY))
    before, after = _train_torch(lambda xb, yb: model(xb, labels=yb).loss, model, x, y, steps=8)
    print(f"eager loop: loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY)).train()
    compiled = torch.compile(model, backend="aot_eager")  # dynamo + AOT autograd; inductor codegen is too slow here
    eager_loss = model(x, labels=y).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled_loss = compiled(x, labels=y).loss
    compiled_loss.backward()
    assert abs(compiled_loss.item() - eager_loss.item()) <= 1e-5
    for name, grad in eager_grads.items():
        diff = (model.get_parameter(name).grad - grad).abs().max().item()
        assert diff <= 1e-5, f"{name}: compiled gradient differs by {diff:.3e}"
    model.zero_grad()
    before, after = _train_torch(lambda xb, yb: compiled(xb, labels=yb).loss, model, x, y, steps=8)
    print(f"torch.compile loop: loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before


# ------------------------------------------------------------------------------ Flax
FLAX_CLASSES = [FlaxViTModel, FlaxViTForImageClassification, FlaxViTForMaskedImageModeling]


@pytest.mark.parametrize("cls", FLAX_CLASSES, ids=lambda c: c.__name__)
def test_flax_gradient_checkpointing_switch(cls: type) -> None:
    """The transformers / vit_torch names on every class; enabled, every encoder layer runs under remat."""
    model = cls(ViTConfig(**TINY))
    assert cls.supports_gradient_checkpointing and not model.is_gradient_checkpointing
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)

    def loss(m: Any) -> Any:
        out = m.forward(x)
        return (out.logits if hasattr(out, "logits") else out[0]).sum()

    def remat_count(**kwargs: Any) -> int:
        def of(m: Any) -> Any:
            out = m.forward(x, **kwargs)
            return (out.logits if hasattr(out, "logits") else out[0]).sum()
        return str(jax.make_jaxpr(nnx.grad(of))(model)).count("remat")

    def scanned_layers() -> list[str]:
        return re.findall(r"length=(\d+)", str(jax.make_jaxpr(nnx.grad(loss))(model)))

    assert remat_count() == 0 and scanned_layers() == []
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    # one rematerialised layer scanned over the stacked layers (forward and backward scans) ...
    assert remat_count() >= 1 and set(scanned_layers()) == {str(TINY["num_hidden_layers"])}
    # ... or, where every layer's outputs are asked for, every layer under its own remat
    assert remat_count(output_hidden_states=True) >= TINY["num_hidden_layers"]
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing and remat_count() == 0
    with pytest.raises(ValueError, match="policy"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


def test_flax_gradient_checkpointing_gives_the_same_gradients() -> None:
    """With dropout on (explicit keys, so the recomputed masks are the same) the loss and every
    gradient equal those without checkpointing."""
    config = ViTConfig(**TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = FlaxViTForImageClassification(config, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, config.num_labels, 3)
    key = jax.random.key(5)

    @nnx.jit
    def loss_and_grads(m: Any) -> Any:
        return nnx.value_and_grad(lambda m: m.forward(x, labels=y, train=True, dropout_rng=key).loss)(m)

    plain_loss, plain = loss_and_grads(model)
    model.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed = loss_and_grads(model)
    assert abs(float(plain_loss) - float(checkpointed_loss)) <= GRAD_ATOL
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                   plain, checkpointed)
    worst = max(jax.tree_util.tree_leaves(diffs))
    print(f"flax remat: max |grad diff| {worst:.3e}")
    assert worst <= GRAD_ATOL, f"gradients differ by {worst:.3e} with checkpointing"


def test_flax_jit_train_step_with_adamw(tmp_path: pathlib.Path) -> None:
    """A jit-compiled nnx train step with optax.adamw through nnx.Optimizer (gradient checkpointing
    on) trains; the trained model saves and reloads in vit_torch with the same logits."""
    x_t, y_t = dataset()
    x, y = x_t.numpy(), y_t.numpy()
    model = FlaxViTForImageClassification(ViTConfig(**TINY), seed=0)
    model.gradient_checkpointing_enable()
    optimizer = nnx.Optimizer(model, optax.adamw(5e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model: Any, optimizer: Any, x: Any, y: Any, key: Any) -> Any:
        loss, grads = nnx.value_and_grad(lambda m: m.forward(x, labels=y, train=True, dropout_rng=key).loss)(model)
        optimizer.update(model, grads)
        return loss

    before = float(model(x, labels=y).loss)
    for _ in range(8):
        train_step(model, optimizer, x, y, jax.random.key(0))
    after = float(model(x, labels=y).loss)
    print(f"flax nnx.Optimizer: loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, f"flax did not train: loss {before:.4f} -> {after:.4f}"

    model.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = ViTForImageClassification.from_pretrained(tmp_path)(x_t[:3]).logits.numpy()
    diff = float(np.max(np.abs(reloaded - np.asarray(model(x[:3]).logits))))
    assert diff <= LOGITS_ATOL, f"trained flax model reloaded in vit_torch: logits differ by {diff:.3e}"

"""The one table of backends: every framework-specific call the shared tests make lives here.

A backend says how to build a model of a case (from a canonical numpy state), run it on the
case's numpy inputs with the case's options, read the outputs back as float64 numpy, switch the
attention implementation, cast to bfloat16 / float16, read and write the canonical state, which
paths to exercise (PATHS), which bad inputs must raise (BAD_INPUTS), and the layer primitives the
numpy reference checks. tests/test_models.py crosses BACKENDS with tests/cases.py's CASES.

Frameworks are imported lazily, inside the backend, by :meth:`Backend.require`: a backend whose
framework is not installed is skipped with ``pytest.importorskip`` (CI installs all three). A
future API rename changes one function here.

The transformers 4.57.6 oracles (PyTorch, TF through tf_keras, Flax) are at the end (ORACLES),
with the cases each supports.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

from vit_core import ViTConfig
from vit_core.weights import WeightSpec

from .cases import CASES, Case, forward_options, make_inputs, make_state
from .test_core import transformers_supports  # the case rule test_core checks the reference with

REPO = pathlib.Path(__file__).parent.parent


@dataclass(frozen=True)
class Path:
    """One way through a model: the attention implementation ("fused" / "eager", framework-neutral
    names), whether attention maps are asked for (which takes the eager kernel whatever the
    implementation), and how the call runs ("call": the model's own call; "tf.function": traced
    into a graph; "no-jit": op by op under jax.disable_jit)."""

    name: str
    attn: str
    output_attentions: bool
    mode: str = "call"


# A bad input: (id, task, pixel_values factory, extra forward arguments (numpy), message regex).
BadInput = tuple[str, str, Callable[[], Any], dict[str, Any], str]


def _zeros(*shape: int, dtype: Any = np.float32) -> Callable[[], np.ndarray]:
    return lambda: np.zeros(shape, dtype=dtype)


# Rejected by every framework with the same vit_core.validation message.
COMMON_BAD_INPUTS: list[BadInput] = [
    ("rank-3", "base", _zeros(3, 32, 32), {}, "rank 4"),
    ("channels-last", "base", _zeros(1, 32, 32, 3), {}, "channels"),
    ("wrong-channels", "base", _zeros(1, 1, 32, 32), {}, "1 channels.*num_channels=3"),
    ("uint8", "base", _zeros(1, 3, 32, 32, dtype=np.uint8), {}, "floating-point"),
    ("wrong-size", "base", _zeros(1, 3, 48, 40), {}, r"Input image size \(48\*40\) doesn't match model \(32\*32\)"),
    ("smaller-than-a-patch", "base", _zeros(1, 3, 4, 32), {"interpolate_pos_encoding": True}, "smaller than one"),
    ("head-mask-shape", "base", _zeros(1, 3, 32, 32), {"head_mask": np.ones(3, np.float32)},
     "head_mask must have shape"),
    ("head-mask-2d-shape", "classification", _zeros(1, 3, 32, 32), {"head_mask": np.ones((3, 4), np.float32)},
     "head_mask must have shape"),
    ("head-mask-3d", "classification", _zeros(1, 3, 32, 32), {"head_mask": np.ones((2, 4, 1), np.float32)},
     "head_mask must have shape"),
    ("mask-shape", "mim", _zeros(2, 3, 32, 32), {"bool_masked_pos": np.zeros((2, 15), bool)},
     r"bool_masked_pos must have shape .* \(2, 16\)"),
    ("mask-without-token", "base", _zeros(2, 3, 32, 32), {"bool_masked_pos": np.zeros((2, 16), bool)},
     "use_mask_token=True"),
]


class Backend:
    """How the shared tests drive one framework. Subclasses fill in every method."""

    name: str            # pytest id: "torch" | "tf" | "flax"
    module: str          # the package: "vit_torch"
    extra: str           # the pip extra that installs the framework: vitx[extra]
    frameworks: tuple[str, ...]  # what `module` needs; blocking any one must name the extra
    own_modules: tuple[str, ...]  # modules importing `module` may load (all others: never)
    blockable: tuple[str, ...]  # frameworks whose absence `import module` must explain
    paths: tuple[Path, ...]
    bad_inputs: tuple[BadInput, ...]

    # -------------------------------------------------------------------------- setup
    def require(self) -> Any:
        """Import the framework and the package (skipping the test when absent); pin precision."""
        for framework in self.frameworks:
            pytest.importorskip(framework)
        return importlib.import_module(self.module)

    # -------------------------------------------------------------------------- models
    def new_model(self, config: ViTConfig, task: str, *, dtype: str = "float32", seed: int = 0,
                  attn: str | None = None, init: bool = True, **table_kwargs: bool) -> Any:
        """A freshly initialised (seeded) model; ``init=False`` may skip the init (a state follows)."""
        raise NotImplementedError

    def build(self, case: Case, state: dict[str, np.ndarray] | None = None, *, dtype: str = "float32",
              attn: str | None = None) -> Any:
        """The case's model holding ``state`` (default: the case's seeded canonical weights), for inference."""
        model = self.new_model(case.vit_config, case.task, dtype=dtype, attn=attn, init=False, **case.table_kwargs)
        self.load_state(model, make_state(case) if state is None else state)
        return model

    def backbone(self, model: Any) -> Any:
        return getattr(model, "vit", model)

    def set_attn(self, model: Any, name: str) -> None:
        """Switch the attention implementation ("sdpa" = "fused", or "eager"): the same method in every framework."""
        model.set_attn_implementation(name)

    def get_attn(self, model: Any) -> str:
        """The attention implementation, canonical ("sdpa" or "eager") in every framework."""
        return model.attn_implementation

    # -------------------------------------------------------------------------- running
    def forward(self, model: Any, inputs: dict[str, Any], *, train: bool = False, seed: int = 0,
                **options: Any) -> Any:
        """The model's call on numpy inputs (converted as the framework's users would pass them)."""
        raise NotImplementedError

    def run(self, model: Any, inputs: dict[str, Any], path: Path, **options: Any) -> Any:
        """``forward`` along ``path`` (its attention implementation and call mode)."""
        self.set_attn(model, path.attn)
        return self.forward(model, inputs, output_attentions=path.output_attentions, **options)

    def forward_python(self, model: Any, inputs: dict[str, Any], **options: Any) -> Any:
        """A call that runs the model's Python code every time (no cached executable)."""
        return self.forward(model, inputs, **options)

    def to_numpy(self, value: Any) -> np.ndarray:
        """One output tensor as a float64 numpy array."""
        raise NotImplementedError

    def tensor(self, array: np.ndarray) -> Any:
        """A numpy array as this framework's users pass it to a model."""
        return array

    def outputs_to_numpy(self, output: Any) -> dict[str, Any]:
        """Model output -> dict of float64 numpy arrays (lists of them for hidden states / attentions)."""
        result: dict[str, Any] = {}
        for key, value in output.items():
            if isinstance(value, (tuple, list)):
                result[key] = [self.to_numpy(v) for v in value]
            else:
                result[key] = self.to_numpy(value)
        return result

    def dtype_name(self, value: Any) -> str:
        """The dtype of an output tensor, as a numpy name ("bfloat16")."""
        raise NotImplementedError

    # -------------------------------------------------------------------------- weights
    def canonical_state(self, model: Any) -> dict[str, np.ndarray]:
        return self.require().canonical_state(model)

    def load_state(self, model: Any, state: dict[str, np.ndarray]) -> None:
        self.require().load_canonical_state(model, state)

    def parameter_shapes(self, model: Any) -> dict[str, tuple[int, ...]]:
        """Every parameter the framework registers (its own registry), by canonical name, with the
        framework-layout shape; names the table does not know are kept as the framework spells them."""
        raise NotImplementedError

    def framework_shape(self, spec: WeightSpec) -> tuple[int, ...]:
        """The shape of a canonical weight in this framework's layout."""
        raise NotImplementedError

    def parameter_dtypes(self, model: Any) -> set[str]:
        raise NotImplementedError

    def num_parameters(self, model: Any) -> int:
        return int(model.num_parameters())

    # -------------------------------------------------------------------------- primitives (numpy in, numpy out)
    def activation(self, name: str, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                   dtype: str = "float32") -> np.ndarray:
        """LayerNorm with parameters of ``dtype`` on x cast to ``dtype``; returns the result as stored."""
        raise NotImplementedError

    def bicubic_matrix(self, in_size: int, out_size: int) -> np.ndarray:
        raise NotImplementedError

    def resample_position_grid(self, table: np.ndarray, grid: tuple[int, int], out: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def patch_embed(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """x (batch, C, H, W), weight canonical (hidden, C, ph, pw) -> (batch, patches, hidden)."""
        raise NotImplementedError

    def pixel_shuffle(self, x: np.ndarray, factor: int) -> np.ndarray:
        """(batch, c * r * r, h, w) -> (batch, c, h * r, w * r), NCHW numpy both ways."""
        raise NotImplementedError

    def eager_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                        head_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(batch, heads, tokens, head_dim) operands -> (context, probabilities)."""
        raise NotImplementedError

    def fused_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


# ================================================================================ PyTorch
class TorchBackend(Backend):
    name = "torch"
    module = "vit_torch"
    extra = "torch"
    frameworks = ("torch",)
    own_modules = ("torch",)
    blockable = ("torch",)
    # The sdpa path (attentions not asked; a head mask still forces eager), the eager path, and
    # the sdpa model forced onto the eager path by output_attentions=True (attention maps).
    paths = (
        Path("sdpa", "fused", False),
        Path("eager", "eager", False),
        Path("sdpa+attentions", "fused", True),
    )
    bad_inputs = tuple(COMMON_BAD_INPUTS)

    def require(self) -> Any:
        vit_torch = super().require()
        import torch

        # docs/NUMERICS.md: no TF32 anywhere (only matters on GPU; pinned so the bound means the same)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return vit_torch

    def new_model(self, config: ViTConfig, task: str, *, dtype: str = "float32", seed: int = 0,
                  attn: str | None = None, init: bool = True, **table_kwargs: bool) -> Any:
        vit_torch = self.require()
        import torch

        classes = {"base": vit_torch.ViTModel, "classification": vit_torch.ViTForImageClassification,
                   "mim": vit_torch.ViTForMaskedImageModeling}
        torch.manual_seed(seed)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if attn is not None:
            kwargs["attn_implementation"] = attn
        return classes[task](config, **table_kwargs, **kwargs).eval()

    def tensor(self, array: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(np.asarray(array))

    def _tensors(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: self.tensor(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}

    def forward(self, model: Any, inputs: dict[str, Any], *, train: bool = False, seed: int = 0,
                **options: Any) -> Any:
        import torch

        if train:
            torch.manual_seed(seed)
            model.train()
        try:
            with torch.no_grad():
                return model(**self._tensors(inputs), **options)
        finally:
            model.eval()

    def to_numpy(self, value: Any) -> np.ndarray:
        import torch

        return value.detach().to(torch.float64).numpy()

    def dtype_name(self, value: Any) -> str:
        return str(value.dtype).removeprefix("torch.")

    def parameter_shapes(self, model: Any) -> dict[str, tuple[int, ...]]:
        return {name: tuple(value.shape) for name, value in model.state_dict().items()}

    def framework_shape(self, spec: WeightSpec) -> tuple[int, ...]:
        return tuple(spec.shape)  # the canonical layout is PyTorch's

    def parameter_dtypes(self, model: Any) -> set[str]:
        return {self.dtype_name(p) for p in model.parameters()}

    def activation(self, name: str, x: np.ndarray) -> np.ndarray:
        import torch
        from vit_torch import layers

        return layers.get_activation(name)(torch.from_numpy(x)).to(torch.float64).numpy()

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                   dtype: str = "float32") -> np.ndarray:
        import torch
        from vit_torch import layers

        norm = layers.layer_norm(weight.shape[0], eps).to(getattr(torch, dtype))
        with torch.no_grad():
            norm.weight.copy_(_numpy_to_torch(weight))
            norm.bias.copy_(_numpy_to_torch(bias))
            return _torch_to_numpy(norm(_numpy_to_torch(x)))

    def bicubic_matrix(self, in_size: int, out_size: int) -> np.ndarray:
        from vit_torch import layers

        return layers.bicubic_matrix(in_size, out_size).numpy()

    def resample_position_grid(self, table: np.ndarray, grid: tuple[int, int], out: tuple[int, int]) -> np.ndarray:
        import torch
        from vit_torch import layers

        return layers.resample_position_grid(torch.from_numpy(table), grid, out).to(torch.float64).numpy()

    def patch_embed(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        import torch
        from vit_torch import layers

        projection = layers.patch_projection(weight.shape[1], weight.shape[0], weight.shape[2:])
        with torch.no_grad():
            projection.weight.copy_(torch.from_numpy(weight))
            projection.bias.copy_(torch.from_numpy(bias))
            return projection.eval()(torch.from_numpy(x)).flatten(2).transpose(1, 2).double().numpy()

    def pixel_shuffle(self, x: np.ndarray, factor: int) -> np.ndarray:
        import torch

        mim = self.new_model(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=16, image_size=8, patch_size=factor,
                                       encoder_stride=factor, num_channels=x.shape[1] // factor**2), "mim")
        with torch.no_grad():
            return mim.decoder[1](torch.from_numpy(x)).numpy()  # the SimMIM head's own pixel shuffle

    def eager_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                        head_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        import torch
        from vit_torch import layers

        mask = None if head_mask is None else torch.from_numpy(head_mask)
        context, probs = layers.eager_attention(*(torch.from_numpy(a) for a in (q, k, v)), scale, mask, 0.0)
        return context.double().numpy(), probs.double().numpy()

    def fused_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
        import torch
        from vit_torch import layers

        return layers.fused_attention(*(torch.from_numpy(a) for a in (q, k, v)), scale, 0.0).double().numpy()


def _numpy_to_torch(array: np.ndarray) -> Any:
    """Same dtype and bits (ml_dtypes bfloat16, which torch cannot read, through its int16 view)."""
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.detach().contiguous().view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return tensor.detach().numpy().copy()


# ================================================================================ TensorFlow / Keras 3
class TFBackend(Backend):
    name = "tf"
    module = "vit_tf"
    extra = "tf"
    frameworks = ("tensorflow", "keras")
    own_modules = ("tensorflow", "keras")
    blockable = ("tensorflow",)
    # fused, eager and fused forced eager by output_attentions in TF's eager mode; and the fused
    # path traced by tf.function (graph mode, as Keras fit / SavedModel serving run it).
    paths = (
        Path("fused", "fused", False),
        Path("eager", "eager", False),
        Path("fused+attentions", "fused", True),
        Path("fused/tf.function", "fused", False, "tf.function"),
    )
    bad_inputs = tuple(COMMON_BAD_INPUTS) + (
        ("int-list", "base", lambda: [[[[1]]]], {}, "rank 4|floating-point"),
    )

    def require(self) -> Any:
        vit_tf = super().require()
        import tensorflow as tf

        # docs/NUMERICS.md: no TF32 (only matters on GPU; pinned so the bound means the same everywhere)
        tf.config.experimental.enable_tensor_float_32_execution(False)
        return vit_tf

    def new_model(self, config: ViTConfig, task: str, *, dtype: str = "float32", seed: int = 0,
                  attn: str | None = None, init: bool = True, **table_kwargs: bool) -> Any:
        vit_tf = self.require()
        classes = {"base": vit_tf.TFViTModel, "classification": vit_tf.TFViTForImageClassification,
                   "mim": vit_tf.TFViTForMaskedImageModeling}
        return classes[task](config, **table_kwargs, dtype=dtype, seed=seed, attn_implementation=attn)

    def forward(self, model: Any, inputs: dict[str, Any], *, train: bool = False, seed: int = 0,
                **options: Any) -> Any:
        return model(**inputs, **options, training=train)

    def run(self, model: Any, inputs: dict[str, Any], path: Path, **options: Any) -> Any:
        if path.mode != "tf.function":
            return super().run(model, inputs, path, **options)
        import tensorflow as tf

        self.set_attn(model, path.attn)
        options = {**options, "output_attentions": path.output_attentions}
        traced = tf.function(lambda tensors: model(**tensors, **options))
        out = traced({k: tf.constant(v) for k, v in inputs.items()})
        assert type(out).__name__.startswith("TF"), f"tf.function returned {type(out)}"
        return out

    def to_numpy(self, value: Any) -> np.ndarray:
        import tensorflow as tf

        return np.asarray(tf.cast(value, tf.float64))

    def dtype_name(self, value: Any) -> str:
        import tensorflow as tf

        return tf.as_dtype(value.dtype).name

    def parameter_shapes(self, model: Any) -> dict[str, tuple[int, ...]]:
        prefix = model.name + "/"
        shapes = {}
        for variable in model.trainable_weights:
            assert variable.path.startswith(prefix), variable.path
            shapes[variable.path.removeprefix(prefix).replace("/", ".")] = tuple(variable.shape)
        return shapes

    def framework_shape(self, spec: WeightSpec) -> tuple[int, ...]:
        from vit_tf.weights import framework_shape

        return tuple(framework_shape(spec))

    def parameter_dtypes(self, model: Any) -> set[str]:
        return {v.dtype for v in model.trainable_weights}

    def activation(self, name: str, x: np.ndarray) -> np.ndarray:
        import tensorflow as tf
        from vit_tf import layers

        return np.asarray(tf.cast(layers.get_activation(name)(tf.constant(x)), tf.float64))

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                   dtype: str = "float32") -> np.ndarray:
        import tensorflow as tf
        from vit_tf import layers

        norm = layers.LayerNorm(weight.shape[0], eps, dtype=dtype, name="ln")
        norm.weight.assign(tf.cast(weight, dtype))
        norm.bias.assign(tf.cast(bias, dtype))
        return np.asarray(norm(tf.cast(x, dtype)))

    def bicubic_matrix(self, in_size: int, out_size: int) -> np.ndarray:
        from vit_tf import layers

        return layers.bicubic_matrix(in_size, out_size).numpy()

    def resample_position_grid(self, table: np.ndarray, grid: tuple[int, int], out: tuple[int, int]) -> np.ndarray:
        import tensorflow as tf
        from vit_tf import layers

        return np.asarray(tf.cast(layers.resample_position_grid(tf.constant(table), grid, out), tf.float64))

    def patch_embed(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        import vit_tf
        from vit_tf.weights import LAYOUTS

        embed = vit_tf.ViTPatchEmbeddings(weight.shape[1], weight.shape[0], weight.shape[2:], dtype="float32")
        embed.projection.weight.assign(LAYOUTS["conv"][0](weight))
        embed.projection.bias.assign(bias)
        return np.asarray(embed(x), dtype=np.float64)

    def pixel_shuffle(self, x: np.ndarray, factor: int) -> np.ndarray:
        import tensorflow as tf
        from vit_tf import layers

        shuffle = layers.PixelShuffle(factor, dtype="float32", name="shuffle")  # NHWC in (the decoder's conv), NCHW out
        return np.asarray(shuffle(tf.transpose(x, (0, 2, 3, 1))))

    def eager_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                        head_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        import tensorflow as tf
        from vit_tf import layers

        mask = None if head_mask is None else tf.constant(head_mask)
        context, probs = layers.eager_attention(tf.constant(q), tf.constant(k), tf.constant(v), scale, mask, None)
        return np.asarray(context, np.float64), np.asarray(probs, np.float64)

    def fused_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
        import tensorflow as tf
        from vit_tf import layers

        return np.asarray(layers.fused_attention(tf.constant(q), tf.constant(k), tf.constant(v), scale), np.float64)


# ================================================================================ Flax NNX
class FlaxBackend(Backend):
    name = "flax"
    module = "vit_flax"
    extra = "flax"
    frameworks = ("jax", "flax")
    own_modules = ("jax", "jaxlib", "flax")
    blockable = ("jax", "flax")
    # model(...) is jit-compiled: fused, eager and fused forced eager by output_attentions; and the
    # fused forward run op by op under jax.disable_jit (no XLA fusion, same numbers).
    paths = (
        Path("fused", "fused", False),
        Path("eager", "eager", False),
        Path("fused+attentions", "fused", True),
        Path("fused/no-jit", "fused", False, "no-jit"),
    )
    bad_inputs = tuple(COMMON_BAD_INPUTS)

    def new_model(self, config: ViTConfig, task: str, *, dtype: str = "float32", seed: int = 0,
                  attn: str | None = None, init: bool = True, **table_kwargs: bool) -> Any:
        vit_flax = self.require()
        classes = {"base": vit_flax.FlaxViTModel, "classification": vit_flax.FlaxViTForImageClassification,
                   "mim": vit_flax.FlaxViTForMaskedImageModeling}
        return classes[task](config, **table_kwargs, dtype=dtype, param_dtype=dtype, seed=seed,
                             attn_implementation=attn, _do_init=init)

    def forward(self, model: Any, inputs: dict[str, Any], *, train: bool = False, seed: int = 0,
                **options: Any) -> Any:
        if train:
            import jax

            return model(**inputs, **options, train=True, dropout_rng=jax.random.key(seed))
        return model(**inputs, **options)

    def forward_python(self, model: Any, inputs: dict[str, Any], **options: Any) -> Any:
        import jax
        import jax.numpy as jnp

        with jax.disable_jit():
            return model.forward(**{k: jnp.asarray(v) for k, v in inputs.items()}, **options)

    def run(self, model: Any, inputs: dict[str, Any], path: Path, **options: Any) -> Any:
        if path.mode != "no-jit":
            return super().run(model, inputs, path, **options)
        self.set_attn(model, path.attn)
        return self.forward_python(model, inputs, output_attentions=path.output_attentions, **options)

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value, dtype=np.float64)

    def dtype_name(self, value: Any) -> str:
        return np.dtype(value.dtype).name

    def parameter_shapes(self, model: Any) -> dict[str, tuple[int, ...]]:
        from flax import nnx
        from vit_flax.weights import flax_path

        names = {flax_path(spec): spec.name for spec in model.canonical_table()}
        shapes = {}
        for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            key = tuple(str(p) for p in path)
            shapes[names.get(key, "/".join(key))] = tuple(value.shape)
        return shapes

    def framework_shape(self, spec: WeightSpec) -> tuple[int, ...]:
        from vit_flax.weights import flax_shape

        return tuple(flax_shape(spec))

    def parameter_dtypes(self, model: Any) -> set[str]:
        import jax
        from flax import nnx

        return {np.dtype(p.dtype).name for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))}

    def activation(self, name: str, x: np.ndarray) -> np.ndarray:
        import jax.numpy as jnp
        from vit_flax import layers

        return np.asarray(layers.get_activation(name)(jnp.asarray(x)), dtype=np.float64)

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                   dtype: str = "float32") -> np.ndarray:
        import jax.numpy as jnp
        from vit_flax import layers

        norm = layers.LayerNorm(weight.shape[0], eps, dtype=dtype, param_dtype=dtype)
        norm.scale.set_value(jnp.asarray(weight, dtype))
        norm.bias.set_value(jnp.asarray(bias, dtype))
        return np.asarray(norm(jnp.asarray(x, dtype)))

    def bicubic_matrix(self, in_size: int, out_size: int) -> np.ndarray:
        from vit_flax import layers

        return np.asarray(layers._bicubic_matrix_f32(in_size, out_size))  # the constant resample_position_grid applies

    def resample_position_grid(self, table: np.ndarray, grid: tuple[int, int], out: tuple[int, int]) -> np.ndarray:
        import jax.numpy as jnp
        from vit_flax import layers

        return np.asarray(layers.resample_position_grid(jnp.asarray(table), grid, out), dtype=np.float64)

    def patch_embed(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        import jax.numpy as jnp
        from vit_flax import layers
        from vit_flax.weights import LAYOUTS

        conv = layers.patch_projection(weight.shape[1], weight.shape[0], weight.shape[2:], dtype=jnp.float32,
                                       param_dtype=jnp.float32)
        conv.kernel.set_value(jnp.asarray(LAYOUTS["conv"][0](weight)))
        conv.bias.set_value(jnp.asarray(bias))
        out = np.asarray(conv(jnp.asarray(x)), dtype=np.float64)  # (batch, hidden, gh, gw)
        return out.reshape(out.shape[0], out.shape[1], -1).transpose(0, 2, 1)

    def pixel_shuffle(self, x: np.ndarray, factor: int) -> np.ndarray:
        import jax.numpy as jnp
        from vit_flax import layers

        return np.asarray(layers.PixelShuffle(factor)(jnp.asarray(x)))

    def eager_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                        head_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        import jax.numpy as jnp
        from vit_flax import layers

        mask = None if head_mask is None else jnp.asarray(head_mask)
        context, probs = layers.eager_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale, mask, 0.0, None)
        return np.asarray(context, np.float64), np.asarray(probs, np.float64)

    def fused_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
        import jax.numpy as jnp
        from vit_flax import layers

        return np.asarray(layers.fused_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale), np.float64)


BACKENDS: list[Backend] = [TorchBackend(), TFBackend(), FlaxBackend()]
BACKENDS_BY_NAME = {b.name: b for b in BACKENDS}

# Frameworks (and oracles) that importing one backend's package must not import.
ALL_FRAMEWORK_MODULES = ("torch", "tensorflow", "keras", "tf_keras", "jax", "jaxlib", "flax", "transformers")


# ================================================================================ caches
# Built models and their outputs are cached per (backend, case, ...): building a TF model or
# compiling a Flax one costs more than running a tiny one. Only tests that never mutate a model
# (beyond set_attn, which every use sets first) read these caches.
_MODELS: dict[tuple[str, str, str], Any] = {}
_OUTPUTS: dict[tuple[str, str, str, str], dict[str, Any]] = {}


def cached_model(backend: Backend, case: Case, state: str = "case", dtype: str = "float32") -> Any:
    """The case's model with the case's seeded weights (state="case") or checkpoint-scale init
    weights (state="init", tests/cases.py init_state), cached."""
    key = (backend.name, case.name, f"{state}/{dtype}")
    if key not in _MODELS:
        from .cases import init_state

        weights = make_state(case) if state == "case" else init_state(case)
        if dtype != "float32":
            weights = cast_state(weights, dtype)
        _MODELS[key] = backend.build(case, weights, dtype=dtype)
    return _MODELS[key]


def path_outputs(backend: Backend, case: Case, path: Path, state: str = "case", dtype: str = "float32",
                 ) -> dict[str, Any]:
    """float64 numpy outputs of the case along ``path`` (with hidden states), cached."""
    key = (backend.name, case.name, path.name, f"{state}/{dtype}")
    if key not in _OUTPUTS:
        model = cached_model(backend, case, state, dtype)
        options = {k: v for k, v in forward_options(case).items() if k != "output_attentions"}
        out = backend.run(model, make_inputs(case), path, **options)
        if not path.output_attentions:
            assert out.attentions is None, f"{backend}/{case.name}/{path.name}: attentions returned though not asked"
        main = next(k for k in ("last_hidden_state", "logits", "reconstruction") if k in out)
        result = backend.outputs_to_numpy(out)
        result["_dtype"] = backend.dtype_name(out[main])
        _OUTPUTS[key] = result
    return {k: v for k, v in _OUTPUTS[key].items() if k != "_dtype"}


def output_dtype(backend: Backend, case: Case, path: Path, state: str = "case", dtype: str = "float32") -> str:
    path_outputs(backend, case, path, state, dtype)
    return _OUTPUTS[(backend.name, case.name, path.name, f"{state}/{dtype}")]["_dtype"]


def cast_state(state: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """A canonical state in float32 / bfloat16 (ml_dtypes) / float16: each value rounded once."""
    if dtype == "bfloat16":
        import ml_dtypes

        return {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
    return {k: v.astype(dtype) for k, v in state.items()}


# ================================================================================ transformers 4.57.6 oracles
def transformers_tf_supports(case: Case) -> bool:
    """transformers' TF ViT: TFViTModel (no mask token) and TFViTForImageClassification, no head
    mask (its TF main layer raises NotImplementedError for one); its position interpolation uses
    tf.image.resize's bicubic (a different kernel): no interpolate cases. Its TF activation table
    has no "gelu_pytorch_tanh" (the same function as "gelu_new", compared there)."""
    return (transformers_supports(case) and case.task != "mim" and not case.use_mask_token
            and not case.interpolate_pos_encoding and case.head_mask is None
            and case.vit_config.hidden_act != "gelu_pytorch_tanh")


def transformers_flax_supports(case: Case) -> bool:
    """transformers' FlaxViT has no interpolation, head mask, mask token, MIM head or loss."""
    return (transformers_supports(case) and case.task in ("base", "classification") and case.head_mask is None
            and not case.bool_masked_pos and not case.use_mask_token and case.image_hw is None
            and case.labels is None and case.vit_config.hidden_act != "gelu_fast")


def _numpy_tree(out: Any, to_numpy: Callable[[Any], np.ndarray]) -> dict[str, Any]:
    return {k: [to_numpy(t) for t in v] if isinstance(v, (tuple, list)) else to_numpy(v) for k, v in out.items()}


def transformers_pytorch_model(case: Case, state: dict[str, np.ndarray], attn_implementation: str) -> Any:
    """transformers' PyTorch ViT of the case, strictly loaded with ``state``, in eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(**case.vit_config.to_dict())
    config._attn_implementation = attn_implementation
    if case.task == "base":
        model = transformers.ViTModel(config, add_pooling_layer=case.add_pooling_layer,
                                      use_mask_token=case.use_mask_token)
    elif case.task == "classification":
        model = transformers.ViTForImageClassification(config)
    else:
        model = transformers.ViTForMaskedImageModeling(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model.eval()


_TRANSFORMERS_PT: dict[str, Any] = {}


def _transformers_pytorch(case: Case, attn_implementation: str) -> dict[str, Any]:
    torch = pytest.importorskip("torch")
    if case.name not in _TRANSFORMERS_PT:  # one model per case: transformers reads the switch at every call
        _TRANSFORMERS_PT[case.name] = transformers_pytorch_model(case, make_state(case), "eager")
    model = _TRANSFORMERS_PT[case.name]
    model.config._attn_implementation = attn_implementation
    options = forward_options(case)
    if attn_implementation == "sdpa":
        options["output_attentions"] = False
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in make_inputs(case).items()}, **options)
    return _numpy_tree(out, lambda t: t.to(torch.float64).numpy())


def _transformers_tf(case: Case) -> dict[str, Any]:
    """TFViTModel / TFViTForImageClassification (tf_keras) loading the case's weights from a
    tf_model.h5; the loss is dropped (transformers' TF loss is per example), its mean kept as
    "loss" for single-label cases (it is then the PyTorch loss)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tf_keras")
    from vit_core.checkpoint import write_tf_h5

    with tempfile.TemporaryDirectory() as tmp:
        case.vit_config.save_pretrained(tmp)
        write_tf_h5(make_state(case), os.path.join(tmp, "tf_model.h5"))
        if case.task == "base":
            model = transformers.TFViTModel.from_pretrained(tmp, add_pooling_layer=case.add_pooling_layer)
        else:
            model = transformers.TFViTForImageClassification.from_pretrained(tmp)
    inputs = make_inputs(case)
    labels = inputs.pop("labels", None)
    out = model(**inputs, output_hidden_states=True, output_attentions=True, training=False)
    result = _numpy_tree(out, lambda t: np.asarray(t, np.float64))
    result.pop("loss", None)
    if case.labels == "int":
        result["loss"] = np.asarray(np.mean(np.asarray(model(**inputs, labels=labels).loss, np.float64)))
    return result


def _transformers_flax(case: Case) -> dict[str, Any]:
    """FlaxViTModel / FlaxViTForImageClassification (_do_init=False: no random init) run with the
    case's weights in transformers' Flax params tree (vit_flax's ``params``; the same tree is
    checked in tests/test_flax_only.py)."""
    transformers = pytest.importorskip("transformers")
    flax_backend = BACKENDS_BY_NAME["flax"]
    params = cached_model(flax_backend, case).params
    config = transformers.ViTConfig(**case.vit_config.to_dict())
    if case.task == "base":
        model = transformers.FlaxViTModel(config, add_pooling_layer=case.add_pooling_layer, _do_init=False)
    else:
        model = transformers.FlaxViTForImageClassification(config, _do_init=False)
    out = model(make_inputs(case)["pixel_values"], params=params, output_hidden_states=True, output_attentions=True)
    return _numpy_tree(out, lambda t: np.asarray(t, np.float64))


@dataclass(frozen=True)
class Oracle:
    """An independent implementation: its outputs of a case (cached) and the cases it supports.
    ``fused`` oracles return no attention maps and are compared with each backend's fused path."""

    name: str
    supports: Callable[[Case], bool]
    outputs: Callable[[Case], dict[str, Any]]
    fused: bool = False


ORACLES: list[Oracle] = [
    Oracle("transformers-pt-eager", transformers_supports, lambda c: _transformers_pytorch(c, "eager")),
    # transformers' sdpa path would treat a head mask as an attention mask: not compared there
    Oracle("transformers-pt-sdpa", lambda c: transformers_supports(c) and c.head_mask is None,
           lambda c: _transformers_pytorch(c, "sdpa"), fused=True),
    Oracle("transformers-tf", transformers_tf_supports, _transformers_tf),
    Oracle("transformers-flax", transformers_flax_supports, _transformers_flax),
]

_ORACLE_OUTPUTS: dict[tuple[str, str], dict[str, Any]] = {}


def oracle_outputs(oracle: Oracle, case: Case) -> dict[str, Any]:
    key = (oracle.name, case.name)
    if key not in _ORACLE_OUTPUTS:
        _ORACLE_OUTPUTS[key] = oracle.outputs(case)
    return _ORACLE_OUTPUTS[key]


ORACLE_CASES = [(oracle, case) for oracle in ORACLES for case in CASES if oracle.supports(case)]


def import_blocker(*packages: str) -> str:
    """Python source that makes ``packages`` (top-level names) unimportable in a subprocess: a
    meta-path finder raises ImportError for them, whatever sys.path holds. Unlike
    ``sys.modules[name] = None`` it leaves no None entry behind for libraries that probe
    ``sys.modules`` (scipy's array-API helpers do, and crash on it)."""
    return (
        "import sys\n"
        "class _Blocked:\n"
        f"    names = {tuple(packages)!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names:\n"
        "            raise ImportError(name + ' must not be imported here')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Blocked())\n"
    )

"""ViTConfig: the transformers 4.x ViT configuration, framework-neutral.

A config.json written here is read by transformers' ViTConfig and the reverse. Unknown keys are
kept (``extra``) and written back, so a round trip never loses information.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import pathlib
from typing import Any

from .activations import ACTIVATIONS
from .hub_mixin import PushToHubMixin

CONFIG_NAME = "config.json"

# Model sizes (hidden size, layers, heads, MLP size), decoded from names like "B/16" (big_vision
# style). The one size table: conversion's head counts and timm's size names are read from it.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "g": (1408, 40, 16, 6144),
    "G": (1664, 48, 16, 8192),
}

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "encoder_stride": 16,
    "pooler_output_size": None,
    "pooler_act": "tanh",
    "problem_type": None,
}

# Keys transformers' PretrainedConfig writes that carry no meaning for the model here; they are
# kept in ``extra`` like any unknown key.
_INT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "num_channels", "encoder_stride")
_PROB_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
# Fields that are JSON booleans only (never a string such as "false", never 0 / 1): the model's
# own, and the output flags of transformers' PretrainedConfig that the models read from ``extra``.
_BOOL_FIELDS = ("qkv_bias",)
_BOOL_EXTRA_FIELDS = ("output_attentions", "output_hidden_states", "return_dict")
# Sane bounds of the float fields. LayerNorm's eps is 1e-12 (transformers) to 1e-5 in real
# checkpoints; one near the activations' variance (or an overflow such as 1e300) flattens every
# token. initializer_range is a standard deviation of weights: 0.02 in every ViT.
LAYER_NORM_EPS_MAX = 0.1
INITIALIZER_RANGE_MAX = 1.0
_INT_STRING = re.compile(r"-?[0-9]+")

# transformers PretrainedConfig defaults of the fields it writes into every to_dict(): a field with
# its default is left out when a transformers config is read (``as_vit_config``), so a saved
# config.json holds what the user set, as transformers' own to_diff_dict does.
PRETRAINED_CONFIG_DEFAULTS: dict[str, Any] = {
    "add_cross_attention": False, "architectures": None, "bad_words_ids": None, "begin_suppress_tokens": None,
    "bos_token_id": None, "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
    "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0, "eos_token_id": None, "exponential_decay_length_penalty": None,
    "finetuning_task": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "is_decoder": False,
    "is_encoder_decoder": False, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
    "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "pad_token_id": None,
    "prefix": None, "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
    "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None, "suppress_tokens": None,
    "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torchscript": False,
    "typical_p": 1.0, "use_bfloat16": False,
}
# The attributes every transformers 4.x PretrainedConfig has (besides the ViT fields and the label
# fields): ``from_pretrained(path, output_attentions=True)`` sets one, as transformers does (it is
# kept in ``extra`` and written to config.json). The set equals transformers 4.57's
# ``PretrainedConfig().to_dict()`` keys less the bookkeeping ones (tests/test_compat.py checks it).
PRETRAINED_CONFIG_FIELDS: frozenset[str] = frozenset(PRETRAINED_CONFIG_DEFAULTS)
LABEL_FIELDS: tuple[str, ...] = ("num_labels", "id2label", "label2id")

# model_type values vitx can name when refusing a config: the distilled DeiT is the one ViT-like
# checkpoint family users meet most (facebook/deit-*-distilled-*).
DISTILLED_DEIT_MESSAGE = (
    "model_type 'deit' is a distilled DeiT (DeiTForImageClassificationWithTeacher, with a distillation "
    "token and a second head), which vitx does not implement; the non-distilled DeiT checkpoints "
    "(model_type 'vit', e.g. facebook/deit-base-patch16-224) load with the ViT classes"
)


def check_model_type(model_type: Any, source: str = "config") -> None:
    """Raise ValueError unless ``model_type`` is "vit" (or absent, None).

    Args:
        model_type: the ``model_type`` of a config.json (or a config object's).
        source: what the config came from (a path or hub id), named in the message.
    """
    if model_type in ("vit", None):
        return
    if model_type == "deit":
        raise ValueError(f"{source}: {DISTILLED_DEIT_MESSAGE}")
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; vitx reads ViT checkpoints "
                     "(model_type 'vit') only")


def as_vit_config(config: Any, what: str = "config") -> "ViTConfig":
    """A vitx ViTConfig from a vitx ViTConfig (returned as is) or a transformers ``ViTConfig``.

    A transformers config is read through its ``to_dict()`` (the same fields and names); its
    ``model_type`` must be "vit".

    Args:
        config: the config given (``from_pretrained(path, config=...)``, ``from_config(...)``).
        what: the argument's name, for the error message.
    """
    if isinstance(config, ViTConfig):
        return config
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None or not callable(to_dict):
        raise TypeError(f"{what} must be a ViTConfig (vitx's or transformers'), got {type(config).__name__}")
    check_model_type(getattr(config, "model_type", None), f"{what} ({type(config).__name__})")
    fields = {k: v for k, v in to_dict().items() if not k.startswith("_")}
    for key in ("transformers_version", "dtype", "torch_dtype"):  # transformers' bookkeeping, not the model's
        fields.pop(key, None)
    fields = {k: v for k, v in fields.items()
              if k not in PRETRAINED_CONFIG_DEFAULTS or v != PRETRAINED_CONFIG_DEFAULTS[k]}
    return ViTConfig.from_dict(fields)




def _pair(value: int | tuple[int, int] | list[int], field: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"ViTConfig.{field} must be an int or (height, width), got {value!r}")
        pair = (value[0], value[1])
    else:
        pair = (value, value)
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"ViTConfig.{field} must hold positive ints, got {value!r}")
    return pair


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _label_index(value: Any, what: str) -> int:
    """A class index of id2label / label2id: an int, or a string of one (JSON object keys are strings)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT_STRING.fullmatch(value):
        return int(value)
    field = what.split()[0]
    raise ValueError(f"ViTConfig.{field}: each {what} must be an int class index (or a string of one), got {value!r}")


class ViTConfig(PushToHubMixin):
    """Configuration of a ViT model, with the fields and defaults of transformers' ViTConfig.

    ``image_size`` and ``patch_size`` may be an int or (height, width). Label fields
    (``num_labels``, ``id2label``, ``label2id``, ``problem_type``) behave as in transformers:
    ``id2label`` keys are ints, and ``num_labels`` defaults to 2.
    """

    _hub_commit_message = "Upload config"

    model_type = "vit"

    def __init__(self, **kwargs: Any) -> None:
        for key, default in _DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, copy.deepcopy(default)))
        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        num_labels = kwargs.pop("num_labels", None)
        if id2label is not None:
            if not isinstance(id2label, dict):
                raise ValueError(f"ViTConfig.id2label must be a mapping of class index to name, got {id2label!r}")
            self.id2label = {_label_index(k, "id2label key"): str(v) for k, v in id2label.items()}
            if len(self.id2label) != len(id2label):
                raise ValueError(f"ViTConfig.id2label names a class index twice (e.g. 0 and '0'): {list(id2label)[:10]}")
            if num_labels is not None and num_labels != len(self.id2label):
                raise ValueError(
                    f"ViTConfig.num_labels={num_labels} disagrees with id2label ({len(self.id2label)} labels)"
                )
        else:
            n = 2 if num_labels is None else num_labels
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"ViTConfig.num_labels must be a non-negative int, got {n!r}")
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        if label2id is not None:
            if not isinstance(label2id, dict):
                raise ValueError(f"ViTConfig.label2id must be a mapping of name to class index, got {label2id!r}")
            self.label2id = {str(k): _label_index(v, "label2id value") for k, v in label2id.items()}
        else:
            self.label2id = {v: k for k, v in self.id2label.items()}
        kwargs.pop("model_type", None)
        # Everything else (architectures, torch_dtype, transformers_version, ...) is kept verbatim.
        self.extra: dict[str, Any] = kwargs
        self.validate()

    # ----------------------------------------------------------------------------- labels
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"ViTConfig.num_labels must be a non-negative int, got {n!r}")
        if n == len(self.id2label):  # transformers keeps the names when the count is unchanged
            return
        self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def use_return_dict(self) -> bool:
        """Whether models return output objects: ``return_dict`` (default True) and not ``torchscript``,
        as transformers' PretrainedConfig.use_return_dict."""
        return bool(self.extra.get("return_dict", True)) and not bool(self.extra.get("torchscript", False))

    def is_field(self, name: str) -> bool:
        """Whether ``name`` is a config field here (transformers' ``hasattr(config, name)``): a ViT
        field, a label field, a transformers PretrainedConfig attribute or a key this config holds."""
        return name in _DEFAULTS or name in LABEL_FIELDS or name in PRETRAINED_CONFIG_FIELDS or name in self.extra

    # ----------------------------------------------------------------------------- geometry
    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair(self.image_size, "image_size")

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _pair(self.patch_size, "patch_size")

    @property
    def grid_hw(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of an image of ``image_size``."""
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        return h // ph, w // pw

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_hw
        return gh * gw

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pooler_size(self) -> int:
        return self.hidden_size if self.pooler_output_size is None else self.pooler_output_size

    # ----------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ValueError naming the first invalid field.

        Ints are ints (not bools, not floats); booleans are bools only (a JSON string "false" or a
        0 / 1 is an error, never coerced); layer_norm_eps is finite in (0, LAYER_NORM_EPS_MAX];
        initializer_range finite in [0, INITIALIZER_RANGE_MAX]; dropout probabilities in [0, 1);
        id2label keys are exactly 0..num_labels-1 and label2id values ints in that range (label2id
        names are not matched against id2label: transformers keeps a stale label2id after
        ``config.id2label = ...``, and ImageNet's id2label repeats names).
        """
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ViTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        if h % ph or w % pw:
            raise ValueError(
                f"ViTConfig.image_size {self.image_size!r} must be divisible by patch_size {self.patch_size!r}"
            )
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ViTConfig.{name} must be true or false (a JSON boolean), got {getattr(self, name)!r}")
        for name in _BOOL_EXTRA_FIELDS:
            if name in self.extra and not isinstance(self.extra[name], bool):
                raise ValueError(f"ViTConfig.{name} must be true or false (a JSON boolean), got {self.extra[name]!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"ViTConfig.hidden_act {self.hidden_act!r} is not supported; choose one of {sorted(ACTIVATIONS)}"
            )
        if not isinstance(self.pooler_act, str) or self.pooler_act not in ACTIVATIONS:
            raise ValueError(
                f"ViTConfig.pooler_act {self.pooler_act!r} is not supported; choose one of {sorted(ACTIVATIONS)}"
            )
        for name in _PROB_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
                raise ValueError(f"ViTConfig.{name} must be a probability in [0, 1), got {v!r}")
        eps = self.layer_norm_eps
        if not _is_finite_number(eps) or not 0 < eps <= LAYER_NORM_EPS_MAX:
            raise ValueError(f"ViTConfig.layer_norm_eps must be a finite number in (0, {LAYER_NORM_EPS_MAX}], got {eps!r}")
        std = self.initializer_range
        if not _is_finite_number(std) or not 0 <= std <= INITIALIZER_RANGE_MAX:
            raise ValueError(f"ViTConfig.initializer_range must be a finite number in [0, {INITIALIZER_RANGE_MAX}], "
                             f"got {std!r}")
        self._validate_labels()
        if self.pooler_output_size is not None and (
            isinstance(self.pooler_output_size, bool)
            or not isinstance(self.pooler_output_size, int)
            or self.pooler_output_size <= 0
        ):
            raise ValueError(f"ViTConfig.pooler_output_size must be a positive int or None, got {self.pooler_output_size!r}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"ViTConfig.problem_type must be one of {PROBLEM_TYPES} or None, got {self.problem_type!r}")

    def _validate_labels(self) -> None:
        n = len(self.id2label)
        keys = list(self.id2label)
        wrong = [k for k in keys if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n]
        if wrong or len(set(keys)) != n:
            raise ValueError(f"ViTConfig.id2label keys must be the class indices 0..{n - 1} of its {n} labels, "
                             f"got {wrong[:10] if wrong else 'repeated keys'}")
        for name, index in self.label2id.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
                raise ValueError(f"ViTConfig.label2id[{name!r}] must be a class index in [0, {n}) "
                                 f"(num_labels={n}), got {index!r}")

    # ----------------------------------------------------------------------------- variants
    @classmethod
    def from_variant(cls, name: str, image_size: int = 224, **kwargs: Any) -> "ViTConfig":
        """Build the config of a named size such as ``"B/16"`` or ``"Ti/16"`` (big_vision naming)."""
        try:
            size, patch = name.split("/")
            hidden, layers, heads, mlp = VARIANTS[size]
            patch_size = int(patch)
        except (ValueError, KeyError):
            raise ValueError(f"unknown ViT variant {name!r}; expected one of {sorted(VARIANTS)} + '/patch', e.g. 'B/16'") from None
        fields = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=mlp, patch_size=patch_size, encoder_stride=patch_size,
                      image_size=image_size)
        fields.update(kwargs)
        return cls(**fields)

    # ----------------------------------------------------------------------------- dict / json
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        for key in _DEFAULTS:
            value = getattr(self, key)
            d[key] = list(value) if isinstance(value, tuple) else value
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        d["label2id"] = dict(self.label2id)
        d["model_type"] = self.model_type
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> "ViTConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a ViT config must be a JSON object, got {type(d).__name__}")
        check_model_type(d.get("model_type", "vit"))
        fields = dict(d)
        if "num_labels" in overrides and "id2label" not in overrides and not _same_label_count(d, overrides["num_labels"]):
            # a different count names new classes: LABEL_0..N-1, as transformers; the same count keeps the names
            fields.pop("id2label", None)
            fields.pop("label2id", None)
        if "id2label" in overrides and "label2id" not in overrides:
            fields.pop("label2id", None)  # a new head's labels: the checkpoint's label2id names the old ones
        fields.update(overrides)
        return cls(**fields)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ViTConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ViTConfig {self.to_json_string()}"

    # ----------------------------------------------------------------------------- files
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False,
                        **kwargs: Any) -> pathlib.Path:
        """Write ``config.json`` (atomically) into ``save_directory``; returns its path.

        Args:
            save_directory: the directory (created when absent).
            push_to_hub: upload config.json to the hub afterwards (transformers' spelling).
            **kwargs: with push_to_hub: ``repo_id`` (default: the directory's name), ``commit_message``,
                ``private``, ``token``, ``revision``, ``create_pr``, ``commit_description``.
        """
        from .pretrained import push_saved

        path = write_json_to_directory(save_directory, CONFIG_NAME, self.to_json_string())
        push_saved(save_directory, push_to_hub, kwargs, [CONFIG_NAME], owner="ViTConfig.save_pretrained",
                   default_message=self._hub_commit_message)
        return path

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "ViTConfig":
        path = pathlib.Path(path)
        d = read_json_file(path, "config file")
        try:
            return cls.from_dict(d, **overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> "ViTConfig | tuple[ViTConfig, dict[str, Any]]":
        """Read ``config.json`` from a directory, a json file, or a hub id (through huggingface_hub).

        As transformers' ``PretrainedConfig.from_pretrained``: keywords that are config fields
        (:meth:`is_field`) override the file's values; the others are not config fields and are
        ignored, or returned with ``return_unused_kwargs=True`` as ``(config, unused)``.

        Args:
            pretrained_model_name_or_path: a directory, a config.json file or a hub id.
            revision: hub branch, tag or commit.
            cache_dir: huggingface_hub's cache directory.
            token: hub token.
            local_files_only: read the hub cache only.
            force_download: download again even when cached.
            return_unused_kwargs: also return the keywords that were not config fields.
            **kwargs: config fields to override (e.g. ``num_labels=10``).
        """
        path = pathlib.Path(pretrained_model_name_or_path)
        if path.is_file():
            file = path
        elif path.is_dir():
            file = path / CONFIG_NAME
        else:
            from .checkpoint.hub import resolve_pretrained

            directory = resolve_pretrained(
                str(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir, token=token,
                local_files_only=local_files_only, filenames=(CONFIG_NAME,), force_download=force_download,
            )
            file = directory / CONFIG_NAME
        kwargs.pop("trust_remote_code", None)  # no remote code is ever run
        base = cls.from_json_file(file)
        overrides = {k: v for k, v in kwargs.items() if base.is_field(k)}
        unused = {k: v for k, v in kwargs.items() if k not in overrides}
        config = cls.from_json_file(file, **overrides) if overrides else base
        return (config, unused) if return_unused_kwargs else config


def _same_label_count(d: dict[str, Any], num_labels: Any) -> bool:
    """Whether ``num_labels`` equals the number of labels config dict ``d`` names."""
    id2label = d.get("id2label")
    if isinstance(id2label, dict):
        return num_labels == len(id2label)
    return "num_labels" in d and num_labels == d["num_labels"]


def write_json_to_directory(save_directory: str | os.PathLike, filename: str, text: str) -> pathlib.Path:
    """``save_pretrained``'s common part: create the directory, write ``filename`` atomically."""
    directory = pathlib.Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained needs a directory, but {directory} is a file")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    write_text_atomic(path, text)
    return path


def read_json_file(path: pathlib.Path, what: str) -> Any:
    """Parse a JSON file; a missing file or bad JSON raises an error naming ``what`` and the path."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from None


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (the checkpoint layer's one staging helper)."""
    from .checkpoint.staging import write_text

    write_text(path, text)

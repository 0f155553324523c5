"""transformers 4.x's Auto classes for the one model type vitx implements ("vit").

``AutoConfig`` lives here; each framework's ``auto.py`` names its model classes on top of
:class:`BaseAutoModel` (``AutoModel``, ``TFAutoModelForImageClassification``, ...). What they
share is here: reading a checkpoint's ``model_type`` before anything is built, and refusing any
model type but "vit" with a message naming it (a distilled DeiT gets its own message: its
non-distilled siblings are plain ViT checkpoints and load).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, ClassVar

from .config import CONFIG_NAME, ViTConfig, as_vit_config, check_model_type, read_json_file

# model_type -> config class: the only one vitx implements.
CONFIG_MAPPING: dict[str, type[ViTConfig]] = {"vit": ViTConfig}
_HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


def checkpoint_model_type(pretrained_model_name_or_path: str | os.PathLike, **hub_options: Any) -> Any:
    """The ``model_type`` of a checkpoint's config.json (a directory, a file in it, or a hub id);
    None when it has no config.json (the model class then says what is missing).

    Args:
        pretrained_model_name_or_path: a checkpoint directory, a file inside one, or a hub id.
        **hub_options: ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``
            for a hub id.
    """
    path = pathlib.Path(pretrained_model_name_or_path).expanduser()
    if path.is_file():
        config_file = path if path.suffix == ".json" and path.name == CONFIG_NAME else path.parent / CONFIG_NAME
    elif path.is_dir():
        config_file = path / CONFIG_NAME
    else:
        from .checkpoint.errors import CheckpointNotFoundError
        from .checkpoint.hub import resolve_pretrained

        options = {k: v for k, v in hub_options.items() if k in _HUB_OPTIONS}
        try:
            config_file = resolve_pretrained(os.fspath(pretrained_model_name_or_path), filenames=(CONFIG_NAME,),
                                             **options) / CONFIG_NAME
        except CheckpointNotFoundError:
            return None
    if not config_file.is_file():
        return None
    data = read_json_file(config_file, "config file")
    if not isinstance(data, dict):
        raise ValueError(f"{config_file}: a config must be a JSON object, got {type(data).__name__}")
    return data.get("model_type")


class AutoConfig:
    """transformers' ``AutoConfig``: ``AutoConfig.from_pretrained(path_or_hub_id, **kwargs)`` and
    ``AutoConfig.for_model("vit", **fields)`` give a :class:`ViTConfig`; any other model_type is a
    ValueError naming it."""

    def __init__(self) -> None:
        raise OSError("AutoConfig is designed to be instantiated with AutoConfig.from_pretrained(path) or "
                      "AutoConfig.for_model(model_type)")

    @classmethod
    def for_model(cls, model_type: str, *args: Any, **kwargs: Any) -> ViTConfig:
        """A new config of ``model_type`` ("vit") with the given fields.

        Args:
            model_type: "vit" (anything else raises ValueError naming it).
            *args: passed to the config class (none are taken by ViTConfig).
            **kwargs: config fields.
        """
        check_model_type(model_type, "AutoConfig.for_model")
        return CONFIG_MAPPING["vit"](*args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """The config of a checkpoint directory, a config.json or a hub id, as ViTConfig.from_pretrained.

        Args:
            pretrained_model_name_or_path: a directory, a config.json file or a hub id.
            **kwargs: as :meth:`ViTConfig.from_pretrained` (hub options, config fields,
                ``return_unused_kwargs``).
        """
        check_model_type(checkpoint_model_type(pretrained_model_name_or_path, **kwargs),
                         os.fspath(pretrained_model_name_or_path))
        return ViTConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)

    @staticmethod
    def register(model_type: str, config: Any, exist_ok: bool = False) -> None:
        """Not supported: vitx implements ViT only (transformers' registry of custom models)."""
        raise NotImplementedError(f"AutoConfig.register({model_type!r}): vitx implements the 'vit' model type only")


class BaseAutoModel:
    """The shared part of every framework's Auto model classes: a subclass names ``_model_class``.

    ``from_pretrained(path, **kwargs)`` checks the checkpoint's model_type (or that of
    ``config=``) and calls ``_model_class.from_pretrained``; ``from_config(config, **kwargs)``
    builds ``_model_class(config, **kwargs)`` with random weights (a transformers ViTConfig is
    accepted too).
    """

    _model_class: ClassVar[Any] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is designed to be instantiated with "
                      f"{type(self).__name__}.from_pretrained(path) or {type(self).__name__}.from_config(config)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any) -> Any:
        """Load the checkpoint into ``_model_class`` (see its from_pretrained for the keywords).

        Args:
            pretrained_model_name_or_path: a checkpoint directory, a weights file or a hub id.
            *model_args: refused (vitx's model classes take keywords only), as a TypeError.
            **kwargs: passed on to ``_model_class.from_pretrained``.
        """
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes the checkpoint and keywords only, "
                            f"got {len(model_args)} more positional argument(s)")
        config = kwargs.get("config")
        source = os.fspath(pretrained_model_name_or_path)
        if config is None:
            check_model_type(checkpoint_model_type(pretrained_model_name_or_path, **kwargs), source)
        else:
            kwargs["config"] = as_vit_config(config)
        return cls._model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> Any:
        """A new ``_model_class`` with random weights for ``config`` (a vitx or transformers ViTConfig).

        Args:
            config: the configuration; any model_type but "vit" raises ValueError naming it.
            **kwargs: passed to the model class (e.g. ``attn_implementation``, ``dtype``).
        """
        return cls._model_class(as_vit_config(config), **kwargs)


__all__ = ["AutoConfig", "BaseAutoModel", "CONFIG_MAPPING", "checkpoint_model_type"]

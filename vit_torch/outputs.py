"""The output classes vit_torch's models return: vit_core's dataclasses, registered as torch pytrees.

Eager mode and autograd pass any Python object through, and torch.compile (dynamo) traces the
construction of a dataclass and returns the same object. torch.export, the dynamo ONNX exporter
(``torch.onnx.export(..., dynamo=True)``) and other pytree users need to flatten an output into
its tensors: :func:`register_outputs` registers every class with ``torch.utils._pytree`` (the
fields in declaration order; a None field is an empty subtree, so the flattened leaves are the
non-None tensors in ``to_tuple()`` order, as transformers' ModelOutput flattens). The TorchScript
tracer (``torch.jit.trace``, the legacy ``torch.onnx.export(..., dynamo=False)``) knows no pytrees:
while it traces, the models return ``to_tuple()`` (see :func:`traceable`). Registration runs once,
when vit_torch is imported. vit_tf/outputs.py and vit_flax/outputs.py are the same module for
their frameworks (TensorFlow's nest protocol, JAX pytree registration).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree

from vit_core.outputs import (
    OUTPUT_CLASSES,
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    MaskedImageModelingOutput,
    ModelOutput,
)

__all__ = ["OUTPUT_CLASSES", "BaseModelOutputWithPooling", "ImageClassifierOutput", "MaskedImageModelingOutput",
           "register_outputs", "traceable", "inner_call"]

_NESTING = threading.local()


def register_outputs() -> None:
    """Register each class of OUTPUT_CLASSES with torch's pytree utilities (a no-op for one already
    registered). The serialized type name is the class's import path, so an ExportedProgram saved
    with ``torch.export.save`` names it."""
    for cls in OUTPUT_CLASSES:
        if cls in pytree.SUPPORTED_NODES:
            continue
        pytree.register_dataclass(cls, field_names=[f.name for f in dataclasses.fields(cls)],
                                  serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


def traceable(output: ModelOutput, return_dict: bool) -> ModelOutput | tuple[Any, ...]:
    """What a model's forward returns: ``output`` (return_dict) or its tuple; the tuple under the
    TorchScript tracer too, which cannot return a dataclass, except to a head's own call of its
    backbone (:func:`inner_call`), which reads the fields by name."""
    if return_dict and (not torch.jit.is_tracing() or getattr(_NESTING, "depth", 0) > 0):
        return output
    return output.to_tuple()


@contextlib.contextmanager
def inner_call() -> Iterator[None]:
    """Around a head's call of its ViTModel: the backbone returns its output class even while traced."""
    _NESTING.depth = getattr(_NESTING, "depth", 0) + 1
    try:
        yield
    finally:
        _NESTING.depth -= 1


register_outputs()

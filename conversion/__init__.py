"""conversion: bring any ViT checkpoint, run it in any framework, write it in any format, prove parity.

```python
from conversion import load_checkpoint, convert, compare, assert_parity, pipeline
state, config = load_checkpoint("ViT-B_16.npz")          # detected from the contents
convert("ViT-B_16.npz", "vit-b16-tf", to="tf")            # streamed, atomic
report = compare("vit-b16-tf", frameworks=("torch", "tf", "flax"))
print(report.to_table()); assert report.ok
```

``import conversion`` imports numpy (and safetensors / h5py / msgpack when a function needs them),
never torch, tensorflow or jax: a framework is imported only by the call that runs a model.
"""

from __future__ import annotations

from vit_core.checkpoint import CheckpointError

from .compare import ParityReport, assert_parity, compare
from .convert import TARGETS, Conversion, convert
from .detect import load_checkpoint, open_checkpoint
from .pipeline import ImageClassificationPipeline, ImageFeatureExtractionPipeline, pipeline

__all__ = [
    "CheckpointError",
    "Conversion",
    "ImageClassificationPipeline",
    "ImageFeatureExtractionPipeline",
    "ParityReport",
    "TARGETS",
    "assert_parity",
    "compare",
    "convert",
    "load_checkpoint",
    "open_checkpoint",
    "pipeline",
]

"""What a training run means, once for every framework: the AdamW rule, the learning-rate
schedule, which weights decay, and a new classification head drawn in numpy.

Each framework's ``training`` module maps :class:`AdamW` onto its own optimizer
(``torch.optim.AdamW``, a Keras ``AdamW``, ``optax``) so that the same batches give the same
steps in all three (docs/training.md):

    m_t = b1 m + (1 - b1) g              v_t = b2 v + (1 - b2) g²
    p  <- p - lr * wd * p                (decoupled decay, only where :func:`decays` says so)
    p  <- p - lr * (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)

(epsilon after the bias correction, as torch and optax place it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .config import ViTConfig
from .weights import WeightSpec

__all__ = ["AdamW", "Schedule", "decays", "new_head", "nonempty", "part_bounds", "step_seed", "worker_seed"]


@dataclass(frozen=True)
class AdamW:
    """One optimizer description (torch.optim.AdamW's defaults except the learning rate)."""

    lr: float = 5e-5
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def decays(spec: WeightSpec) -> bool:
    """Whether weight decay applies to a weight: matrices, kernels and embeddings do; biases and
    LayerNorm scales (one-dimensional weights) do not, as in transformers' Trainer and timm."""
    return len(spec.shape) > 1


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps``
    (transformers' ``get_cosine_schedule_with_warmup``). Steps count from 1."""

    peak: float
    total_steps: int
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"a schedule needs at least one step, got total_steps={self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1-based), in float64."""
        done = step - 1  # steps taken before this one, as transformers' LambdaLR counts
        if done < self.warmup_steps:
            return self.peak * done / max(1, self.warmup_steps) if self.warmup_steps else self.peak
        progress = (done - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def new_head(config: ViTConfig, seed: int) -> dict[str, np.ndarray]:
    """A freshly initialised classifier for ``config.num_labels`` classes, the same in every framework:
    weight ~ N(0, initializer_range²) truncated at two standard deviations, drawn by numpy from
    ``seed``; bias zero. Canonical names and layout ((num_labels, hidden_size) weight)."""
    rng = np.random.default_rng([seed, 0x4EAD])
    shape = (config.num_labels, config.hidden_size)
    std = config.initializer_range
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2.0
    while outside.any():  # redraw what falls outside [-2, 2] standard deviations
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2.0
    return {"classifier.weight": (values * std).astype(np.float32),
            "classifier.bias": np.zeros(config.num_labels, np.float32)}


def step_seed(seed: int, step: int) -> int:
    """The dropout seed of optimizer step ``step``: a function of the run's seed and the step only, so a
    resumed run draws the same dropout masks as one never interrupted."""
    return int(np.random.default_rng([seed, step, 0xD0]).integers(0, 2**31 - 1))


def worker_seed(seed: int, rank: int) -> int:
    """The dropout seed of worker ``rank`` at a step whose seed is ``seed`` (:func:`step_seed`):
    ``seed`` itself on rank 0, so that one process draws what it always drew; other workers draw
    other masks for their other images."""
    if rank == 0:
        return seed
    return int(np.random.default_rng([seed, rank, 0xD1]).integers(0, 2**31 - 1))


def nonempty(pixel_values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(pixel values, labels, rows): a worker's part of a global batch, with one zero image of label 0
    in place of an empty part (rows 0: the caller weighs its loss by 0), so that every worker runs
    the same computation and meets the others in its collectives."""
    rows = len(labels)
    if rows:
        return pixel_values, labels, rows
    shape = (1, *np.shape(pixel_values)[1:])
    return np.zeros(shape, np.float32), np.zeros(1, np.int64), 0


def part_bounds(rows: int, parts: int) -> np.ndarray:
    """Offsets (``parts + 1`` of them) splitting a global batch of ``rows`` rows into ``parts``
    contiguous parts, one per data-parallel worker, that differ by at most one row, the first ones
    larger (``numpy.array_split``'s rule): equal parts when ``parts`` divides ``rows``."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(rows, parts)
    sizes = [base + (1 if i < extra else 0) for i in range(parts)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

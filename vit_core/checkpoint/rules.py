"""The generic rule engine: one format's weight names and layouts as data, applied both ways.

A format module declares an ordered list of rules. ``apply_forward`` runs them in order to turn a
state in the source format's names into canonical names (transformers 4.x PyTorch, docs/FORMATS.md
section 1); ``apply_backward`` runs their inverses in reverse order to write that format. Every
rule is reversible by construction, so ``backward(forward(state)) == state`` bitwise.

States are dicts of :class:`Lazy` tensors (shape and dtype known up front, data read on demand),
so a conversion streams tensor by tensor: a memory-mapped source is read once per output tensor,
and a writer materialises one tensor at a time.

Templates name keys with placeholders in braces, e.g. ``blocks.{i}.norm1.{wb}``; the same
placeholder on both sides of a rule carries the matched text across. Placeholder patterns are in
:data:`PLACEHOLDERS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CheckpointError
from .lazy import Lazy, LazyState

PLACEHOLDERS: dict[str, str] = {
    "i": r"\d+",                 # a layer index
    "wb": r"weight|bias",        # a torch parameter leaf
    "ksb": r"kernel|scale|bias",  # a flax parameter leaf
    "path": r".+",               # the rest of a path
}


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------


class Template:
    """A key pattern with named placeholders, e.g. ``Transformer/encoderblock_{i}/LayerNorm_0/{ksb}``.

    ``match(key)`` returns the placeholder values or None; ``format(values)`` builds a key.
    """

    _FIELD = re.compile(r"\{(\w+)\}")

    def __init__(self, text: str, extra: Mapping[str, str] | None = None) -> None:
        self.text = text
        patterns = dict(PLACEHOLDERS, **(extra or {}))
        parts: list[str] = []
        pos = 0
        self.fields: list[str] = []
        for m in self._FIELD.finditer(text):
            parts.append(re.escape(text[pos:m.start()]))
            name = m.group(1)
            if name in self.fields:
                parts.append(f"(?P={name})")
            else:
                if name not in patterns:
                    raise ValueError(f"template {text!r}: unknown placeholder {{{name}}}")
                parts.append(f"(?P<{name}>{patterns[name]})")
                self.fields.append(name)
            pos = m.end()
        parts.append(re.escape(text[pos:]))
        self.regex = re.compile("".join(parts))

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(key)
        return None if m is None else m.groupdict()

    def format(self, values: Mapping[str, str]) -> str:
        return self._FIELD.sub(lambda m: str(values[m.group(1)]), self.text)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


# ---------------------------------------------------------------------------------------------
# Reversible array operations (inside a Rename)
# ---------------------------------------------------------------------------------------------

Dims = Mapping[str, int]


def _resolve(shape: Sequence[int | str], dims: Dims) -> tuple[int, ...]:
    out = []
    for s in shape:
        if isinstance(s, str):
            if s not in dims:
                raise CheckpointError(f"shape symbol {s!r} unknown (known: {sorted(dims)})")
            out.append(int(dims[s]))
        else:
            out.append(int(s))
    return tuple(out)


class Op:
    """One reversible array operation. ``forward`` goes source -> canonical, ``backward`` undoes it."""

    def forward_shape(self, shape: tuple[int, ...], dims: Dims) -> tuple[int, ...]:
        raise NotImplementedError

    def backward_shape(self, shape: tuple[int, ...], dims: Dims) -> tuple[int, ...]:
        raise NotImplementedError

    def forward(self, array: np.ndarray, dims: Dims) -> np.ndarray:
        raise NotImplementedError

    def backward(self, array: np.ndarray, dims: Dims, key: str) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class Transpose(Op):
    """Permute axes: canonical = source.transpose(axes). Kernels (in, out) -> Linear (out, in): (1, 0);
    conv HWIO -> OIHW: (3, 2, 0, 1)."""

    axes: tuple[int, ...]

    def forward_shape(self, shape: tuple[int, ...], dims: Dims) -> tuple[int, ...]:
        if len(shape) != len(self.axes):
            raise CheckpointError(f"transpose {self.axes} needs rank {len(self.axes)}, got shape {shape}")
        return tuple(shape[a] for a in self.axes)

    def backward_shape(self, shape: tuple[int, ...], dims: Dims) -> tuple[int, ...]:
        inverse = tuple(int(a) for a in np.argsort(self.axes))
        return tuple(shape[a] for a in inverse)

    def forward(self, array: np.ndarray, dims: Dims) -> np.ndarray:
        return np.ascontiguousarray(array.transpose(self.axes))

    def backward(self, array: np.ndarray, dims: Dims, key: str) -> np.ndarray:
        return np.ascontiguousarray(array.transpose(tuple(int(a) for a in np.argsort(self.axes))))


@dataclass(frozen=True)
class Reshape(Op):
    """Reshape between two symbolic shapes (symbols from the model's dims: D, H, hd, ...), e.g. the
    JAX attention kernel (D, H, hd) <-> (D, D). Row-major, so head h's columns stay h*hd + j."""

    source: tuple[int | str, ...]
    canonical: tuple[int | str, ...]

    def forward_shape(self, shape: tuple[int, ...], dims: Dims) -> tuple[int, ...]:
        expected = _resolve(self.source, dims)
        if shape != expected:
            raise CheckpointError(f"expected shape {expected} {self.source}, got {shape}")
        return _resolve(self.canonical, dims)

    def backward_shape(self, shape: tuple[int, ...], dims: Dims) -> tuple[int, ...]:
        expected = _resolve(self.canonical, dims)
        if shape != expected:
            raise CheckpointError(f"expected shape {expected} {self.canonical}, got {shape}")
        return _resolve(self.source, dims)

    def forward(self, array: np.ndarray, dims: Dims) -> np.ndarray:
        return array.reshape(_resolve(self.canonical, dims))

    def backward(self, array: np.ndarray, dims: Dims, key: str) -> np.ndarray:
        return array.reshape(_resolve(self.source, dims))


@dataclass(frozen=True)
class ZeroClsRow(Op):
    """A position table without a CLS row (1, N, D) <-> canonical (1, 1 + N, D) with a zero CLS row.

    Exact for big_vision and timm ``no_embed_class`` models: they concatenate the CLS token after
    the position add, and cls + 0 == cls bitwise. Backward refuses a non-zero CLS row: that model
    has no place to keep it (``why`` names the format in the message).
    """

    why: str

    def forward_shape(self, shape: tuple[int, ...], dims: Dims) -> tuple[int, ...]:
        if len(shape) != 3:
            raise CheckpointError(f"position table must be (1, N, D), got {shape}")
        return (shape[0], shape[1] + 1, shape[2])

    def backward_shape(self, shape: tuple[int, ...], dims: Dims) -> tuple[int, ...]:
        return (shape[0], shape[1] - 1, shape[2])

    def forward(self, array: np.ndarray, dims: Dims) -> np.ndarray:
        zeros = np.zeros((array.shape[0], 1, array.shape[2]), dtype=array.dtype)
        return np.concatenate([zeros, array], axis=1)

    def backward(self, array: np.ndarray, dims: Dims, key: str) -> np.ndarray:
        row = array[:, :1]
        if np.any(row != 0):
            raise CheckpointError(
                f"{key}: the CLS row of the position table is not zero (max |value| "
                f"{float(np.max(np.abs(row.astype(np.float64)))):.3g}); {self.why}"
            )
        return np.ascontiguousarray(array[:, 1:])


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


class Rule:
    """A reversible transformation of a whole lazy state."""

    def forward(self, state: LazyState, dims: Dims) -> LazyState:
        raise NotImplementedError

    def backward(self, state: LazyState, dims: Dims) -> LazyState:
        raise NotImplementedError


def _chain(lazy: Lazy, fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...], source: str) -> Lazy:
    return Lazy(shape, lazy.dtype, lambda: fn(lazy.materialize()), source)


@dataclass(frozen=True)
class Rename:
    """One source key <-> one canonical key, with reversible ``ops`` applied source -> canonical."""

    source: str
    canonical: str
    ops: tuple[Op, ...] = ()


@dataclass
class Renames(Rule):
    """A strict table of :class:`Rename` entries: every key that reaches it must match exactly one
    entry (in the direction applied), otherwise one error lists all keys no rule maps."""

    renames: Sequence[Rename]
    what: str = "checkpoint"
    _compiled: list[tuple[Template, Template, Rename]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._compiled = [(Template(r.source), Template(r.canonical), r) for r in self.renames]

    def _apply(self, state: LazyState, dims: Dims, forward: bool) -> LazyState:
        out: LazyState = {}
        unmatched: list[str] = []
        for key, lazy in state.items():
            for src, dst, rule in self._compiled:
                frm, to = (src, dst) if forward else (dst, src)
                values = frm.match(key)
                if values is None:
                    continue
                new = to.format(values)
                out_lazy = lazy
                ops = rule.ops if forward else tuple(reversed(rule.ops))
                for op in ops:
                    try:
                        shape = (op.forward_shape(out_lazy.shape, dims) if forward
                                 else op.backward_shape(out_lazy.shape, dims))
                    except CheckpointError as e:
                        raise CheckpointError(f"{key}: {e}") from None
                    if forward:
                        out_lazy = _chain(out_lazy, lambda a, op=op: op.forward(a, dims), shape, key)
                    else:
                        out_lazy = _chain(out_lazy, lambda a, op=op, k=key: op.backward(a, dims, k), shape, key)
                if new in out:
                    raise CheckpointError(f"{self.what}: two keys map to {new!r} (second: {key!r})")
                out[new] = out_lazy
                break
            else:
                unmatched.append(key)
        if unmatched:
            direction = "in" if forward else "for"
            shown = ", ".join(f"{k} {state[k].shape}" for k in unmatched[:20])
            raise CheckpointError(f"{self.what}: {len(unmatched)} weights {direction} this format that no rule maps: "
                                  f"{shown}{' ...' if len(unmatched) > 20 else ''}")
        return out

    def forward(self, state: LazyState, dims: Dims) -> LazyState:
        return self._apply(state, dims, True)

    def backward(self, state: LazyState, dims: Dims) -> LazyState:
        return self._apply(state, dims, False)


@dataclass
class Split(Rule):
    """One source key holding ``parts`` concatenated along ``axis`` <-> one key per part.

    timm's fused ``qkv`` (3D, D): rows [0:D] query, [D:2D] key, [2D:3D] value. ``target`` uses the
    placeholder ``{part}``. Keys matching neither side pass through.
    """

    source: str
    target: str
    parts: tuple[str, ...]
    axis: int = 0

    def __post_init__(self) -> None:
        self._src = Template(self.source)
        self._dst = Template(self.target, {"part": "|".join(map(re.escape, self.parts))})

    def forward(self, state: LazyState, dims: Dims) -> LazyState:
        out: LazyState = {}
        n = len(self.parts)
        for key, lazy in state.items():
            values = self._src.match(key)
            if values is None:
                out[key] = lazy
                continue
            total = lazy.shape[self.axis]
            if total % n:
                raise CheckpointError(f"{key}: axis {self.axis} of shape {lazy.shape} does not split into {n} equal parts")
            size = total // n
            shape = lazy.shape[: self.axis] + (size,) + lazy.shape[self.axis + 1:]
            for j, part in enumerate(self.parts):
                index = (slice(None),) * self.axis + (slice(j * size, (j + 1) * size),)
                out[self._dst.format(dict(values, part=part))] = _chain(
                    lazy, lambda a, ix=index: np.ascontiguousarray(a[ix]), shape, key)
        return out

    def backward(self, state: LazyState, dims: Dims) -> LazyState:
        out: LazyState = {}
        groups: dict[str, dict[str, tuple[str, Lazy]]] = {}
        for key, lazy in state.items():
            values = self._dst.match(key)
            if values is None:
                out[key] = lazy
                continue
            part = values.pop("part")
            merged = self._src.format(values)
            groups.setdefault(merged, {})[part] = (key, lazy)
            out.setdefault(merged, lazy)  # placeholder keeps the position of the first part
        for merged, members in groups.items():
            missing = [p for p in self.parts if p not in members]
            if missing:
                raise CheckpointError(f"{merged}: needs {', '.join(self.parts)}; missing {', '.join(missing)}")
            lazies = [members[p][1] for p in self.parts]
            shapes = {tuple(np.delete(lz.shape, self.axis)) for lz in lazies}
            dtypes = {lz.dtype for lz in lazies}
            if len(shapes) != 1 or len(dtypes) != 1:
                raise CheckpointError(f"{merged}: parts differ in shape or dtype: "
                                      f"{[(members[p][0], lz.shape, str(lz.dtype)) for p, lz in zip(self.parts, lazies)]}")
            first = lazies[0]
            shape = first.shape[: self.axis] + (sum(lz.shape[self.axis] for lz in lazies),) + first.shape[self.axis + 1:]
            out[merged] = Lazy(shape, first.dtype,
                               lambda lz=lazies: np.concatenate([x.materialize() for x in lz], axis=self.axis), merged)
        return out


@dataclass
class Stack(Rule):
    """One source key with a leading depth axis <-> one key per index (big_vision ``scan=True``).

    ``source`` is e.g. ``{prefix}Transformer/encoderblock/{path}``, ``target``
    ``{prefix}Transformer/encoderblock_{i}/{path}``. Keys matching neither side pass through.
    """

    source: str
    target: str

    def __post_init__(self) -> None:
        self._src = Template(self.source)
        self._dst = Template(self.target)

    def forward(self, state: LazyState, dims: Dims) -> LazyState:
        out: LazyState = {}
        for key, lazy in state.items():
            values = self._src.match(key)
            if values is None:
                out[key] = lazy
                continue
            if not lazy.shape:
                raise CheckpointError(f"{key}: a scanned weight needs a leading depth axis, got a scalar")
            for i in range(lazy.shape[0]):
                out[self._dst.format(dict(values, i=i))] = _chain(
                    lazy, lambda a, i=i: np.ascontiguousarray(a[i]), lazy.shape[1:], key)
        return out

    def backward(self, state: LazyState, dims: Dims) -> LazyState:
        out: LazyState = {}
        groups: dict[str, dict[int, Lazy]] = {}
        for key, lazy in state.items():
            values = self._dst.match(key)
            if values is None:
                out[key] = lazy
                continue
            i = int(values.pop("i"))
            stacked = self._src.format(values)
            groups.setdefault(stacked, {})[i] = lazy
            out.setdefault(stacked, lazy)
        for stacked, members in groups.items():
            n = len(members)
            if sorted(members) != list(range(n)):
                raise CheckpointError(f"{stacked}: layers {sorted(members)} are not 0..{n - 1}")
            lazies = [members[i] for i in range(n)]
            if len({lz.shape for lz in lazies}) != 1 or len({lz.dtype for lz in lazies}) != 1:
                raise CheckpointError(f"{stacked}: layers differ in shape or dtype")
            out[stacked] = Lazy((n,) + lazies[0].shape, lazies[0].dtype,
                                lambda lz=lazies: np.stack([x.materialize() for x in lz]), stacked)
        return out


@dataclass(frozen=True)
class Sub(Rule):
    """A key rewrite by regular expression, declared for both directions; keys it does not match
    pass through. ``forward`` is (pattern, replacement) from the format's names toward canonical,
    ``backward`` the inverse. Values are never touched. Two keys landing on one name is an error
    (a file that mixes both spellings of a weight)."""

    forward_sub: tuple[str, str]
    backward_sub: tuple[str, str]

    def _apply(self, state: Mapping[str, Any], sub: tuple[str, str]) -> dict[str, Any]:
        pattern = re.compile(sub[0])
        out: dict[str, Any] = {}
        for key, value in state.items():
            new = pattern.sub(sub[1], key)
            if new in out:
                raise CheckpointError(f"key {key!r} and another key both map to {new!r} (two spellings of one weight)")
            out[new] = value
        return out

    def forward(self, state: LazyState, dims: Dims) -> LazyState:
        return self._apply(state, self.forward_sub)

    def backward(self, state: LazyState, dims: Dims) -> LazyState:
        return self._apply(state, self.backward_sub)


# Canonical task layout: task models keep the backbone under "vit." (docs/FORMATS.md section 1).
_HEAD = re.compile(r"^(classifier|decoder|pooler)\.")


def task_prefix(state: LazyState) -> LazyState:
    """Backbone keys get ``vit.`` when a classifier or decoder is present and no pooler (a task model)."""
    has_task_head = any(k.startswith(("classifier.", "decoder.")) for k in state)
    has_pooler = any(k.startswith("pooler.") for k in state)
    if not has_task_head or has_pooler:
        return dict(state)
    return {k if _HEAD.match(k) else "vit." + k: v for k, v in state.items()}


def strip_task_prefix(state: LazyState) -> LazyState:
    """The inverse of :func:`task_prefix`: backbone keys without ``vit.``."""
    return {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in state.items()}


def apply_forward(rules: Iterable[Rule], state: LazyState, dims: Dims) -> LazyState:
    for rule in rules:
        state = rule.forward(state, dims)
    return state


def apply_backward(rules: Sequence[Rule], state: LazyState, dims: Dims) -> LazyState:
    for rule in reversed(list(rules)):
        state = rule.backward(state, dims)
    return state


def dims_of(config: Any) -> dict[str, int]:
    """Shape symbols of a ViTConfig: D hidden, H heads, hd head size, M MLP size."""
    return {"D": config.hidden_size, "H": config.num_attention_heads, "hd": config.head_dim,
            "M": config.intermediate_size}

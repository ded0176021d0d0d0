"""Declarative key mappings between our flat parameters and another format's state dict, read both ways.

A mapping is a list of `Rule`s: our parameter name(s), their tensor name(s) and a `Hook` that says how the
layouts relate (transpose, reshape, split, fuse). Their names with `{i}` are per layer; our parameter stacks
them on a leading `layers` axis (its length is the layer count). Reading (`to_ours`), writing (`to_theirs`)
and the expected names and shapes of a file (`their_shapes`) all derive from the one table, so a reverse rule
is never written by hand. Pure numpy.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from insvie_jax.convert.sat import ConvertError

Arrays = list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Hook:
    """`to_ours(their tensors, our shapes) -> our tensors` and its inverse `to_theirs(our tensors)`."""

    to_ours: Callable[[Arrays, list[tuple]], Arrays]
    to_theirs: Callable[[Arrays], Arrays]


def _one(to_ours: Callable, to_theirs: Callable, reshape: bool = True) -> Hook:
    """A hook between one of their tensors and one of ours: `to_ours(w)` (then reshaped to our shape when it is
    known and `reshape`: heads split out), `to_theirs(a)`."""

    def ours(ws, shapes):
        a = to_ours(ws[0])
        return [a.reshape(shapes[0]) if reshape and shapes[0] is not None else a]

    return Hook(ours, lambda arrays: [to_theirs(arrays[0])])


SAME = _one(lambda w: w, lambda a: a)
VECTOR = _one(lambda w: w, lambda a: a.reshape(-1))  # biases and norms (heads split out on our side)
TABLE = _one(lambda w: w[0], lambda a: a[None])  # a (1, k, D) table, ours (k, D)


def linear(n_in: int = 1) -> Hook:
    """A PyTorch Linear weight (out, in) whose input spans our first `n_in` kernel axes."""
    return _one(lambda w: w.T, lambda a: a.reshape(math.prod(a.shape[:n_in]), -1).T)


LINEAR = linear(1)


def transpose(perm: Sequence[int]) -> Hook:
    """A convolution kernel: PyTorch (out, in, *window) -> ours (*window, in, out) by `perm` (not reshaped: a
    text-to-video patch kernel keeps its channel count until the edit model's init widens it)."""
    inverse = tuple(int(i) for i in np.argsort(perm))
    return _one(lambda w: w.transpose(perm), lambda a: a.transpose(inverse), reshape=False)


CONV2D = transpose((2, 3, 1, 0))
CONV3D = transpose((2, 3, 4, 1, 0))


def pointwise(window: int) -> Hook:
    """A 1x..x1 convolution (out, in, 1, ...) -> our (in, out) matrix."""
    return _one(lambda w: w.reshape(w.shape[:2]).T, lambda a: a.T.reshape(*a.T.shape, *(1,) * window))


def squeeze(window: int) -> Hook:
    """A norm weight stored with trailing unit axes (C, 1, ...) -> ours (C,)."""
    return _one(lambda w: w.reshape(-1), lambda a: a.reshape(-1, *(1,) * window))


def fused(part: Hook, axis: int = 1) -> Hook:
    """Several of their tensors (q, k, v) stacked on our `axis` (of the per-layer shape)."""

    def to_ours(ws, shapes):
        shape = shapes[0][:axis] + shapes[0][axis + 1:]
        return [np.stack([part.to_ours([w], [shape])[0] for w in ws], axis=axis)]

    def to_theirs(arrays):
        return [part.to_theirs([np.take(arrays[0], j, axis=axis)])[0] for j in range(arrays[0].shape[axis])]

    return Hook(to_ours, to_theirs)


def split_rows(parts: int, part: Hook, axis: int = 1) -> Hook:
    """One of their tensors that concatenates `parts` row blocks (SAT's query_key_value), stacked on our `axis`."""
    inner = fused(part, axis)
    return Hook(lambda ws, shapes: inner.to_ours(np.split(ws[0], parts, axis=0), shapes),
                lambda arrays: [np.concatenate(inner.to_theirs(arrays), axis=0)])


def regroup(part: Hook, order: Sequence[Sequence[int]], chunks: int) -> Hook:
    """One of their tensors cut into `chunks` row blocks, regrouped into several of ours: ours j joins the blocks
    `order[j]` (in that order), then takes `part`'s layout (SAT's one adaLN linear -> our norm1 / norm2)."""
    sizes = [len(group) for group in order]
    flat_order = [k for group in order for k in group]
    inverse = np.argsort(flat_order)

    def to_ours(ws, shapes):
        blocks = np.split(ws[0], chunks, axis=0)
        return [part.to_ours([np.concatenate([blocks[k] for k in group])], [shape])[0]
                for group, shape in zip(order, shapes)]

    def to_theirs(arrays):
        blocks = []
        for array, n in zip(arrays, sizes):
            blocks += np.split(part.to_theirs([array])[0], n, axis=0)
        return [np.concatenate([blocks[k] for k in inverse])]

    return Hook(to_ours, to_theirs)


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    hook: Hook = SAME

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.theirs[0]


def rule(ours: str | Sequence[str], theirs: str | Sequence[str], hook: Hook = SAME) -> Rule:
    return Rule((ours,) if isinstance(ours, str) else tuple(ours), (theirs,) if isinstance(theirs, str) else
                tuple(theirs), hook)


def by_pattern(names, rows, ours: bool) -> list[Rule]:
    """One rule per tensor name (ours when `ours`, else theirs) through the first fitting row of a pattern table
    `(module regex, their suffix, our suffix, hook)`: a name fits a row when it ends in the row's suffix and the
    module path before it matches the regex. For models whose every layer has its own names (the VAEs)."""
    side, other = (2, 1) if ours else (1, 2)
    out = []
    for name in names:
        for row in rows:
            suffix = row[side]
            if name.endswith(suffix) and re.search(row[0], name[: -len(suffix)]):
                converted = name[: -len(suffix)] + row[other]
                out.append(rule(name, converted, row[3]) if ours else rule(converted, name, row[3]))
                break
        else:
            raise ConvertError(f"tensor {name!r} fits no rule of this format: not a checkpoint of this model")
    return out


def rename(rules: Sequence[Rule], name: Callable[[str], str]) -> list[Rule]:
    """The same rules with their names passed through `name` (a format that only renames another's tensors)."""
    return [dataclasses.replace(r, theirs=tuple(name(t) for t in r.theirs)) for r in rules]


# ---------------------------------------------------------------------------------------------------
# The driver: both directions from one list of rules


def _layer_names(r: Rule, i: int | None) -> list[str]:
    return [t.format(i=i) for t in r.theirs] if i is not None else list(r.theirs)


def to_ours(rules: Sequence[Rule], read: Callable[[str], np.ndarray] | dict, shapes: dict[str, tuple] | None,
            dtype=None, progress=lambda it, desc: it) -> dict[str, np.ndarray]:
    """Our flat params (of `shapes`; None: as the hooks lay them out) from their tensors (`read(name)` or a state
    dict); `dtype`: cast to."""
    read = read.__getitem__ if isinstance(read, dict) else read
    out = {}
    for r in progress(list(rules), "convert"):
        out.update(convert_rule(r, read, shapes, dtype))
    return out


def convert_rule(r: Rule, read: Callable[[str], np.ndarray], shapes: dict[str, tuple], dtype=None,
                 index: tuple | None = None) -> dict[str, np.ndarray]:
    """Our tensors of one rule; `index`: only that block of each (one device's share), converted layer by layer."""
    our_shapes = [tuple(shapes[name]) if shapes is not None else None for name in r.ours]
    if not r.per_layer:
        arrays = r.hook.to_ours([np.asarray(read(t)) for t in r.theirs], our_shapes)
        return {name: np.ascontiguousarray(a[index or ...], dtype) for name, a in zip(r.ours, arrays)}
    index = index or (slice(None),)
    layers = range(our_shapes[0][0])[index[0]]
    stacks: list[list] = [[] for _ in r.ours]
    for i in layers:
        arrays = r.hook.to_ours([np.asarray(read(t)) for t in _layer_names(r, i)], [s[1:] for s in our_shapes])
        for stack, a in zip(stacks, arrays):
            stack.append(np.asarray(a[index[1:]], dtype))
    return {name: np.stack(stack) if stack else np.zeros((0, *s[1:]), dtype)
            for name, stack, s in zip(r.ours, stacks, our_shapes)}


def to_theirs(rules: Sequence[Rule], flat: dict[str, np.ndarray], contiguous: bool = True) -> dict[str, np.ndarray]:
    """Their state dict of our flat params (contiguous copies, or views when `contiguous` is False)."""
    out = {}
    for r in rules:
        ours = [np.asarray(flat[name]) for name in r.ours]
        for i in range(ours[0].shape[0]) if r.per_layer else (None,):
            arrays = r.hook.to_theirs(ours if i is None else [a[i] for a in ours])
            for name, a in zip(_layer_names(r, i), arrays):
                out[name] = np.ascontiguousarray(a) if contiguous else a
    return out


def their_shapes(rules: Sequence[Rule], our_shapes: dict[str, tuple]) -> dict[str, tuple]:
    """Every tensor name of their state dict with its shape, for our parameters of `our_shapes` (no memory:
    zero-stride stand-ins)."""
    zeros = {k: np.broadcast_to(np.bool_(0), s) for k, s in our_shapes.items()}  # 1 byte where a hook copies
    return {k: tuple(v.shape) for k, v in to_theirs(rules, zeros, contiguous=False).items()}


def check_theirs(expected: dict[str, tuple], sd: dict, what: str) -> None:
    """Names the missing and unexpected tensors of a state dict, else (on one line) those of the wrong shape."""
    from insvie_jax.models.params import ParamMismatch

    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ParamMismatch(f"{what} does not fit its config.json:\nmissing ({len(missing)}): {', '.join(missing[:20])}"
                            f"\nunexpected ({len(unexpected)}): {', '.join(unexpected[:20])}")
    wrong = [f"{k}: expected {tuple(expected[k])}, found {tuple(sd[k].shape)}" for k in sorted(sd)
             if tuple(sd[k].shape) != tuple(expected[k])]
    if wrong:
        raise ParamMismatch(f"{what}: {len(wrong)} tensor(s) do not have the shape its config.json gives: "
                            f"{'; '.join(wrong[:5])}")

"""Checkpoint tensors to model tensors, as transformers' `from_pretrained` maps them, without data.

transformers 5 stores some tensors differently from how the model holds them: keys are renamed
(GPT-NeoX's ``embed_out`` is ``lm_head``) and MoE experts are saved one by one and fused at load
time (``experts.{e}.gate_proj`` and ``up_proj`` stacked and concatenated into
``experts.gate_up_proj``). Its own description of this (`get_model_conversion_mapping`:
renamings and converters with operations such as ``MergeModulelist``, ``Concatenate``,
``Transpose``, ``Chunk``) is applied here the way `convert_and_load_state_dict_in_model`
applies it: same key order, same renaming, same grouping, and transformers' own operation code,
run on `_Symbolic` tensors that record where each element comes from instead of holding it.

The result for each model tensor is a `TensorLocation` (one checkpoint tensor, possibly
renamed) or an `Assembly`: boxes of checkpoint tensors (`Piece`) placed into the model tensor.
Both are plain picklable data. The weight writer copies each piece file to file at its offsets
(or, when a piece is transposed, reads one slice of it, permutes and writes), so memory is
bounded by one piece, never by a layer.

Supported operations: stacking, concatenation, transposes/permutations, chunks, splits, narrowing,
(un)squeezing and reshapes that only reinterpret one whole checkpoint tensor. Anything else (e.g.
``Interleave``, ``PermuteForRope``, dequantization) is refused at planning in one line naming the
operation.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import traceback
from collections.abc import Sequence

import torch
from torch import nn

from shardex._dtypes import SAFETENSORS_BITS, SAFETENSORS_TO_TORCH
from shardex._errors import PlanError, SourceError
from shardex._source import TensorLocation, read_tensor


@dataclasses.dataclass(frozen=True)
class Piece:
    """A box of one checkpoint tensor placed into a model tensor.

    Source dim ``k`` contributes ``start[k]:start[k] + size[k]`` and lands on target dim
    ``dims[k]`` (None: a size-1 dim the target does not have) from index ``offset[dims[k]]``.
    A target dim no source dim lands on holds the piece at index ``offset[d]`` (a stacking dim).
    """

    source: TensorLocation
    start: tuple[int, ...]
    size: tuple[int, ...]
    dims: tuple[int | None, ...]
    offset: tuple[int, ...]  # per target dim

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    def strided(self, target_shape: Sequence[int]) -> tuple[int, int, list[tuple[int, int, int]]]:
        """The copy as (source start, target start, axes): element offsets in the row-major
        source and target, and per source dim of size > 1, in source order,
        (size, source stride, target stride) in elements."""
        source_strides = _row_major_strides(self.source.shape)
        target_strides = _row_major_strides(target_shape)
        source_start = sum(s * st for s, st in zip(self.start, source_strides))
        target_start = sum(o * st for o, st in zip(self.offset, target_strides))
        axes = [
            (n, source_strides[k], target_strides[d])
            for k, (n, d) in enumerate(zip(self.size, self.dims))
            if n > 1
        ]
        return source_start, target_start, axes


@dataclasses.dataclass(frozen=True)
class Assembly:
    """A model tensor that transformers builds from several checkpoint tensors, or from part of
    one, or transposed: it exists in no file, the weight writer assembles it from its pieces."""

    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    operations: str  # transformers' operations, e.g. "MergeModulelist(dim=0), Concatenate(dim=1)"

    @property
    def file(self) -> str:
        return self.pieces[0].source.file if self.pieces else ""


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where a model tensor comes from, and the checkpoint keys it is built from."""

    source: TensorLocation | Assembly
    keys: tuple[str, ...]


def resolve_checkpoint(model: nn.Module, checkpoint: dict[str, TensorLocation]) -> dict[str, Resolved]:
    """Model tensor name -> its source, for every model tensor the checkpoint fills, applying
    transformers' conversion mapping for the model's class (identity for other models). Keys
    that fill nothing are left out: the caller reports them."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        PreTrainedModel = None  # noqa: N806
    if PreTrainedModel is None or not isinstance(model, PreTrainedModel):
        return {key: Resolved(location, (key,)) for key, location in checkpoint.items()}
    return _resolve_transformers(model, checkpoint)


def _resolve_transformers(model, checkpoint: dict[str, TensorLocation]) -> dict[str, Resolved]:
    """`convert_and_load_state_dict_in_model`'s collection loop, on symbolic tensors."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    model_state = dict.fromkeys(model.state_dict(), True)  # rename_source_key only tests presence
    prefix = model.base_model_prefix
    mappings: dict[str, tuple[object, list[str]]] = {}
    for key in sorted(checkpoint, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, model_state)
        if renamed not in model_state and key in model_state:  # as transformers: a key renamed away
            renamed, pattern = rename_source_key(
                key, [], [], base_model_prefix=prefix, meta_state_dict=model_state
            )
        if renamed not in model_state:
            continue
        if renamed not in mappings:  # each target gets its own transform, as in transformers
            fresh = (
                copy.deepcopy(by_pattern[pattern]) if pattern is not None else WeightRenaming(key, renamed)
            )
            mappings[renamed] = (fresh, [])
        mapping, keys = mappings[renamed]
        pattern = pattern if pattern is not None else key
        keys.append(key)
        mapping.add_tensor(renamed, key, pattern, functools.partial(_Symbolic.of, checkpoint[key]))
    resolved = {}
    for first, (mapping, keys) in mappings.items():
        for name, value in _convert(mapping, first, model).items():
            value = value[0] if isinstance(value, list) else value
            resolved[name] = Resolved(_lower(value, _operations(mapping)), tuple(keys))
    return resolved


def _convert(mapping, first: str, model) -> dict:
    """Run transformers' own conversion of one target on symbolic tensors."""
    try:
        return mapping.convert(first, model=model, config=model.config)
    except _Mismatch as e:
        raise SourceError(
            f"transformers cannot build {first!r} from the checkpoint with {_operations(mapping)}: {e}; "
            "the checkpoint does not match its config (experts missing or of other sizes?)."
        ) from None
    except Exception as e:
        operation = _failing_operation(e) or _operations(mapping)
        cause = (
            e.operation if isinstance(e, _Unsupported) else f"{type(e).__name__}: {str(e).splitlines()[0]}"
        )
        raise PlanError(
            f"transformers builds {first!r} from the checkpoint with {operation}, which shardex cannot do "
            f"while streaming ({cause}); convert the checkpoint to the model's layout first (load it with "
            "from_pretrained and save it with safetensors.torch.save_file(model.state_dict(), ...))."
        ) from None


def _operations(mapping) -> str:
    operations = getattr(mapping, "operations", None)
    return ", ".join(map(repr, operations)) if operations else "a renaming"


def _failing_operation(error: Exception) -> str | None:
    """The transformers conversion operation whose code raised `error`, as it prints itself."""
    from transformers.core_model_loading import ConversionOps

    found = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConversionOps):
            found = repr(candidate)
    return found


def _lower(value: _Symbolic, operations: str) -> TensorLocation | Assembly:
    """A model tensor whose bytes are one contiguous range of a checkpoint tensor, in order (the
    whole tensor renamed, or a leading chunk of it), is a location: it can be linked and read
    as is. Anything else is an assembly of pieces."""
    assert isinstance(value, _Symbolic), f"Bug: a conversion produced {type(value).__name__}"
    assert sum(p.numel for p in value.pieces) == math.prod(value.shape), "Bug: pieces do not tile the tensor"
    location = _as_location(value)
    return location if location is not None else Assembly(tuple(value.shape), value.pieces, operations)


def _as_location(value: _Symbolic) -> TensorLocation | None:
    if len(value.pieces) != 1:
        return None
    piece = value.pieces[0]
    mapped = [d for d in piece.dims if d is not None]
    bits = SAFETENSORS_BITS[piece.source.dtype]
    if mapped != sorted(mapped) or any(piece.offset) or bits % 8:
        return None
    shape = piece.source.shape
    partial = next((k for k, n in enumerate(piece.size) if n != 1), len(shape))  # leading 1s, then
    if any(piece.start[k] or piece.size[k] != shape[k] for k in range(partial + 1, len(shape))):
        return None  # only whole dims may follow the first dim the box does not reduce to 1
    skipped = sum(s * stride for s, stride in zip(piece.start, _row_major_strides(shape)))
    return dataclasses.replace(
        piece.source,
        offset=piece.source.offset + skipped * bits // 8,
        nbytes=piece.numel * bits // 8,
        shape=tuple(value.shape),
    )


def locations(source: TensorLocation | Assembly) -> list[TensorLocation]:
    """The checkpoint tensors a model tensor is read from."""
    return [p.source for p in source.pieces] if isinstance(source, Assembly) else [source]


def read_source(source: TensorLocation | Assembly, dtype: torch.dtype) -> torch.Tensor:
    """A model tensor's value, read from the checkpoint (an assembly is built in `dtype`; a
    location is returned in its stored dtype). Memory: the tensor plus one piece."""
    if isinstance(source, TensorLocation):
        return read_tensor(source)
    result = torch.empty(source.shape, dtype=dtype)
    for piece in source.pieces:
        box = read_tensor(piece.source)
        for k, (start, size) in enumerate(zip(piece.start, piece.size)):
            box = box.narrow(k, start, size)
        _target_view(result, piece).copy_(box)
    return result


def _target_view(target: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The view of `target` that `piece` fills, with the piece's source dims in source order."""
    index: list[slice | int] = list(piece.offset)
    for k, d in enumerate(piece.dims):
        if d is not None:
            index[d] = slice(piece.offset[d], piece.offset[d] + piece.size[k])
    view = target[tuple(index)]
    mapped = sorted(d for d in piece.dims if d is not None)
    view = view.permute([mapped.index(d) for d in piece.dims if d is not None])
    for k, d in enumerate(piece.dims):
        if d is None:
            view = view.unsqueeze(k)
    return view


def _row_major_strides(shape: Sequence[int]) -> list[int]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return strides


# --- symbolic tensors -----------------------------------------------------------------------


class _Unsupported(Exception):
    """A torch call symbolic tensors cannot follow (it is not data movement)."""

    def __init__(self, operation: str) -> None:
        super().__init__(operation)
        self.operation = operation


class _Mismatch(ValueError):
    """The checkpoint's tensors do not fit together as the conversion expects."""


class _Symbolic:
    """A tensor known only by where its elements come from: `Piece`s placed into its shape.

    transformers' conversion operations run on it unchanged: the torch calls they make
    (``torch.stack``, ``torch.cat``, ``transpose``, ``chunk``, ...) reach `__torch_function__`
    and move the pieces' placement; no data exists. Any other call raises `_Unsupported`.
    """

    def __init__(self, shape: Sequence[int], pieces: Sequence[Piece]) -> None:
        self.shape = torch.Size(shape)
        self.pieces = tuple(pieces)

    @classmethod
    def of(cls, location: TensorLocation) -> _Symbolic:
        n = len(location.shape)
        whole = Piece(location, (0,) * n, tuple(location.shape), tuple(range(n)), (0,) * n)
        return cls(location.shape, [whole])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        handler = _TORCH_FUNCTIONS.get(func)
        if handler is None:
            raise _Unsupported(f"torch.{getattr(func, '__name__', func)}")
        return handler(*args, **(kwargs or {}))

    def __repr__(self) -> str:
        return f"_Symbolic(shape={list(self.shape)}, pieces={len(self.pieces)})"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return (
            SAFETENSORS_TO_TORCH.get(self.pieces[0].source.dtype, torch.uint8)
            if self.pieces
            else torch.float32
        )

    @property
    def device(self) -> torch.device:
        return torch.device("meta")

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    def contiguous(self, *args, **kwargs) -> _Symbolic:
        return self

    clone = detach = contiguous

    def transpose(self, dim0: int, dim1: int) -> _Symbolic:
        return _transpose(self, dim0, dim1)

    def permute(self, *dims) -> _Symbolic:
        return _permute(self, *dims)

    def chunk(self, chunks: int, dim: int = 0) -> tuple[_Symbolic, ...]:
        return _chunk(self, chunks, dim)

    def split(self, split_size_or_sections, dim: int = 0) -> tuple[_Symbolic, ...]:
        return _split(self, split_size_or_sections, dim)

    def narrow(self, dim: int, start: int, length: int) -> _Symbolic:
        return _narrow(self, dim, start, length)

    def unsqueeze(self, dim: int) -> _Symbolic:
        return _unsqueeze(self, dim)

    def squeeze(self, dim: int | None = None) -> _Symbolic:
        return _squeeze(self, dim)

    def reshape(self, *shape) -> _Symbolic:
        return _reshape(self, *shape)

    view = reshape


def _dim(x: _Symbolic, dim: int, extra: int = 0) -> int:
    n = x.ndim + extra
    if not -n <= dim < n:
        raise _Mismatch(f"dim {dim} out of range for {n} dims")
    return dim % n


def _replace(piece: Piece, **fields) -> Piece:
    return dataclasses.replace(piece, **fields)


def _stack(tensors: Sequence[_Symbolic], dim: int = 0) -> _Symbolic:
    dim = _dim(tensors[0], dim, extra=1)
    if any(t.shape != tensors[0].shape for t in tensors):
        raise _Mismatch(f"stack of different shapes {[list(t.shape) for t in tensors]}")
    shape = [*tensors[0].shape[:dim], len(tensors), *tensors[0].shape[dim:]]
    pieces = [
        _replace(
            p,
            dims=tuple(d if d is None or d < dim else d + 1 for d in p.dims),
            offset=(*p.offset[:dim], i, *p.offset[dim:]),
        )
        for i, t in enumerate(tensors)
        for p in t.pieces
    ]
    return _Symbolic(shape, pieces)


def _cat(tensors: Sequence[_Symbolic], dim: int = 0) -> _Symbolic:
    dim = _dim(tensors[0], dim)
    shape = list(tensors[0].shape)
    if any(
        len(t.shape) != len(shape) or _set(tuple(t.shape), dim, 0) != _set(tuple(shape), dim, 0)
        for t in tensors
    ):
        raise _Mismatch(f"cat of mismatched shapes {[list(t.shape) for t in tensors]}")
    pieces, at = [], 0
    for t in tensors:
        pieces += [_replace(p, offset=_set(p.offset, dim, p.offset[dim] + at)) for p in t.pieces]
        at += t.shape[dim]
    shape[dim] = at
    return _Symbolic(shape, pieces)


def _set(values: tuple[int, ...], i: int, value: int) -> tuple[int, ...]:
    return (*values[:i], value, *values[i + 1 :])


def _permute(x: _Symbolic, *dims) -> _Symbolic:
    if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
        dims = tuple(dims[0])
    order = [_dim(x, d) for d in dims]
    if sorted(order) != list(range(x.ndim)):
        raise _Mismatch(f"permute({order}) of {x.ndim} dims")
    new_index = {old: new for new, old in enumerate(order)}
    pieces = [
        _replace(
            p,
            dims=tuple(None if d is None else new_index[d] for d in p.dims),
            offset=tuple(p.offset[old] for old in order),
        )
        for p in x.pieces
    ]
    return _Symbolic([x.shape[old] for old in order], pieces)


def _transpose(x: _Symbolic, dim0: int, dim1: int) -> _Symbolic:
    order = list(range(x.ndim))
    a, b = _dim(x, dim0), _dim(x, dim1)
    order[a], order[b] = order[b], order[a]
    return _permute(x, order)


def _narrow(x: _Symbolic, dim: int, start: int, length: int) -> _Symbolic:
    dim = _dim(x, dim)
    if not 0 <= start <= start + length <= x.shape[dim]:
        raise _Mismatch(f"narrow({dim}, {start}, {length}) of size {x.shape[dim]}")
    pieces = []
    for p in x.pieces:
        if dim in p.dims:
            k = p.dims.index(dim)
            lo = max(start, p.offset[dim])
            hi = min(start + length, p.offset[dim] + p.size[k])
            if hi <= lo:
                continue
            pieces.append(
                _replace(
                    p,
                    start=_set(p.start, k, p.start[k] + lo - p.offset[dim]),
                    size=_set(p.size, k, hi - lo),
                    offset=_set(p.offset, dim, lo - start),
                )
            )
        elif start <= p.offset[dim] < start + length:
            pieces.append(_replace(p, offset=_set(p.offset, dim, p.offset[dim] - start)))
    shape = list(x.shape)
    shape[dim] = length
    return _Symbolic(shape, pieces)


def _split(x: _Symbolic, split_size_or_sections, dim: int = 0) -> tuple[_Symbolic, ...]:
    dim = _dim(x, dim)
    total = x.shape[dim]
    if isinstance(split_size_or_sections, int):
        step = split_size_or_sections
        sizes = [min(step, total - i) for i in range(0, total, step)] or [0]
    else:
        sizes = list(split_size_or_sections)
        if sum(sizes) != total:
            raise _Mismatch(f"split sizes {sizes} do not add up to {total}")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple(_narrow(x, dim, s, n) for s, n in zip(starts, sizes))


def _chunk(x: _Symbolic, chunks: int, dim: int = 0) -> tuple[_Symbolic, ...]:
    total = x.shape[_dim(x, dim)]
    return _split(x, max(1, -(-total // chunks)), dim)


def _unsqueeze(x: _Symbolic, dim: int) -> _Symbolic:
    dim = _dim(x, dim, extra=1)
    pieces = [
        _replace(
            p,
            dims=tuple(d if d is None or d < dim else d + 1 for d in p.dims),
            offset=(*p.offset[:dim], 0, *p.offset[dim:]),
        )
        for p in x.pieces
    ]
    return _Symbolic([*x.shape[:dim], 1, *x.shape[dim:]], pieces)


def _squeeze(x: _Symbolic, dim: int | None = None) -> _Symbolic:
    dims = [d for d in range(x.ndim) if x.shape[d] == 1] if dim is None else [_dim(x, dim)]
    for d in sorted((d for d in dims if x.shape[d] == 1), reverse=True):
        x = _Symbolic(
            [*x.shape[:d], *x.shape[d + 1 :]],
            [
                _replace(
                    p,
                    dims=tuple(None if e == d else (e if e is None or e < d else e - 1) for e in p.dims),
                    offset=(*p.offset[:d], *p.offset[d + 1 :]),
                )
                for p in x.pieces
            ],
        )
    return x


def _reshape(x: _Symbolic, *shape) -> _Symbolic:
    """Only a reshape that changes nothing, or one of a contiguous range of a checkpoint tensor
    in its own order (the same bytes read as another shape)."""
    if len(shape) == 1 and isinstance(shape[0], (list, tuple, torch.Size)):
        shape = tuple(shape[0])
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape = tuple(x.numel() // known if s == -1 else s for s in shape)
    if math.prod(shape) != x.numel():
        raise _Mismatch(f"reshape of {list(x.shape)} to {list(shape)}")
    if tuple(shape) == tuple(x.shape):
        return x
    location = _as_location(x)
    if location is not None:
        return _Symbolic.of(dataclasses.replace(location, shape=tuple(shape)))
    raise _Unsupported(f"a reshape of {list(x.shape)} to {list(shape)} that reorders elements")


_TORCH_FUNCTIONS = {
    torch.stack: _stack,
    torch.cat: _cat,
    torch.concat: _cat,
    torch.concatenate: _cat,
    torch.transpose: _transpose,
    torch.swapaxes: _transpose,
    torch.permute: _permute,
    torch.narrow: _narrow,
    torch.split: _split,
    torch.chunk: _chunk,
    torch.unsqueeze: _unsqueeze,
    torch.squeeze: _squeeze,
    torch.reshape: _reshape,
}

"""Stage 1, source: where a model comes from, without materializing its weights.

Three kinds of source share one shape (`Source`, picklable and cheap to ship to workers):
- ``hf``: a Hugging Face checkpoint directory; the skeleton is built from ``config.json``. A Hub
  id (``"org/name"``, not an existing path) is resolved to its snapshot directory in the HF
  cache by `_hub`, and the id and commit are kept in ``Source.hub``;
- ``factory``: ``"package.module:function"`` returning an ``nn.Module``, plus safetensors files;
- ``module``: an in-memory ``nn.Module``; its meta-device copy travels, its weights stay with the
  coordinator.

Skeletons have their parameters on ``meta`` and their buffers real: non-persistent buffers (rotary
``inv_freq``) are not in checkpoints and must come from the code that computes them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import importlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from shardex._dtypes import SAFETENSORS_BITS, SAFETENSORS_TO_TORCH
from shardex._errors import SourceError

SourceKind = Literal["hf", "factory", "module"]
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclasses.dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are in a safetensors file (absolute data offset)."""

    file: str
    offset: int
    nbytes: int
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]


@dataclasses.dataclass
class Source:
    """A resolved model source. `skeleton` is set only for in-memory modules (a meta copy)."""

    kind: SourceKind
    location: str
    files: list[str]
    trust_remote_code: bool = False
    skeleton: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    hub: dict[str, str] | None = None  # {"repo_id", "commit"} of a Hub id, resolved to `location`

    def describe(self) -> dict:
        described = {"kind": self.kind, "location": self.location, "files": list(self.files)}
        return described | ({"hub": dict(self.hub)} if self.hub else {})


def resolve_source(
    source: str | os.PathLike | nn.Module,
    *,
    weights: str | os.PathLike | list[str] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Source:
    """Classify and validate `source` before any work starts. `revision` (a branch, tag or
    commit) is for Hub ids; an existing directory of the same name as an id wins."""
    if isinstance(source, nn.Module):
        if weights is not None:
            raise SourceError(
                "weights= is only for factory sources; an nn.Module source carries its own weights."
            )
        return Source(
            kind="module",
            location=f"<in-memory {type(source).__name__}>",
            files=[],
            skeleton=meta_copy(source),
        )
    from shardex import _hub  # here, not at the top: _hub imports this module

    text = os.fspath(source)
    hub = None
    is_hub_id = not os.path.exists(text) and _hub.looks_like_repo_id(text)
    if revision is not None and not is_hub_id:
        shadowed = " (a local path wins over a Hub id of the same name)" if os.path.exists(text) else ""
        raise SourceError(
            f"revision= is only for Hugging Face Hub ids 'org/name', got {text!r}{shadowed}; drop revision=, "
            "or run from a directory where the id names no local path."
        )
    if is_hub_id:
        if weights is not None:
            raise SourceError(f"weights= is only for factory sources; {text!r} is a Hub id.")
        hub_id, text = text, _hub.resolve_hub_id(text, revision=revision, trust_remote_code=trust_remote_code)
        hub = {"repo_id": hub_id, "commit": os.path.basename(text)}
    if os.path.isdir(text):
        if weights is not None:
            raise SourceError(f"weights= is only for factory sources; {text} is a checkpoint directory.")
        config = os.path.join(text, "config.json")
        if not os.path.isfile(config):
            raise SourceError(
                f"{text} is not a Hugging Face checkpoint: it has no config.json; pass a directory "
                "written by save_pretrained, or a factory 'package.module:function' with weights=."
            )
        source = Source(
            kind="hf",
            location=os.path.abspath(text),
            files=safetensors_files(text),
            trust_remote_code=trust_remote_code,
            hub=hub,
        )
        _hf_model_class(source)  # a bad config fails here, before any work starts
        index_checkpoint(source.files)  # so does a bad header
        return source
    if ":" in text and not os.path.exists(text):
        if weights is None:
            raise SourceError(
                f"factory source {text!r} needs weights= (a .safetensors file or a directory of them)."
            )
        _import_factory(text)  # fail early on an unknown factory path
        if isinstance(weights, (list, tuple)):
            files = [_existing_file(os.fspath(w)) for w in weights]
        elif os.path.isdir(weights):
            files = safetensors_files(os.fspath(weights))
        else:
            files = [_existing_file(os.fspath(weights))]
        index_checkpoint(files)  # a bad header fails here, before any work starts
        return Source(kind="factory", location=text, files=files)
    raise SourceError(
        f"source {text!r} does not exist; pass a checkpoint directory (with config.json), a Hugging "
        "Face Hub id 'org/name', a factory 'package.module:function', or an nn.Module."
    )


def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise SourceError(f"weights file {path} does not exist.")
    return os.path.abspath(path)


def safetensors_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files: those the index names, else every *.safetensors.
    Names in the index must stay inside `directory` (no absolute paths, no ``..``)."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        names = sorted(set(_index_weight_map(index_path).values()))
        for name in names:
            if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
                raise SourceError(
                    f"{index_path} names file {name!r}, outside the checkpoint directory; the index is "
                    "damaged or hostile: a checkpoint's files must be inside its directory."
                )
        missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise SourceError(
                f"{index_path} names {len(missing)} missing file(s), e.g. {missing[0]}; "
                "copy the whole checkpoint directory."
            )
        return [os.path.abspath(os.path.join(directory, n)) for n in names]
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        pickled = sorted(
            glob.glob(os.path.join(directory, "*.bin")) + glob.glob(os.path.join(directory, "*.pt"))
        )
        found = (
            f" (it has {os.path.basename(pickled[0])}, a pickle file shardex never loads)" if pickled else ""
        )
        raise SourceError(
            f"{directory} has no *.safetensors files{found}; shardex reads safetensors checkpoints "
            "(convert .bin files with save_pretrained(safe_serialization=True))."
        )
    return [os.path.abspath(f) for f in files]


def _index_weight_map(index_path: str) -> dict[str, str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise SourceError(
            f"{index_path} is not a readable index ({e}); re-download the checkpoint."
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(
            f"{index_path} has no weight_map of tensor names to file names; re-download the checkpoint."
        )
    return weight_map


def read_safetensors_header(path: str) -> dict[str, TensorLocation]:
    """Parse and check one safetensors header: tensor name -> absolute byte location. Reads no
    data. Everything later stages trust is checked here, before any byte is written: a bounded
    header length, JSON of the right shape, known dtypes, every tensor's bytes inside the file,
    its size = elements x item size, and no two tensors sharing bytes."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _not_safetensors(path, f"it has {size} bytes, fewer than the 8 of a header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if 8 + header_len > size:
                raise _not_safetensors(
                    path, f"its header length {header_len} exceeds the file ({size} bytes)"
                )
            if header_len > MAX_HEADER_BYTES:
                raise _not_safetensors(
                    path, f"its header length {header_len} exceeds {MAX_HEADER_BYTES} bytes"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}.") from None
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise _not_safetensors(path, f"its header names {e} twice") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _not_safetensors(path, f"its header is not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "its header is not a JSON object")
    data_size = size - 8 - header_len
    index = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = _checked_entry(path, name, info, data_size)
        index[name] = TensorLocation(
            file=path,
            offset=8 + header_len + begin,
            nbytes=end - begin,
            dtype=info["dtype"],
            shape=tuple(info["shape"]),
        )
    _check_no_overlap(path, index)
    return index


class _DuplicateKey(ValueError):
    """A JSON object names one key twice (`json` would silently keep the last)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [k for k, _ in pairs]
        raise _DuplicateKey(repr(next(k for k in keys if keys.count(k) > 1)))
    return result


def _checked_entry(path: str, name: str, info: Any, data_size: int) -> tuple[int, int]:
    """One header entry's data offsets, after checking the entry against the file."""

    def bad(problem: str) -> SourceError:
        return SourceError(
            f"{path}: tensor {name!r} {problem}; the file is damaged or not a safetensors "
            "checkpoint: re-download or re-save it."
        )

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise bad("lacks dtype, shape or data_offsets in the header")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_BITS:
        raise bad(f"has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise bad(f"has data_offsets [{begin}, {end}] outside the file's {data_size} data bytes")
    bits = math.prod(shape) * SAFETENSORS_BITS[dtype]
    if bits != (end - begin) * 8:
        raise bad(f"has {end - begin} bytes, but {dtype} of shape {shape} needs {bits / 8:g}")
    return begin, end


def _check_no_overlap(path: str, index: dict[str, TensorLocation]) -> None:
    spans = sorted((loc.offset, loc.offset + loc.nbytes, name) for name, loc in index.items() if loc.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise SourceError(
                f"{path}: tensors {first!r} and {second!r} share bytes (overlapping data_offsets); the "
                "file is damaged or hostile: re-download or re-save it."
            )


def _not_safetensors(path: str, problem: str) -> SourceError:
    return SourceError(f"{path} is not a safetensors file: {problem}; re-download or re-save it.")


def index_checkpoint(files: list[str]) -> dict[str, TensorLocation]:
    """Every tensor of a (possibly multi-file) checkpoint, by name."""
    index: dict[str, TensorLocation] = {}
    for path in files:
        for name, location in read_safetensors_header(path).items():
            if name in index:
                raise SourceError(
                    f"tensor {name!r} appears in both {index[name].file} and {path}; "
                    "a checkpoint must store each tensor once."
                )
            index[name] = location
    return index


def check_stored_dtype(name: str, location: TensorLocation, expected: torch.dtype) -> None:
    """A checkpoint tensor can fill a model tensor of dtype `expected`: shardex can read its
    dtype, and it is floating exactly when `expected` is (floats convert, integers must match)."""
    stored = SAFETENSORS_TO_TORCH.get(location.dtype)
    if stored is None:
        raise SourceError(
            f"tensor {name!r} in {location.file} has dtype {location.dtype}, which shardex cannot store "
            f"(it handles {', '.join(SAFETENSORS_TO_TORCH)}); dequantize or convert the checkpoint first."
        )
    if stored != expected and (
        stored.is_floating_point != expected.is_floating_point or not stored.is_floating_point
    ):
        raise SourceError(
            f"tensor {name!r} is {location.dtype} in {location.file} but the model expects "
            f"{str(expected).removeprefix('torch.')}; the checkpoint does not match its config/factory."
        )


def read_tensor(location: TensorLocation, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor with a single bounded read (no mmap: only this tensor's bytes are touched),
    into `out` (contiguous, of the tensor's dtype and size) when given: a reused buffer is
    neither zeroed nor faulted in again."""
    dtype = SAFETENSORS_TO_TORCH.get(location.dtype)
    if dtype is None:
        raise SourceError(f"{location.file}: unsupported safetensors dtype {location.dtype}.")
    if out is None:
        out = torch.empty(location.shape, dtype=dtype)
    assert (
        out.dtype == dtype and out.is_contiguous() and out.numel() * out.element_size() == location.nbytes
    ), f"Bug: a buffer of {out.dtype} {list(out.shape)} cannot hold {location.dtype} {list(location.shape)}"
    if not location.nbytes:
        return out.reshape(location.shape)
    _pread(location, 0, memoryview(out.view(torch.uint8).reshape(-1).numpy()))
    return out.reshape(location.shape)


class MappedRows:
    """Rows of stored tensors as views of their files' pages (mmap), for a reader that converts
    them at once: one pass over memory, where a read copies them out of the page cache first
    (the 6.7B reference's passes on 2 threads: 5.5 against 3.9 GB/s). `rows` unmaps the pages
    once the caller is done with them, so the process holds at most one chunk of them."""

    def __init__(self) -> None:
        self.maps: dict[str, tuple[mmap.mmap, memoryview]] = {}

    @contextlib.contextmanager
    def rows(self, location: TensorLocation, start: int, stop: int) -> Iterator[torch.Tensor]:
        """Rows `start:stop` (along the first dim) of a stored tensor, valid inside the block."""
        rows = location.shape[0]
        assert 0 <= start <= stop <= rows, f"Bug: rows {start}:{stop} of a tensor of {rows}"
        row_bytes = location.nbytes // rows if rows else 0
        first, length = location.offset + start * row_bytes, (stop - start) * row_bytes
        mapped, view = self._map(location)
        if location.offset + location.nbytes > len(view):
            raise _truncated(location)
        dtype = SAFETENSORS_TO_TORCH[location.dtype]
        try:
            data = (
                torch.frombuffer(view[first : first + length], dtype=dtype)
                if length
                else torch.empty(0, dtype=dtype)
            )
            yield data.view(stop - start, *location.shape[1:])
        finally:
            page = first - first % mmap.PAGESIZE
            if length:
                mapped.madvise(mmap.MADV_DONTNEED, page, first + length - page)

    def _map(self, location: TensorLocation) -> tuple[mmap.mmap | None, memoryview]:
        if location.file not in self.maps:
            with open(location.file, "rb") as f:
                if not os.fstat(f.fileno()).st_size:  # nothing to map: `rows` reports it truncated
                    return None, memoryview(b"")
                # copy-on-write, never written: a writable buffer, which torch views without a warning
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self.maps[location.file] = (mapped, memoryview(mapped))
        return self.maps[location.file]


def _truncated(location: TensorLocation) -> SourceError:
    return SourceError(
        f"{location.file} is truncated: expected {location.nbytes} bytes at offset {location.offset}."
    )


def _pread(location: TensorLocation, offset: int, view: memoryview) -> None:
    """Fill `view` from `location`'s file, `offset` bytes into the tensor's data."""
    fd = os.open(location.file, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], location.offset + offset + done)
            if n == 0:
                raise _truncated(location)
            done += n
    finally:
        os.close(fd)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create modules with parameters on `meta` and buffers real, for this block only.

    Parameters are allocated lazily by `torch.empty`, then moved to meta on registration, so
    initializers run on meta (free). Buffers stay real because non-persistent ones are computed
    by the model's own code and are not in checkpoints.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            on_meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            on_meta.__dict__.update(param.__dict__)
            module._parameters[name] = on_meta

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def named_tensors(module: nn.Module, *, remove_duplicate: bool = True) -> list[tuple[str, torch.Tensor]]:
    """`module`'s parameters, then its buffers, with their names: every tensor a checkpoint,
    a plan or a capture knows it by (tied tensors once, or under each name)."""
    return [
        *module.named_parameters(remove_duplicate=remove_duplicate),
        *module.named_buffers(remove_duplicate=remove_duplicate),
    ]


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters are on meta (its buffers are copied, they are small)."""
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in module.parameters()
    }
    skeleton = copy.deepcopy(module, memo)
    return skeleton.eval()


def _import_factory(path: str):
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SourceError(
            f"unknown factory {path!r}: cannot import module {module_name!r} ({e}); it must be "
            "'package.module:function' importable on every worker."
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SourceError(f"unknown factory {path!r}: module {module_name!r} has no callable {attr!r}.")
    return factory


def build_skeleton(source: Source, dtype: torch.dtype | None, *, use_cache: bool = False) -> nn.Module:
    """The model with parameters on meta, in eval mode, with floating tensors in `dtype`.

    `dtype=None` keeps the dtypes the model code chooses (for HF: the checkpoint's). `use_cache`
    keeps a Hugging Face config's KV cache on (exports with a cache); off, forward returns no cache.
    """
    if source.kind == "module":
        assert source.skeleton is not None, "Bug: a module source always carries its skeleton"
        model = copy.deepcopy(source.skeleton)
        if dtype is not None:
            model.to(dtype)
    elif source.kind == "factory":
        factory = _import_factory(source.location)
        with params_on_meta():
            model = factory()
        if not isinstance(model, nn.Module):
            raise SourceError(
                f"factory {source.location!r} returned {type(model).__name__}, not an nn.Module."
            )
        if dtype is not None:
            model.to(dtype)
    else:
        model = _build_hf_skeleton(source, dtype, use_cache)
    return model.eval()


def hf_config(source: Source):
    """The checkpoint's transformers config (config.json); see `_hf_model_class`."""
    return _hf_model_class(source)[0]


def _build_hf_skeleton(source: Source, dtype: torch.dtype | None, use_cache: bool) -> nn.Module:
    import transformers

    config, model_class = _hf_model_class(source)
    config.use_cache = use_cache and getattr(config, "use_cache", False)
    if dtype is None:
        dtype = checkpoint_float_dtype(source.files) or torch.float32
    with params_on_meta():
        if model_class is not None:
            return model_class._from_config(config, dtype=dtype)
        return transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=source.trust_remote_code
        )


def _hf_model_class(source: Source) -> tuple[Any, type[nn.Module] | None]:
    """The checkpoint's config and its transformers class (None: the checkpoint's own code, only
    with `trust_remote_code`). A config transformers cannot read is a one-line `SourceError`."""
    try:
        import transformers
    except ImportError as e:
        raise SourceError("a Hugging Face checkpoint needs transformers: pip install 'shardex[hf]'.") from e
    path = os.path.join(source.location, "config.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SourceError(
            f"{path} is not readable JSON ({e}); re-download or re-save the checkpoint."
        ) from None
    auto = (data.get("auto_map") or {}).get("AutoModelForCausalLM") if isinstance(data, dict) else None
    architectures = (data.get("architectures") or []) if isinstance(data, dict) else []
    model_class = getattr(transformers, str(architectures[0]), None) if architectures else None
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        model_class = None
    if model_class is None and auto and not source.trust_remote_code:
        raise SourceError(
            f"{source.location} needs its own code ({auto}); shardex runs it only with "
            "trust_remote_code=True (--trust-remote-code), if you trust the checkpoint."
        )
    try:
        config = transformers.AutoConfig.from_pretrained(
            source.location, trust_remote_code=source.trust_remote_code
        )
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise SourceError(f"transformers cannot read {path}: {type(e).__name__}: {first}") from None
    return config, model_class


def checkpoint_float_dtype(files: list[str]) -> torch.dtype | None:
    """The floating dtype holding most bytes of the checkpoint (None if it has no floats)."""
    totals: dict[torch.dtype, int] = {}
    for location in index_checkpoint(files).values():
        dtype = SAFETENSORS_TO_TORCH.get(location.dtype)
        if dtype is not None and dtype.is_floating_point:
            totals[dtype] = totals.get(dtype, 0) + location.nbytes
    return max(totals, key=totals.get) if totals else None

"""A cache of captured pieces, so that an architecture is captured once per machine.

A captured piece (the trunk, or one distinct block) is weightless: its bytes depend on the
model's architecture, the example shapes, the export options and the library versions, never
on the weights. Re-exporting a fine-tune, resuming an export, or a zoo of several checkpoints
of one architecture therefore needs no capture at all once the first export has run.

The key of a piece is the sha256 of everything that shapes its bytes: ``config.json`` (as
data, less ``_name_or_path``), the model class, task, runtime, dtype and opset, the example
inputs' names, shapes and dynamic axes, the piece's blocks and their recorded calls (shapes,
constants, output structure), the tensors' names, shapes and dtypes, shardex's version and a
hash of its own source files, and the versions of Python, torch, onnx, onnxscript, onnx-ir,
protobuf and transformers. Only Hugging Face checkpoints whose class transformers ships are
cached: a factory or an in-memory module, and a checkpoint's own (remote) code, are code that
can change without any of the above changing.

Entries are files ``pieces/KEY[:2]/KEY.piece``: an 8-byte header length, a JSON header (format,
key, name, weight inputs, sha256 of the graph) and the serialized graph. They are written under
a unique temporary name and renamed, so concurrent exports never see a partial entry (two that
miss on one key both capture it; identical bytes, the last rename wins). An entry whose graph
does not match its sha256 is removed and counts as a miss. No entry is code: reading one runs
nothing. The cache keeps at most `MAX_CACHE_BYTES`; the entries used least recently go first.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from importlib import metadata

from shardex._capture import CapturedPiece
from shardex._dtypes import dtype_name
from shardex._plan import BlockGroup, Plan

logger = logging.getLogger("shardex")

ENTRY_FORMAT = "shardex-capture/1"
MAX_CACHE_BYTES = 1 << 30  # pieces are weightless: a Llama-7B trunk plus its block is under 1 MB
ENV_VAR = "SHARDEX_CAPTURE_CACHE"  # default cache directory, or "off"
KEYED_PACKAGES = ("torch", "onnx", "onnxscript", "onnx-ir", "protobuf", "transformers")
IGNORED_CONFIG_KEYS = ("_name_or_path",)  # where the config was loaded from: never in the graph


def default_directory() -> str | None:
    """``$SHARDEX_CAPTURE_CACHE`` ("off" disables the cache), else shardex's directory under
    ``$XDG_CACHE_HOME`` (default ``~/.cache``)."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return None if configured.lower() in ("off", "0", "false", "no") else configured
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "shardex", "captures")


def resolve(capture_cache: bool | str | os.PathLike | None) -> CaptureCache | None:
    """The cache an export uses: `capture_cache` True (the default directory), False (none), or
    a directory."""
    if capture_cache is False:
        return None
    directory = default_directory() if capture_cache in (True, None) else os.fspath(capture_cache)
    return CaptureCache(directory) if directory else None


class CaptureCache:
    """Captured pieces on disk, by key."""

    def __init__(self, directory: str, max_bytes: int = MAX_CACHE_BYTES) -> None:
        self.directory = os.path.abspath(directory)
        self.max_bytes = max_bytes

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, "pieces", key[:2], f"{key}.piece")

    def get(self, key: str) -> CapturedPiece | None:
        """The piece stored under `key`, or None (absent, unreadable, or damaged: then removed)."""
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        start = time.perf_counter()
        piece = _decode(data, key)
        if piece is None:
            logger.warning("capture cache: %s is damaged; capturing the piece again", path)
            _remove_quietly(path)
            return None
        try:
            os.utime(path)  # most recently used: evicted last
        except OSError:
            pass
        piece.seconds = time.perf_counter() - start
        return piece

    def put(self, key: str, piece: CapturedPiece) -> None:
        """Store `piece` under `key` (atomically); a cache that cannot be written is skipped."""
        path = self._path(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, partial = tempfile.mkstemp(prefix=f".{key}.", suffix=".partial", dir=os.path.dirname(path))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_encode(key, piece))
                os.replace(partial, path)
            except BaseException:
                _remove_quietly(partial)
                raise
            self._evict()
        except OSError as e:
            logger.warning("capture cache: cannot write %s (%s); continuing without storing it", path, e)

    def _evict(self) -> None:
        """Remove the least recently used entries while the cache holds more than `max_bytes`."""
        entries = []
        for folder, _, names in os.walk(os.path.join(self.directory, "pieces")):
            for name in names:
                try:
                    stat = os.stat(os.path.join(folder, name))
                except FileNotFoundError:  # another export evicted it
                    continue
                entries.append((stat.st_mtime, stat.st_size, os.path.join(folder, name)))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            _remove_quietly(path)
            total -= size


def _encode(key: str, piece: CapturedPiece) -> bytes:
    header = {
        "format": ENTRY_FORMAT,
        "key": key,
        "name": piece.name,
        "weight_inputs": piece.weight_inputs,
        "capture_seconds": piece.seconds,
        "sha256": hashlib.sha256(piece.model_bytes).hexdigest(),
    }
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + piece.model_bytes


def _decode(data: bytes, key: str) -> CapturedPiece | None:
    length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + length])
        model_bytes = data[8 + length :]
        valid = (
            len(data) >= 8 + length
            and header["format"] == ENTRY_FORMAT
            and header["key"] == key
            and hashlib.sha256(model_bytes).hexdigest() == header["sha256"]
            and isinstance(header["name"], str)
            and all(isinstance(n, str) for n in header["weight_inputs"])
        )
    except (ValueError, KeyError, TypeError):
        return None
    return CapturedPiece(header["name"], model_bytes, list(header["weight_inputs"]), 0.0) if valid else None


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --- keys ----------------------------------------------------------------------------------


def piece_keys(plan: Plan) -> dict[str, str] | None:
    """The cache key of the trunk (``"trunk"``) and of each group (by function name), or None
    when the source cannot be cached (not a Hugging Face checkpoint of a class transformers
    ships)."""
    config = _cacheable_config(plan)
    if config is None:
        return None
    context = {
        "format": ENTRY_FORMAT,
        "environment": environment(),
        "config": config,
        "model_class": plan.model_class,
        "task": plan.task,
        "component": plan.component,
        "runtime": plan.runtime,
        "dtype": dtype_name(plan.dtype) if plan.dtype else None,
        "opset": plan.opset,
    }
    trunk = context | {
        "piece": "trunk",
        "inputs": plan.input_names,
        "outputs": plan.output_names,
        "example": [
            (list(t.shape), str(t.dtype), sorted(axes.items()))
            for t, axes in zip(plan.example.flat_tensors(), plan.example.dynamic_axes)
        ],
        "groups": [_group_identity(g) | {"members": g.members} for g in plan.groups],
        "cache_layers": sorted(plan.cache_layers.items()),
        "tensors": [(t.name, t.aliases, t.shape, t.dtype, t.is_buffer) for t in plan.tensors],
    }
    keys = {"trunk": _digest(trunk)}
    for group in plan.groups:
        first = group.members[0]
        weights = [plan.entry(f"{first}.{n}") for n in group.weight_names]
        block = context | {
            "piece": "block",
            "block": first,
            "group": _group_identity(group),
            "weights": [(n, w.shape, w.dtype) for n, w in zip(group.weight_names, weights)],
        }
        keys[group.function_name] = _digest(block)
    return keys


def _group_identity(group: BlockGroup) -> dict:
    call = group.call
    return {
        "function": group.function_name,
        "class": group.class_name,
        "in_spec": str(call.in_spec),
        "leaves": repr(call.leaves),
        "out_spec": str(call.out_spec),
        "out_leaves": repr(call.out_leaves),
        "weight_names": group.weight_names,
    }


def _cacheable_config(plan: Plan) -> dict | None:
    """config.json as data, for a checkpoint transformers builds with its own classes."""
    if plan.source.kind != "hf":
        return None
    try:
        with open(os.path.join(plan.source.location, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    architectures = config.get("architectures") or []
    if config.get("auto_map") and not (architectures and _transformers_has(str(architectures[0]))):
        return None  # the checkpoint's own code builds it
    return {k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS}


def _transformers_has(name: str) -> bool:
    import transformers

    return isinstance(getattr(transformers, name, None), type)


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """What shapes a capture besides the plan: Python, the keyed packages' versions, shardex's
    version and a hash of its source files (an edited checkout is another shardex)."""
    import shardex

    versions = {}
    for name in KEYED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    package = os.path.dirname(os.path.abspath(shardex.__file__))
    digest = hashlib.sha256()
    for folder, dirs, names in sorted(os.walk(package)):
        dirs.sort()
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, package).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return {
        "python": list(sys.version_info[:2]),
        "packages": versions,
        "shardex": shardex.__version__,
        "shardex_source": digest.hexdigest(),
    }

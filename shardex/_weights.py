"""Stage 4, weights: stream tensors into ONNX external-data shard files.

Each shard is written by one writer from the plan's layout (names, page-aligned offsets), so
shards are independent work items and identical whatever order they finish in. Why not
`onnx_ir.save(max_shard_size_bytes=...)`: it serializes from an in-memory model in one process;
here the layout is decided up front so workers that never see the model can write shards in
parallel, straight from the source files.

Memory stays bounded: a tensor whose dtype does not change is copied file-to-file by the kernel
(`os.copy_file_range`, no user-space buffer); a converted tensor goes through fixed-size chunks.
A tensor transformers assembles from several checkpoint tensors (fused MoE experts, see
`_conversions`) is written piece by piece at the offsets the plan computed, the same way; a
transposed piece is read one slice at a time (at most the piece), permuted and written.
A shard is written under a hidden temporary name, fsynced, hashed and renamed: a final name
always holds a complete shard. Its digest is BLAKE3 (`SHARD_DIGEST`), not sha256: both are
256-bit cryptographic hashes, and BLAKE3 hashes 4.5 x faster on one core of the bench machine
(5.5 against 1.2 GB/s, SHA-NI included), which every export and every `shardex verify` pays once
per byte written (13.5 GB at 6.7B bf16: ~2.5 instead of ~11 core-seconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import time

import blake3
import torch

from shardex._conversions import Assembly, Piece
from shardex._dtypes import SAFETENSORS_TO_TORCH
from shardex._errors import WeightsError
from shardex._files import partial_path
from shardex._plan import ShardSpec, TensorEntry
from shardex._source import TensorLocation

CHUNK_BYTES = 16 << 20  # bounds a writer's buffers; larger chunks were not faster

SHARD_DIGEST = "blake3"  # a shard's digest, recorded as "blake3:<hex>"; older manifests: "sha256"
_HASHES = {"blake3": blake3.blake3, "sha256": hashlib.sha256}


@dataclasses.dataclass
class ShardResult:
    file: str
    nbytes: int
    digest: str  # "<algorithm>:<hex>", of the file (or of the linked file's header)
    seconds: float
    hashed: str = "file"  # "header" for a zero-copy link: its data is not read
    link_target: str | None = None


def write_shard(
    shard: ShardSpec,
    entries: list[TensorEntry],
    output_dir: str,
    memory: dict[str, torch.Tensor] | None = None,
) -> ShardResult:
    """Write one shard from its entries; `memory` supplies the tensors that have no source file."""
    start = time.perf_counter()
    final = os.path.join(output_dir, shard.file)
    partial = partial_path(output_dir, shard.file)
    try:
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, shard.size)  # alignment gaps stay sparse zeros
            for entry in entries:
                if entry.source is None:
                    assert memory is not None and entry.name in memory, f"Bug: no value for {entry.name}"
                    _write_memory_tensor(fd, entry, memory[entry.name])
                elif isinstance(entry.source, Assembly):
                    for piece in entry.source.pieces:
                        _copy_piece(fd, entry, piece)
                else:
                    _copy_tensor(fd, entry, entry.source)
            # while the kernel already writes back: fsync then waits less
            digest = f"{SHARD_DIGEST}:{_hexdigest(fd, SHARD_DIGEST)}"
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, final)
    except OSError as e:
        _remove_quietly(partial)
        raise WeightsError(f"writing shard {shard.file} in {output_dir} failed: {e}", shard=shard.file) from e
    except BaseException:
        _remove_quietly(partial)
        raise
    return ShardResult(shard.file, shard.size, digest, time.perf_counter() - start)


def link_shard(shard: ShardSpec, output_dir: str) -> ShardResult:
    """Zero-copy: the shard is a hard link to the source safetensors file, identified by its
    header hash. A hard link, not a symlink: ONNX Runtime resolves symlinks and refuses external
    data outside the model's directory. Hard links need one filesystem. A source file that is a
    symlink (the HF cache's snapshots point into blobs/) is linked through to its target: a hard
    link to the symlink would be a symlink, dangling when relative."""
    start = time.perf_counter()
    assert shard.link_target, f"Bug: {shard.file} is not a link shard"
    partial = partial_path(output_dir, shard.file)
    _remove_quietly(partial)
    try:
        os.link(os.path.realpath(shard.link_target), partial)
    except OSError as e:
        raise WeightsError(
            f"zero_copy cannot hard-link {shard.link_target} into {output_dir} ({e.strerror}); put the "
            "output on the checkpoint's filesystem, or export without zero_copy.",
            shard=shard.file,
        ) from e
    os.replace(partial, os.path.join(output_dir, shard.file))
    digest = link_digest(shard.link_target)
    return ShardResult(
        shard.file, shard.size, digest, time.perf_counter() - start, "header", shard.link_target
    )


def link_digest(path: str) -> str:
    """A zero-copy shard's digest as a manifest records it: its header's sha256 (its data is the
    source's, never read)."""
    return "sha256:" + header_sha256(path)


def header_sha256(path: str) -> str:
    """sha256 of a safetensors file's header (names, dtypes, shapes, offsets), or of a whole
    small file such as config.json."""
    with open(path, "rb") as f:
        if path.endswith(".safetensors"):
            return hashlib.sha256(f.read(int.from_bytes(f.read(8), "little"))).hexdigest()
        return hashlib.sha256(f.read()).hexdigest()


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_memory_tensor(fd: int, entry: TensorEntry, tensor: torch.Tensor) -> None:
    data = tensor.detach().to("cpu", getattr(torch, entry.dtype)).contiguous()
    if data.numel():
        _pwrite_all(fd, memoryview(data.reshape(-1).view(torch.uint8).numpy()), entry.offset)


def _copy_tensor(fd: int, entry: TensorEntry, location: TensorLocation) -> None:
    source_dtype = SAFETENSORS_TO_TORCH[location.dtype]
    src = os.open(location.file, os.O_RDONLY)
    try:
        elements = location.nbytes // source_dtype.itemsize
        _copy_run(src, fd, location.offset, entry.offset, elements, source_dtype, entry)
    finally:
        os.close(src)


def _copy_run(
    src: int,
    dst: int,
    src_offset: int,
    dst_offset: int,
    elements: int,
    source_dtype: torch.dtype,
    entry: TensorEntry,
) -> None:
    """Copy `elements` contiguous elements (at byte offsets), converted to the entry's dtype."""
    target_dtype = getattr(torch, entry.dtype)
    if source_dtype == target_dtype:
        _kernel_copy(src, dst, src_offset, dst_offset, elements * source_dtype.itemsize)
        return
    step = max(1, CHUNK_BYTES // max(source_dtype.itemsize, target_dtype.itemsize))
    for first in range(0, elements, step):
        count = min(step, elements - first)
        raw = _pread_exact(
            src, count * source_dtype.itemsize, src_offset + first * source_dtype.itemsize, entry
        )
        converted = torch.frombuffer(raw, dtype=source_dtype).to(target_dtype)
        _pwrite_all(
            dst, memoryview(converted.view(torch.uint8).numpy()), dst_offset + first * target_dtype.itemsize
        )


def _kernel_copy(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(src, dst, count - done, src_offset + done, dst_offset + done)
        except OSError:  # e.g. a file system without support: fall back to bounded reads
            n = _buffered_copy(src, dst, src_offset + done, dst_offset + done, count - done)
        if n == 0:
            raise OSError(f"source ended {count - done} bytes early (truncated safetensors file?)")
        done += n


def _buffered_copy(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> int:
    data = os.pread(src, min(count, CHUNK_BYTES), src_offset)
    _pwrite_all(dst, memoryview(data), dst_offset)
    return len(data)


def _pread_exact(fd: int, count: int, offset: int, entry: TensorEntry) -> bytearray:
    data = bytearray(os.pread(fd, count, offset))
    if len(data) != count:
        raise OSError(
            f"source ended {count - len(data)} bytes early inside tensor {entry.name} (truncated file?)"
        )
    return data


def _copy_piece(fd: int, entry: TensorEntry, piece: Piece) -> None:
    """Write one piece of an assembled tensor where the plan placed it.

    In the source's element order the piece is a set of runs contiguous in both files, copied
    as whole tensors are. A transposed piece is not: it is read one slice of its leading dims
    at a time (dims that lead in both orders; at most the whole piece), permuted in memory into
    the target's order and written run by run."""
    source_dtype = SAFETENSORS_TO_TORCH[piece.source.dtype]
    target_dtype = getattr(torch, entry.dtype)
    source_start, target_start, axes = piece.strided(entry.shape)
    if not piece.numel:
        return
    order = sorted(range(len(axes)), key=lambda k: -axes[k][2])  # the target's element order
    src = os.open(piece.source.file, os.O_RDONLY)
    try:
        if order == sorted(order):
            *outer, (run, _, _) = _runs(axes, both=True)
            for src_el, dst_el in _positions(outer, source_start, target_start):
                _copy_run(
                    src,
                    fd,
                    piece.source.offset + src_el * source_dtype.itemsize,
                    entry.offset + dst_el * target_dtype.itemsize,
                    run,
                    source_dtype,
                    entry,
                )
            return
        shared = next((i for i, k in enumerate(order) if k != i), len(order))
        inner = [axes[k] for k in order[shared:]]  # in target order
        *runs_outer, (run, _, _) = _runs(inner, both=False)
        span = 1 + sum((n - 1) * s for n, s, _ in inner)
        for src_el, dst_el in _positions(axes[:shared], source_start, target_start):
            raw = _pread_exact(
                src, span * source_dtype.itemsize, piece.source.offset + src_el * source_dtype.itemsize, entry
            )
            flat = torch.frombuffer(raw, dtype=source_dtype)
            block = flat.as_strided([n for n, _, _ in inner], [s for _, s, _ in inner]).to(target_dtype)
            data = memoryview(block.contiguous().view(torch.uint8).numpy()).cast("B")
            step = run * target_dtype.itemsize
            for i, (_, at) in enumerate(_positions(runs_outer, 0, dst_el)):
                _pwrite_all(fd, data[i * step : (i + 1) * step], entry.offset + at * target_dtype.itemsize)
    finally:
        os.close(src)


def _runs(axes: list[tuple[int, int, int]], *, both: bool) -> list[tuple[int, int, int]]:
    """Merge the innermost axes that are contiguous in the target (and, with `both`, in the
    source too) into one run axis: returns the outer axes followed by (run length, 1, 1)."""
    outer = list(axes)
    run = 1
    while outer and outer[-1][2] == run and (not both or outer[-1][1] == run):
        run *= outer.pop()[0]
    return [*outer, (run, 1, 1)]


def _positions(axes: list[tuple[int, int, int]], source_start: int, target_start: int):
    """(source, target) element offsets of every index over `axes`, in row-major order."""
    for index in itertools.product(*(range(n) for n, _, _ in axes)):
        yield (
            source_start + sum(i * s for i, (_, s, _) in zip(index, axes)),
            target_start + sum(i * t for i, (_, _, t) in zip(index, axes)),
        )


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B")  # bytes: a tensor's view has its shape, and slicing would cut rows
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _hexdigest(fd: int, algorithm: str) -> str:
    """The file's hash by `algorithm` (a key of `_HASHES`), read in chunks; both hashes release
    the GIL, so it runs beside other threads' work."""
    digest = _HASHES[algorithm]()
    buffer = memoryview(bytearray(CHUNK_BYTES))
    offset = 0
    while n := os.preadv(fd, [buffer], offset):
        digest.update(buffer[:n])
        offset += n
    return digest.hexdigest()


def file_digest(path: str, algorithm: str = SHARD_DIGEST) -> str:
    """A file's digest as a manifest records it, ``"<algorithm>:<hex>"``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return f"{algorithm}:{_hexdigest(fd, algorithm)}"
    finally:
        os.close(fd)


def file_sha256(path: str) -> str:
    """The plain hex sha256 of a small file (``model.onnx``: what `sha256sum` prints)."""
    return file_digest(path, "sha256").removeprefix("sha256:")

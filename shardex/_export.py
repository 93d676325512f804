"""The coordinator: validate, plan, run capture and weights on Ray, stitch, save, verify.

Output directory layout: ``model.onnx``, ``model-0000K-of-0000N.data`` shards and
``manifest.json``. Shards appear under their final names only when complete; ``model.onnx``
appears only after every shard is written; ``manifest.json`` is written last and records
whether verification passed. A directory without a manifest is an unfinished export.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import time
from importlib import metadata
from typing import Any

import onnx_ir as ir
import torch
from torch import nn

from shardex import _ray
from shardex._capture import capture_block, capture_trunk
from shardex._dtypes import dtype_name, parse_dtype
from shardex._errors import OptionsError, ShardexError, VerificationError
from shardex._plan import Plan, make_plan, parse_size
from shardex._source import resolve_source
from shardex._stitch import stitch
from shardex._verify import (
    VerificationReport,
    block_check_model,
    compute_dtype,
    format_failure,
    needs_promotion,
    reference_run,
    tolerances,
    verify_block_group,
    verify_global,
)
from shardex._weights import ShardResult, file_sha256, write_shard

logger = logging.getLogger("shardex")

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "shardex/1"


def export(
    source: str | os.PathLike | nn.Module,
    output_dir: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    args: tuple | None = None,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    dtype: str | torch.dtype | None = None,
    opset: int | None = None,
    block_pattern: str | None = None,
    max_shard_size: int | str = "1GiB",
    inline: bool = False,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    address: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> torch.onnx.ONNXProgram:
    """Export `source` to ONNX in `output_dir` without ever holding all of its weights.

    `source` is a Hugging Face checkpoint directory, a factory ``"package.module:function"``
    (with `weights` = a safetensors file or directory), or an ``nn.Module`` with real weights.
    `args`/`kwargs` are example inputs as for ``torch.onnx.export`` (token ids are generated for
    models with a vocabulary); `dynamic_shapes` maps each input (kwarg name, or position in a
    tuple) to ``{dim: "axis_name"}``. Work runs on Ray: the cluster at `address` or
    ``RAY_ADDRESS``, else a local Ray started and stopped here.

    Returns the stitched program; raises `VerificationError` (after writing everything, with
    the numbers in the manifest) when ONNX Runtime disagrees with PyTorch.
    """
    started = time.perf_counter()
    dtype_ = _option(parse_dtype, dtype) if dtype is not None else None
    shard_bytes = _option(parse_size, max_shard_size)
    if workers is not None and workers < 1:
        raise OptionsError(f"workers must be at least 1, got {workers}.")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and value < 0:
            raise OptionsError(f"{name} must be >= 0, got {value}.")
    out = _prepare_output_dir(os.fspath(output_dir), overwrite)

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    src = resolve_source(source, weights=weights, trust_remote_code=trust_remote_code)
    plan, memory = make_plan(
        src,
        dtype=dtype_,
        args=args,
        kwargs=kwargs,
        dynamic_shapes=dynamic_shapes,
        block_pattern=block_pattern,
        max_shard_size=shard_bytes,
        opset=opset,
    )
    if isinstance(source, nn.Module):
        memory = _module_tensors(source, plan)
    timings["plan"] = time.perf_counter() - clock
    logger.info(
        "planned %d blocks in %d distinct group(s), %d tensors in %d shard(s) (%.1fs)",
        len(plan.hole_paths),
        len(plan.groups),
        len(plan.tensors),
        len(plan.shards),
        timings["plan"],
    )

    with _ray.ray_session(address):
        clock = time.perf_counter()
        trunk, blocks, shard_results = _capture_and_stream(plan, memory, out, workers)
        timings["capture_and_weights"] = time.perf_counter() - clock

        clock = time.perf_counter()
        model = stitch(plan, trunk, blocks, out)
        promote = needs_promotion(plan)
        check_models = {g.id: block_check_model(model, g, promote) for g in plan.groups} if verify else {}
        if inline:
            model = stitch(plan, trunk, blocks, out, inline=True)
        model_path = _save_model(model, out)
        timings["stitch"] = time.perf_counter() - clock

        report = None
        if verify:
            clock = time.perf_counter()
            report = _verify(plan, memory, out, model_path, check_models, promote, atol, rtol, workers)
            timings["verify"] = report.seconds = time.perf_counter() - clock

    timings["total"] = time.perf_counter() - started
    options = {
        "dtype": dtype_name(dtype_) if dtype_ else None,
        "opset": opset,
        "block_pattern": block_pattern,
        "max_shard_size": shard_bytes,
        "inline": inline,
        "verify": verify,
        "atol": atol,
        "rtol": rtol,
    }
    _write_manifest(out, plan, shard_results, model_path, timings, report, options, trunk, blocks)
    logger.info("exported to %s in %.1fs", out, timings["total"])
    if report is not None and not report.passed:
        raise VerificationError(format_failure(report), failures=report.failures)
    return torch.onnx.ONNXProgram(model, None)


def _option(parse, value):
    try:
        return parse(value)
    except ValueError as e:
        raise OptionsError(str(e)) from None


def _prepare_output_dir(path: str, overwrite: bool) -> str:
    """Create `path`, or reuse it when empty; with `overwrite`, clear a previous shardex export.
    A directory holding anything else is refused: shardex never deletes files it did not write."""
    out = os.path.abspath(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise OptionsError(f"output {out} exists and is not a directory; choose a directory path.")
    os.makedirs(out, exist_ok=True)
    existing = os.listdir(out)
    if not existing:
        return out
    if not overwrite:
        raise OptionsError(
            f"output directory {out} is not empty; choose an empty one or pass overwrite=True (--overwrite)."
        )
    ours = {MODEL_FILE, MANIFEST_FILE}
    foreign = [n for n in existing if n not in ours and not _is_shard_file(n)]
    if foreign:
        raise OptionsError(
            f"output directory {out} holds files shardex did not write (e.g. {foreign[0]}); "
            "overwrite only replaces a previous shardex export. Choose another directory."
        )
    for name in existing:
        os.remove(os.path.join(out, name))
    return out


def _is_shard_file(name: str) -> bool:
    bare = name.removeprefix(".").removesuffix(".partial")
    return bare.startswith("model-") and bare.endswith(".data") or name.startswith(".verify")


def _module_tensors(module: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    named = dict(
        [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    )
    return {t.name: named[t.name] for t in plan.tensors}


def _capture_and_stream(plan: Plan, memory, out: str, workers: int | None):
    """Capture pieces and file-sourced shards on Ray; memory-held shards in a local thread."""
    entries = {t.name: t for t in plan.tensors}
    tasks = [_ray.Task("capture trunk", capture_trunk, (plan,))]
    tasks += [_ray.Task(f"capture {g.function_name}", capture_block, (plan, g.id)) for g in plan.groups]
    file_shards = [s for s in plan.shards if not s.from_memory]
    tasks += [
        _ray.Task(f"write {s.file}", write_shard, (s, [entries[n] for n in s.tensors], out))
        for s in file_shards
    ]
    progress = _Progress(len(plan.groups) + 1, sum(s.size for s in plan.shards))

    def on_done(task: _ray.Task, result) -> None:
        progress.done(task.label, result)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as local:
        local_results = [
            local.submit(
                write_shard, s, [entries[n] for n in s.tensors], out, {n: memory[n] for n in s.tensors}
            )
            for s in plan.shards
            if s.from_memory
        ]
        results = _ray.run_tasks(tasks, max_in_flight=workers, on_done=on_done)
        for future in local_results:
            progress.done("write (local)", future.result())
    trunk = results[0]
    blocks = {g.id: piece for g, piece in zip(plan.groups, results[1 : 1 + len(plan.groups)])}
    shard_results = {r.file: r for r in results[1 + len(plan.groups) :]}
    shard_results.update({f.result().file: f.result() for f in local_results})
    return trunk, blocks, [shard_results[s.file] for s in plan.shards]


class _Progress:
    """Logs captures and bytes streamed as work finishes."""

    def __init__(self, pieces: int, total_bytes: int) -> None:
        self.pieces, self.captured = pieces, 0
        self.total_bytes, self.written = total_bytes, 0
        self.start = time.perf_counter()

    def done(self, label: str, result) -> None:
        if isinstance(result, ShardResult):
            self.written += result.nbytes
            rate = self.written / max(time.perf_counter() - self.start, 1e-9) / 1e6
            logger.info(
                "weights: %s written, %.1f/%.1f MB (%.0f MB/s)",
                result.file,
                self.written / 1e6,
                self.total_bytes / 1e6,
                rate,
            )
        else:
            self.captured += 1
            logger.info(
                "capture: %s done in %.1fs (%d/%d)", result.name, result.seconds, self.captured, self.pieces
            )


def _save_model(model: ir.Model, out: str) -> str:
    path = os.path.join(out, MODEL_FILE)
    partial = os.path.join(out, f".{MODEL_FILE}.partial")
    ir.save(model, partial)
    os.replace(partial, path)
    return path


def _verify(plan, memory, out, model_path, check_models, promote, atol, rtol, workers) -> VerificationReport:
    compute = compute_dtype(plan)
    atol_, rtol_ = tolerances(compute, atol, rtol)
    inputs = plan.example.resized()  # other sizes than the capture example: dynamic axes are exercised
    logger.info("verify: running the PyTorch reference block by block")
    reference = reference_run(plan, memory, inputs)
    tasks = [
        _ray.Task(
            "verify global", verify_global, (model_path, inputs, reference.outputs, atol_, rtol_, promote)
        )
    ]
    tasks += [
        _ray.Task(
            f"verify {g.function_name}",
            verify_block_group,
            (check_models[g.id], plan, g, {p: reference.boundaries[p] for p in g.members}, out, atol_, rtol_),
        )
        for g in plan.groups
    ]
    results = _ray.run_tasks(tasks, max_in_flight=workers)
    method = "float32-promoted graph, ONNX Runtime CPU" if promote else "ONNX Runtime CPU"
    shapes = [list(t.shape) for t in inputs.flat_tensors()]
    blocks = [check for group_checks in results[1:] for check in group_checks]
    report = VerificationReport(method, dtype_name(compute), shapes, results[0], blocks)
    worst = max((c.max_abs_diff for c in report.outputs), default=0.0)
    logger.info(
        "verify: %s; outputs max abs diff %.3g, %d blocks checked",
        "passed" if report.passed else "FAILED",
        worst,
        len(blocks),
    )
    return report


def _versions() -> dict[str, str]:
    names = [
        "shardex",
        "torch",
        "onnx",
        "onnx-ir",
        "onnxscript",
        "onnxruntime",
        "onnxruntime-gpu",
        "ray",
        "transformers",
        "safetensors",
    ]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _source_hashes(plan: Plan) -> list[dict]:
    """Cheap identity of the source: size and header hash of each file (data is not re-read)."""
    files = list(plan.source.files)
    config = os.path.join(plan.source.location, "config.json") if plan.source.kind == "hf" else None
    if config:
        files.insert(0, config)
    return [{"path": p, "bytes": os.path.getsize(p), "header_sha256": _header_sha256(p)} for p in files]


def _header_sha256(path: str) -> str:
    with open(path, "rb") as f:
        if path.endswith(".safetensors"):
            length = int.from_bytes(f.read(8), "little")
            data = f.read(length)
        else:
            data = f.read()
    return hashlib.sha256(data).hexdigest()


def _write_manifest(
    out, plan, shards: list[ShardResult], model_path, timings, report, options, trunk, blocks
) -> None:
    manifest = {
        "format": MANIFEST_FORMAT,
        "status": "complete" if report is None or report.passed else "verification_failed",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "source": plan.source.describe() | {"hashes": _source_hashes(plan)},
        "options": options,
        "parameters": sum(math.prod(t.shape) for t in plan.tensors),
        "model": {
            "file": MODEL_FILE,
            "bytes": os.path.getsize(model_path),
            "sha256": file_sha256(model_path),
        },
        "shards": [
            dataclasses.asdict(s) | {"tensors": len(spec.tensors)} for s, spec in zip(shards, plan.shards)
        ],
        "plan": plan.to_json(),
        "capture_seconds": {trunk.name: trunk.seconds} | {b.name: b.seconds for b in blocks.values()},
        "timings": timings,
        "verification": report.to_json() if report is not None else None,
    }
    partial = os.path.join(out, f".{MANIFEST_FILE}.partial")
    with open(partial, "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    os.replace(partial, os.path.join(out, MANIFEST_FILE))


def load_manifest(output_dir: str | os.PathLike) -> dict:
    """The manifest of a finished export (raises ShardexError if there is none)."""
    path = os.path.join(os.fspath(output_dir), MANIFEST_FILE)
    if not os.path.isfile(path):
        raise ShardexError(f"{output_dir} has no {MANIFEST_FILE}: it is not a finished shardex export.")
    with open(path) as f:
        return json.load(f)

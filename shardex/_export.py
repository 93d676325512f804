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
from shardex._capture import warm_up as warm_up_capture
from shardex._cluster import MARKER_PREFIX, summarize_nodes, write_timeline
from shardex._dtypes import dtype_name, parse_dtype
from shardex._errors import OptionsError, SourceError, VerificationError
from shardex._generation import GenerationCheck, reference_generation, verify_generation
from shardex._layout import TOKEN_INPUTS, RuntimeIO, is_runtime_file, write_runtime_files
from shardex._measure import ProcessTreeSampler
from shardex._plan import Plan, make_plan, parse_size
from shardex._source import resolve_source
from shardex._stitch import inline_blocks, stitch
from shardex._tasks import TEXT_GENERATION_WITH_PAST, check_runtime, check_task
from shardex._verify import (
    VerificationReport,
    block_check_model,
    compute_dtype,
    format_failure,
    needs_promotion,
    providers,
    reference_device,
    reference_run,
    tolerances,
    verify_block_group,
    verify_global,
)
from shardex._weights import ShardResult, file_sha256, header_sha256, link_shard, write_shard

logger = logging.getLogger("shardex")

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "shardex/1"
INPUTS_FILE = "inputs.safetensors"
JOURNAL_FILE = ".journal.json"
TIMELINE_FILE = "timeline.json"
REPORT_FILE = "report.html"  # written by the CLI (_report), listed here so overwrite/resume know it
# Files an export may leave in its directory besides shards (report and timeline: see the CLI, _ray).
OWN_FILES = {MODEL_FILE, MANIFEST_FILE, INPUTS_FILE, JOURNAL_FILE, REPORT_FILE, TIMELINE_FILE}


def export(
    source: str | os.PathLike | nn.Module,
    output_dir: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    args: tuple | None = None,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    dtype: str | torch.dtype | None = None,
    task: str | None = None,
    runtime: str = "onnxruntime",
    opset: int | None = None,
    block_pattern: str | None = None,
    max_shard_size: int | str = "1GiB",
    inline: bool = False,
    verify: bool = True,
    verify_tokens: int = 8,
    atol: float | None = None,
    rtol: float | None = None,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_task: float = 1,
    runtime_env: dict | None = None,
    overwrite: bool = False,
    resume: bool = False,
    trust_remote_code: bool = False,
    zero_copy: bool = False,
    revision: str | None = None,
) -> torch.onnx.ONNXProgram:
    """Export `source` to ONNX in `output_dir` without ever holding all of its weights.

    `source` is a Hugging Face checkpoint directory, a Hugging Face Hub id ``"org/name"`` (at
    `revision`, default main; fetched into the HF cache, which it is read from; an existing
    directory of the same name wins), a factory ``"package.module:function"`` (with `weights` = a
    safetensors file or directory), or an ``nn.Module`` with real weights.
    `args`/`kwargs` are example inputs as for ``torch.onnx.export`` (token ids are generated for
    models with a vocabulary); `dynamic_shapes` maps each input (kwarg name, or position in a
    tuple) to ``{dim: "axis_name"}``. `task` (Optimum's names) chooses what a Hugging Face
    checkpoint's program computes: causal LMs default to ``"text-generation-with-past"`` (one
    decoder step with the KV cache as inputs and outputs), ``"text-generation"`` gives logits
    without a cache. `runtime` chooses the ops: ``"onnxruntime"`` (default) rewrites each
    distinct piece once into ONNX Runtime's fused ops for its CPU provider,
    ``"onnxruntime-cuda"`` for its CUDA provider, ``"onnx"`` keeps standard ONNX ops only. Work runs on Ray: the cluster at `address` or
    ``RAY_ADDRESS``, else a local Ray started and stopped here: at most `workers` tasks at once,
    each holding `cpus_per_task` CPUs, spread over the nodes; `runtime_env` goes to Ray for the
    workers of a joined cluster (e.g. ``{"pip": [...]}``). On a cluster every node must see
    `output_dir` (a shared filesystem), which is checked before any work; see cluster/README.md.
    `zero_copy` writes no weight copies: the external data points into the source safetensors
    files, hard-linked into `output_dir` (which must be on the same filesystem); see DESIGN.md
    for the trade-offs.
    `resume` continues an export that was killed: shards already written whose sha256 matches
    are kept; an output directory holding another model's export is refused.

    Returns the stitched program; raises `VerificationError` (after writing everything, with
    the numbers in the manifest) when ONNX Runtime disagrees with PyTorch.
    """
    started = time.perf_counter()
    dtype_ = _option(parse_dtype, dtype) if dtype is not None else None
    _option(check_task, task)
    _option(check_runtime, runtime)
    shard_bytes = _option(parse_size, max_shard_size)
    _check_run_options(workers, atol, rtol)
    _check_verify_tokens(verify_tokens)
    if overwrite and resume:
        raise OptionsError("overwrite and resume contradict each other; pass one of them.")
    options = {
        "dtype": dtype_name(dtype_) if dtype_ else None,
        "task": task,
        "runtime": runtime,
        "opset": opset,
        "block_pattern": block_pattern,
        "max_shard_size": shard_bytes,
        "inline": inline,
        "verify": verify,
        "verify_tokens": verify_tokens,
        "atol": atol,
        "rtol": rtol,
        "trust_remote_code": trust_remote_code,
        "zero_copy": zero_copy,
        "revision": revision,
    }
    timings: dict[str, float] = {}
    src = resolve_source(source, weights=weights, trust_remote_code=trust_remote_code, revision=revision)
    out = _prepare_output_dir(os.fspath(output_dir), overwrite=overwrite, resume=resume)

    with (
        _ray.ray_session(address, runtime_env=runtime_env),
        _ray.recording() as records,
        ProcessTreeSampler() as memory_sampler,
    ):
        # Workers import torch.onnx, onnxscript and transformers (seconds) while we plan.
        _ray.warm_up(warm_up_capture, src.kind)
        clock = time.perf_counter()
        plan, memory = make_plan(
            src,
            dtype=dtype_,
            args=args,
            kwargs=kwargs,
            dynamic_shapes=dynamic_shapes,
            block_pattern=block_pattern,
            max_shard_size=shard_bytes,
            opset=opset,
            task=task,
            runtime=runtime,
            module=source if isinstance(source, nn.Module) else None,
            zero_copy=zero_copy,
        )
        timings["plan"] = time.perf_counter() - clock
        fingerprint = _fingerprint(plan, options)
        reused = _reusable_shards(out, plan, fingerprint) if resume else {}
        logger.info(
            "planned %d blocks in %d distinct group(s), %d tensors in %d shard(s) (%.1fs)",
            len(plan.hole_paths),
            len(plan.groups),
            len(plan.tensors),
            len(plan.shards),
            timings["plan"],
        )
        os.makedirs(out, exist_ok=True)
        _ray.check_output_visible(out, readable=plan.source.files)
        journal = _Journal(out, fingerprint, reused)
        clock = time.perf_counter()
        trunk, blocks, shard_results = _capture_and_stream(plan, memory, out, workers, journal, cpus_per_task)
        timings["capture_and_weights"] = time.perf_counter() - clock

        clock = time.perf_counter()
        model = stitch(plan, trunk, blocks, out)
        # Verification runs the function form block by block; the flat graph is its inlining.
        program = ir.serde.deserialize_model(ir.serde.serialize_model(model)) if inline and verify else model
        if inline:
            inline_blocks(model)
        model_path = _save_model(model, out)
        _save_example_inputs(plan, out)
        runtime_files = _write_runtime_layout(plan, out, model)
        timings["stitch"] = time.perf_counter() - clock

        report = None
        if verify:
            clock = time.perf_counter()
            report = _verify(plan, memory, out, program, atol, rtol, workers, cpus_per_task, verify_tokens)
            timings["verify"] = time.perf_counter() - clock

    timings["total"] = time.perf_counter() - started
    write_timeline(records, os.path.join(out, TIMELINE_FILE))
    _write_manifest(
        out,
        plan,
        shard_results,
        model_path,
        timings,
        report,
        options,
        trunk,
        blocks,
        memory_sampler.peak,
        journal,
        summarize_nodes(records),
        runtime_files,
    )
    journal.close()
    logger.info("exported to %s in %.1fs", out, timings["total"])
    if report is not None and not report.passed:
        raise VerificationError(format_failure(report), failures=report.failures)
    return torch.onnx.ONNXProgram(model, None)


def verify(
    output_dir: str | os.PathLike,
    *,
    args: tuple | None = None,
    kwargs: dict[str, Any] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    verify_tokens: int | None = None,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_task: float = 1,
    runtime_env: dict | None = None,
) -> VerificationReport:
    """Re-verify a finished export against its source: shard hashes, then ONNX Runtime vs
    PyTorch globally and per block. Updates the manifest; raises `VerificationError` on failure.

    Example inputs come from the export (``inputs.safetensors``) unless `args`/`kwargs` are given.
    A generation export's greedy decoding is checked for `verify_tokens` tokens (default: as
    many as at export).
    """
    _check_run_options(workers, atol, rtol)
    _check_verify_tokens(verify_tokens)
    out = os.path.abspath(os.fspath(output_dir))
    manifest = load_manifest(out)
    described = manifest["source"]
    if described["kind"] == "module":
        raise OptionsError(
            f"{out} was exported from an in-memory module; it can only be verified by export(verify=True)."
        )
    hub = described.get("hub")  # a Hub id: the recorded commit, from the cache when it is there
    src = resolve_source(
        hub["repo_id"] if hub else described["location"],
        weights=described["files"] if described["kind"] == "factory" else None,
        trust_remote_code=manifest["options"].get("trust_remote_code", False),
        revision=hub["commit"] if hub else None,
    )
    options = manifest["options"]
    task = manifest["plan"].get("task")
    if task is not None:
        if args is not None or kwargs is not None:
            raise OptionsError(
                f"{out} was exported for task {task!r}, which generates its own inputs; drop args=/kwargs=."
            )
        dynamic_shapes = None  # the task generates the same inputs again
    elif args is None and kwargs is None:
        args, kwargs, dynamic_shapes = _load_example_inputs(out, manifest)
    else:
        dynamic_shapes = None
    plan, memory = make_plan(
        src,
        dtype=parse_dtype(options["dtype"]) if options["dtype"] else None,
        args=args,
        kwargs=kwargs,
        dynamic_shapes=dynamic_shapes,
        block_pattern=options["block_pattern"],
        max_shard_size=options["max_shard_size"],
        opset=options["opset"],
        task=task,
        runtime=options.get("runtime", "onnx"),  # exports from before the option had no fusions
        zero_copy=options.get("zero_copy", False),
    )
    expected = [(s["file"], s["nbytes"]) for s in manifest["shards"]]
    if [(s.file, s.size) for s in plan.shards] != expected:
        raise SourceError(
            f"the source {described['location']} no longer plans to the shards recorded in {out}; "
            "it changed since the export: export it again."
        )
    clock = time.perf_counter()
    with _ray.ray_session(address, runtime_env=runtime_env):
        _ray.check_output_visible(out, readable=plan.source.files)
        if options["inline"]:
            # The flat graph has no block calls to stream by: rebuild its function form (cheap,
            # weightless captures) and verify that, as export(inline=True) does.
            trunk, blocks, _ = _capture_and_stream(
                dataclasses.replace(plan, shards=[]), memory, out, workers, cpus_per_task=cpus_per_task
            )
            program = stitch(plan, trunk, blocks, out)
        else:
            program = ir.load(os.path.join(out, MODEL_FILE))
        new_tokens = options.get("verify_tokens", 0) if verify_tokens is None else verify_tokens
        report = _verify(plan, memory, out, program, atol, rtol, workers, cpus_per_task, new_tokens)
    report.shard_hash_mismatches = [
        s["file"] for s in manifest["shards"] if _shard_hash(out, s) != s["sha256"]
    ]
    report.seconds = time.perf_counter() - clock
    manifest["verification"] = report.to_json()
    manifest["status"] = "complete" if report.passed else "verification_failed"
    _write_json_atomic(out, MANIFEST_FILE, manifest)
    if not report.passed:
        raise VerificationError(format_failure(report), failures=report.failures)
    return report


def _shard_hash(out: str, shard: dict) -> str:
    path = os.path.join(out, shard["file"])
    return header_sha256(path) if shard.get("hashed") == "header" else file_sha256(path)


def _check_run_options(workers: int | None, atol: float | None, rtol: float | None) -> None:
    if workers is not None and workers < 1:
        raise OptionsError(f"workers must be at least 1, got {workers}.")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and value < 0:
            raise OptionsError(f"{name} must be >= 0, got {value}.")


def _check_verify_tokens(verify_tokens: int | None) -> None:
    if verify_tokens is not None and (not isinstance(verify_tokens, int) or verify_tokens < 0):
        raise OptionsError(
            f"verify_tokens must be a whole number >= 0 (0 skips the generation check), got {verify_tokens!r}."
        )


def _option(parse, value):
    try:
        return parse(value)
    except ValueError as e:
        raise OptionsError(str(e)) from None


def _prepare_output_dir(path: str, *, overwrite: bool, resume: bool) -> str:
    """Check `path` can take this export (the journal creates it after planning). With
    `overwrite`, clear a previous shardex export; with `resume`, keep it for `_reusable_shards`.
    A directory holding anything else is refused: shardex never deletes files it did not write."""
    out = os.path.abspath(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise OptionsError(f"output {out} exists and is not a directory; choose a directory path.")
    existing = os.listdir(out) if os.path.isdir(out) else []
    if not existing:
        return out
    if not overwrite and not resume:
        raise OptionsError(
            f"output directory {out} is not empty; choose an empty one, or pass overwrite=True "
            "(--overwrite) to replace a previous export or resume=True (--resume) to finish it."
        )
    # A probe marker is left only by a coordinator killed during the storage check.
    foreign = [
        n
        for n in existing
        if n not in OWN_FILES
        and not _is_shard_file(n)
        and not is_runtime_file(n)
        and not n.startswith(MARKER_PREFIX)
    ]
    if foreign:
        raise OptionsError(
            f"output directory {out} holds files shardex did not write (e.g. {foreign[0]}); "
            "shardex only replaces or resumes its own exports. Choose another directory."
        )
    if overwrite:
        for name in existing:
            os.remove(os.path.join(out, name))
    return out


def _is_shard_file(name: str) -> bool:
    bare = name.removeprefix(".").removesuffix(".partial")
    return (bare.startswith("model-") and bare.endswith((".data", ".safetensors"))) or (
        name.startswith(".") and name.endswith(".partial")
    )


def _capture_and_stream(
    plan: Plan,
    memory,
    out: str,
    workers: int | None,
    journal: _Journal | None = None,
    cpus_per_task: float = 1,
):
    """Capture pieces and file-sourced shards on Ray; memory-held shards and zero-copy links in
    a local thread. Shards the journal already holds (a resumed export) are not written again."""
    entries = {t.name: t for t in plan.tensors}
    done = journal.results if journal else {}
    todo = [s for s in plan.shards if s.file not in done]
    tasks = [_ray.Task("capture trunk", capture_trunk, (plan,))]
    tasks += [_ray.Task(f"capture {g.function_name}", capture_block, (plan, g.id)) for g in plan.groups]
    file_shards = [s for s in todo if not s.from_memory and not s.link_target]
    tasks += [
        _ray.Task(f"write {s.file}", write_shard, (s, [entries[n] for n in s.tensors], out), io_bound=True)
        for s in file_shards
    ]
    progress = _Progress(len(plan.groups) + 1, sum(s.size for s in plan.shards))

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as local:
        local_results = [
            local.submit(
                write_shard, s, [entries[n] for n in s.tensors], out, {n: memory[n] for n in s.tensors}
            )
            for s in todo
            if s.from_memory
        ]
        local_results += [local.submit(link_shard, s, out) for s in todo if s.link_target]

        def finished(result) -> None:
            progress.done(result)
            if journal and isinstance(result, ShardResult):
                journal.record(result)

        results = _ray.run_tasks(
            tasks,
            max_in_flight=workers,
            on_done=lambda task, result: finished(result),
            cpus_per_task=cpus_per_task,
        )
        for future in local_results:
            finished(future.result())
    trunk = results[0]
    blocks = {g.id: piece for g, piece in zip(plan.groups, results[1 : 1 + len(plan.groups)])}
    shard_results = dict(done) | {r.file: r for r in results[1 + len(plan.groups) :]}
    shard_results.update({f.result().file: f.result() for f in local_results})
    return trunk, blocks, [shard_results[s.file] for s in plan.shards]


class _Journal:
    """The shards finished so far, persisted after each one so a killed export can resume.
    Removed once the manifest (which holds the same results) is written."""

    def __init__(self, out: str, fingerprint: str, reused: dict[str, ShardResult]) -> None:
        self.out = out
        self.fingerprint = fingerprint
        self.results = dict(reused)
        os.makedirs(out, exist_ok=True)
        self.reused = set(reused)
        self._write()
        if reused:
            logger.info(
                "resume: keeping %d shard(s) already written (%s)", len(reused), ", ".join(sorted(reused))
            )

    def record(self, result: ShardResult) -> None:
        self.results[result.file] = result
        self._write()

    @property
    def bytes_written(self) -> int:
        return sum(r.nbytes for f, r in self.results.items() if f not in self.reused and r.hashed == "file")

    def _write(self) -> None:
        shards = [dataclasses.asdict(r) for r in self.results.values()]
        _write_json_atomic(self.out, JOURNAL_FILE, {"fingerprint": self.fingerprint, "shards": shards})

    def close(self) -> None:
        os.remove(os.path.join(self.out, JOURNAL_FILE))


def _fingerprint(plan: Plan, options: dict) -> str:
    """Identity of an export's inputs: source (with header hashes), plan, options that change
    the bytes. Equal fingerprints produce byte-identical shards and model."""
    # A Hub revision counts through the commit it resolved to (in the plan's source).
    relevant = {
        k: v for k, v in options.items() if k not in ("verify", "verify_tokens", "atol", "rtol", "revision")
    }
    identity = {"plan": plan.to_json(), "source": _source_hashes(plan), "options": relevant}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _reusable_shards(out: str, plan: Plan, fingerprint: str) -> dict[str, ShardResult]:
    """Shards of an earlier run of the same export whose files still hash as recorded."""
    previous = None
    for name in (JOURNAL_FILE, MANIFEST_FILE):
        path = os.path.join(out, name)
        if os.path.isfile(path):
            with open(path) as f:
                previous = json.load(f)
            break
    if previous is None:
        return {}
    if previous.get("fingerprint") != fingerprint:
        raise OptionsError(
            f"output directory {out} holds an export of another model or with other options; "
            "resume refuses to mix them. Choose another directory or pass overwrite=True (--overwrite)."
        )
    planned = {s.file for s in plan.shards}
    reused = {}
    for record in previous.get("shards", []):
        result = ShardResult(**record)
        path = os.path.join(out, result.file)
        if result.file in planned and os.path.isfile(path) and _shard_hash(out, record) == result.sha256:
            reused[result.file] = result
    return reused


class _Progress:
    """Logs captures and bytes streamed as work finishes."""

    def __init__(self, pieces: int, total_bytes: int) -> None:
        self.pieces, self.captured = pieces, 0
        self.total_bytes, self.written = total_bytes, 0

    def done(self, result) -> None:
        if isinstance(result, ShardResult):
            self.written += result.nbytes
            logger.info(
                "weights: %s written (%.1f MB at %.0f MB/s), %.1f/%.1f MB done",
                result.file,
                result.nbytes / 1e6,
                result.nbytes / max(result.seconds, 1e-9) / 1e6,
                self.written / 1e6,
                self.total_bytes / 1e6,
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


def _verify(
    plan, memory, out, program: ir.Model, atol, rtol, workers, cpus_per_task=1, new_tokens: int = 0
) -> VerificationReport:
    """Reference run here (streamed); the streamed global check and one check per block group
    on Ray; for a generation export with `new_tokens`, greedy decoding on both sides too.
    `program` is the stitched model in function form (before any inlining)."""
    start = time.perf_counter()
    compute = compute_dtype(plan)
    atol_, rtol_ = tolerances(compute, atol, rtol)
    promote = needs_promotion(plan)
    inputs = plan.example.resized()  # other sizes than the capture example: dynamic axes are exercised
    logger.info("verify: running the PyTorch reference block by block")
    reference = reference_run(plan, memory, inputs)
    check_models = {g.function_name: block_check_model(program, plan, g, promote) for g in plan.groups}
    program_bytes = ir.serde.serialize_model(program).SerializeToString()  # weights stay external
    global_args = (program_bytes, check_models, plan, out, inputs, reference.outputs, atol_, rtol_, promote)
    # ONNX Runtime and the PyTorch reference: on a node with a GPU, a share of it.
    tasks = [_ray.Task("verify global", verify_global, global_args, gpu=True)]
    tasks += [
        _ray.Task(
            f"verify {g.function_name}",
            verify_block_group,
            (
                check_models[g.function_name],
                plan,
                g,
                {p: reference.boundaries[p] for p in g.members},
                out,
                atol_,
                rtol_,
            ),
            gpu=True,
        )
        for g in plan.groups
    ]
    if new_tokens and plan.task == TEXT_GENERATION_WITH_PAST:
        logger.info("verify: PyTorch greedy decoding of %d tokens", new_tokens)
        generation = reference_generation(plan, memory, new_tokens)
        generation_args = (program_bytes, check_models, plan, out, generation, atol_, rtol_, promote)
        tasks.append(_ray.Task("verify generation", verify_generation, generation_args, gpu=True))
    results = _ray.run_tasks(tasks, max_in_flight=workers, on_done=_log_verified, cpus_per_task=cpus_per_task)
    generation = results.pop() if isinstance(results[-1], GenerationCheck) else None
    runtime = f"ONNX Runtime {providers()[0]}, PyTorch on {reference_device().type}"
    method = f"float32-promoted graph, {runtime}" if promote else runtime
    shapes = [list(t.shape) for t in inputs.flat_tensors()]
    blocks = [check for group_checks in results[1:] for check in group_checks]
    report = VerificationReport(
        method, dtype_name(compute), shapes, results[0], blocks, generation=generation
    )
    report.seconds = time.perf_counter() - start
    worst = max((c.max_abs_diff for c in report.outputs), default=0.0)
    logger.info(
        "verify: %s; outputs max abs diff %.3g, %d blocks checked",
        "passed" if report.passed else "FAILED",
        worst,
        len(blocks),
    )
    return report


def _log_verified(task: _ray.Task, checks) -> None:
    """Progress on the driver: workers' own logs do not reach it."""
    if isinstance(checks, GenerationCheck):
        checks = checks.checks()
    worst = max(checks, key=lambda c: (not c.passed, c.max_abs_diff), default=None)
    if worst is not None:
        failed = sum(not c.passed for c in checks)
        logger.info(
            "%s: %d check(s), %d failed, worst %s max abs diff %.3g",
            task.label,
            len(checks),
            failed,
            worst.name,
            worst.max_abs_diff,
        )


def _write_runtime_layout(plan: Plan, out: str, model: ir.Model) -> list[str]:
    """genai_config.json, config, generation config and tokenizer files beside a generation
    export of a checkpoint, so onnxruntime-genai and Optimum open the directory as it is. The
    cache's sizes come from the plan (what the graph takes), the rest from config.json; the
    cache shares one buffer between past and present only where attention is fused into
    GroupQueryAttention, which writes in place."""
    if plan.task != TEXT_GENERATION_WITH_PAST or plan.source.kind != "hf":
        return []
    inputs = dict(zip(plan.input_names, plan.example.flat_tensors()))
    keys = [t for name, t in inputs.items() if name.startswith("past_key_values.") and name.endswith(".key")]
    with open(os.path.join(plan.source.location, "config.json")) as f:
        fused = any(
            node.op_type == "GroupQueryAttention"
            for graph in [model.graph, *model.functions.values()]
            for node in ir.traversal.RecursiveGraphIterator(graph)
        )
        io = RuntimeIO.from_config(
            json.load(f), fused_attention=fused, inputs=tuple(n for n in TOKEN_INPUTS if n in inputs)
        )
    io = dataclasses.replace(
        io, num_layers=len(keys), num_kv_heads=keys[0].shape[1], head_dim=keys[0].shape[3]
    )
    return write_runtime_files(out, plan.source.location, io=io)


def _save_example_inputs(plan: Plan, out: str) -> None:
    """Keep the example inputs beside the model so `verify` can rerun without the caller's code."""
    from safetensors.torch import save_file

    example = plan.example
    if not all(isinstance(a, torch.Tensor) for a in [*example.args, *example.kwargs.values()]):
        return  # nested inputs: verify needs them passed again
    tensors = {f"args.{i}": a for i, a in enumerate(example.args)}
    tensors |= {f"kwargs.{k}": v for k, v in example.kwargs.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, INPUTS_FILE))


def _load_example_inputs(out: str, manifest: dict):
    from safetensors.torch import load_file

    path = os.path.join(out, INPUTS_FILE)
    if not os.path.isfile(path):
        raise OptionsError(
            f"{out} has no {INPUTS_FILE} (its inputs were nested); pass args=/kwargs= to verify."
        )
    tensors = load_file(path)
    args = tuple(tensors[f"args.{i}"] for i in range(sum(k.startswith("args.") for k in tensors)))
    names = [k.removeprefix("kwargs.") for k in tensors if k.startswith("kwargs.")]
    kwargs = {n: tensors[f"kwargs.{n}"] for n in names}
    axes = [
        {int(d): a for d, a in axis.items()} for axis in manifest["plan"]["example_inputs"]["dynamic_axes"]
    ]
    dynamic = tuple(axes[: len(args)]) if args else dict(zip(names, axes[len(args) :]))
    return args, kwargs, dynamic


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
    return [{"path": p, "bytes": os.path.getsize(p), "header_sha256": header_sha256(p)} for p in files]


def _write_manifest(
    out,
    plan,
    shards: list[ShardResult],
    model_path,
    timings,
    report,
    options,
    trunk,
    blocks,
    peak_memory,
    journal,
    placement,
    runtime_files: list[str],
) -> None:
    manifest = {
        "format": MANIFEST_FORMAT,
        "fingerprint": journal.fingerprint,
        "status": "complete" if report is None or report.passed else "verification_failed",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "source": plan.source.describe() | {"hashes": _source_hashes(plan)},
        "options": options,
        "model_class": plan.model_class,
        "parameters": sum(math.prod(t.shape) for t in plan.tensors if not t.is_buffer),
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
        "peak_memory": dataclasses.asdict(peak_memory),
        "bytes_written": journal.bytes_written,
        "reused_shards": sorted(journal.reused),
        "placement": placement,
        "runtime_files": runtime_files,
        "verification": report.to_json() if report is not None else None,
    }
    _write_json_atomic(out, MANIFEST_FILE, manifest)


def _write_json_atomic(out: str, name: str, data: dict) -> None:
    partial = os.path.join(out, f".{name}.partial")
    with open(partial, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(partial, os.path.join(out, name))


def load_manifest(output_dir: str | os.PathLike) -> dict:
    """The manifest of a finished export. A missing or unreadable one raises `OptionsError`:
    the directory given is not (or no longer) a finished shardex export."""
    path = os.path.join(os.fspath(output_dir), MANIFEST_FILE)
    if not os.path.isfile(path):
        raise OptionsError(f"{output_dir} has no {MANIFEST_FILE}: it is not a finished shardex export.")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise OptionsError(f"{path} is unreadable ({e}); export the model again with overwrite=True.") from e

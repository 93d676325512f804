"""The coordinator: validate, plan, run capture and weights on Ray, stitch, save, verify.

`export` is the pipeline as a sequence of stages; what the output directory holds and how it
is written (atomically, journal, manifest) is `_output`'s business.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import onnx_ir as ir
import torch
from torch import nn

from shardex import _capture_cache, _output, _ray
from shardex._capture import CapturedPiece, capture_block, capture_trunk
from shardex._capture import warm_up as warm_up_capture
from shardex._cluster import IO_TASKS_PER_SLOT, summarize_nodes, write_timeline
from shardex._dtypes import dtype_name, parse_dtype
from shardex._errors import OptionsError, ShardexError, SourceError, VerificationError
from shardex._fork import FORK_LOST, CaptureFork, spare_fork
from shardex._generation import reference_generation, verify_saved_model, verify_seq2seq_generation
from shardex._layout import (
    CONTEXT_LENGTH_KEYS,
    DEFAULT_CONTEXT_LENGTH,
    TOKEN_INPUTS,
    RuntimeIO,
    write_runtime_files,
)
from shardex._measure import ProcessTreeSampler
from shardex._output import MANIFEST_FILE, TIMELINE_FILE, Journal
from shardex._plan import Plan, make_plan, parse_size, resolve_task
from shardex._source import Source, resolve_source
from shardex._stitch import inline_blocks, stitch
from shardex._tasks import TEXT_GENERATION_WITH_PAST, check_runtime, check_task, components, uses_cache
from shardex._verify import (
    VerificationReport,
    block_segments,
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
from shardex._weights import ShardResult, link_shard, write_shard

logger = logging.getLogger("shardex")

WRITER_NICENESS = 10  # writer threads yield the CPU to captures by this much
RAY_START_NICENESS = 10  # a local Ray starting while this process captures: the captures go first
# A local Ray takes ~6 s to start and a fresh worker ~2.5 s more for its first capture on 2
# cores, where a capture here takes 1.5-4 s warm: up to this many pieces per hand here (the
# capture thread, and the fork) are captured here alone, and Ray's workers are started for
# captures only on a machine with cores those hands leave idle (DESIGN.md, "Who captures").
CAPTURES_PER_HAND = 2
# On 2 cores, a second capture process shortened the 1.1B bf16 export (2.2 GB of weights) by
# 2.3 s and lengthened the 6.7B's (13.5 GB) by 3-6 s: the stream needs the core (BENCHMARKS.md).
FORK_MAX_STREAM_BYTES = 4 * 2**30
# Verification runs at the capture example's sizes grown by this along every dynamic axis:
# other sizes exercise the dynamic axes as well as larger ones would, and the reference's and
# ONNX Runtime's multi-token runs cost in proportion to the tokens (6.7B: 27 tokens, not 55).
VERIFY_GROWTH = 1
MAX_WRITER_THREADS = 16  # a 16-core node's disk is saturated by 8-16 writers (BENCHMARKS.md)


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
    capture_cache: bool | str | os.PathLike = True,
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
    decoder step with the KV cache as inputs and outputs, with the files onnxruntime-genai and
    Optimum open the directory with), ``"text-generation"`` gives logits without a cache.
    `runtime` chooses the ops: ``"onnxruntime"`` (default) rewrites each distinct piece once into
    ONNX Runtime's fused ops for its CPU provider, ``"onnxruntime-cuda"`` for its CUDA provider,
    ``"onnx"`` keeps standard ONNX ops only. Work runs on Ray: the cluster at `address` or
    ``RAY_ADDRESS`` (``"local"``: a local Ray used as one), else this machine, where this
    process captures and checks the pieces itself and starts a local Ray only when there are
    more pieces than it captures faster alone (stopped at the end): at most `workers` tasks at once,
    each holding `cpus_per_task` CPUs, spread over the nodes; `runtime_env` goes to Ray for the
    workers of a joined cluster (e.g. ``{"pip": [...]}``). On a cluster every node must see
    `output_dir` (a shared filesystem), which is checked before any work; see cluster/README.md.
    `zero_copy` writes no weight copies: the external data points into the source safetensors
    files, hard-linked into `output_dir` (which must be on the same filesystem); see DESIGN.md
    for the trade-offs.
    `resume` continues an export that was killed: shards already written whose digest matches
    are kept; an output directory holding another model's export is refused.
    `capture_cache` keeps captured pieces (weightless graphs) for later exports of the same
    architecture with the same options: True uses ``$SHARDEX_CAPTURE_CACHE`` or
    ``~/.cache/shardex/captures`` (``$XDG_CACHE_HOME``), a path uses that directory, False none;
    the output is byte-identical either way (see `_capture_cache`).

    Verification compares ONNX Runtime on the saved files with PyTorch, globally and block by
    block; a generation export is checked by decoding through its cache: `verify_tokens` next-token
    choices and their logits, ONNX Runtime's steps against PyTorch's one pass (`_generation`).
    Returns the stitched program; raises `VerificationError` (after writing everything, with
    the numbers in the manifest) when ONNX Runtime disagrees with PyTorch.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    options = _export_options(dtype, max_shard_size, opset, block_pattern, inline, verify, atol, rtol)
    _option(check_task, task)
    _option(check_runtime, runtime)
    _check_run_options(workers, atol, rtol, verify_tokens)
    if overwrite and resume:
        raise OptionsError("overwrite and resume contradict each other; pass one of them.")
    src = resolve_source(source, weights=weights, trust_remote_code=trust_remote_code, revision=revision)
    options |= {
        "task": task,
        "runtime": runtime,
        "verify_tokens": verify_tokens,
        "trust_remote_code": trust_remote_code,
        "zero_copy": zero_copy,
        "revision": revision,
    }
    checkpoint_dir = src.location if src.kind == "hf" else None
    target = _output.prepare_output_dir(
        os.fspath(output_dir), overwrite=overwrite, resume=resume, source_dir=checkpoint_dir
    )
    cache = _capture_cache.resolve(capture_cache)
    with target.staged():  # swapped in when complete; a failed export leaves a previous one as it was
        out = target.work

        with (
            _ray.ray_session(
                address,
                runtime_env=runtime_env,
                lazy=True,
                on_start=lambda: _ray.warm_up(warm_up_capture, src.kind),  # workers import torch.onnx etc.
            ) as ray,
            _ray.recording() as records,
            ProcessTreeSampler() as memory_sampler,
            # Forked before planning, so that it warms up for captures meanwhile; a second hand,
            # so not where one task at a time was asked for.
            spare_fork(not ray.joins and workers != 1, src.kind, options["opset"]) as fork,
        ):
            with _stage(timings, "plan"):
                module = source if isinstance(source, nn.Module) else None
                explicit = args is not None or kwargs is not None
                plans = [
                    plan_export(src, options, args, kwargs, dynamic_shapes, module, component=component)
                    for component in components(resolve_task(src, task, explicit_inputs=explicit))
                ]
            plan, memory = plans[0]
            _log_plan(plan, timings["plan"])
            journal = _start_journal(out, plan, options, resume, ray)
            with _stage(timings, "capture_and_weights"):
                captured, shards = _capture_and_stream(
                    [p for p, _ in plans],
                    memory,
                    out,
                    workers,
                    journal,
                    cpus_per_task,
                    ray=ray,
                    cache=cache,
                    fork=fork,
                )
            programs = [
                _Program(component_plan, component_memory, *pieces)
                for (component_plan, component_memory), pieces in zip(plans, captured)
            ]
            with _stage(timings, "stitch"):
                for program in programs:
                    _stitch_and_save(program, out, inline, verify)
                model = programs[0].model
                _output.save_example_inputs(plan.example, out)
                runtime_files = _write_runtime_layout(plan, out, model)
            report = None
            if verify:
                with _stage(timings, "verify"), ray.checks():
                    report = _verify_programs(
                        [(p.plan, p.memory, p.checked) for p in programs],
                        out,
                        atol,
                        rtol,
                        workers,
                        cpus_per_task,
                        verify_tokens,
                        inline,
                    )

        timings["total"] = time.perf_counter() - started
        write_timeline(records, os.path.join(out, TIMELINE_FILE))
        _output.write_manifest(
            out,
            plan=plan,
            shards=shards,
            options=options,
            journal=journal,
            report=report,
            timings=timings,
            capture_seconds={
                p.piece_name(piece.name): piece.seconds
                for p in programs
                for piece in [p.trunk, *p.blocks.values()]
            },
            capture_cache=_merge_accounts(programs),
            peak_memory=memory_sampler.peak,
            placement=summarize_nodes(records),
            runtime_files=runtime_files,
            components=[p.plan for p in programs] if plan.component else None,
        )
        journal.close()
    ir.external_data.set_base_dir(model.graph, target.final)
    logger.info("exported to %s in %.1fs", target.final, timings["total"])
    if report is not None and not report.passed:
        raise VerificationError(format_failure(report), failures=report.failures)
    return torch.onnx.ONNXProgram(model, None)


@contextlib.contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    """Time one stage into `timings[name]`."""
    clock = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - clock


def _start_journal(out: str, plan: Plan, options: dict, resume: bool, ray: _ray.RaySession) -> Journal:
    """After planning, before any byte is written: the export's fingerprint, the shards a
    resumed export keeps, room for the rest, the check that every node of a joined cluster
    sees `out`, then the journal."""
    fingerprint = _output.fingerprint(plan, options)
    reused = _output.reusable_shards(out, plan, fingerprint) if resume else {}
    os.makedirs(out, exist_ok=True)
    _output.check_free_space(
        out, sum(s.size for s in plan.shards if s.file not in reused and not s.link_target)
    )
    if ray.joins:  # a Ray started here runs on this machine alone
        _ray.check_output_visible(out, readable=plan.source.files)
    return Journal(out, fingerprint, reused)


def _export_options(dtype, max_shard_size, opset, block_pattern, inline, verify, atol, rtol) -> dict:
    """The options as the manifest records them (parsed and checked)."""
    dtype_ = _option(parse_dtype, dtype) if dtype is not None else None
    return {
        "dtype": dtype_name(dtype_) if dtype_ else None,
        "opset": opset,
        "block_pattern": block_pattern,
        "max_shard_size": _option(parse_size, max_shard_size),
        "inline": inline,
        "verify": verify,
        "atol": atol,
        "rtol": rtol,
    }


def plan_export(
    src: Source,
    options: dict,
    args,
    kwargs,
    dynamic_shapes,
    module: nn.Module | None = None,
    component: str | None = None,
) -> tuple[Plan, dict[str, torch.Tensor]]:
    """Plan `src` (its `component`, for an encoder-decoder task) with an export's options (as the
    manifest records them)."""
    return make_plan(
        src,
        dtype=parse_dtype(options["dtype"]) if options["dtype"] else None,
        args=args,
        kwargs=kwargs,
        dynamic_shapes=dynamic_shapes,
        block_pattern=options["block_pattern"],
        max_shard_size=options["max_shard_size"],
        opset=options["opset"],
        task=options.get("task"),
        runtime=options.get("runtime", "onnx"),  # exports from before the option had no fusions
        module=module,
        zero_copy=options.get("zero_copy", False),
        component=component,
    )


@dataclasses.dataclass
class _Program:
    """One ONNX file of an export (``model.onnx``, or one of an encoder-decoder's files): its
    plan, its captured pieces and, once stitched, the saved model and the function form the
    block checks call."""

    plan: Plan
    memory: dict[str, torch.Tensor]
    trunk: CapturedPiece
    blocks: dict[int, CapturedPiece]
    capture_cache: dict
    model: ir.Model | None = None
    checked: ir.Model | None = None

    def piece_name(self, name: str) -> str:
        return f"{self.plan.component}/{name}" if self.plan.component else name


def _stitch_and_save(program: _Program, out: str, inline: bool, verify: bool) -> None:
    model = stitch(program.plan, program.trunk, program.blocks, out)
    # Block checks need the function form; the flat graph is verified as saved.
    program.checked = (
        ir.serde.deserialize_model(ir.serde.serialize_model(model)) if inline and verify else model
    )
    if inline:
        inline_blocks(model)
    _output.save_model(model, out, program.plan.model_file)
    program.model = model


def _merge_accounts(programs: list[_Program]) -> dict:
    """The capture cache's account over every program's pieces."""
    account = dict(programs[0].capture_cache)
    for key in ("hits", "misses"):
        account[key] = [p.piece_name(name) for p in programs for name in p.capture_cache[key]]
    return account


def _verify_programs(
    programs: list[tuple[Plan, dict, ir.Model]],
    out: str,
    atol,
    rtol,
    workers,
    cpus_per_task,
    new_tokens: int,
    inline: bool,
    beside_onnx: Callable[[], None] | None = None,
) -> VerificationReport:
    """Verify each file (its plan, memory tensors and function-form model; `inline`: the files
    as saved are flat); an encoder-decoder's also decodes through its three files.
    `beside_onnx` is called as ONNX Runtime's checks start (after the PyTorch reference)."""
    if len(programs) == 1:
        ((plan, memory, checked),) = programs
        return _verify(
            plan, memory, out, checked, atol, rtol, workers, cpus_per_task, new_tokens, inline, beside_onnx
        )
    reports = [
        _verify(
            plan,
            memory,
            out,
            checked,
            atol,
            rtol,
            workers,
            cpus_per_task,
            inline=inline,
            beside_onnx=beside_onnx,
        )
        for plan, memory, checked in programs
    ]
    clock = time.perf_counter()
    plans = {plan.component: plan for plan, _, _ in programs}

    def named(check, plan: Plan):
        return dataclasses.replace(check, name=f"{plan.model_file}: {check.name}")

    first, memory, _ = programs[0]
    report = VerificationReport(
        reports[0].method.replace(first.model_file, "each file"),
        reports[0].compute_dtype,
        [shape for r in reports for shape in r.input_shapes],
        [named(c, p) for r, p in zip(reports, plans.values()) for c in r.outputs],
        [named(c, p) for r, p in zip(reports, plans.values()) for c in r.blocks],
    )
    if new_tokens:
        atol_, rtol_ = tolerances(compute_dtype(first), atol, rtol)
        logger.info("verify: decoding %d tokens through the encoder and decoders", new_tokens)
        report.generation = verify_seq2seq_generation(
            plans, memory, out, new_tokens, atol_, rtol_, needs_promotion(first)
        )
    report.seconds = sum(r.seconds for r in reports) + time.perf_counter() - clock
    return report


def _log_plan(plan: Plan, seconds: float) -> None:
    logger.info(
        "planned %d blocks in %d distinct group(s), %d tensors in %d shard(s) (%.1fs)",
        len(plan.hole_paths),
        len(plan.groups),
        len(plan.tensors),
        len(plan.shards),
        seconds,
    )


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
    factory: str | None = None,
    trust_remote_code: bool = False,
    capture_cache: bool | str | os.PathLike = True,
) -> VerificationReport:
    """Re-verify a finished export against its source: ``model.onnx``'s sha256, ONNX Runtime on
    the saved files vs PyTorch globally and per block, the shards' digests. Updates the manifest;
    raises `VerificationError` on failure.

    The manifest is data, never a reason to run code: a factory export is verified only with
    `factory` (the ``"package.module:function"`` to import) given here, and a checkpoint's own
    code runs only with `trust_remote_code` given here, whatever the manifest says.
    Example inputs come from the export (``inputs.safetensors``) unless `args`/`kwargs` are given;
    a task's inputs are generated again. A generation export's decoding through its cache is checked
    for `verify_tokens` tokens (default: as many as at export). `capture_cache` serves the pieces an
    inlined export's block checks need, as in `export`.
    """
    _check_run_options(workers, atol, rtol, verify_tokens)
    out = os.path.abspath(os.fspath(output_dir))
    manifest = _output.load_manifest(out)
    files = _output.model_files(manifest)
    changed = [m["file"] for m in files if _output.model_sha256(out, m["file"]) != m["sha256"]]
    if changed:
        report = VerificationReport(f"not run: {', '.join(changed)} changed", "", [], [], [], 0.0, changed)
        _record_verification(out, manifest, report)
        raise VerificationError(format_failure(report), failures=[])
    hub = manifest["source"].get("hub")  # a Hub id: the recorded commit, from the cache when it is there
    src = resolve_source(
        hub["repo_id"] if hub else _trusted_location(out, manifest, factory, trust_remote_code),
        weights=manifest["source"]["files"] if factory else None,
        trust_remote_code=trust_remote_code,
        revision=hub["commit"] if hub else None,
    )
    options = dict(manifest["options"])
    options["task"] = manifest["plan"].get("task")  # the task the export resolved to
    if options["task"] is not None:
        if args is not None or kwargs is not None:
            raise OptionsError(
                f"{out} was exported for task {options['task']!r}, which generates its own inputs; "
                "drop args=/kwargs=."
            )
        dynamic_shapes = None
    elif args is None and kwargs is None:
        args, kwargs, dynamic_shapes = _output.load_example_inputs(out, manifest)
    else:
        dynamic_shapes = None
    plans = [
        plan_export(src, options, args, kwargs, dynamic_shapes, component=m.get("component")) for m in files
    ]
    expected = [(s["file"], s["nbytes"]) for s in manifest["shards"]]
    if [(s.file, s.size) for s in plans[0][0].shards] != expected:
        raise SourceError(
            f"the source {src.location} no longer plans to the shards recorded in {out}; "
            "it changed since the export: export it again."
        )
    clock = time.perf_counter()
    hashes: list[concurrent.futures.Future] = []

    def hash_shards() -> None:
        """Hash the shards, once, on one thread reading them in order beside ONNX Runtime's pass
        over the same files in the same order (one read from disk serves both where the page
        cache cannot hold checkpoint and export together), leaving the PyTorch reference both
        cores before it."""
        if not hashes:
            hashes.extend(_output.shard_hashes(out, manifest["shards"], threads=1))

    try:
        with _ray.ray_session(address, runtime_env=runtime_env, lazy=True) as ray:
            if ray.joins:
                _ray.check_output_visible(out, readable=plans[0][0].source.files)
            if options["inline"]:
                # Block checks call the block functions, which the flat graph no longer has: rebuild
                # them (cheap, weightless captures). The global check runs the flat graph as saved.
                captured, _ = _capture_and_stream(
                    [dataclasses.replace(plan, shards=[]) for plan, _ in plans],
                    plans[0][1],
                    out,
                    workers,
                    cpus_per_task=cpus_per_task,
                    ray=ray,
                    cache=_capture_cache.resolve(capture_cache),
                )
                checked = [
                    stitch(plan, trunk, blocks, out) for (plan, _), (trunk, blocks, _) in zip(plans, captured)
                ]
            else:
                checked = [ir.load(os.path.join(out, plan.model_file)) for plan, _ in plans]
            programs = [(plan, memory, model) for (plan, memory), model in zip(plans, checked)]
            new_tokens = options.get("verify_tokens", 0) if verify_tokens is None else verify_tokens
            with ray.checks():
                report = _verify_programs(
                    programs,
                    out,
                    atol,
                    rtol,
                    workers,
                    cpus_per_task,
                    new_tokens,
                    options["inline"],
                    hash_shards,
                )
        hash_shards()
        report.shard_hash_mismatches = [
            s["file"]
            for s, digest in zip(manifest["shards"], hashes)
            if digest.result() != _output.recorded_digest(s)
        ]
    finally:
        for digest in hashes:  # a failed verification does not wait for them
            digest.cancel()
    report.seconds = time.perf_counter() - clock
    _record_verification(out, manifest, report)
    if not report.passed:
        raise VerificationError(format_failure(report), failures=report.failures)
    return report


def _trusted_location(out: str, manifest: dict, factory: str | None, trust_remote_code: bool) -> str:
    """The source to verify against, from the manifest, except that code to import (a factory)
    must come from the caller; a manifest's wish for remote code is logged, not obeyed."""
    described = manifest["source"]
    kind, location = described["kind"], described["location"]
    if kind == "module":
        raise OptionsError(
            f"{out} was exported from an in-memory module; it can only be verified by export(verify=True)."
        )
    if manifest["options"].get("trust_remote_code") and not trust_remote_code:
        logger.warning(
            "%s's manifest asks for trust_remote_code; shardex takes that only from the caller "
            "(trust_remote_code=True, --trust-remote-code)",
            out,
        )
    if kind == "factory" and factory is None:
        raise OptionsError(
            f"{out} was exported from the factory {location!r}; shardex imports no code a manifest names: "
            f"pass factory={location!r} (--factory {location}) if you trust it."
        )
    if kind != "factory" and factory is not None:
        raise OptionsError(
            f"factory= is only for exports of factory models; {out} was exported from {location}."
        )
    return factory or location


def _record_verification(out: str, manifest: dict, report: VerificationReport) -> None:
    manifest["verification"] = report.to_json()
    manifest["status"] = "complete" if report.passed else "verification_failed"
    _output.write_json_atomic(os.path.join(out, MANIFEST_FILE), manifest)


def _check_run_options(
    workers: int | None, atol: float | None, rtol: float | None, verify_tokens: int | None
) -> None:
    if workers is not None and workers < 1:
        raise OptionsError(f"workers must be at least 1, got {workers}.")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and value < 0:
            raise OptionsError(f"{name} must be >= 0, got {value}.")
    if verify_tokens is not None and (not isinstance(verify_tokens, int) or verify_tokens < 0):
        raise OptionsError(
            f"verify_tokens must be a whole number >= 0 (0 skips the generation check), got {verify_tokens!r}."
        )


def _option(parse, value):
    try:
        return parse(value)
    except ValueError as e:
        raise OptionsError(str(e)) from None


def _capture_and_stream(
    plans: list[Plan],
    memory,
    out: str,
    workers: int | None,
    journal: Journal | None = None,
    cpus_per_task: float = 1,
    *,
    ray: _ray.RaySession,
    cache: _capture_cache.CaptureCache | None = None,
    fork: CaptureFork | None = None,
):
    """Capture the pieces of every plan (the programs of one export: one, or an encoder-decoder's
    three, all on the first plan's shards) that the capture cache lacks, all at once, while the
    first plan's shards are written: on a joined cluster by its workers; on one machine by this
    process and its fork (`_CapturesHere`), with a local Ray's workers taking a share of more
    than `CAPTURES_PER_HAND` a hand where cores are left for them. Returns ``[(trunk, blocks by group id, the cache's account)]`` per plan
    and the shard results in plan order.

    Shards are written by threads of this process when every Ray worker would be on this
    machine anyway (kernel copies, hashing and fsync release the GIL; no worker process, no
    object store), else as Ray tasks spread over the cluster's nodes. Memory-held tensors and
    zero-copy links are always local. Shards the journal already holds (a resumed export) are
    not written again."""
    plan = plans[0]
    entries = {t.name: t for t in plan.tensors}
    done = journal.results if journal else {}
    todo = [s for s in plan.shards if s.file not in done]
    keys = [_capture_cache.piece_keys(p) if cache is not None else None for p in plans]
    pieces: list[dict[str, CapturedPiece]] = [
        {name: piece for name, key in (k or {}).items() if (piece := cache.get(key)) is not None}
        for k in keys
    ]
    captures: list[_ray.Task] = []
    owners: list[tuple[int, str]] = []  # per capture: its plan and piece name
    for i, p in enumerate(plans):
        prefix = f"{p.component} " if p.component else ""
        wanted = [("trunk", capture_trunk, (p,))]
        wanted += [(g.function_name, capture_block, (p, g.id)) for g in p.groups]
        for name, function, args in wanted:
            if name not in pieces[i]:
                captures.append(_ray.Task(f"capture {prefix}{name}", function, args))
                owners.append((i, name))
    if fork is not None and not _fork_pays(len(captures), sum(s.size for s in todo if not s.link_target)):
        fork.close()
        fork = None
    remote = ray.spans_other_machines()  # a Ray this export may still start runs here alone
    file_shards = [s for s in todo if not s.from_memory and not s.link_target]
    writes = [
        _ray.Task(f"write {s.file}", write_shard, (s, [entries[n] for n in s.tensors], out), io_bound=True)
        for s in file_shards
    ]
    progress = _Progress(len(captures), sum(s.size for s in plan.shards))
    lock = threading.Lock()

    def finished(result) -> None:
        with lock:
            progress.done(result)
            if journal and isinstance(result, ShardResult):
                journal.record(result)

    local_tasks = [] if remote else writes
    local_tasks += [
        _ray.Task(
            f"write {s.file}",
            write_shard,
            (s, [entries[n] for n in s.tensors], out, {n: memory[n] for n in s.tensors}),
        )
        for s in todo
        if s.from_memory
    ]
    local_tasks += [_ray.Task(f"link {s.file}", link_shard, (s, out)) for s in todo if s.link_target]
    threads = min(IO_TASKS_PER_SLOT * (workers or os.cpu_count() or 1), MAX_WRITER_THREADS)
    # While pieces are captured, the captures are the critical path: the writers (hashing) yield.
    nice = WRITER_NICENESS if captures else 0
    with (
        _LocalWork(max(1, min(threads, len(local_tasks))), finished, nice) as local,
        _CapturesHere(captures, finished, run=not ray.joins, fork=fork) as here,
    ):
        for task in local_tasks:
            local.submit(task)
        # Ray takes captures on a cluster, and here when its workers add cores to more pieces
        # than the hands here capture faster alone.
        hands = 1 + (fork is not None)
        shared = ray.joins or (len(captures) > CAPTURES_PER_HAND * hands and (os.cpu_count() or 1) > hands)
        if shared and not ray.joins:
            ray.start_soon(nice=RAY_START_NICENESS)
            while here.pending() and not ray.wait_up(0.05):
                pass
        remote_captures = captures if shared and here.pending() else []
        if remote_captures:
            ray.ensure()  # the shards are being written meanwhile
        remote_tasks = remote_captures + (writes if remote else [])
        results = (
            _ray.run_tasks(
                remote_tasks,
                max_in_flight=workers,
                on_done=lambda task, result: finished(result),
                cpus_per_task=cpus_per_task,
                claim=here.claim,
            )
            if remote_tasks
            else []
        )
        captured = here.merged(results[: len(remote_captures)])
        if fork is not None:
            fork.close()  # its memory is not held through stitching and verification
        local_results = local.results()
    for (i, name), piece in zip(owners, captured):
        pieces[i][name] = piece
        if keys[i] is not None:
            cache.put(keys[i][name], piece)
    programs = [
        (
            pieces[i]["trunk"],
            {g.id: pieces[i][g.function_name] for g in p.groups},
            _cache_account(cache, keys[i], {name for owner, name in owners if owner == i}, p),
        )
        for i, p in enumerate(plans)
    ]
    shard_results = dict(done) | {r.file: r for r in [*results[len(remote_captures) :], *local_results]}
    return programs, [shard_results[s.file] for s in plan.shards]


def _fork_pays(captures: int, stream_bytes: int) -> bool:
    """Whether the capture fork shortens this export: two pieces or more to capture, and a core
    for it that the weight stream (`stream_bytes` to copy and hash) does not need. On 2 cores
    two capture processes leave the writers (niced) next to nothing: a stream of more than
    `FORK_MAX_STREAM_BYTES` is then the critical path, and the fork lengthens it."""
    cores = os.cpu_count() or 1
    return captures > 1 and (cores > 2 or (cores == 2 and stream_bytes <= FORK_MAX_STREAM_BYTES))


def _cache_account(cache, keys: dict[str, str] | None, captured: set[str], plan: Plan) -> dict:
    """What the manifest records of the capture cache: where it is, and which pieces came from it."""
    if cache is None:
        return {"directory": None, "hits": [], "misses": []}
    if keys is None:
        return {"directory": cache.directory, "hits": [], "misses": [], "skipped": "source not cacheable"}
    names = ["trunk", *(g.function_name for g in plan.groups)]
    return {
        "directory": cache.directory,
        "hits": [n for n in names if n not in captured],
        "misses": [n for n in names if n in captured],
    }


class _LocalWork:
    """Tasks run by threads of this process, recorded in the timeline like Ray tasks (on the
    coordinator's row); `on_done` gets each result as it finishes, in the finishing thread."""

    def __init__(self, threads: int, on_done, nice: int = 0) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(
            threads,
            thread_name_prefix="shardex-local",
            initializer=_ray.lower_thread_priority,
            initargs=(nice,),
        )
        self.on_done = on_done
        self.sinks = _ray.active_recordings()
        self.futures: list[concurrent.futures.Future] = []
        self.callback_errors: list[BaseException] = []

    def __enter__(self) -> _LocalWork:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, task: _ray.Task) -> None:
        future = self.pool.submit(_ray.run_recorded, task, self.sinks)
        future.add_done_callback(self._done)
        self.futures.append(future)

    def _done(self, future: concurrent.futures.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        try:
            self.on_done(future.result())
        except BaseException as e:  # e.g. the journal cannot be written: raised by results()
            self.callback_errors.append(e)

    def results(self) -> list:
        """Every task's result in submission order; the first failure is raised."""
        results = [future.result() for future in self.futures]
        if self.callback_errors:
            raise self.callback_errors[0]
        return results


class _CapturesHere:
    """Captures this process runs itself while a local Ray starts: the coordinator has torch,
    torch.onnx and the model's code imported and warm, where a fresh Ray worker first spends
    seconds starting and importing them. A `CaptureFork` (forked at the export's start, warmed
    up while this process plans) is a second hand here. Each capture is taken once, by the next
    free hand: this thread, the fork, or Ray through `claim` once a worker slot is free (see
    DESIGN.md, "Who captures")."""

    def __init__(
        self, tasks: list[_ray.Task], on_done, *, run: bool, fork: CaptureFork | None = None
    ) -> None:
        """`run`: whether this process captures at all (not on a cluster: all go to `claim`)."""
        self.tasks = tasks
        self.on_done = on_done
        self.results: list = [None] * len(tasks)
        self.free = list(range(len(tasks)))
        self.lock = threading.Lock()
        self.sinks = _ray.active_recordings()
        self.pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="shardex-capture")
        hands = ([fork] if fork is not None else []) + [None]  # None: this process
        self.futures = [self.pool.submit(self._run, hand) for hand in hands] if run and tasks else []

    def __enter__(self) -> _CapturesHere:
        return self

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.free.clear()  # an export that failed elsewhere starts no further capture here
        self.pool.shutdown(wait=True)

    def pending(self) -> bool:
        """Whether a capture is still untaken."""
        with self.lock:
            return bool(self.free)

    def claim(self, index: int) -> bool:
        """Take capture `index` for Ray, unless a hand here took it already. Ray's task list
        starts with the captures: a later index (a shard write) is not one of them."""
        if index >= len(self.tasks):
            return True
        with self.lock:
            if index in self.free:
                self.free.remove(index)
                return True
            return False

    def merged(self, remote: list) -> list:
        """Every capture's piece, from here or from Ray (`remote`: None where a hand here took
        it); a capture that failed here raises."""
        for future in self.futures:
            future.result()
        remote = remote or [None] * len(self.results)
        return [mine if mine is not None else theirs for mine, theirs in zip(self.results, remote)]

    def _run(self, fork: CaptureFork | None) -> None:
        """Take free captures until none is left. The fork takes them from the front (the trunk,
        the largest, first: it is warm by the time planning ends), this thread from the back.
        A capture the fork cannot take is run here, and the fork is used no further."""
        while True:
            with self.lock:
                if not self.free:
                    return
                index = self.free.pop(0 if fork is not None else -1)
            task = self.tasks[index]
            result = fork.run(task, self.sinks) if fork is not None else FORK_LOST
            if result is FORK_LOST:
                fork = None
                result = _ray.run_recorded(task, self.sinks)
            self.results[index] = result
            self.on_done(result)


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


def _verify(
    plan,
    memory,
    out,
    program: ir.Model,
    atol,
    rtol,
    workers,
    cpus_per_task=1,
    new_tokens: int = 0,
    inline=False,
    beside_onnx: Callable[[], None] | None = None,
) -> VerificationReport:
    """Reference run here (streamed), then ``model.onnx`` as saved in ONNX Runtime, and one
    check per block. A generation export with `new_tokens` is verified by decoding through its
    cache (`_generation`): PyTorch's one pass over a prompt and fed tokens is the reference of
    every check. Otherwise the reference is one pass on the verification inputs. On one machine
    the block checks ride on ONNX Runtime's pass (a block is checked on what it computed there,
    `chained_block_check`), so every weight is read and upcast once for ONNX Runtime; on a cluster, or for an inlined
    ``model.onnx`` (no block calls), they are tasks of their own, spread over the nodes.
    `program` is the stitched model in function form (before any inlining): those tasks call
    its functions."""
    start = time.perf_counter()
    compute = compute_dtype(plan)
    atol_, rtol_ = tolerances(compute, atol, rtol)
    promote = needs_promotion(plan)
    inputs = plan.example.resized(VERIFY_GROWTH)  # other sizes than the capture's: dynamic axes are exercised
    riding = not inline and _ray.node_count() == 1
    decode = bool(new_tokens) and plan.task == TEXT_GENERATION_WITH_PAST
    try:
        if decode:
            logger.info("verify: PyTorch on a prompt and %d fed token(s), block by block", new_tokens - 1)
            generation = reference_generation(plan, memory, inputs, new_tokens)
            recorded, shapes = generation.boundaries, generation.input_shapes
        else:
            logger.info("verify: running the PyTorch reference block by block")
            reference = reference_run(plan, memory, inputs)
            recorded, shapes = reference.boundaries, [list(t.shape) for t in inputs.flat_tensors()]
    except ShardexError:
        raise
    except Exception as e:  # the model's own code failed on the verification inputs
        first = (str(e).strip().splitlines() or [""])[0]
        raise ShardexError(f"the PyTorch reference run failed: {type(e).__name__}: {first}") from e
    block_tasks = [] if riding else _block_tasks(plan, program, recorded, promote, out, atol_, rtol_)
    boundaries = recorded if riding else {}
    and_blocks = " and blocks" if riding else ""
    if decode:
        args = (plan, out, generation, atol_, rtol_, promote, boundaries)
        saved = _ray.Task("verify global, generation" + and_blocks, verify_saved_model, args, gpu=True)
    else:
        args = (plan, out, inputs, reference.outputs, atol_, rtol_, promote, None, boundaries)
        saved = _ray.Task("verify global" + and_blocks, verify_global, args, gpu=True)
    logger.info("verify: ONNX Runtime on %s (%s)", plan.model_file, saved.label.removeprefix("verify "))
    if beside_onnx is not None:
        beside_onnx()
    results = _ray.run_tasks(
        [saved, *block_tasks], max_in_flight=workers, on_done=_log_verified, cpus_per_task=cpus_per_task
    )
    global_checks, *rest = results[0]
    generation_check = rest[0] if decode else None
    blocks = [check for checks in [rest[-1], *results[1:]] for check in checks]
    runtime = (
        f"{plan.model_file} as saved in ONNX Runtime {providers()[0]}, PyTorch on {reference_device().type}"
    )
    method = f"float32-promoted graph, {runtime}" if promote else runtime
    report = VerificationReport(
        method, dtype_name(compute), shapes, global_checks, blocks, generation=generation_check
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


def _block_tasks(plan: Plan, program: ir.Model, boundaries: dict, promote: bool, out, atol, rtol) -> list:
    """The block checks as tasks of their own: a group's members in as many tasks as there are
    nodes (a cluster shares them), each block a session of one call of `program` (a private,
    promoted copy of it where the export is bf16/fp16)."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(program))
    segments = block_segments(copy, [p for g in plan.groups for p in g.members], promote)
    return [
        _ray.Task(
            f"verify {g.function_name}" + (f" {members[0]}..{members[-1]}" if chunks > 1 else ""),
            verify_block_group,
            ({p: segments[p] for p in members}, {p: boundaries[p] for p in members}, out, atol, rtol),
            gpu=True,
        )
        for g in plan.groups
        for chunks in [min(len(g.members), _ray.node_count())]
        for members in _split(g.members, chunks)
    ]


def _split(items: list, parts: int) -> list[list]:
    """`items` in `parts` consecutive runs of (nearly) equal length."""
    size = -(-len(items) // parts)
    return [items[i : i + size] for i in range(0, len(items), size)]


def _log_verified(task: _ray.Task, checks) -> None:
    """Progress on the driver: workers' own logs do not reach it."""
    if isinstance(checks, tuple):  # the saved model's: output checks, [generation check,] block checks
        checks = [c for part in checks for c in (part if isinstance(part, list) else part.checks())]
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
    if plan.source.kind != "hf" or not uses_cache(plan.task):
        return []
    if plan.component:  # Optimum's encoder-decoder layout; onnxruntime-genai does not run these
        return write_runtime_files(out, plan.source.location, io=None)
    inputs = dict(zip(plan.input_names, plan.example.flat_tensors()))
    keys = [t for name, t in inputs.items() if name.startswith("past_key_values.") and name.endswith(".key")]
    if not keys:  # a state-space model's recurrent state: onnxruntime-genai runs no such model
        return []
    fused = any(
        node.op_type == "GroupQueryAttention"
        for graph in [model.graph, *model.functions.values()]
        for node in ir.traversal.RecursiveGraphIterator(graph)
    )
    with open(os.path.join(plan.source.location, "config.json")) as f:
        config = json.load(f)
    text = {**config, **(config.get("text_config") or {})}
    if not any(text.get(k) for k in CONTEXT_LENGTH_KEYS):  # e.g. ALiBi models (BLOOM) name none
        logger.warning(
            "config.json names no context length; genai_config.json gets %d (edit its context_length "
            "and search.max_length to change it)",
            DEFAULT_CONTEXT_LENGTH,
        )
        config["max_position_embeddings"] = DEFAULT_CONTEXT_LENGTH
    io = RuntimeIO.from_config(
        config, fused_attention=fused, inputs=tuple(n for n in TOKEN_INPUTS if n in inputs)
    )
    io = dataclasses.replace(
        io, num_layers=len(keys), num_kv_heads=keys[0].shape[1], head_dim=keys[0].shape[3]
    )
    return write_runtime_files(out, plan.source.location, io=io)

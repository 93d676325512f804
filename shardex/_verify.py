"""Stage 6, verify: the exported program against PyTorch, globally and block by block.

The PyTorch reference streams: the trunk's weights are loaded, and each block's weights are
loaded just before it runs and dropped after, so memory is about the trunk plus one block. The
same run records every block's boundary tensors; each block's ONNX function is then run in ONNX
Runtime on exactly those inputs, so a mismatch is pinned to one block.

ONNX Runtime runs the files as saved: its sessions get the external-data references written in
``model.onnx`` and resolve them in the shards themselves, as one session on the file or, for a
model larger than the session budget, as segments (a block's segment also runs its check).

Low precision on CPU: ONNX Runtime's CPU provider lacks bf16 (and much fp16) kernels. Such
exports are verified as a *float32-promoted* copy of the graph: every bf16/fp16 type, cast and
constant becomes float32, and every stored weight is upcast exactly (bf16 and fp16 are subsets
of fp32), by shardex, from the bytes at the file's references (`_Upcasts`); the reference is
PyTorch in float32 with the same rounded weights. This proves the graph's structure and every
stored weight bit; it does not measure the rounding a native low-precision runtime would add.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from shardex._conversions import read_source
from shardex._dtypes import LOW_PRECISION, SAFETENSORS_TO_TORCH, dtype_name
from shardex._output import MODEL_FILE, file_in
from shardex._plan import BlockGroup, ExampleInputs, Plan, export_state
from shardex._source import MappedRows, TensorLocation, named_tensors, read_tensor
from shardex._stitch import BLOCK_DOMAIN
from shardex._tasks import BlockStandIn, call_block, merge_cache, split_cache

logger = logging.getLogger("shardex")

LOW_ONNX_TYPES = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)

# compute dtype -> (atol, rtol); an element passes when |actual - expected| <= atol + rtol * |expected|
DEFAULT_TOLERANCES = {
    "float64": (1e-7, 1e-7),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


@dataclasses.dataclass
class CheckResult:
    """One comparison: a model output or a block (its worst output)."""

    name: str
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float
    passed: bool
    error: str | None = None  # why ONNX Runtime could not run the check at all


@dataclasses.dataclass
class VerificationReport:
    method: str
    compute_dtype: str
    input_shapes: list[list[int]]
    outputs: list[CheckResult]
    blocks: list[CheckResult]
    seconds: float = 0.0
    # files of the export (shards, model.onnx) whose digest differs from the manifest's
    shard_hash_mismatches: list[str] = dataclasses.field(default_factory=list)
    generation: Any = None  # a `_generation.GenerationCheck` for generation exports

    @property
    def checks(self) -> list[CheckResult]:
        generation = self.generation.checks() if self.generation is not None else []
        return [*self.outputs, *self.blocks, *generation]

    @property
    def passed(self) -> bool:
        return not self.shard_hash_mismatches and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict:
        generation = self.generation.to_json() if self.generation is not None else None
        return dataclasses.asdict(self) | {"passed": self.passed, "generation": generation}


def compute_dtype(plan: Plan) -> torch.dtype:
    """float32 where the export holds low-precision tensors (CPU promotion), else float32 too
    unless the model is float64."""
    dtypes = {t.dtype for t in plan.tensors}
    return torch.float64 if dtypes == {"float64"} else torch.float32


def needs_promotion(plan: Plan) -> bool:
    return any(getattr(torch, t.dtype) in LOW_PRECISION for t in plan.tensors)


def tolerances(compute: torch.dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    default_atol, default_rtol = DEFAULT_TOLERANCES[dtype_name(compute)]
    return (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)


# --- PyTorch reference -------------------------------------------------------------------


@dataclasses.dataclass
class ReferenceRun:
    outputs: list[np.ndarray]
    boundaries: dict[str, tuple[list[np.ndarray], list[np.ndarray]]]  # path -> (inputs, outputs)


def reference_device() -> torch.device:
    """CUDA where this process sees a GPU (the coordinator on a GPU node), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# A 2-D weight of at least this many bytes (as exported) is streamed by the CPU reference: read
# from the checkpoint where it is used, rows at a time (`_StreamedWeight`).
STREAM_MIN_BYTES = 1 << 20
# Rows of a streamed weight converted to the compute dtype at once: they stay in the CPU's cache
# between the conversion and the matrix product, which reads them from there.
STREAM_CHUNK_BYTES = 4 << 20
# An embedding lookup of more distinct rows than this reads the whole table (stored dtype).
STREAM_MAX_LOOKUP_ROWS = 4096


class _WeightLoader:
    """Loads a tensor from the source, rounded through its export dtype, in the compute dtype.

    On the CPU, large 2-D weights are not loaded at all: `weight` gives a `_StreamedWeight`,
    whose rows are taken from the checkpoint's pages (`MappedRows`) where a matrix product or
    an embedding lookup uses them, a few MB at a time, converted to the compute dtype in a buffer
    that stays in cache. Nothing of the size of a block (or of the LM head) is held, and the
    weights cross memory once per forward instead of being read, upcast to a float32 copy and
    read again. Any other use of such a weight gets its whole value (`load`).

    Other block weights are loaded for every call of their block: `load(..., pooled=True)`
    fills buffers taken from a pool, which `release` gives back once the block has run. Blocks
    of a group have the same shapes, so after the first block no buffer is allocated, zeroed or
    faulted in again (fresh multi-GB allocations per forward cost more than the reads)."""

    def __init__(
        self, plan: Plan, memory: dict[str, torch.Tensor], compute: torch.dtype, device: torch.device
    ) -> None:
        self.plan = plan
        self.memory = memory
        self.compute = compute
        self.device = device
        self.pool: dict[tuple, list[torch.Tensor]] = {}
        self.scratch: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.mapped = MappedRows()

    def weight(self, name: str, *, pooled: bool = False) -> torch.Tensor:
        """The tensor `name` as the reference's model gets it: streamed where it can be, else
        loaded (`load`)."""
        entry = self.plan.entry(name)
        source = entry.source
        if (
            self.device.type == "cpu"
            and isinstance(source, TensorLocation)
            and len(entry.shape) == 2
            and tuple(source.shape) == tuple(entry.shape)
            and getattr(torch, entry.dtype).is_floating_point
            and SAFETENSORS_TO_TORCH[source.dtype].is_floating_point
            and source.nbytes >= STREAM_MIN_BYTES
        ):
            return _StreamedWeight(entry, self)
        return self.load(name, pooled=pooled)

    def load(self, name: str, *, pooled: bool = False) -> torch.Tensor:
        entry = self.plan.entry(name)
        dtype = getattr(torch, entry.dtype)
        if entry.source is None:
            tensor = self.memory[entry.name].detach()
        elif pooled and isinstance(entry.source, TensorLocation):
            stored = SAFETENSORS_TO_TORCH[entry.source.dtype]
            raw = read_tensor(entry.source, self._take(entry.source.shape, stored, torch.device("cpu")))
            tensor = raw.to(dtype)
            self.release([raw])
        else:
            tensor = read_source(entry.source, dtype)
        tensor = tensor.to(self.device, dtype)
        if not tensor.is_floating_point():
            return tensor
        if not pooled:
            return tensor.to(self.compute)
        return self._take(tensor.shape, self.compute, self.device).copy_(tensor)

    def release(self, tensors) -> None:
        """Give pooled tensors back once nothing uses them."""
        for t in tensors:
            self.pool.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)

    def _take(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self.pool.get((tuple(shape), dtype, device))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=device)

    # --- streamed weights ----------------------------------------------------------------

    def linear(self, entry, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` with the weight's rows streamed in cache-sized chunks."""
        rows, cols = entry.shape
        flat = x.reshape(-1, cols)
        out = torch.empty((flat.shape[0], rows), dtype=self.compute)
        step = max(1, STREAM_CHUNK_BYTES // (cols * out.element_size()))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            out[:, start:stop] = torch.mm(flat, self._rows(entry, start, stop, "linear").t())
        if bias is not None:
            out += bias
        return out.reshape(*x.shape[:-1], rows)

    def embedding(self, entry, ids: torch.Tensor) -> torch.Tensor | None:
        """``F.embedding(ids, weight)`` reading only the rows looked up; None where that is not
        worth it (many distinct ids) or an id is out of range (the caller then loads it all)."""
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        if not unique.numel() or unique.numel() > STREAM_MAX_LOOKUP_ROWS:
            return None
        if int(unique[0]) < 0 or int(unique[-1]) >= entry.shape[0]:
            return None
        table = torch.empty((unique.numel(), entry.shape[1]), dtype=self.compute)
        for row, index in enumerate(unique.tolist()):
            table[row] = self._rows(entry, index, index + 1, "embedding")[0]
        return table[inverse].reshape(*ids.shape, entry.shape[1])

    def _rows(self, entry, start: int, stop: int, use: str) -> torch.Tensor:
        """Rows `start:stop` of a streamed weight in the compute dtype, rounded through its export
        dtype, in a scratch buffer of `use` (valid until its next call)."""
        source, export = entry.source, getattr(torch, entry.dtype)
        stored = SAFETENSORS_TO_TORCH[source.dtype]
        count = (stop - start) * entry.shape[1]
        with self.mapped.rows(source, start, stop) as raw:
            if export != stored:
                raw = raw.to(export)
            return self._scratch(use, count, self.compute)[:count].view(raw.shape).copy_(raw)

    def _scratch(self, use: str, count: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.scratch.get((use, dtype))
        if buffer is None or buffer.numel() < count:
            buffer = self.scratch[(use, dtype)] = torch.empty(count, dtype=dtype)
        return buffer


# What a `_StreamedWeight` answers itself, without reading its data.
_METADATA = {
    "shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_cuda", "is_meta", "is_sparse",
    "is_quantized", "is_nested", "is_mkldnn", "is_floating_point", "is_complex", "size", "dim",
    "numel", "nelement", "element_size", "__len__", "grad", "grad_fn", "is_leaf", "names", "_is_view",
}  # fmt: skip


def _function_name(func) -> str:
    name = getattr(func, "__name__", "")
    return getattr(getattr(func, "__self__", None), "__name__", name) if name == "__get__" else name


class _StreamedWeight(torch.Tensor):
    """A large 2-D weight of the CPU reference, as the model's code sees it (its shape, the
    compute dtype) with no data: ``F.linear`` and ``F.embedding`` read its rows where they use
    them (`_WeightLoader.linear`/`embedding`); any other operation gets the loaded tensor."""

    @staticmethod
    def __new__(cls, entry, loader: _WeightLoader):
        return torch.Tensor._make_wrapper_subclass(
            cls, entry.shape, dtype=loader.compute, device=loader.device, requires_grad=False
        )

    def __init__(self, entry, loader: _WeightLoader) -> None:
        self.entry = entry
        self.loader = loader

    def __repr__(self) -> str:
        return f"_StreamedWeight({self.entry.name}, {list(self.shape)})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not kwargs and 2 <= len(args) <= 3:
            x, weight, bias = (*args, None)[:3]
            if type(weight) is cls and isinstance(x, torch.Tensor) and type(x) is not cls:
                if x.dtype == weight.dtype and x.device.type == "cpu" and type(bias) is not cls:
                    return weight.loader.linear(weight.entry, x, bias)
        elif func is F.embedding and len(args) >= 2 and type(args[1]) is cls and type(args[0]) is not cls:
            ids, weight = args[:2]
            if kwargs.get("max_norm", args[3] if len(args) > 3 else None) is None:
                looked_up = weight.loader.embedding(weight.entry, ids)
                if looked_up is not None:
                    return looked_up
        elif _function_name(func) in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = pytree.tree_map_only(cls, cls._load, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args, kwargs = pytree.tree_map_only(cls, cls._load, (args, kwargs or {}))
        return func(*args, **kwargs)

    def _load(self) -> torch.Tensor:
        return self.loader.load(self.entry.name)


class _StreamedBlock(BlockStandIn, nn.Module):
    """Runs a meta block with weights loaded for this call only; records its boundary in hole
    form (its layer of the KV cache among the inputs and outputs), as the ONNX function sees it."""

    def __init__(
        self, path: str, block: nn.Module, group: BlockGroup, loader: _WeightLoader, record: dict, layer: int
    ) -> None:
        super().__init__()
        self.path = path
        self.block = block
        object.__setattr__(self, "_block", block)  # attributes the model reads off its blocks
        self.group = group
        self.loader = loader
        self.record = record
        self.layer = layer

    def forward(self, *args, **kwargs):
        weights = {n: self.loader.weight(f"{self.path}.{n}", pooled=True) for n in self.group.weight_names}
        args, kwargs, cache = split_cache(args, kwargs, self.layer)
        output = call_block(
            lambda *a, **k: torch.func.functional_call(self.block, weights, a, k), args, kwargs
        )
        self.loader.release(
            t for t in weights.values() if type(t) is not _StreamedWeight and t.is_floating_point()
        )
        if self.record is not None:
            self.record[self.path] = (_flat_numpy((args, kwargs)), _flat_numpy(output))
        return merge_cache(output, cache, self.layer)


def _flat_numpy(tree) -> list[np.ndarray]:
    return [_to_numpy(x) for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """NumPy has no bfloat16: such tensors come out as (exactly upcast) float32."""
    t = t.detach().cpu().contiguous()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()


class StreamedReference:
    """The PyTorch model on meta, trunk weights loaded, each block loading its weights only
    while it runs (memory ~ trunk + one block); callable any number of times. With `record`,
    the last call's block boundaries (hole form) are in `boundaries`."""

    def __init__(self, plan: Plan, memory: dict[str, torch.Tensor], *, record: bool = True) -> None:
        self.compute = compute_dtype(plan)
        self.device = reference_device()
        loader = _WeightLoader(plan, memory, self.compute, self.device)
        self.model = plan.build_model(self.compute)
        holes = set(plan.hole_paths)
        self.boundaries: dict | None = {} if record else None
        for group in plan.groups:
            for path in group.members:
                block = _StreamedBlock(
                    path,
                    self.model.get_submodule(path),
                    group,
                    loader,
                    self.boundaries,
                    plan.cache_layers.get(path, 0),
                )
                self.model.set_submodule(path, block)
        loaded: dict[str, torch.Tensor] = {}  # by canonical name: tied aliases share one tensor
        self.state = {}
        for name, _ in named_tensors(self.model, remove_duplicate=False):
            if not any(name.startswith(h + ".") for h in holes):
                canonical = plan.entry(name).name
                if canonical not in loaded:
                    loaded[canonical] = loader.weight(canonical)
                self.state[name] = loaded[canonical]

    def __call__(self, args: tuple, kwargs: dict):
        """The model's output on `args`/`kwargs` (floating inputs cast to the compute dtype)."""

        def to_device(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, self.compute) if t.is_floating_point() else t.to(self.device)

        args, kwargs = pytree.tree_map_only(torch.Tensor, to_device, (args, kwargs))
        with torch.no_grad(), export_state():
            return torch.func.functional_call(self.model, self.state, args, kwargs)


def reference_run(plan: Plan, memory: dict[str, torch.Tensor], inputs: ExampleInputs) -> ReferenceRun:
    """Run the PyTorch model on `inputs`, streaming block weights (memory ~ trunk + one block)."""
    reference = StreamedReference(plan, memory)
    output = reference(inputs.args, inputs.kwargs)
    run = ReferenceRun(_flat_numpy(output), reference.boundaries)
    del reference, output
    release_freed_memory()
    return run


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``). A forward's
    many activations and an ONNX Runtime session's buffers are freed into the heap, which glibc
    keeps: 0.4 GB of the coordinator's 0.8 GB after the 6.7B reference run was such free heap."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own libc (no lookup: that forks)
    except (OSError, AttributeError):  # not glibc
        pass


# --- ONNX side -----------------------------------------------------------------------------


def _promote_graph(graph: ir.Graph | ir.Function) -> None:
    for value in graph.inputs:
        _promote_value(value)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):  # a Scan's body
                for subgraph in attr.value if attr.type == ir.AttributeType.GRAPHS else [attr.value]:
                    for value in subgraph.inputs:
                        _promote_value(value)
            elif (
                attr.name in ("to", "dtype")
                and attr.type == ir.AttributeType.INT
                and attr.value in LOW_ONNX_TYPES
            ):
                node.attributes[attr.name] = ir.AttrInt64(attr.name, ir.DataType.FLOAT)
            elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype in LOW_ONNX_TYPES:
                array = attr.value.numpy().astype(np.float32)
                node.attributes[attr.name] = ir.AttrTensor(attr.name, ir.tensor(array, name=attr.value.name))
        for value in node.outputs:
            _promote_value(value)


def _promote_value(value: ir.Value) -> None:
    if value.dtype in LOW_ONNX_TYPES and value.const_value is None:
        value.dtype = ir.DataType.FLOAT


def session(
    model: str | bytes,
    weights_dir: str | None = None,
    *,
    basic: bool = False,
    initializers: dict[str, torch.Tensor] | None = None,
):
    """An ONNX Runtime session on a model file, or on model bytes whose external data ONNX
    Runtime resolves itself, relative to `weights_dir` (with its own checks: no absolute path,
    nothing outside the directory, offsets inside the file). `basic`: only ONNX Runtime's basic
    graph optimizations (constant folding, no fusions): a session run once opens faster.

    Threads: as many as the Ray task was given (Ray sets ``OMP_NUM_THREADS`` in its workers),
    not spinning while idle: the checks share the cores with the PyTorch reference, and a
    spinning or oversubscribed pool stalls both."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        options.intra_op_num_threads = int(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if basic:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # Prepacking copies every MatMul weight into new buffers: twice the model in memory.
    options.add_session_config_entry("session.disable_prepacking", "1")
    if weights_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", weights_dir)
    buffers = list((initializers or {}).values())
    values = {name: ort.OrtValue.ortvalue_from_numpy(t.numpy()) for name, t in (initializers or {}).items()}
    for name, value in values.items():
        options.add_initializer(name, value)
    sess = ort.InferenceSession(model, options, providers=providers())
    sess.shardex_buffers, sess.shardex_values = buffers, values  # used in place: they live with it
    return sess


SESSION_BUDGET_CAP = 1 << 30  # resident weight bytes of one session: more is no faster, only bigger


def session_budget() -> int:
    """Resident weight bytes one verification session may hold: a quarter of this node's free
    memory, at most `SESSION_BUDGET_CAP`. A larger model runs as segments, each loaded once
    however many runs (generation steps) go through it, so the cap costs no time."""
    import psutil

    return min(psutil.virtual_memory().available // 4, SESSION_BUDGET_CAP)


def providers() -> list[str]:
    """ONNX Runtime's CUDA provider where a GPU is visible and the build has it, else CPU only
    (asking for CUDA without a GPU makes onnxruntime-gpu warn on every session)."""
    import onnxruntime as ort

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def compare(name: str, actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> CheckResult:
    """Element-wise |actual - expected| <= atol' + rtol·|expected|, where atol' is `atol` times
    the largest |expected| of the tensor when that exceeds 1 (the result's `atol` is atol').
    Float32 rounding grows with the magnitudes summed into an element, not with the element:
    a near-zero element of a wide layer's output (hidden 4096, 11008-long sums, random weights)
    differed by 1.44e-4 after ONNX Runtime's reordered sums. A wrong weight or mask still
    differs by the order of the outputs themselves."""
    if actual.shape != expected.shape:
        logger.error("%s: shape %s differs from PyTorch's %s", name, actual.shape, expected.shape)
        return CheckResult(name, float("inf"), float("inf"), atol, rtol, False)
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    diff = np.abs(a - e)
    both_nan = np.isnan(a) & np.isnan(e)
    diff = np.where(both_nan, 0.0, diff)
    max_abs = float(np.nanmax(diff, initial=0.0)) if not np.isnan(diff).any() else float("inf")
    max_rel = float(np.max(diff / np.maximum(np.abs(e), 1e-12), initial=0.0)) if diff.size else 0.0
    finite = np.abs(e[np.isfinite(e)])
    scaled_atol = atol * max(1.0, float(finite.max()) if finite.size else 1.0)
    passed = bool(np.all(diff <= scaled_atol + rtol * np.abs(e)))
    return CheckResult(name, max_abs, max_rel, scaled_atol, rtol, passed)


@dataclasses.dataclass
class Step:
    """One run of the saved model: its `feeds`, plus inputs taken from the previous step's
    outputs (`carried`: input name -> output name, e.g. a KV cache's past from its present)."""

    feeds: dict[str, np.ndarray]
    carried: dict[str, str] = dataclasses.field(default_factory=dict)
    outputs: list[str] | None = None  # the outputs to return (default: all)


def verify_global(
    plan: Plan,
    output_dir: str,
    inputs: ExampleInputs,
    reference: list[np.ndarray],
    atol: float,
    rtol: float,
    promote: bool,
    max_session_bytes: int | None = None,
    boundaries: dict | None = None,
) -> tuple[list[CheckResult], list[CheckResult]]:
    """Run ``model.onnx`` as saved in ONNX Runtime and compare its outputs with PyTorch's; with
    `boundaries` (path -> a block's recorded PyTorch inputs and outputs), also check those
    blocks in the same pass (`SavedModelRunner`). Returns the output checks and block checks.

    ONNX Runtime itself resolves the file's external-data references (location, offset,
    length), except a promoted graph's bf16/fp16 weights, which shardex reads at those
    references and upcasts for it (`_Upcasts`). When the weights fit `max_session_bytes` (default
    `session_budget()`), one session runs the whole file (a float32-promoted copy of it where
    the export is bf16/fp16, its initializers still references into the shards). Otherwise the
    main graph runs in order as segments of at most that many resident weight bytes, each a
    small model whose initializers are the file's own references; every tensor is loaded at
    least once and memory stays about one segment's weights plus the activations. A flat
    (inlined) graph is run as written, like one with block functions.
    """
    boundaries = boundaries or {}
    runner = SavedModelRunner(
        output_dir, promote, max_session_bytes, model_file=plan.model_file, block_paths=list(boundaries)
    )
    try:
        chained = chained_block_check(boundaries, atol, rtol)
        (outputs,), blocks = runner.run([global_step(runner, inputs, promote)], boundaries, chained)
    except Exception as e:  # ONNX Runtime's errors are plain Exceptions
        return [runtime_failure(f"{plan.model_file} in {output_dir}", e, atol, rtol)], []
    return global_checks(runner, outputs, reference, atol, rtol), block_checks(blocks, boundaries, atol, rtol)


def global_step(runner: SavedModelRunner, inputs: ExampleInputs, promote: bool) -> Step:
    """The global check's run: the verification inputs (float32 where the graph was promoted)."""
    tensors = inputs.flat_tensors()
    if promote:  # the promoted graph takes float32 where the export takes bf16/fp16
        tensors = [t.float() if t.dtype in LOW_PRECISION else t for t in tensors]
    return Step({name: _to_numpy(t) for name, t in zip(runner.input_names, tensors)})


def global_checks(
    runner: SavedModelRunner, outputs: dict[str, np.ndarray], reference: list[np.ndarray], atol, rtol
) -> list[CheckResult]:
    """ONNX Runtime's outputs of the global step against PyTorch's, one check per output."""
    if len(outputs) != len(reference):
        return [
            CheckResult(
                f"outputs ({len(outputs)} vs PyTorch's {len(reference)})",
                float("inf"),
                float("inf"),
                atol,
                rtol,
                False,
            )
        ]
    return [compare(f"output:{n}", outputs[n], e, atol, rtol) for n, e in zip(runner.output_names, reference)]


class SavedModelRunner:
    """``model.onnx`` as saved, in ONNX Runtime: one session on the file when its weights fit
    `max_session_bytes` (default `session_budget()`) and no promotion is needed, else the main
    graph in segments (`_SegmentedRunner`). `run` runs several steps in one pass over the
    weights and checks the blocks named in `block_paths` on their recorded PyTorch inputs: in
    the same pass where the graph runs in segments (each block call is then a segment of its
    own), else after the steps, one small session per block."""

    def __init__(
        self,
        output_dir: str,
        promote: bool,
        max_session_bytes: int | None = None,
        *,
        model_file: str = MODEL_FILE,
        block_paths: list[str] = (),
    ) -> None:
        path = os.path.join(output_dir, model_file)
        model = ir.load(path)  # initializers stay references into the shards
        self.input_names = [v.name for v in model.graph.inputs]
        self.output_names = [v.name for v in model.graph.outputs]
        budget = session_budget() if max_session_bytes is None else max_session_bytes
        weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if _is_external(v))
        self.upcasts = _Upcasts(output_dir)
        if weights <= budget and not promote:
            self.path, self.segments = path, None
            self.blocks = block_segments(model, block_paths, promote=False)
        else:
            self.path, self.blocks = None, {}
            self.segments = _SegmentedRunner(
                model, output_dir, promote, budget, set(block_paths), self.upcasts
            )

    def run_steps(self, steps: list[Step]) -> list[dict[str, np.ndarray]]:
        return self.run(steps, {})[0]

    def run(
        self, steps: list[Step], boundaries: dict, chained: ChainedCheck | None = None
    ) -> tuple[list[dict[str, np.ndarray]], dict]:
        """Every step's outputs by name, steps in order (a step's carried inputs come from the
        one before; each session is opened once for all the steps), and each checked block's
        outputs on its recorded inputs (`boundaries`: path -> (inputs, outputs)), or the error
        ONNX Runtime raised for it, by path. Where the graph runs in segments, a block that
        `chained` passes on its outputs in the steps themselves is not run again: its entry is
        that check."""
        if self.segments is not None:
            return self.segments.run(steps, boundaries, chained)
        sess = session(self.path)
        results: list[dict[str, np.ndarray]] = []
        previous: dict[str, np.ndarray] = {}
        for step in steps:
            feeds = step.feeds | {i: previous[o] for i, o in step.carried.items()}
            previous = dict(zip(self.output_names, sess.run(None, feeds)))
            results.append({n: previous[n] for n in step.outputs or self.output_names})
        del sess
        return results, run_blocks(self.blocks, boundaries, self.upcasts)


def _is_external(value: ir.Value) -> bool:
    return value.is_initializer() and isinstance(value.const_value, ir.ExternalTensor)


def runtime_failure(what: str, error: Exception, atol: float, rtol: float) -> CheckResult:
    first = (str(error).strip().splitlines() or [""])[0]
    message = f"ONNX Runtime cannot run {what}: {type(error).__name__}: {first}"
    return CheckResult(what, float("inf"), float("inf"), atol, rtol, False, error=message)


# Resident bytes per stored byte of a promoted (float32-computed) low-precision weight: its
# float32 upcast (`_Upcasts`).
PROMOTED_RESIDENT_FACTOR = 2


class _SegmentedRunner:
    """Runs a saved model's main graph in order, as segments of at most `budget` resident
    weight bytes. Each segment is cut (and, for a promoted graph, given float32 weights) once
    and kept as a small model whose initializers are the file's references. A block call named
    in `checked` is a segment of its own, so that its session also runs the block check.

    Several steps run segment by segment: a segment's session is opened once, every step runs
    through it, and it is dropped before the next one opens, so memory stays one segment's
    weights however many steps there are. A step's carried input (a past) is the previous
    step's output (a present) of the same or an earlier segment; an earlier segment that reads
    only its shape (the trunk's ``Shape`` of a past, for the mask) gets a stand-in of the shape
    the graph declares for that output, checked against the real output once it is computed.
    Where that does not hold, the steps run one after the other, each opening every segment."""

    def __init__(
        self,
        model: ir.Model,
        output_dir: str,
        promote: bool,
        budget: int,
        checked: set[str],
        upcasts: _Upcasts,
    ) -> None:
        graph = model.graph
        self.output_names = [v.name for v in graph.outputs]
        if promote:
            for graph_like in [graph, *model.functions.values()]:
                _promote_graph(graph_like)
        functions = [ir.serde.serialize_function(f) for f in model.functions.values()]
        stored_budget = budget // PROMOTED_RESIDENT_FACTOR if promote else budget

        def alone(node: ir.Node) -> bool:
            return node.domain == BLOCK_DOMAIN and node.name in checked

        self.segments = [
            _Segment(model, nodes, functions, promote) for nodes in _segments(graph, stored_budget, alone)
        ]
        self.input_dims = {v.name: _dims(v) for v in graph.inputs}
        self.outputs = {v.name: (_dims(v), v.dtype.numpy()) for v in graph.outputs if v.dtype is not None}
        self.upcasts = upcasts

    def run(
        self, steps: list[Step], boundaries: dict, chained: ChainedCheck | None
    ) -> tuple[list[dict[str, np.ndarray]], dict]:
        blocks: dict[str, list[np.ndarray] | Exception | CheckResult] = {}
        try:
            return self._run_segment_major(steps, boundaries, blocks, chained), blocks
        except _NeedsStepOrder as e:
            logger.info("verify: %s; running the steps one after the other", e)
        results: list[dict[str, np.ndarray]] = []
        for t, step in enumerate(steps):
            carried = steps[t + 1].carried.values() if t + 1 < len(steps) else []
            wanted = list(dict.fromkeys([*(step.outputs or self.output_names), *carried]))
            feeds = step.feeds | {i: results[-1][o] for i, o in step.carried.items()}
            checked = boundaries if t == 0 else {}
            results.append(self._run_segment_major([Step(feeds, {}, wanted)], checked, blocks, None)[0])
        return [
            {n: r[n] for n in step.outputs or self.output_names} for step, r in zip(steps, results)
        ], blocks

    def _run_segment_major(
        self, steps: list[Step], boundaries: dict, blocks: dict, chained: ChainedCheck | None
    ) -> list[dict[str, np.ndarray]]:
        envs = [dict(step.feeds) for step in steps]
        stand_ins: dict[tuple[int, str], tuple[int, ...]] = {}  # (step, carried output) -> shape given
        for index, segment in enumerate(self.segments):
            if not segment.output_names:
                continue
            sess = None
            for t, (step, env) in enumerate(zip(steps, envs)):
                feeds = {n: env[n] for n in segment.input_names if n in env}
                for name, source in step.carried.items():
                    if name in feeds or name not in segment.input_names:
                        continue
                    if source in envs[t - 1]:
                        feeds[name] = env[name] = envs[t - 1][source]
                    elif name in segment.shape_only:
                        shape, dtype = self._declared(source, steps[t - 1])
                        feeds[name] = np.zeros(shape, dtype)
                        stand_ins[(t, source)] = shape
                    else:
                        raise _NeedsStepOrder(f"{name} is read before the segment computing {source}")
                if sess is None:
                    sess = segment.open(feeds, self.upcasts)
                env.update(zip(segment.output_names, sess.run(None, feeds)))
                for output in segment.output_names:
                    given = stand_ins.get((t + 1, output))
                    if given is not None and tuple(env[output].shape) != given:
                        raise _NeedsStepOrder(f"{output} has shape {env[output].shape}, declared {given}")
            if segment.block in boundaries:
                path = segment.block
                along = (
                    chained(path, [[env[n] for n in segment.output_names] for env in envs])
                    if chained
                    else None
                )
                blocks[path] = along if along is not None else segment.check(sess, boundaries[path][0])
            self.upcasts.release(sess)  # its weights go before the next segment's come
            del sess
            release_freed_memory()
            later = {n for s in self.segments[index + 1 :] for n in s.input_names}
            for t, env in enumerate(envs):
                keep = later | set(steps[t].outputs or self.output_names)
                if t + 1 < len(steps):  # not yet taken by the next step
                    keep |= {src for name, src in steps[t + 1].carried.items() if name not in envs[t + 1]}
                for name in [n for n in env if n not in keep]:
                    del env[name]
        return [{n: env[n] for n in step.outputs or self.output_names} for step, env in zip(steps, envs)]

    def _declared(self, output: str, step: Step) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype the graph declares for `output`, its named dims bound by the
        sizes of `step`'s feeds."""
        sizes: dict[str, int] = {}
        for name, value in step.feeds.items():
            for dim, size in zip(self.input_dims.get(name, ()), value.shape):
                if isinstance(dim, str):
                    sizes.setdefault(dim, size)
        dims, dtype = self.outputs.get(output, ((None,), None))
        shape = tuple(sizes.get(d) if isinstance(d, str) else d for d in dims)
        if dtype is None or not all(isinstance(d, int) for d in shape):
            raise _NeedsStepOrder(f"the shape of {output} is not declared in terms of the inputs")
        return shape, dtype


class _NeedsStepOrder(Exception):
    """The steps cannot run segment by segment (a carried value is read before it exists)."""


def _dims(value: ir.Value) -> list[int | str | None]:
    if value.shape is None:
        return []
    return [
        d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in value.shape
    ]


def _segments(graph: ir.Graph, budget: int, alone=lambda node: False) -> list[list[ir.Node]]:
    """The main graph's nodes in order, cut so that each run of nodes uses at most `budget`
    bytes of external weights (a node needing more runs alone, as does a node `alone` picks)."""
    segments: list[list[ir.Node]] = []
    current: list[ir.Node] = []
    loaded: set[int] = set()
    size = 0
    for node in graph:
        weights = {id(v): v.const_value.nbytes for v in node.inputs if v is not None and _is_external(v)}
        extra = sum(n for i, n in weights.items() if i not in loaded)
        by_itself = alone(node)
        if current and (by_itself or size + extra > budget):
            segments.append(current)
            current, loaded, size = [], set(), 0
            extra = sum(weights.values())
        current.append(node)
        loaded |= weights.keys()
        size += extra
        if by_itself:
            segments.append(current)
            current, loaded, size = [], set(), 0
    if current:
        segments.append(current)
    return segments


@dataclasses.dataclass(frozen=True)
class _StoredWeight:
    """A bf16/fp16 weight of a promoted segment, where ``model.onnx`` says its bytes are."""

    name: str
    location: str  # relative to the export directory, as written in model.onnx
    offset: int
    length: int
    dtype: ir.DataType
    shape: tuple[int, ...]


class _Segment:
    """A run of main-graph nodes as a standalone model over the file's own weight references.
    A segment that is one block call (`block`: its path) keeps every output of the call, and
    `check` runs it on the block's recorded PyTorch inputs.

    Promoted, its bf16/fp16 weights are declared float32 and given to ONNX Runtime as float32
    values (`_Upcasts`) read at the file's references: exact upcasts, as the Casts of the
    promoted graph would compute, without ONNX Runtime folding those Casts on one thread."""

    def __init__(self, model: ir.Model, nodes: list[ir.Node], functions: list, promote: bool) -> None:
        graph = model.graph
        inside = {id(n) for n in nodes}
        produced = {id(v) for n in nodes for v in n.outputs}
        inputs, initializers, seen = [], [], set()
        for n in nodes:
            for v in n.inputs:
                if v is None or id(v) in produced or id(v) in seen:
                    continue
                seen.add(id(v))
                (initializers if v.is_initializer() else inputs).append(v)
        call = nodes[0] if len(nodes) == 1 and nodes[0].domain == BLOCK_DOMAIN else None
        self.block = call.name if call is not None else None
        self.call_inputs = (
            [v.name if v is not None else None for v in call.inputs] if call is not None else []
        )
        graph_outputs = {id(v) for v in graph.outputs}
        outputs = [
            v
            for n in nodes
            for v in n.outputs
            if call is not None
            or id(v) in graph_outputs
            or any(id(use.node) not in inside for use in v.uses())
        ]
        self.input_names = [v.name for v in inputs]
        self.output_names = [v.name for v in outputs]
        # inputs this segment reads only the shape of
        self.shape_only = {
            v.name
            for v in inputs
            if all(
                u.node.op_type == "Shape" and u.node.domain == "" for u in v.uses() if id(u.node) in inside
            )
        }
        view = ir.GraphView(
            inputs, outputs, nodes=nodes, initializers=initializers, opset_imports=graph.opset_imports
        )
        self.proto = onnx.helper.make_model(
            ir.serde.serialize_graph(view),
            opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in graph.opset_imports.items()],
            functions=functions,
            ir_version=model.ir_version,
        )
        for value_info in [*self.proto.graph.input, *self.proto.graph.output]:
            value_info.type.tensor_type.ClearField("shape")
        self.upcast = _promote_initializers(self.proto.graph, initializers) if promote else []

    def open(self, feeds: dict[str, np.ndarray], upcasts: _Upcasts, *, basic: bool = False):
        """A session on this segment, its input types taken from the arrays fed (promotion
        changed some), its weights resolved in `upcasts`' export directory."""
        for value_info in self.proto.graph.input[: len(self.input_names)]:  # the weights follow
            value_info.type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(
                feeds[value_info.name].dtype
            )
        model = self.proto.SerializeToString()
        return session(model, upcasts.output_dir, basic=basic, initializers=upcasts.values(self.upcast))

    def block_feeds(self, data: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The block call's inputs from `data`, its recorded inputs in call order."""
        return {name: value for name, value in zip(self.call_inputs, data) if name in self.input_names}

    def check(self, sess, data: list[np.ndarray]) -> list[np.ndarray] | Exception:
        """The block call's outputs on `data`, or the error ONNX Runtime raised."""
        try:
            return sess.run(None, self.block_feeds(data))
        except Exception as e:  # ONNX Runtime's errors are plain Exceptions
            return e


def _promote_initializers(graph: onnx.GraphProto, initializers: list[ir.Value]) -> list[_StoredWeight]:
    """Declare a promoted segment's bf16/fp16 initializers float32: the stored ones to be given
    as upcast values at `open` (returned), the few held in the file itself converted here."""
    stored = []
    low = {v.name: v for v in initializers if v.dtype in LOW_ONNX_TYPES}
    for index, proto in enumerate(graph.initializer):
        value = low.get(proto.name)
        if value is None:
            continue
        if _is_external(value):
            tensor = value.const_value
            stored.append(
                _StoredWeight(
                    value.name,
                    tensor.location,
                    tensor.offset or 0,
                    tensor.length,
                    value.dtype,
                    tuple(tensor.shape),
                )
            )
            proto.data_type = onnx.TensorProto.FLOAT  # ONNX Runtime takes the upcast values instead
            # Also an input: an overridable initializer, which ONNX Runtime's graph optimizers
            # never read from the model (they would find 2 stored bytes per declared float).
            graph.input.append(
                onnx.helper.make_tensor_value_info(proto.name, onnx.TensorProto.FLOAT, proto.dims)
            )
        else:
            array = value.const_value.numpy().astype(np.float32)
            graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(array, proto.name))
    return stored


_LOW_STORED = {ir.DataType.BFLOAT16: "BF16", ir.DataType.FLOAT16: "F16"}  # as safetensors names them


class _Upcasts:
    """The float32 values of promoted segments' stored bf16/fp16 weights, for ONNX Runtime's
    ``add_initializer`` (which uses them in place): read at the references ``model.onnx``
    records, upcast exactly by PyTorch into buffers reused from one session to the next (blocks
    have the same shapes). A Cast that ONNX Runtime folds when the session opens converts on
    one thread at ~0.35 G values/s: 0.53 s for a 6.7B layer, 0.07 s here."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.free: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self.mapped = MappedRows()

    def values(self, weights: list[_StoredWeight]) -> dict[str, torch.Tensor]:
        """`weights` upcast, by name; the pool keeps only buffers of the shapes they need."""
        needed: dict[tuple[int, ...], int] = {}
        for w in weights:
            needed[w.shape] = needed.get(w.shape, 0) + 1
        self.free = {s: free[: needed[s]] for s, free in self.free.items() if s in needed}  # the rest go
        values = {}
        for w in weights:
            free = self.free.get(w.shape)
            out = free.pop() if free else torch.empty(w.shape, dtype=torch.float32)
            with self.mapped.rows(self._location(w), 0, w.shape[0] if w.shape else 1) as stored:
                values[w.name] = out.copy_(stored.view(w.shape))
        return values

    def release(self, sess) -> None:
        """The buffers given to `sess`, back to the pool: call once the session is done."""
        for t in getattr(sess, "shardex_buffers", []):
            self.free.setdefault(tuple(t.shape), []).append(t)

    def _location(self, w: _StoredWeight) -> TensorLocation:
        """Where `w`'s bytes are, checked as ONNX Runtime checks a reference: a file of the
        export directory, a length that fits the shape (`MappedRows` checks the file's end)."""
        path = file_in(self.output_dir, w.location, named_by=f"{MODEL_FILE}'s reference of {w.name}")
        if w.length != math.prod(w.shape) * 2:
            raise ValueError(
                f"{w.name}'s external data length {w.length} does not fit its shape {list(w.shape)}"
            )
        return TensorLocation(path, w.offset, w.length, _LOW_STORED[w.dtype], w.shape or (1,))


def block_segments(model: ir.Model, paths, promote: bool) -> dict[str, _Segment]:
    """A segment of its own for each call of `model` (function form) to a block `paths` names,
    by path; `model`'s graph and functions are promoted in place when `promote`."""
    wanted = set(paths)
    if not wanted:
        return {}
    if promote:
        for graph_like in [model.graph, *model.functions.values()]:
            _promote_graph(graph_like)
    functions = [ir.serde.serialize_function(f) for f in model.functions.values()]
    return {
        node.name: _Segment(model, [node], functions, promote)
        for node in model.graph
        if node.domain == BLOCK_DOMAIN and node.name in wanted
    }


def run_blocks(segments: dict[str, _Segment], boundaries: dict, upcasts: _Upcasts) -> dict:
    """Each block's session on its recorded inputs, one session at a time: its outputs, or the
    error ONNX Runtime raised, by path."""
    outputs: dict[str, list[np.ndarray] | Exception] = {}
    for path, segment in segments.items():
        if path not in boundaries:
            continue
        data = boundaries[path][0]
        try:
            sess = segment.open(segment.block_feeds(data), upcasts, basic=True)
        except Exception as e:  # ONNX Runtime's errors are plain Exceptions
            outputs[path] = e
            continue
        outputs[path] = segment.check(sess, data)
        upcasts.release(sess)
        del sess
        release_freed_memory()
    return outputs


def block_checks(outputs: dict, boundaries: dict, atol: float, rtol: float) -> list[CheckResult]:
    """Each checked block's worst output against PyTorch's, in the order of `boundaries`
    (`outputs`: path -> its outputs on the recorded inputs, the error ONNX Runtime raised, or
    the passing check of its outputs in the steps, `chained_block_check`)."""
    results = []
    for path, (_, expected) in boundaries.items():
        actual = outputs.get(path)
        if actual is None:
            continue
        if isinstance(actual, Exception):
            results.append(runtime_failure(f"block {path}", actual, atol, rtol))
            continue
        if isinstance(actual, CheckResult):
            worst = actual
        else:
            worst = _worst([compare(path, a, e, atol, rtol) for a, e in zip(actual, expected)])
        results.append(worst)
        logger.info("verified block %s: max abs diff %.3g", path, worst.max_abs_diff)
    return results


def _worst(checks: list[CheckResult]) -> CheckResult:
    return max(checks, key=lambda c: (not c.passed, c.max_abs_diff))


# A block's outputs in every step (step-major) -> its passing check, or None to run it again on
# its recorded inputs.
ChainedCheck = Callable[[str, list[list[np.ndarray]]], CheckResult | None]


def chained_block_check(
    boundaries: dict, atol: float, rtol: float, attention_mask: np.ndarray | None = None
) -> ChainedCheck:
    """Checks a block on what it computed inside the steps (its inputs ONNX Runtime's own, from
    the blocks before it) against PyTorch's recorded outputs of the same positions: the steps'
    outputs laid end to end along the sequence, or the last step's where it has the recorded
    shape (a cache or state after the last token); with `attention_mask` (the whole sequence's),
    at its real positions only (`at_real_positions`). A passing block needs no run of its own;
    a failing one, or one whose outputs do not line up so, is run on its recorded inputs, which
    tells its own error from one it was fed. Memory-bound on CPU, that run cost as much as a
    step (6.6 s of 28 at 6.7B)."""

    def check(path: str, per_step: list[list[np.ndarray]]) -> CheckResult | None:
        expected = boundaries[path][1]
        if any(len(outputs) != len(expected) for outputs in per_step):
            return None
        checks = []
        for index, want in enumerate(expected):
            got = _whole_sequence([outputs[index] for outputs in per_step], want.shape)
            if got is None:
                return None
            if attention_mask is not None:
                got, want = at_real_positions(got, want, attention_mask)
            checks.append(compare(path, got, want, atol, rtol))
        worst = _worst(checks)
        return worst if worst.passed else None

    return check


def _whole_sequence(per_step: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray | None:
    """One output over the steps' whole sequence: the last step's where it has `shape`, else
    the steps' concatenated along the one axis they split, else None."""
    if per_step[-1].shape == shape:
        return per_step[-1]
    for axis in range(len(shape)):
        rest = shape[:axis] + shape[axis + 1 :]
        if all(a.ndim == len(shape) and a.shape[:axis] + a.shape[axis + 1 :] == rest for a in per_step) and (
            sum(a.shape[axis] for a in per_step) == shape[axis]
        ):
            return np.concatenate(per_step, axis)
    return None


def at_real_positions(
    actual: np.ndarray, expected: np.ndarray, attention_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """An output's values at the real (unpadded) positions: logits or hidden states [batch,
    sequence, features] and keys or values [batch, heads, sequence, head dim]. A padded position
    attends to nothing, and what a model computes there (a fully masked softmax) depends on the
    sequence's length, so it differs between one pass and the steps; no real position ever reads
    it. Anything else (a state-space model's state) is compared whole."""
    real = attention_mask.astype(bool)
    if actual.shape != expected.shape:
        return actual, expected  # `compare` reports the shapes
    if expected.ndim == 3 and expected.shape[:2] == real.shape:
        return actual[real], expected[real]
    if expected.ndim == 4 and (expected.shape[0], expected.shape[2]) == real.shape:
        return np.moveaxis(actual, 2, 1)[real], np.moveaxis(expected, 2, 1)[real]
    return actual, expected


def verify_block_group(
    segments: dict[str, _Segment], boundaries: dict, output_dir: str, atol: float, rtol: float
) -> list[CheckResult]:
    """Each block's ONNX function on its recorded PyTorch inputs vs PyTorch's outputs: one
    session per block (`block_segments`), its weights the block's initializers in
    ``model.onnx`` as saved."""
    return block_checks(run_blocks(segments, boundaries, _Upcasts(output_dir)), boundaries, atol, rtol)


def format_failure(report: VerificationReport) -> str:
    hashes = (
        f"; {', '.join(report.shard_hash_mismatches)} no longer match(es) its digest in the manifest "
        "(changed since the export)"
        if report.shard_hash_mismatches
        else ""
    )
    if not report.failures:
        return f"verification failed{hashes}."
    broken = next((c.error for c in report.failures if c.error), None)
    if broken:
        return f"verification failed: {broken}{hashes}."
    worst = max(report.failures, key=lambda c: c.max_abs_diff)
    blocks = [c.name for c in report.blocks if not c.passed]
    where = f"block(s) {', '.join(blocks[:5])}" if blocks else worst.name
    return (
        f"verification failed in {where}: max abs diff {worst.max_abs_diff:.3g} (rel {worst.max_rel_diff:.3g}) "
        f"exceeds atol={worst.atol:g} + rtol={worst.rtol:g}·|expected| ({len(report.failures)} failed check(s)){hashes}; "
        "inspect the block's weights in the shards, or loosen atol=/rtol= if the difference is expected."
    )

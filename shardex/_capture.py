"""Stage 3, capture: the trunk with opaque holes, and one graph per distinct block, on meta.

The trunk replaces each block by a call to the custom op ``shardex::hole``. Its fake kernel
re-runs the real block on empty fake parameters so symbolic shapes flow through, memoized per
(group, input shapes) so trunk capture cost stays flat in depth. The op translates to one node
``shardex.holes::HoleN`` (N outputs) that the stitch stage replaces with a function call.

Every piece comes back weightless: its parameters and buffers are trailing graph inputs, so the
onnxscript optimizer can run (it cannot fold meta data) and weights can be bound later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import re
import threading
import time
import warnings
from collections.abc import Iterator

import onnx
import onnx_ir as ir
import torch
from onnx import defs
from torch import nn
from torch.utils import _pytree as pytree

from shardex import _hf_export
from shardex._dtypes import DTYPES, TORCH_TO_ONNX
from shardex._errors import CaptureError
from shardex._export_shortcuts import shortcuts, warm_registry
from shardex._patches import SHAPES_ONLY, capture_patches
from shardex._plan import CallSignature, Plan, TensorSpec, export_state
from shardex._source import named_tensors
from shardex._tasks import (
    CACHE_AXES,
    DERIVED_AXES,
    BlockStandIn,
    call_block,
    hole_names,
    merge_cache,
    split_cache,
)

logger = logging.getLogger("shardex")

HOLE_DOMAIN = "shardex.holes"
BLOCK_PREFIX = "block."
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


@dataclasses.dataclass
class CapturedPiece:
    """A weightless ONNX graph; `weight_inputs` names its trailing weight inputs in order."""

    name: str
    model_bytes: bytes
    weight_inputs: list[str]
    seconds: float

    def load(self) -> ir.Model:
        return ir.serde.deserialize_model(onnx.ModelProto.FromString(self.model_bytes))


# --- the hole op ---------------------------------------------------------------------------

# key -> (block on meta, call signature, group id); set only inside `_holes_registered`.
_HOLES: dict[str, tuple[nn.Module, CallSignature, int]] = {}
_FAKE_OUTPUTS: dict[tuple, list[tuple[torch.Size, torch.dtype]]] = {}


@torch.library.custom_op("shardex::hole", mutates_args=())
def _hole(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    raise RuntimeError("Bug: shardex::hole only exists inside a trunk capture and is never run")


@_hole.register_fake
def _hole_fake(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    block, call, group = _HOLES[key]
    memo_key = (group, tuple(str(tuple(t.shape)) for t in inputs))
    if memo_key not in _FAKE_OUTPUTS:
        from torch._guards import detect_fake_mode

        device = inputs[0].device if inputs else torch.device("meta")
        # Inside the export's fake mode: tensors the block creates (torch.tensor(..., device=x.device))
        # are fake too, as the trace's own are.
        shapes_only = SHAPES_ONLY.set(True)
        try:
            # In torch.export's state even when a pass after the trace (torch.onnx's type
            # promotion) runs the op again: model code branches on it (transformers' MoE experts
            # pick a CPU-bf16-only kernel outside it).
            with detect_fake_mode(inputs) or contextlib.nullcontext(), export_state():
                params = {
                    n: torch.empty(t.shape, dtype=t.dtype, device=device) for n, t in named_tensors(block)
                }
                args, kwargs = call.unflatten_inputs(inputs)
                output = call_block(
                    lambda *a, **k: torch.func.functional_call(block, params, a, k), args, kwargs
                )
        finally:
            SHAPES_ONLY.reset(shapes_only)
        leaves = [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]
        _FAKE_OUTPUTS[memo_key] = [(t.shape, t.dtype) for t in leaves]
    like = inputs[0]
    return [like.new_empty(shape, dtype=dtype) for shape, dtype in _FAKE_OUTPUTS[memo_key]]


def _hole_schema_name(num_outputs: int) -> str:
    """Register (once) an ONNX schema ``HoleN`` with variadic inputs and N outputs; the torch.onnx
    builder needs a schema and takes the output count from it. Its inference gives each output
    the element type in the node's ``output_types`` attribute, so optimizers and fusions that
    re-infer types keep the trunk typed past a hole."""
    name = f"Hole{num_outputs}"
    if not defs.has(name, HOLE_DOMAIN):
        param = defs.OpSchema.FormalParameter
        variadic = defs.OpSchema.FormalParameterOption.Variadic
        all_tensors = [d.onnx_type for d in DTYPES]
        schema = defs.OpSchema(
            name,
            HOLE_DOMAIN,
            1,
            inputs=[param("inputs", "T", param_option=variadic, is_homogeneous=False)],
            outputs=[param(f"output_{i}", "T") for i in range(num_outputs)],
            type_constraints=[("T", all_tensors, "any tensor")],
            attributes=[
                defs.OpSchema.Attribute("key", defs.OpSchema.AttrType.STRING, "hole path"),
                defs.OpSchema.Attribute("output_types", defs.OpSchema.AttrType.INTS, "output element types"),
            ],
        )
        schema.set_type_and_shape_inference_function(_infer_hole_types)
        defs.register_schema(schema)
    return name


def _infer_hole_types(context) -> None:
    for index, elem_type in enumerate(context.get_attribute("output_types").ints):
        context.set_output_type(index, onnx.helper.make_tensor_type_proto(elem_type, None))


def _translate_hole(inputs, key: str):
    from onnxscript import values

    _, call, _ = _HOLES[key]
    op = values.Opset(HOLE_DOMAIN, 1)[_hole_schema_name(len(call.outputs))]
    output_types = [int(TORCH_TO_ONNX[getattr(torch, s.dtype)]) for s in call.outputs]
    outputs = op(*inputs, key=key, output_types=output_types)
    # A list, even of one: torch.onnx then indexes it directly instead of emitting SequenceAt.
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


class _HoleModule(BlockStandIn, nn.Module):
    """Stands in for a block in the trunk: flattens the call (in hole form: its layer of the KV
    cache as tensors), emits one hole op, rebuilds the output and writes the present back."""

    def __init__(self, key: str, call: CallSignature, cache_layer: int, block: nn.Module) -> None:
        super().__init__()
        self.key = key
        self.call = call
        self.cache_layer = cache_layer
        object.__setattr__(self, "_block", block)  # not a submodule: its weights stay out of the trunk

    def forward(self, *args, **kwargs):
        args, kwargs, cache = split_cache(args, kwargs, self.cache_layer)
        leaves = pytree.tree_leaves((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        constants = [x for x in leaves if not isinstance(x, torch.Tensor)]
        expected = [x for x in self.call.leaves if not isinstance(x, TensorSpec)]
        if len(tensors) != len(self.call.inputs) or repr(constants) != repr(expected):
            raise CaptureError(
                f"block {self.key} is called differently during export than when it was recorded "
                f"({len(tensors)} tensors, constants {constants!r} vs {expected!r}).",
                piece="trunk",
            )
        outputs = torch.ops.shardex.hole(tensors, self.key)
        return merge_cache(self.call.unflatten_outputs(outputs), cache, self.cache_layer)


def _equate_named_axes(model: nn.Module, example) -> None:
    """Tell the trace, as it enters `model`, that input axes sharing a name (the plan's
    ``dynamic_axes``: every layer's past length, the inputs' and the cache's batch) are one size.
    torch.export equates such dims only when the trace ends; until then each tensor carries
    symbols of its own, and each hole call would look new to `_hole_fake`'s memo, running the
    block once per layer (or twice, the first layer's hidden states having a batch of their
    own) instead of once per group. Axes whose example sizes differ are left alone."""
    sizes = [t.shape for t in example.flat_tensors()]

    def equate(module, args, kwargs) -> None:
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        first: dict[str, tuple[torch.SymInt | int, int]] = {}
        for tensor, shape, axes in zip(tensors, sizes, example.dynamic_axes):
            for axis, name in axes.items():
                size, known = first.setdefault(name, (tensor.shape[axis], shape[axis]))
                if known == shape[axis]:
                    torch._check(tensor.shape[axis] == size)

    model.register_forward_pre_hook(equate, with_kwargs=True)


@contextlib.contextmanager
def _holes_registered(holes: dict[str, tuple[nn.Module, CallSignature, int]]) -> Iterator[None]:
    _HOLES.update(holes)
    try:
        yield
    finally:
        for key in holes:
            _HOLES.pop(key, None)
        _FAKE_OUTPUTS.clear()


# --- captures ------------------------------------------------------------------------------


def warm_up(source_kind: str, opset: int | None = None) -> None:
    """Import what a capture needs before the first capture arrives (run on fresh workers and
    in the coordinator's capture fork), and build torch.onnx's op registry for `opset` (None:
    torch.onnx's default) and transformers' exporter pieces: ~2 s of a first capture's time."""
    import onnxscript.optimizer  # noqa: F401
    import torch.onnx._internal.exporter._core  # noqa: F401

    if source_kind == "hf":
        import transformers  # noqa: F401
    _hf_export.translation_table()
    warm_registry(opset)


# A capture patches module state (torch.onnx's passes, transformers' and shardex's patches, the
# hole registry): captures in one process run one at a time, whichever thread asks.
_ONE_AT_A_TIME = threading.Lock()


def _one_at_a_time(capture):
    @functools.wraps(capture)
    def serialized(*args):
        with _ONE_AT_A_TIME:
            return capture(*args)

    return serialized


@_one_at_a_time
def capture_trunk(plan: Plan) -> CapturedPiece:
    """Capture the model with every block replaced by a hole node."""
    start = time.perf_counter()
    model = plan.build_model()
    mode = _fake_cpu(model)
    holes = {}
    for group in plan.groups:
        for path in group.members:
            block = model.get_submodule(path)
            holes[path] = (block, group.call, group.id)
            model.set_submodule(path, _HoleModule(path, group.call, plan.cache_layers.get(path, 0), block))
    example = plan.example
    args, kwargs = pytree.tree_map_only(torch.Tensor, mode.from_tensor, (example.args, example.kwargs))
    dynamic = _export_dynamic_shapes(model, args, kwargs, example.dynamic_axes)
    _equate_named_axes(model, example)
    with _holes_registered(holes):
        onnx_model = _export(
            "trunk",
            model,
            args,
            kwargs,
            dynamic,
            plan.opset,
            {torch.ops.shardex.hole.default: _translate_hole},
        )
    _name_inputs(onnx_model.graph, plan.input_names)
    _name_outputs(onnx_model.graph, plan.output_names)
    _name_dynamic_axes(onnx_model, example.dynamic_axes)
    weights = _initializers_to_inputs(onnx_model, prefix="", known=set(plan.alias_to_name), piece="trunk")
    _optimize(onnx_model)
    fuse_for_runtime(onnx_model, plan.runtime)
    return CapturedPiece("trunk", _serialize(onnx_model), weights, time.perf_counter() - start)


class _FlatBlock(nn.Module):
    """A block called with the hole's flat tensor inputs, returning its flat tensor outputs:
    exactly the hole's contract, dynamic dims included."""

    def __init__(self, block: nn.Module, call: CallSignature) -> None:
        super().__init__()
        self.block = block
        self.call = call

    def forward(self, *tensors):
        args, kwargs = self.call.unflatten_inputs(tensors)
        output = call_block(self.block, args, kwargs)
        return tuple(x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor))


@_one_at_a_time
def capture_block(plan: Plan, group_id: int) -> CapturedPiece:
    """Capture one distinct block (the group's first member) as a standalone weightless graph."""
    start = time.perf_counter()
    group = plan.groups[group_id]
    model = plan.build_model()
    with _fake_cpu(model):
        inputs = tuple(torch.empty(s.shape, dtype=getattr(torch, s.dtype)) for s in group.call.inputs)
    block = model.get_submodule(group.members[0])
    # forward(*tensors) has one varargs parameter: its spec is a tuple nested in a 1-tuple
    dynamic = (tuple({d: torch.export.Dim.AUTO for d in s.dynamic} or None for s in group.call.inputs),)
    onnx_model = _export(
        group.function_name, _FlatBlock(block, group.call), inputs, {}, dynamic, plan.opset, None
    )
    args, kwargs = group.call.unflatten_inputs(inputs)
    outputs = group.call.unflatten_outputs(
        torch.empty(s.shape, dtype=getattr(torch, s.dtype), device="meta") for s in group.call.outputs
    )
    input_names, output_names = hole_names(
        list(inspect.signature(block.forward).parameters), args, kwargs, outputs
    )
    _name_inputs(onnx_model.graph, input_names)
    _name_outputs(onnx_model.graph, output_names)
    expected = group.weight_names
    weights = _initializers_to_inputs(
        onnx_model, prefix=BLOCK_PREFIX, known=set(expected), piece=group.function_name
    )
    missing = sorted(set(expected) - set(weights))
    if missing:  # the block uses no such tensor: an input of its function all the same, unused
        onnx_model.graph.inputs.extend(ir.Value(name=n) for n in missing)
        weights += missing
    _reorder_weight_inputs(onnx_model, weights, expected)
    _optimize(onnx_model)
    fuse_for_runtime(onnx_model, plan.runtime)
    return CapturedPiece(group.function_name, _serialize(onnx_model), expected, time.perf_counter() - start)


def _fake_cpu(model: nn.Module):
    """Replace `model`'s parameters and buffers by fake CPU tensors (shapes and dtypes, no
    memory) and return their `FakeTensorMode`, in which the capture's inputs are made too.

    Fake CPU rather than the meta device: model code creates tensors on its inputs' device
    (``torch.tensor(x, device=h.device)``, transformers' export patches among it), and in fake
    mode only a CPU one becomes a fake tensor; a meta one stays a real meta tensor the trace
    refuses. The trace also takes the branches a CPU run takes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fakes: dict[int, torch.Tensor] = {}  # tied tensors stay tied

    def fake(tensor: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(tensor) not in fakes:
            empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            fakes[id(tensor)] = nn.Parameter(empty, requires_grad=False) if parameter else empty
        return fakes[id(tensor)]

    with mode:
        for module in model.modules():
            for tensors, parameter in ((module._parameters, True), (module._buffers, False)):
                for name, tensor in tensors.items():
                    if tensor is not None:
                        tensors[name] = fake(tensor, parameter)
    return mode


def _export(piece, model, args, kwargs, dynamic_shapes, opset, translations) -> ir.Model:
    """torch.onnx's dynamo export of one piece, with what transformers' exporter knows
    (`_hf_export`: patches, FX fixes, translations, IR fixes)."""
    try:
        with warnings.catch_warnings(), _hf_export.export_patches(), capture_patches(), shortcuts():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                args,
                kwargs=kwargs or None,
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                optimize=False,
                verbose=False,
                opset_version=opset,
                custom_translation_table=_hf_export.translation_table() | (translations or {}),
            )
        _hf_export.fix_program(program)
    except CaptureError:
        raise
    except Exception as e:
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        summary = (str(root).strip().splitlines() or [""])[0]
        raise CaptureError(f"capturing {piece} failed: {type(root).__name__}: {summary}", piece=piece) from e
    return program.model


def _export_dynamic_shapes(model: nn.Module, args, kwargs, dynamic_axes):
    """Our per-tensor axis dicts, in the nested form torch.export expects.

    The KV-cache tensors' axes are one named dim each for all layers (they are equal; each
    layer's past flows only into its own hole, so nothing in the trunk would relate them; see
    `_equate_named_axes`)."""
    if not any(dynamic_axes):
        return None
    axes = iter(dynamic_axes)
    shared = {name: torch.export.Dim(name) for cache_axes in CACHE_AXES for name in cache_axes.values()}

    def dims(x):
        if not isinstance(x, torch.Tensor):
            return None
        tensor_axes = next(axes)
        if tensor_axes in CACHE_AXES:
            return {d: shared[name] for d, name in tensor_axes.items()}
        return {d: torch.export.Dim.DYNAMIC for d in tensor_axes} or None

    args_spec, kwargs_spec = pytree.tree_map(dims, (args, kwargs))
    if not kwargs:
        return tuple(args_spec)
    params = list(inspect.signature(model.forward).parameters)
    return {**dict(zip(params, args_spec)), **kwargs_spec}


def _name_inputs(graph: ir.Graph, names: list[str]) -> None:
    """Give the graph's inputs the plan's names (when the counts agree)."""
    if len(graph.inputs) == len(names):
        for value, name in zip(graph.inputs, names):
            value.name = name


def _name_outputs(graph: ir.Graph, names: list[str]) -> None:
    """Give the graph's outputs the plan's names (when the counts agree). An output that is a
    graph input passed through gets an Identity, so the input keeps its own name."""
    if len(graph.outputs) != len(names):
        return
    for index, (value, name) in enumerate(zip(list(graph.outputs), names)):
        if value.is_graph_input():
            identity = ir.node("Identity", [value])
            identity.outputs[0].shape, identity.outputs[0].type = value.shape, value.type
            graph.append(identity)
            graph.outputs[index] = value = identity.outputs[0]
        value.name = name


def _name_dynamic_axes(model: ir.Model, dynamic_axes: list[dict[int, str]]) -> None:
    """Rename the exporter's symbols (s0, s1) to the user's axis names everywhere they appear,
    inside expressions too; an expression equal to a derived axis (``past_sequence_length +
    sequence_length``) takes that axis's name (``total_sequence_length``)."""
    renames: dict[str, str] = {}
    for value, axes in zip(model.graph.inputs, dynamic_axes):
        for dim, name in axes.items():
            symbol = value.shape[dim] if value.shape is not None else None
            if isinstance(symbol, ir.SymbolicDim) and symbol.value:
                renames.setdefault(symbol.value, name)
    if not renames:
        return
    derived = {tuple(sorted(parts)): name for name, parts in DERIVED_AXES.items()}

    def rename(dim):
        if not isinstance(dim, ir.SymbolicDim) or not dim.value:
            return dim
        text = re.sub(r"\b[A-Za-z_]\w*\b", lambda m: renames.get(m.group(0), m.group(0)), dim.value)
        terms = tuple(sorted(t.strip() for t in text.split("+")))
        return derived.get(terms, text)

    for value in [*model.graph.inputs, *model.graph.outputs, *(o for n in model.graph for o in n.outputs)]:
        if value.shape is not None:
            value.shape = ir.Shape([rename(d) for d in value.shape])


def _initializers_to_inputs(model: ir.Model, *, prefix: str, known: set[str], piece: str) -> list[str]:
    """Turn every initializer that is a parameter or buffer (`known`, after removing `prefix`)
    into a trailing graph input, valueless; return their names. A tensor the model creates in
    its forward (``torch.tensor(...)``, lifted by torch.export as a constant) keeps its value:
    a piece-local constant (a Constant node in a block function)."""
    from torch._subclasses.fake_tensor import FakeTensor

    graph = model.graph
    names = []
    for name, value in list(graph.initializers.items()):
        bare = name.removeprefix(prefix)
        if bare not in known:
            raw = getattr(value.const_value, "raw", None)
            if (
                isinstance(raw, torch.Tensor)
                and not isinstance(raw, FakeTensor)
                and raw.device.type != "meta"
            ):
                continue  # a constant with its value
            raise CaptureError(
                f"{piece} uses tensor {bare!r}, neither a parameter or buffer nor a constant with a value; "
                "if the model creates it from its weights in forward, make it a buffer.",
                piece=piece,
            )
        graph.initializers.pop(name)
        value.const_value = None
        graph.inputs.append(value)
        value.name = bare
        names.append(bare)
    return names


def _reorder_weight_inputs(model: ir.Model, current: list[str], wanted: list[str]) -> None:
    graph = model.graph
    n_data = len(graph.inputs) - len(current)
    by_name = {v.name: v for v in graph.inputs[n_data:]}
    data = list(graph.inputs[:n_data])
    graph.inputs.clear()
    graph.inputs.extend([*data, *(by_name[n] for n in wanted)])


def _optimize(model: ir.Model) -> None:
    """onnxscript's optimizer, then drop per-node stack traces: they embed the absolute paths
    of the capturing process's files, so the bytes would depend on where a node installed them."""
    import onnxscript.optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnxscript.optimizer.optimize_ir(model)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.pop(STACK_TRACE_KEY, None)


def fuse_for_runtime(model: ir.Model, runtime: str) -> None:
    """Rewrite a weightless piece into ONNX Runtime's fused ops for `runtime`'s provider
    (``onnxruntime``: CPU, ``onnxruntime-cuda``): RMS/layer norms, skip norms, rotary
    embeddings, attention where it pays, MatMuls with transposed weights. transformers'
    exporter pipeline (onnxscript's ORT fusions plus its own repairs and per-provider choices)
    when transformers is installed, else onnxscript's own. A plain ``onnx`` target keeps
    standard ops only. Pieces are weightless, so this runs once per distinct block, whatever
    the depth."""
    if runtime == "onnx":
        return
    warnings.filterwarnings("ignore", module="onnxscript")
    if not _hf_export.fuse(model, "cuda" if runtime == "onnxruntime-cuda" else "cpu"):
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        optimize_for_ort(model)
    _unfold_batch_transposes(model.graph)


def _unfold_batch_transposes(graph: ir.Graph) -> None:
    """Give each FusedMatMul's batch transpose (``transBatchA/B``, which onnxscript's fusions
    fold into it) back to an explicit Transpose: ONNX Runtime 1.31's CPU kernel rejects one whose
    other operand is 2-D (seen on SigLIP's attention-pooling head). The batch transpose moves
    the first dim to the second-to-last place, as ONNX Runtime defines it."""
    for node in list(graph):
        if node.op_type != "FusedMatMul" or node.domain != "com.microsoft":
            continue
        for index, attribute in ((0, "transBatchA"), (1, "transBatchB")):
            operand = node.inputs[index]
            if not node.attributes.get_int(attribute, 0) or operand.shape is None:
                continue
            rank = len(operand.shape)
            perm = [*range(1, rank - 1), 0, rank - 1]
            transpose = ir.node("Transpose", [operand], {"perm": perm})
            moved = transpose.outputs[0]
            moved.dtype, moved.shape = operand.dtype, ir.Shape([operand.shape[p] for p in perm])
            graph.insert_before(node, transpose)
            node.replace_input_with(index, moved)
            node.attributes[attribute] = ir.AttrInt64(attribute, 0)


def _serialize(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()

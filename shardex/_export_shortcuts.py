"""Two costs torch.onnx's dynamo export pays on every call that a capture of a weightless piece
need not, removed while a piece is captured (`shortcuts`), with the result unchanged.

1. **The registry.** Every ``torch.onnx.export`` builds its op registry from torchlib anew
   (~0.4 s). It is the same for one opset in one process, so it is built once and each export
   gets a copy (its custom translations are added to the copy).

2. **The second trace.** After ``torch.export`` traces a piece, torch.onnx's preparation runs
   ``ExportedProgram.run_decompositions``: a full re-trace of the program (~35 % of a capture),
   which decomposes the ops ONNX has no translation for and functionalizes mutations. A piece
   whose program has neither needs no re-trace: every op is translated as it stands, and with
   no mutation, views and copies are the same values. Before deciding, the few ops that only
   need a rename (``aten.to`` → ``_to_copy``, ``__and__`` → ``bitwise_and``) are renamed in
   place, as the decomposition would; anything else left (an op without a translation, one in
   the decomposition table, a mutation, a higher-order op) takes torch.onnx's own path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
from collections.abc import Iterator

import torch

# Python callables a torch.export graph holds for symbolic-int arithmetic; the translator
# handles them, and the decomposition leaves them as they are.
_SYMBOLIC_CALLABLES = {
    torch.sym_float,
    torch.sym_int,
    torch.sym_max,
    torch.sym_min,
    torch.sym_not,
    torch.sym_ite,
    torch.sym_sum,
}
_SYMBOLIC_MODULES = {operator.__name__, "_operator", math.__name__}
# Checks torch.onnx removes after the decomposition step, translated or not.
_REMOVED_CHECKS = {
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten._assert_async.default,
    torch.ops.aten._assert_async.msg,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_tensor_metadata.default,
}

_REGISTRIES: dict[int, object] = {}


@contextlib.contextmanager
def shortcuts() -> Iterator[None]:
    """Within: torch.onnx's exports use a cached registry and skip the re-trace when it would
    change nothing (see the module docstring)."""
    from torch.onnx._internal.exporter import _constants, _fx_passes, _registration

    original_registry = _registration.ONNXRegistry.__dict__["from_torchlib"]
    original_decompose = _fx_passes.decompose_with_registry

    def cached_registry(cls, opset_version=_constants.TORCHLIB_OPSET, **kwargs):
        if kwargs or cls is not _registration.ONNXRegistry:
            return original_registry.__func__(cls, opset_version, **kwargs)
        key = opset_version
        if key not in _REGISTRIES:
            _REGISTRIES[key] = original_registry.__func__(cls, opset_version)
        registry = cls()
        registry._opset_version = _REGISTRIES[key]._opset_version
        registry.functions = {op: list(metas) for op, metas in _REGISTRIES[key].functions.items()}
        return registry

    def decompose_if_needed(program, registry):
        _rename_trivial_decompositions(program.graph_module)
        if _translatable_as_is(program, registry):
            return program
        return original_decompose(program, registry)

    # The registry's notes on functions it cannot fully register (torchvision ops, signatures
    # of transformers' translations) are torch.onnx's own business, the same on every export:
    # not the user's terminal, now that the coordinator captures too.
    notes = logging.getLogger(_registration.__name__)
    level = notes.level
    notes.setLevel(logging.ERROR)
    _registration.ONNXRegistry.from_torchlib = classmethod(cached_registry)
    _fx_passes.decompose_with_registry = decompose_if_needed
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original_registry
        _fx_passes.decompose_with_registry = original_decompose
        notes.setLevel(level)


def warm_registry(opset: int | None) -> None:
    """Build the registry exports at `opset` use (torch.onnx's default when None), before the
    first export needs it: torch.onnx registers at least its own opset."""
    from torch.onnx import _constants as onnx_constants
    from torch.onnx._internal.exporter import _constants, _registration

    opset = opset or onnx_constants.ONNX_DEFAULT_OPSET  # as torch.onnx.export picks them
    with shortcuts():
        _registration.ONNXRegistry.from_torchlib(max(opset, _constants.TORCHLIB_OPSET))


def _rename_trivial_decompositions(graph_module: torch.fx.GraphModule) -> None:
    """Rewrite the ops whose decomposition is one other op on the same operands: ``aten.to``
    (any overload) is ``_to_copy`` with its dtype, ``__and__``/``__or__`` are the bitwise ops."""
    aten = torch.ops.aten
    bitwise = {aten.__and__.Tensor: aten.bitwise_and.Tensor, aten.__or__.Tensor: aten.bitwise_or.Tensor}
    for module in graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in bitwise:
                node.target = bitwise[node.target]
            elif isinstance(node.target, torch._ops.OpOverload) and node.target.overloadpacket is aten.to:
                dtype = _to_dtype(node)
                if dtype is _UNKNOWN:
                    continue
                node.target = aten._to_copy.default
                node.args = node.args[:1]
                node.kwargs = {"dtype": dtype} if dtype is not None else {}
        module.recompile()


_UNKNOWN = object()


def _to_dtype(node: torch.fx.Node):
    """The dtype an ``aten.to`` call converts to (None: none), or `_UNKNOWN` (``to.other``
    takes another tensor's, which the rename does not handle)."""
    aten = torch.ops.aten
    if node.target is aten.to.dtype:
        return node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
    if node.target is aten.to.device:
        return node.kwargs.get("dtype", node.args[2] if len(node.args) > 2 else None)
    if node.target is aten.to.dtype_layout:
        return node.kwargs.get("dtype")
    return _UNKNOWN


def _translatable_as_is(program, registry) -> bool:
    """Whether torch.onnx can translate `program` without decomposing it: no mutation, and
    every op one it translates and would not decompose."""
    from torch.onnx._internal.exporter import _decomp

    signature = program.graph_signature
    if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
        return False
    table = _decomp.create_onnx_friendly_decomposition_table(
        set(_decomp.get_onnx_implemented_overloads(registry))
    )
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            return False
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            if target in _REMOVED_CHECKS:
                continue
            if isinstance(target, torch._ops.OpOverload):
                if target in table or target._schema.is_mutable or not registry.is_registered(target):
                    return False
            elif (
                target not in _SYMBOLIC_CALLABLES
                and getattr(target, "__module__", None) not in _SYMBOLIC_MODULES
            ):
                return False
    return True

"""Stage 5, stitch: trunk + one ONNX function per distinct block + one call per hole.

Weights become main-graph initializers named by the parameter's fully-qualified name, each an
`onnx_ir.ExternalTensor` pointing into a shard, so nothing is loaded to build the model.
"""

from __future__ import annotations

import os

import onnx_ir as ir
import torch
from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass

from shardex._capture import HOLE_DOMAIN, CapturedPiece
from shardex._dtypes import TORCH_TO_ONNX
from shardex._errors import StitchError
from shardex._plan import Plan

BLOCK_DOMAIN = "shardex.blocks"


def stitch(
    plan: Plan,
    trunk: CapturedPiece,
    blocks: dict[int, CapturedPiece],
    output_dir: str,
) -> ir.Model:
    """Assemble the final model; its initializers reference shards in `output_dir`."""
    model = trunk.load()
    graph = model.graph
    initializers = _Initializers(plan, graph, output_dir)

    # Trunk weights: trailing inputs -> initializers (tied names collapse to one).
    n_data = len(graph.inputs) - len(trunk.weight_inputs)
    for value in list(graph.inputs[n_data:]):
        graph.inputs.remove(value)
        shared = initializers.get(value.name)
        value.replace_all_uses_with(shared, replace_graph_outputs=True)

    add_block_functions(model, plan, blocks)

    holes = [node for node in graph if node.domain == HOLE_DOMAIN]
    if len(holes) != len(plan.hole_paths):
        raise StitchError(
            f"the trunk has {len(holes)} hole nodes but the plan has {len(plan.hole_paths)} blocks; "
            "some block was not called exactly once per forward."
        )
    for hole in holes:
        path = hole.attributes["key"].as_string()
        group = plan.group_of(path)
        weights = [initializers.get(f"{path}.{name}") for name in group.weight_names]
        call = ir.Node(
            BLOCK_DOMAIN,
            group.function_name,
            inputs=[*hole.inputs, *weights],
            num_outputs=len(hole.outputs),
            name=path,
        )
        graph.insert_before(hole, call)
        for old, new in zip(hole.outputs, call.outputs):
            new.name, new.shape, new.type = old.name, old.shape, old.type
            old.name = None
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove(hole, safe=True)

    model.opset_imports.pop(HOLE_DOMAIN, None)
    model.opset_imports[BLOCK_DOMAIN] = 1
    model.producer_name = "shardex"
    RemoveUnusedOpsetsPass()(model)
    return model


def add_block_functions(model: ir.Model, plan: Plan, blocks: dict[int, CapturedPiece]) -> None:
    """Add one model-local function per block group (plus any function a block graph uses)."""
    for group in plan.groups:
        block_model = blocks[group.id].load()
        model.functions.update(block_model.functions)
        function = _as_function(block_model, group.function_name)
        model.functions[function.identifier()] = function
        for domain, version in function.opset_imports.items():
            model.opset_imports.setdefault(domain, version)


def inline_blocks(model: ir.Model) -> None:
    """Replace every function call by its body: a flat graph, for runtimes without functions."""
    InlinePass()(model)
    RemoveUnusedFunctionsPass()(model)
    RemoveUnusedOpsetsPass()(model)


class _Initializers:
    """Creates each weight's initializer once, named by its canonical FQN, pointing into its shard."""

    def __init__(self, plan: Plan, graph: ir.Graph, output_dir: str) -> None:
        self.plan = plan
        self.graph = graph
        self.output_dir = os.path.abspath(output_dir)

    def get(self, name: str) -> ir.Value:
        if name not in self.plan.alias_to_name:
            raise StitchError(f"the captured graph uses tensor {name!r}, which the plan does not store.")
        entry = self.plan.entry(name)
        existing = self.graph.initializers.get(entry.name)
        if existing is not None:
            return existing
        tensor = ir.ExternalTensor(
            entry.shard,
            entry.offset,
            entry.nbytes,
            TORCH_TO_ONNX[getattr(torch, entry.dtype)],
            shape=ir.Shape(entry.shape),
            name=entry.name,
            base_dir=self.output_dir,
        )
        value = ir.Value(
            name=entry.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor
        )
        self.graph.register_initializer(value)
        return value


def _as_function(block: ir.Model, name: str) -> ir.Function:
    """A block graph (weights already trailing inputs) as a model-local function. Functions may
    not hold initializers, so the optimizer's small constants become Constant nodes."""
    graph = block.graph
    for const_name, value in list(graph.initializers.items()):
        graph.initializers.pop(const_name)
        node = ir.Node(
            "", "Constant", inputs=[], attributes=[ir.AttrTensor("value", value.const_value)], num_outputs=1
        )
        graph.insert_before(graph[0], node) if len(graph) else graph.append(node)
        value.replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
        node.outputs[0].name = const_name
    graph.opset_imports.update(block.opset_imports)
    function = ir.Function(BLOCK_DOMAIN, name, graph=graph, attributes=[])
    return function

"""Stage 2, plan: holes, their recorded calls, block groups and the weight shard layout.

The plan is plain data: it pickles (to ship to workers) and prints as JSON (for the manifest).
Everything later stages need is decided here, so capture and weight streaming can run in
parallel and produce the same bytes whatever order they finish in.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import inspect
import logging
import math
import os
import re
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from shardex._conversions import Assembly, locations, resolve_checkpoint
from shardex._dtypes import SAFETENSORS_TO_TORCH, dtype_name
from shardex._errors import PlanError, SourceError
from shardex._source import (
    Source,
    TensorLocation,
    build_skeleton,
    check_stored_dtype,
    hf_config,
    index_checkpoint,
    named_tensors,
)
from shardex._tasks import (
    DERIVED_AXES,
    SEQ2SEQ_COMPONENTS,
    SEQ2SEQ_TASKS,
    TEXT_GENERATION,
    TEXT_GENERATION_WITH_PAST,
    cache_layer_index,
    cache_layout,
    call_block,
    component_holes,
    default_inputs,
    default_task,
    generation_example,
    install_task,
    merge_cache,
    seq2seq_example,
    split_cache,
    tree_names,
    uses_cache,
)

logger = logging.getLogger("shardex")

SHARD_ALIGNMENT = 4096  # ONNX Runtime mmaps external data only at page-aligned offsets
# Attributes that legitimately differ between otherwise identical layers and never change the graph.
PER_LAYER_ATTRIBUTES = frozenset({"layer_idx", "layer_id", "layer_number", "block_idx", "idx"})


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor crossing a boundary; `dynamic` lists the dims that vary."""

    shape: tuple[int, ...]
    dtype: str
    dynamic: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class CallSignature:
    """How a block is called: the flattened (args, kwargs) with tensors replaced by specs."""

    in_spec: pytree.TreeSpec
    leaves: tuple[Any, ...]  # TensorSpec for tensor leaves, the constant value otherwise
    out_spec: pytree.TreeSpec
    out_leaves: tuple[Any, ...]

    @property
    def inputs(self) -> list[TensorSpec]:
        return [x for x in self.leaves if isinstance(x, TensorSpec)]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [x for x in self.out_leaves if isinstance(x, TensorSpec)]

    def unflatten_inputs(self, tensors) -> tuple[tuple, dict]:
        it = iter(tensors)
        leaves = [next(it) if isinstance(x, TensorSpec) else x for x in self.leaves]
        return pytree.tree_unflatten(leaves, self.in_spec)

    def unflatten_outputs(self, tensors):
        it = iter(tensors)
        leaves = [next(it) if isinstance(x, TensorSpec) else x for x in self.out_leaves]
        return pytree.tree_unflatten(leaves, self.out_spec)


@dataclasses.dataclass
class BlockGroup:
    """Structurally identical blocks: captured once, stitched as one ONNX function."""

    id: int
    function_name: str
    class_name: str
    members: list[str]
    call: CallSignature
    weight_names: list[str]  # block-relative parameter/buffer names, in function-input order


@dataclasses.dataclass
class TensorEntry:
    """One stored tensor: its canonical name, where it comes from and where it goes."""

    name: str
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str  # dtype in the export (the skeleton's)
    # One checkpoint tensor; several (or part of one) assembled as transformers converts them at
    # load time (see _conversions); None: held in the coordinator's memory.
    source: TensorLocation | Assembly | None
    is_buffer: bool = False
    shard: str = ""
    offset: int = 0
    nbytes: int = 0
    keys: tuple[str, ...] = ()  # the checkpoint tensors it is read from


@dataclasses.dataclass
class ShardSpec:
    file: str
    size: int
    tensors: list[str]
    from_memory: bool
    link_target: str | None = None  # zero-copy: the file is a hard link to this source file


@dataclasses.dataclass
class ExampleInputs:
    """Real example inputs (args, kwargs ordered like forward's signature) and dynamic axes."""

    args: tuple
    kwargs: dict[str, Any]
    # per flattened tensor input: {dim: axis name}
    dynamic_axes: list[dict[int, str]]

    def flat_tensors(self) -> list[torch.Tensor]:
        return [x for x in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(x, torch.Tensor)]

    def resized(self, extra: int = 3) -> ExampleInputs:
        """The same inputs grown by `extra` along every dynamic axis (values wrap around), used
        to find which hole dims are dynamic and to verify at sizes other than the example's.
        An axis that is the sum of others (`DERIVED_AXES`) grows by their sum."""
        dims_by_tensor = iter(self.dynamic_axes)

        def growth(axis: str) -> int:
            return sum(growth(part) for part in DERIVED_AXES[axis]) if axis in DERIVED_AXES else extra

        def grow(x):
            if not isinstance(x, torch.Tensor):
                return x
            for dim, axis in next(dims_by_tensor).items():
                size = x.shape[dim]
                x = x.index_select(dim, torch.arange(size + growth(axis)) % size)
            return x

        args, kwargs = pytree.tree_map(grow, (self.args, self.kwargs))
        return ExampleInputs(args, kwargs, self.dynamic_axes)


@dataclasses.dataclass
class Plan:
    source: Source
    model_class: str
    task: str | None  # see _tasks; None: the model's own forward
    runtime: str  # the runtime the pieces are rewritten for (RUNTIMES)
    dtype: torch.dtype | None  # requested conversion, None keeps the model's dtypes
    example: ExampleInputs
    input_names: list[str]
    output_names: list[str]
    groups: list[BlockGroup]
    cache_layers: dict[str, int]  # hole path -> the layer of the KV cache it reads (with a cache)
    tensors: list[TensorEntry]
    shards: list[ShardSpec]
    opset: int | None
    alias_to_name: dict[str, str]
    component: str | None = None  # which program of an encoder-decoder task (SEQ2SEQ_COMPONENTS)

    def build_model(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The model on meta with this plan's task forward, in `dtype` (default: the plan's)."""
        return build_model(self.source, self.dtype if dtype is None else dtype, self.task, self.component)

    @property
    def model_file(self) -> str:
        """The ONNX file this plan's program is saved as."""
        return SEQ2SEQ_COMPONENTS[self.component] if self.component else "model.onnx"

    @property
    def hole_paths(self) -> list[str]:
        return [path for group in self.groups for path in group.members]

    def group_of(self, path: str) -> BlockGroup:
        for group in self.groups:
            if path in group.members:
                return group
        raise KeyError(path)

    def entry(self, name: str) -> TensorEntry:
        return self._entries[self.alias_to_name[name]]

    @functools.cached_property
    def _entries(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    def to_json(self) -> dict:
        return {
            "source": self.source.describe(),
            "model_class": self.model_class,
            "task": self.task,
            "component": self.component,
            "runtime": self.runtime,
            "inputs": self.input_names,
            "outputs": self.output_names,
            "parameters": sum(math.prod(t.shape) for t in self.tensors if not t.is_buffer),
            "dtype": dtype_name(self.dtype) if self.dtype else None,
            "opset": self.opset,
            "example_inputs": {
                "shapes": [list(t.shape) for t in self.example.flat_tensors()],
                "dynamic_axes": [{str(k): v for k, v in d.items()} for d in self.example.dynamic_axes],
            },
            "groups": [
                {
                    "function": g.function_name,
                    "class": g.class_name,
                    "members": g.members,
                    "inputs": [dataclasses.asdict(s) for s in g.call.inputs],
                    "outputs": [dataclasses.asdict(s) for s in g.call.outputs],
                    "constants": [repr(x) for x in g.call.leaves if not isinstance(x, TensorSpec)],
                }
                for g in self.groups
            ],
            "tensors": len(self.tensors),
            "shards": [dataclasses.asdict(s) | {"tensors": len(s.tensors)} for s in self.shards],
        }


def parse_size(size: int | str) -> int:
    """`"1GB"` / `"512MiB"` / `1073741824` -> bytes."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
        if not match:
            raise ValueError(f"max_shard_size must look like 1073741824, '1GB' or '512MiB', got {size!r}.")
        number, unit, binary = match.groups()
        base = 1024 if binary else 1000
        value = int(float(number) * (base ** ("KMGT".index(unit.upper()) + 1) if unit else 1))
    if value <= 0:
        raise ValueError(f"max_shard_size must be greater than 0, got {size!r}.")
    return value


def make_plan(
    source: Source,
    *,
    dtype: torch.dtype | None,
    args: tuple | None,
    kwargs: dict | None,
    dynamic_shapes: Any,
    block_pattern: str | None,
    max_shard_size: int,
    opset: int | None,
    task: str | None = None,
    runtime: str = "onnxruntime",
    module: nn.Module | None = None,
    zero_copy: bool = False,
    component: str | None = None,
) -> tuple[Plan, dict[str, torch.Tensor]]:
    """Plan the export (of `component`, one program of an encoder-decoder task). Returns the
    plan and the tensors the coordinator itself must supply (non-persistent buffers; every
    tensor of `module`, the real in-memory model if the source is one)."""
    requested_task = task
    task = resolve_task(source, task, explicit_inputs=args is not None or kwargs is not None)
    if (task in SEQ2SEQ_TASKS) != (component is not None):
        raise PlanError(f"task {task!r} and component {component!r} do not go together.")
    skeleton = build_skeleton(source, dtype, use_cache=uses_cache(task))
    names = _tensor_names(skeleton)
    hole_paths = find_holes(skeleton, block_pattern)
    memory = _memory_tensors(skeleton if module is None else module)
    checkpoint = index_checkpoint(source.files) if source.files else {}
    tensors = _tensor_entries(skeleton, names, checkpoint, memory, source)
    memory = {t.name: memory[t.name] for t in tensors if t.source is None}
    _check_all_used(checkpoint, tensors, skeleton)
    skeleton.to("meta")  # the real buffers are in `memory`; from here on shapes only
    layout = cache_layout(skeleton, _run_fake) if task == TEXT_GENERATION_WITH_PAST else None
    if task == TEXT_GENERATION_WITH_PAST and layout is None:
        if requested_task is not None:
            raise PlanError(
                f"{type(skeleton).__name__}'s cache is not keys and values per layer (a state-space model's "
                f"states), which {TEXT_GENERATION_WITH_PAST!r} exports; pass task='{TEXT_GENERATION}'."
            )
        logger.warning(
            "%s keeps no key-value cache; exporting %r (logits, no cache)",
            type(skeleton).__name__,
            TEXT_GENERATION,
        )
        task = TEXT_GENERATION
        skeleton.config.use_cache = False
    if task == TEXT_GENERATION_WITH_PAST:
        install_task(skeleton, task)
        kwargs, dynamic_shapes = generation_example(skeleton, layout)
    elif task in SEQ2SEQ_TASKS:
        hole_paths = component_holes(skeleton, hole_paths, component)
        if component != "encoder":
            install_task(skeleton, task, "decoder")  # its first step gives the cache's shapes
            kwargs, dynamic_shapes = seq2seq_example(skeleton, component, _run_fake)
        install_task(skeleton, task, component)
    example = _example_inputs(skeleton, args, kwargs, dynamic_shapes)
    cache_layers = (
        {p: cache_layer_index(skeleton.get_submodule(p), i) for i, p in enumerate(hole_paths)}
        if uses_cache(task)
        else {}
    )
    calls, output_names = record_calls(skeleton, hole_paths, example, cache_layers)
    groups = _group_blocks(skeleton, hole_paths, calls)
    if zero_copy:
        _check_zero_copy(tensors, source)
    shards = _assign_shards(tensors, max_shard_size, zero_copy)
    plan = Plan(
        source=source,
        model_class=type(skeleton).__name__,
        task=task,
        runtime=runtime,
        dtype=dtype,
        example=example,
        input_names=_input_names(skeleton, example),
        output_names=output_names,
        groups=groups,
        cache_layers=cache_layers,
        tensors=tensors,
        shards=shards,
        opset=opset,
        alias_to_name={alias: t.name for t in tensors for alias in t.aliases},
        component=component,
    )
    return plan, memory


def resolve_task(source: Source, task: str | None, *, explicit_inputs: bool) -> str | None:
    """The task to export: the one asked for, else the checkpoint's default (see `_tasks`).
    Explicit example inputs mean the model's own forward."""
    if task is not None:
        if source.kind != "hf":
            raise PlanError(
                f"task={task!r} needs a Hugging Face checkpoint; a {source.kind} source exports its own "
                "forward: drop task= (--task)."
            )
        if explicit_inputs:
            raise PlanError(
                f"task={task!r} generates its own example inputs; drop args=/kwargs= (--input) or task= (--task)."
            )
        config = hf_config(source)
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        if encoder_decoder != (task in SEQ2SEQ_TASKS):
            kind = "an encoder-decoder" if encoder_decoder else "a decoder-only model"
            fitting = default_task(config) or "none (drop task=)"
            raise PlanError(
                f"task={task!r} does not fit {getattr(config, 'model_type', '?')}, {kind}; its task is {fitting}."
            )
        return task
    if source.kind != "hf" or explicit_inputs:
        return None
    return default_task(hf_config(source))


def build_model(
    source: Source, dtype: torch.dtype | None, task: str | None, component: str | None = None
) -> nn.Module:
    """The skeleton of `source` with the forward of `task` (its `component`) installed."""
    model = build_skeleton(source, dtype, use_cache=uses_cache(task))
    install_task(model, task, component)
    return model


def _input_names(model: nn.Module, example: ExampleInputs) -> list[str]:
    """Graph input names: positional inputs by forward's parameter names, nested ones by path."""
    params = list(inspect.signature(model.forward).parameters)
    named = {params[i] if i < len(params) else f"input_{i}": a for i, a in enumerate(example.args)}
    return tree_names(named | example.kwargs)


def _tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """id(tensor) -> every name it has (tied weights have several), in registration order."""
    names: dict[int, list[str]] = {}
    for name, tensor in named_tensors(model, remove_duplicate=False):
        names.setdefault(id(tensor), []).append(name)
    return names


def find_holes(model: nn.Module, block_pattern: str | None) -> list[str]:
    """Module paths of the blocks to capture once per distinct kind.

    Default: the members of every repeated stack, outermost first: an `nn.ModuleList` of two or
    more modules of one class with submodules of their own (a list of bare Linears is a part of
    a block, not a stack of blocks), not inside another stack. A decoder-only LM has one (its
    layers); an encoder-decoder or a vision-language model has one per tower.
    `block_pattern` is an fnmatch pattern over module paths, e.g. ``"model.layers.*"``.
    """
    if block_pattern:
        paths = [n for n, _ in model.named_modules() if n and fnmatch.fnmatchcase(n, block_pattern)]
        # Keep outermost matches only: a hole inside a hole is meaningless.
        paths = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
        if not paths:
            raise PlanError(
                f"block pattern {block_pattern!r} matches no module; module paths look like "
                f"{_sample_paths(model)}."
            )
        return paths
    paths: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in paths):
            continue
        if (
            isinstance(module, nn.ModuleList)
            and len(module) >= 2
            and len({type(m) for m in module}) == 1
            and any(True for _ in module[0].children())
        ):
            paths += [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    if not paths:
        raise PlanError(
            f"{type(model).__name__} has no nn.ModuleList of two or more same-class blocks; "
            "pass block_pattern= (--blocks) naming the repeated modules, e.g. 'layers.*'."
        )
    return paths


def _sample_paths(model: nn.Module) -> str:
    return ", ".join(n for n, _ in list(model.named_modules())[1:6])


def _example_inputs(model: nn.Module, args, kwargs, dynamic_shapes) -> ExampleInputs:
    """Explicit inputs, or inputs generated from the model's config (`_tasks.default_inputs`)."""
    if args is None and kwargs is None:
        generated = default_inputs(model)
        if generated is None:
            raise PlanError(
                f"cannot generate example inputs for {type(model).__name__} (its config has no vocab_size "
                "and no image_size/num_channels); pass args=/kwargs= like torch.onnx.export."
            )
        kwargs, axes = generated
        dynamic_shapes = axes if dynamic_shapes is None else dynamic_shapes
    args = tuple(args or ())
    kwargs = _order_like_signature(model, dict(kwargs or {}))
    axes = _dynamic_axes(args, kwargs, dynamic_shapes)
    return ExampleInputs(args, kwargs, axes)


def _order_like_signature(model: nn.Module, kwargs: dict) -> dict:
    params = list(inspect.signature(model.forward).parameters)
    return dict(
        sorted(kwargs.items(), key=lambda kv: params.index(kv[0]) if kv[0] in params else len(params))
    )


def _dynamic_axes(args: tuple, kwargs: dict, dynamic_shapes) -> list[dict[int, str]]:
    """Per flattened tensor input, its dynamic axes. `dynamic_shapes` gives, per input, a
    ``{dim: "axis_name"}`` dict or None: a dict keyed by kwarg name, or a tuple matching args.
    A dict given for a nested input applies to each of its tensors."""
    inputs = [*args, *kwargs.values()]
    if dynamic_shapes is None:
        per_input = [None] * len(inputs)
    elif isinstance(dynamic_shapes, dict):
        if args:
            raise PlanError(
                "dynamic_shapes is a dict but some inputs are positional; pass a tuple matching args."
            )
        unknown = set(dynamic_shapes) - set(kwargs)
        if unknown:
            raise PlanError(
                f"dynamic_shapes names {sorted(unknown)}, which are not inputs; inputs are {list(kwargs)}."
            )
        per_input = [dynamic_shapes.get(k) for k in kwargs]
    else:
        per_input = [*dynamic_shapes, *[None] * (len(inputs) - len(dynamic_shapes))]
    axes = []
    for spec, value in zip(per_input, inputs):
        tensors = [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
        specs = _leaf_axes(spec, value, len(tensors))
        for t, spec in zip(tensors, specs):
            for dim, name in (spec or {}).items():
                if not 0 <= dim < t.dim():
                    raise PlanError(
                        f"dynamic axis {dim} ({name!r}) is out of range for an input of shape {list(t.shape)}."
                    )
                if t.shape[dim] < 2:
                    raise PlanError(
                        f"dynamic axis {name!r} has size {t.shape[dim]} in the example; use a size of at "
                        "least 2 (torch.export specializes sizes 0 and 1)."
                    )
            axes.append({int(d): str(n) for d, n in (spec or {}).items()})
    return axes


def _is_axes(spec) -> bool:
    return isinstance(spec, dict) and all(isinstance(k, int) for k in spec)


def _leaf_axes(spec, value, count: int) -> list:
    """Per tensor of one input, its ``{dim: "axis_name"}``: one dict for all of them, or a tree
    of them shaped like the input (an encoder-decoder's past, whose two caches differ)."""
    if spec is None or _is_axes(spec):
        return [spec] * count
    leaves = pytree.tree_leaves(spec, is_leaf=_is_axes)
    if len(leaves) != count or not all(_is_axes(x) for x in leaves):
        raise PlanError(f"each dynamic_shapes entry must be {{dim: 'axis_name'}} or None, got {spec!r}.")
    return leaves


def _memory_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors with real values in `model`: the skeleton's buffers (non-persistent ones are in
    no checkpoint), or every tensor of a real in-memory model."""
    return {name: t for name, t in named_tensors(model, remove_duplicate=False) if t.device.type != "meta"}


def _tensor_entries(skeleton, names, checkpoint, memory, source) -> list[TensorEntry]:
    by_name = dict(named_tensors(skeleton, remove_duplicate=False))
    resolved = resolve_checkpoint(skeleton, checkpoint) if checkpoint else {}
    result = []
    missing = []
    for aliases in names.values():
        tensor = by_name[aliases[0]]
        found = next((resolved[a] for a in aliases if a in resolved), None)
        keys: tuple[str, ...] = ()
        if source.kind == "module":
            location = None
        elif found is not None:
            location = found.source
            keys = tuple(dict.fromkeys(k for a in aliases if a in resolved for k in resolved[a].keys))
            _check_against_model(aliases[0], location, tensor, source)
        elif aliases[0] in memory:
            location = None
            if not _is_non_persistent(skeleton, aliases[0]):
                logger.warning(
                    "buffer %s is not in the checkpoint; using the value the model code computes", aliases[0]
                )
        else:
            missing.append(aliases[0])
            continue
        result.append(
            TensorEntry(
                name=aliases[0],
                aliases=tuple(aliases),
                shape=tuple(tensor.shape),
                dtype=dtype_name(tensor.dtype),
                source=location,
                is_buffer=not isinstance(tensor, nn.Parameter),
                nbytes=tensor.numel() * tensor.element_size(),
                keys=keys,
            )
        )
    if missing:
        raise SourceError(
            f"{len(missing)} tensor(s) the model needs are missing from the checkpoint "
            f"({len(source.files)} file(s) under {source.location}), e.g. {missing[:3]}; the "
            "checkpoint does not match the model."
        )
    return result


def _check_against_model(
    name: str, found: TensorLocation | Assembly, tensor: torch.Tensor, source: Source
) -> None:
    """The checkpoint's tensor (as transformers would build it) has the model tensor's shape
    and a dtype that can fill it."""
    if tuple(found.shape) != tuple(tensor.shape):
        built = f" as {found.operations} builds it" if isinstance(found, Assembly) else ""
        raise SourceError(
            f"tensor {name!r} has shape {list(found.shape)} in {found.file}{built} but the "
            f"model built from {source.location} expects {list(tensor.shape)}; the "
            "checkpoint does not match its config/factory."
        )
    for location in locations(found):
        check_stored_dtype(name, location, tensor.dtype)


def _check_all_used(
    checkpoint: dict[str, TensorLocation], tensors: list[TensorEntry], model: nn.Module
) -> None:
    """Every checkpoint tensor fills a model tensor (directly, renamed, or as a piece of one
    transformers assembles): one that fills none means the checkpoint is not this model's.
    Ignored, as transformers ignores them: the model class's
    ``_keys_to_ignore_on_load_unexpected`` and stale copies of non-persistent buffers."""
    used = {key for t in tensors for key in t.keys}
    patterns = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    buffers = {
        name.rpartition(".")[2] for name, _ in model.named_buffers() if _is_non_persistent(model, name)
    }
    extra = [
        name
        for name in checkpoint
        if name not in used
        and name.rpartition(".")[2] not in buffers
        and not any(p.search(name) for p in patterns)
    ]
    if extra:
        raise SourceError(
            f"{len(extra)} tensor(s) in the checkpoint are not in the model, e.g. {extra[0]!r} in "
            f"{checkpoint[extra[0]].file}; the checkpoint does not match its config/factory."
        )


def _is_non_persistent(model: nn.Module, name: str) -> bool:
    module_name, _, buffer_name = name.rpartition(".")
    return buffer_name in model.get_submodule(module_name)._non_persistent_buffers_set


def record_calls(
    model: nn.Module, hole_paths: list[str], example: ExampleInputs, cache_layers: dict[str, int]
) -> tuple[dict[str, CallSignature], list[str]]:
    """Record each hole's real call under fake tensors, at the example size and a grown size;
    dims that differ between the two are the hole's dynamic dims. Calls are recorded in hole
    form (see `_tasks`): a block's layer of the KV cache is part of its inputs and outputs.
    Also returns the model's output names (``logits``, ``present.0.key``, ...)."""
    first, output_names = _record_once(model, hole_paths, example, cache_layers)
    second, _ = _record_once(model, hole_paths, example.resized(), cache_layers)
    calls = {}
    for path in hole_paths:
        (in_spec, leaves, out_spec, out_leaves), (_, leaves2, _, out_leaves2) = first[path], second[path]
        calls[path] = CallSignature(
            in_spec,
            _with_dynamic_dims(leaves, leaves2),
            out_spec,
            _with_dynamic_dims(out_leaves, out_leaves2),
        )
    return calls, output_names


def _with_dynamic_dims(leaves: list, grown: list) -> tuple:
    result = []
    for a, b in zip(leaves, grown):
        if isinstance(a, TensorSpec):
            dynamic = tuple(i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y)
            a = dataclasses.replace(a, dynamic=dynamic)
        result.append(a)
    return tuple(result)


def _spec_leaves(tree) -> tuple[pytree.TreeSpec, list]:
    leaves, spec = pytree.tree_flatten(tree)
    return spec, [
        TensorSpec(tuple(int(s) for s in x.shape), dtype_name(x.dtype)) if isinstance(x, torch.Tensor) else x
        for x in leaves
    ]


def export_state():
    """The flags torch.export sets while tracing (`torch.compiler.is_exporting()` is True).

    Model code branches on them (transformers skips causal masks in eager mode but not under
    export); recording and the PyTorch reference must take the branches the capture took.
    """
    from torch._export.utils import _compiling_state_context

    return _compiling_state_context()


def _run_fake(model: nn.Module, kwargs: dict, args: tuple = ()):
    """Run `model` under fake tensors (no data is touched) in torch.export's state."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad(), export_state():
        args, kwargs = pytree.tree_map_only(
            torch.Tensor, lambda t: mode.from_tensor(t.to("meta")), (args, kwargs)
        )
        return model(*args, **kwargs)


def _record_once(
    model: nn.Module, hole_paths: list[str], example: ExampleInputs, cache_layers: dict[str, int]
) -> tuple[dict, list[str]]:
    """One forward under fake tensors, recording each hole's call. A block identical to one
    already run (same fingerprint, same input specs) is not run again: its recorded output
    shapes are replayed, so planning cost barely grows with depth."""
    records: dict[str, tuple] = {}
    outputs: dict[tuple, tuple] = {}

    def recorder(path: str, module: nn.Module):
        run = module.forward
        fingerprint = _fingerprint(module)
        layer = cache_layers.get(path, 0)

        def forward(*args, **kwargs):
            args, kwargs, cache = split_cache(args, kwargs, layer)
            in_spec, in_leaves = _spec_leaves((args, kwargs))
            key = (fingerprint, str(in_spec), repr(in_leaves))
            if key in outputs:
                device = next(
                    x.device for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)
                )
                output = _empty_like_spec(*outputs[key], device)
            else:
                output = call_block(run, args, kwargs)
                outputs[key] = _spec_leaves(output)
            records[path] = (in_spec, in_leaves, *outputs[key])
            return merge_cache(output, cache, layer)

        return forward

    blocks = [model.get_submodule(path) for path in hole_paths]
    for path, block in zip(hole_paths, blocks):
        block.forward = recorder(path, block)
    try:
        output_names = tree_names(_run_fake(model, example.kwargs, example.args))
    except Exception as e:
        raise PlanError(
            f"running {type(model).__name__} on the example inputs under fake tensors failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    finally:
        for block in blocks:
            del block.forward  # the instance attribute; the class's forward shows again
    not_called = [p for p in hole_paths if p not in records]
    if not_called:
        raise PlanError(
            f"blocks {not_called[:3]} were never called by forward; choose other blocks with block_pattern=."
        )
    return records, output_names


def _empty_like_spec(spec: pytree.TreeSpec, leaves: list, device: torch.device):
    tensors = [
        torch.empty(x.shape, dtype=getattr(torch, x.dtype), device=device) if isinstance(x, TensorSpec) else x
        for x in leaves
    ]
    return pytree.tree_unflatten(tensors, spec)


def _fingerprint(block: nn.Module) -> tuple:
    """What makes two blocks produce the same graph: structure, tensor shapes, plain attributes."""
    parts = []
    for name, module in block.named_modules():
        attrs = tuple(
            sorted(
                (k, repr(v))
                for k, v in vars(module).items()
                if not k.startswith("_")
                and k not in PER_LAYER_ATTRIBUTES
                and isinstance(v, (int, float, str, bool, type(None), tuple))
            )
        )
        parts.append((name, type(module).__qualname__, attrs))
    for name, t in named_tensors(block):
        parts.append((name, tuple(t.shape), str(t.dtype)))
    return tuple(parts)


def _group_blocks(
    model: nn.Module, hole_paths: list[str], calls: dict[str, CallSignature]
) -> list[BlockGroup]:
    groups: dict[tuple, BlockGroup] = {}
    for path in hole_paths:
        block = model.get_submodule(path)
        call = calls[path]
        key = (
            _fingerprint(block),
            str(call.in_spec),
            repr(call.leaves),
            str(call.out_spec),
            repr(call.out_leaves),
        )
        if key not in groups:
            class_name = type(block).__name__
            same_class = sum(g.class_name == class_name for g in groups.values())
            groups[key] = BlockGroup(
                id=len(groups),
                function_name=class_name if not same_class else f"{class_name}_{same_class}",
                class_name=class_name,
                members=[],
                call=call,
                weight_names=[n for n, _ in named_tensors(block)],
            )
        groups[key].members.append(path)
    return list(groups.values())


def _check_zero_copy(tensors: list[TensorEntry], source: Source) -> None:
    """zero_copy links the checkpoint's files, so no byte can change. A tensor transformers
    assembles from several checkpoint tensors exists in no file: it is copied into a data shard
    (the least zero_copy can do; refusing would copy every tensor instead), and said so."""
    if source.kind == "module":
        raise PlanError("zero_copy needs weights in safetensors files; an in-memory module has none.")
    converted = [
        t.name
        for t in tensors
        if t.source is not None
        and any(SAFETENSORS_TO_TORCH[x.dtype] != getattr(torch, t.dtype) for x in locations(t.source))
    ]
    if converted:
        raise PlanError(
            f"zero_copy cannot convert dtypes, but {len(converted)} tensor(s) differ from the model's dtype "
            f"(e.g. {converted[0]}); drop dtype= or zero_copy=."
        )
    assembled = [t for t in tensors if isinstance(t.source, Assembly)]
    if assembled:
        logger.warning(
            "zero_copy: %d tensor(s) (%.1f MB, e.g. %s) are assembled from several checkpoint tensors "
            "(%s) and exist in no file; they are copied, the rest is linked",
            len(assembled),
            sum(t.nbytes for t in assembled) / 1e6,
            assembled[0].name,
            assembled[0].source.operations,
        )


def _assign_shards(tensors: list[TensorEntry], max_shard_size: int, zero_copy: bool) -> list[ShardSpec]:
    """Pack tensors in model order into shards of at most `max_shard_size` bytes (a larger
    tensor gets a shard of its own), every offset page-aligned. Memory-held tensors get their
    own shards: the coordinator writes those, workers write the rest.

    With `zero_copy`, tensors stored whole in a source file are not copied: each such file
    becomes a "shard" that is a hard link to it, and tensors keep their offsets inside it.
    Assembled tensors (see `_check_zero_copy`) are packed into data shards as usual."""
    layouts: list[tuple[list[TensorEntry], int, str | None]] = []
    linked = [t for t in tensors if zero_copy and isinstance(t.source, TensorLocation)]
    for file in dict.fromkeys(t.source.file for t in linked):
        members = [t for t in linked if t.source.file == file]
        for t in members:
            t.offset = t.source.offset
        layouts.append((members, os.path.getsize(file), file))
    linked_names = {t.name for t in linked}
    for from_memory in (False, True):
        current: list[TensorEntry] = []
        size = 0
        for t in (t for t in tensors if (t.source is None) == from_memory and t.name not in linked_names):
            offset = _align(size)
            if current and offset + t.nbytes > max_shard_size:
                layouts.append((current, size, None))
                current, offset = [], 0
            t.offset = offset
            current.append(t)
            size = offset + t.nbytes
        if current:
            layouts.append((current, size, None))
    shards = []
    for i, (members, size, link_target) in enumerate(layouts):
        suffix = "safetensors" if link_target else "data"
        file = f"model-{i + 1:05d}-of-{len(layouts):05d}.{suffix}"
        for t in members:
            t.shard = file
        from_memory = members[0].source is None
        shards.append(ShardSpec(file, size, [t.name for t in members], from_memory, link_target))
    return shards


def _align(offset: int) -> int:
    return -(-offset // SHARD_ALIGNMENT) * SHARD_ALIGNMENT

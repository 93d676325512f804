"""Each stage in-process, without Ray: plan, capture, weights."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import shardex
from shardex._capture import HOLE_DOMAIN, capture_block, capture_trunk
from shardex._plan import (
    SHARD_ALIGNMENT,
    _assign_shards,
    _tensor_entries,
    _tensor_names,
    find_holes,
    make_plan,
    record_calls,
)
from shardex._plan import _group_blocks as group_blocks
from shardex._source import checkpoint_float_dtype, resolve_source
from shardex._weights import partial_path, write_shard
from tests import models


def plan_block_stack(tmp_path, **options):
    weights = tmp_path / "stack.safetensors"
    models.save_block_stack(weights)
    source = resolve_source("tests.models:make_block_stack", weights=weights)
    defaults = dict(
        dtype=None,
        args=(torch.randn(2, 5, 16),),
        kwargs=None,
        dynamic_shapes=({0: "batch", 1: "steps"},),
        block_pattern=None,
        max_shard_size=8192,
        opset=None,
    )
    return make_plan(source, **(defaults | options)), weights


def test_giant_llama_planned_on_meta_in_seconds():
    """A 7B-shaped, 64-layer Llama (13B parameters) is planned without allocating a weight."""
    import transformers

    config = models.llama_config(
        64,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        use_cache=False,  # as build_skeleton makes it without a KV-cache task
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    holes = find_holes(model, None)
    assert holes == [f"model.layers.{i}" for i in range(64)]
    from shardex._plan import _example_inputs

    calls, output_names = record_calls(model, holes, _example_inputs(model, None, None, None), {})
    groups = group_blocks(model, holes, calls)
    assert len(groups) == 1 and len(groups[0].members) == 64
    assert output_names == ["logits"]
    hidden = groups[0].call.inputs[0]
    assert hidden.shape == (2, 8, 4096) and hidden.dynamic == (0, 1)

    entries = _tensor_entries(model, _tensor_names(model), {}, {}, resolve_source(torch.nn.Linear(1, 1)))
    shards = _assign_shards(entries, 2 << 30, zero_copy=False)
    assert sum(t.nbytes for t in entries) > 50e9
    for shard in shards:
        assert shard.size <= 2 << 30
    assert all(t.offset % SHARD_ALIGNMENT == 0 for t in entries)


def test_plan_groups_blocks_and_lays_out_shards(tmp_path):
    (plan, memory), _ = plan_block_stack(tmp_path)
    assert [g.members for g in plan.groups] == [[f"blocks.{i}" for i in range(4)]]
    assert plan.groups[0].weight_names == [
        "norm.weight",
        "norm.bias",
        "up.weight",
        "up.bias",
        "down.weight",
        "down.bias",
    ]
    assert set(memory) == {"scale"}  # the non-persistent buffer comes from the model code
    assert [s.from_memory for s in plan.shards][-1] is True
    names = [n for s in plan.shards for n in s.tensors]
    assert sorted(names) == sorted(t.name for t in plan.tensors)
    assert plan.to_json()["groups"][0]["members"] == plan.groups[0].members


def test_block_pattern_overrides_detection(tmp_path):
    (plan, _), _ = plan_block_stack(tmp_path, block_pattern="blocks.[02]")
    assert [g.members for g in plan.groups] == [["blocks.0", "blocks.2"]]


def test_capture_trunk_and_block_in_process(tmp_path):
    (plan, _), _ = plan_block_stack(tmp_path)
    trunk = capture_trunk(plan)
    holes = [n for n in trunk.load().graph if n.domain == HOLE_DOMAIN]
    assert [n.attributes["key"].as_string() for n in holes] == [f"blocks.{i}" for i in range(4)]
    assert set(trunk.weight_inputs) == {"inp.weight", "inp.bias", "head.weight", "head.bias", "scale"}
    block = capture_block(plan, 0)
    assert block.weight_inputs == plan.groups[0].weight_names
    graph = block.load().graph
    assert [v.name for v in graph.inputs[-len(block.weight_inputs) :]] == block.weight_inputs
    assert not graph.initializers or all(v.const_value is not None for v in graph.initializers.values())


def test_capture_is_deterministic(tmp_path):
    (plan, _), _ = plan_block_stack(tmp_path)
    assert capture_block(plan, 0).model_bytes == capture_block(plan, 0).model_bytes
    assert capture_trunk(plan).model_bytes == capture_trunk(plan).model_bytes


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_write_shards_copies_or_converts_every_tensor(tmp_path, dtype):
    (plan, memory), weights = plan_block_stack(tmp_path, dtype=dtype)
    source = load_file(weights)
    out = tmp_path / "out"
    out.mkdir()
    entries = {t.name: t for t in plan.tensors}
    for shard in plan.shards:
        result = write_shard(shard, [entries[n] for n in shard.tensors], os.fspath(out), memory)
        assert os.path.getsize(out / shard.file) == shard.size == result.nbytes
    for entry in plan.tensors:
        data = (out / entry.shard).read_bytes()[entry.offset : entry.offset + entry.nbytes]
        stored = torch.frombuffer(bytearray(data), dtype=getattr(torch, entry.dtype)).reshape(entry.shape)
        expected = source[entry.name] if entry.name in source else memory[entry.name]
        torch.testing.assert_close(stored, expected.to(stored.dtype), rtol=0, atol=0)


def test_failed_shard_leaves_nothing_under_any_name(tmp_path):
    (plan, _), weights = plan_block_stack(tmp_path)
    with open(weights, "r+b") as f:  # truncate the source inside its last tensor
        f.truncate(os.path.getsize(weights) - 100)
    out = tmp_path / "out"
    out.mkdir()
    shard = next(s for s in plan.shards if not s.from_memory and "head.bias" in s.tensors)
    entries = {t.name: t for t in plan.tensors}
    with pytest.raises(shardex.WeightsError) as caught:
        write_shard(shard, [entries[n] for n in shard.tensors], os.fspath(out))
    assert shard.file in str(caught.value)
    assert not os.path.exists(out / shard.file)
    assert not os.path.exists(partial_path(os.fspath(out), shard.file))


def test_checkpoint_dtype_is_the_one_holding_most_bytes(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file(
        {
            "big": torch.zeros(100, dtype=torch.bfloat16),
            "small": torch.zeros(10),
            "ids": torch.zeros(500, dtype=torch.int64),
        },
        path,
    )
    assert checkpoint_float_dtype([os.fspath(path)]) == torch.bfloat16

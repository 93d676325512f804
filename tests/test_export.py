"""End-to-end exports on a local Ray: HF checkpoints, a factory model, an in-memory module."""

from __future__ import annotations

import json
import os

import blake3
import numpy as np
import onnx
import onnx_ir
import pytest
import torch

import shardex
from tests import models
from tests.onnx_support import run_onnx, session, step_feeds, token_feeds

pytestmark = pytest.mark.usefixtures("ray_local")


def first_step(model_path, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """A first decoder step (empty KV cache) of a generation export, or a plain forward."""
    sess = session(model_path)
    return sess.run(None, step_feeds(sess, feeds["input_ids"].numpy(), feeds["attention_mask"].numpy()))


def external_initializers(model_path) -> dict[str, dict]:
    proto = onnx.load(os.fspath(model_path), load_external_data=False)
    result = {}
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            result[init.name] = {e.key: e.value for e in init.external_data} | {"dtype": init.data_type}
    return result


def assert_shards_sound(out, manifest) -> None:
    """Offsets page-aligned, the manifest's digest (BLAKE3) matches every file, nothing partial left."""
    for info in external_initializers(out / "model.onnx").values():
        assert int(info.get("offset", 0)) % 4096 == 0, info
        assert os.path.isfile(out / info["location"])
    for shard in manifest["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert len(data) == shard["nbytes"]
        assert shard["digest"] == "blake3:" + blake3.blake3(data).hexdigest()
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]


def test_llama_multi_file_checkpoint(tmp_path):
    import transformers

    ckpt = models.make_llama(tmp_path / "ckpt", layers=4, max_shard_size="150KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    out = tmp_path / "out"

    program = shardex.export(ckpt, out, max_shard_size="200KB")

    assert isinstance(program, torch.onnx.ONNXProgram)
    manifest = shardex.load_manifest(out)
    assert manifest["status"] == "complete"
    verification = manifest["verification"]
    assert verification["passed"] and len(verification["blocks"]) == 4
    assert all(c["max_abs_diff"] <= 1e-4 for c in verification["outputs"] + verification["blocks"])

    # One function, called once per layer; the KV cache is the default for a causal LM.
    proto = onnx.load(out / "model.onnx", load_external_data=False)
    assert [f.name for f in proto.functions] == ["LlamaDecoderLayer"]
    calls = [n for n in proto.graph.node if n.domain == "shardex.blocks"]
    assert [n.name for n in calls] == [f"model.layers.{i}" for i in range(4)]
    assert manifest["plan"]["task"] == "text-generation-with-past"
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
    }
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["past_key_values.3.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert [o.name for o in proto.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]

    # Plain ONNX Runtime at sizes other than the example's, empty and non-empty past, against
    # transformers itself (its own cache for the past).
    reference = transformers.LlamaForCausalLM.from_pretrained(ckpt).eval()
    sess = session(out / "model.onnx")
    for batch, seq, past_length in [(1, 5, 0), (3, 13, 4)]:
        feeds = token_feeds(batch, seq + past_length)
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        with torch.no_grad():
            expected = reference(**feeds).logits[:, past_length:].numpy()
        past = None
        if past_length:
            with torch.no_grad():
                cache = reference(input_ids=ids[:, :past_length], use_cache=True).cache
            past = {
                f"past_key_values.{i}.{kind}": getattr(layer, f"{kind}s").numpy()
                for i, layer in enumerate(cache.layers)
                for kind in ("key", "value")
            }
        logits, *present = sess.run(None, step_feeds(sess, ids[:, past_length:].numpy(), mask.numpy(), past))
        assert logits.shape == expected.shape
        assert np.abs(logits - expected).max() <= 1e-4
        assert present[0].shape == (batch, 2, seq + past_length, 16)

    assert_shards_sound(out, manifest)
    checkpoint_bytes = sum(os.path.getsize(f) for f in manifest["source"]["files"])
    shard_bytes = sum(s["nbytes"] for s in manifest["shards"])
    assert 0.9 * checkpoint_bytes <= shard_bytes <= 1.1 * checkpoint_bytes + 4096 * len(manifest["shards"])


def test_gpt2_tied_weights_stored_once(tmp_path):
    import transformers

    ckpt = models.make_gpt2(tmp_path / "ckpt", layers=3)
    out = tmp_path / "out"
    shardex.export(ckpt, out)

    initializers = external_initializers(out / "model.onnx")
    assert "transformer.wte.weight" in initializers and "lm_head.weight" not in initializers
    manifest = shardex.load_manifest(out)
    assert manifest["verification"]["passed"]
    reference = transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()
    stored = sum(int(i["length"]) for i in initializers.values())
    assert stored == sum(p.numel() * 4 for p in reference.parameters())  # tied ones counted once
    feeds = token_feeds(2, 9)
    with torch.no_grad():
        expected = reference(**feeds).logits.numpy()
    (logits, *_) = first_step(out / "model.onnx", feeds)
    assert np.abs(logits - expected).max() <= 1e-4


def test_factory_model_with_dynamic_axes(tmp_path):
    weights = tmp_path / "stack.safetensors"
    reference = models.save_block_stack(weights)
    out = tmp_path / "out"
    shardex.export(
        "tests.models:make_block_stack",
        out,
        weights=weights,
        args=(torch.randn(2, 5, 16),),
        dynamic_shapes=({0: "batch", 1: "steps"},),
    )
    manifest = shardex.load_manifest(out)
    assert manifest["verification"]["passed"]
    assert [g["members"] for g in manifest["plan"]["groups"]] == [[f"blocks.{i}" for i in range(4)]]
    x = torch.randn(3, 11, 16)
    with torch.no_grad():
        expected = reference(x).numpy()
    (actual,) = run_onnx(out / "model.onnx", {"x": x})
    assert np.abs(actual - expected).max() <= 1e-4


def test_in_memory_module_with_tied_noncontiguous_and_buffer(tmp_path):
    torch.manual_seed(0)
    model = models.TiedEmbeddingModel().eval()
    out = tmp_path / "out"
    ids = torch.randint(0, 64, (2, 6))
    shardex.export(model, out, args=(ids,), dynamic_shapes=({0: "batch", 1: "sequence"},))

    initializers = external_initializers(out / "model.onnx")
    assert "embed.weight" in initializers and "lm_head.weight" not in initializers
    assert "scale" in initializers  # the non-persistent buffer is materialized
    test_ids = torch.randint(0, 64, (4, 3))
    with torch.no_grad():
        expected = model(test_ids).numpy()
    (actual,) = run_onnx(out / "model.onnx", {"ids": test_ids})
    assert np.abs(actual - expected).max() <= 1e-4


def test_inline_gives_flat_graph_with_same_outputs(tmp_path):
    ckpt = models.make_llama(tmp_path / "ckpt", layers=3)
    shardex.export(ckpt, tmp_path / "functions", verify=False)
    shardex.export(ckpt, tmp_path / "flat", inline=True)

    flat = onnx.load(tmp_path / "flat" / "model.onnx", load_external_data=False)
    assert not flat.functions
    assert not [n for n in flat.graph.node if n.domain.startswith("shardex")]
    feeds = token_feeds(2, 7)
    with_functions = first_step(tmp_path / "functions" / "model.onnx", feeds)
    inlined = first_step(tmp_path / "flat" / "model.onnx", feeds)
    for a, b in zip(inlined, with_functions, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    verification = shardex.load_manifest(tmp_path / "flat")["verification"]
    assert verification["passed"] and len(verification["blocks"]) == 3  # block checks of their own
    report = shardex.verify(tmp_path / "flat")  # re-verification rebuilds the function form
    assert report.passed and [c.name for c in report.blocks] == [f"model.layers.{i}" for i in range(3)]


def corrupt_tensor(out, name: str, dtype=np.float32) -> None:
    """Damage one stored tensor in place, as a bad disk or a bad conversion would: float32
    values scaled, other element types (`dtype` of the same width) bit-flipped."""
    info = external_initializers(out / "model.onnx")[name]
    path, offset, length = out / info["location"], int(info["offset"]), int(info["length"])
    with open(path, "r+b") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(length), dtype=dtype)
        values = values * 3.0 + 0.5 if dtype == np.float32 else values ^ 0x4000
        f.seek(offset)
        f.write(values.astype(dtype).tobytes())


def test_corrupted_weight_is_pinned_to_its_block(tmp_path):
    ckpt = models.make_llama(tmp_path / "ckpt", layers=4)
    out = tmp_path / "out"
    shardex.export(ckpt, out, verify=False)
    corrupt_tensor(out, "model.layers.2.mlp.down_proj.weight")

    with pytest.raises(shardex.VerificationError) as caught:
        shardex.verify(out)

    message = str(caught.value)
    assert "model.layers.2" in message and "\n" not in message
    failed = {c.name for c in caught.value.failures}
    assert "model.layers.2" in failed
    assert not failed & {"model.layers.0", "model.layers.1", "model.layers.3"}
    assert any(name.startswith("output:") for name in failed)  # the global check fails too
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "verification_failed"
    assert not manifest["verification"]["generation"]["passed"]  # greedy decoding notices it too
    assert manifest["verification"]["shard_hash_mismatches"]


def test_bf16_checkpoint_is_verified_on_cpu(tmp_path):
    ckpt = models.make_llama(tmp_path / "ckpt", layers=2, dtype=torch.bfloat16)
    out = tmp_path / "out"
    shardex.export(ckpt, out)

    manifest = shardex.load_manifest(out)
    verification = manifest["verification"]
    assert verification["passed"] and "float32-promoted" in verification["method"]
    dtypes = {i["dtype"] for i in external_initializers(out / "model.onnx").values()}
    assert onnx.TensorProto.BFLOAT16 in dtypes
    checkpoint_bytes = sum(os.path.getsize(f) for f in manifest["source"]["files"])
    assert sum(s["nbytes"] for s in manifest["shards"]) < 1.2 * checkpoint_bytes


def test_float16_conversion_while_streaming(tmp_path):
    ckpt = models.make_llama(tmp_path / "ckpt", layers=2)
    out = tmp_path / "out"
    shardex.export(ckpt, out, dtype="float16")

    manifest = shardex.load_manifest(out)
    assert manifest["verification"]["passed"]
    initializers = external_initializers(out / "model.onnx")
    assert initializers["model.layers.0.mlp.up_proj.weight"]["dtype"] == onnx.TensorProto.FLOAT16
    checkpoint_bytes = sum(os.path.getsize(f) for f in manifest["source"]["files"])
    assert sum(s["nbytes"] for s in manifest["shards"]) < 0.6 * checkpoint_bytes


def test_zero_copy_points_into_the_source_files(tmp_path):
    ckpt = models.make_llama(tmp_path / "ckpt", layers=3, max_shard_size="150KB")
    out = tmp_path / "out"
    shardex.export(ckpt, out, zero_copy=True)

    manifest = shardex.load_manifest(out)
    assert manifest["verification"]["passed"]
    links = [s for s in manifest["shards"] if s["link_target"]]
    assert len(links) == len(manifest["source"]["files"])
    for shard in links:
        assert os.path.samefile(out / shard["file"], shard["link_target"]) and shard["hashed"] == "header"
    copied = sum(s["nbytes"] for s in manifest["shards"] if not s["link_target"])
    assert copied < 16 * 1024  # only the materialized rotary buffers are written
    feeds = token_feeds(2, 6)
    (logits, *_) = first_step(out / "model.onnx", feeds)
    assert logits.shape == (2, 6, 128)
    assert shardex.verify(out).passed
    with pytest.raises(shardex.PlanError, match="zero_copy cannot convert"):
        shardex.export(ckpt, tmp_path / "converted", zero_copy=True, dtype="float16")


def test_global_check_streams_the_saved_file_in_segments(tmp_path):
    """With a session budget below the model's weights, the saved model.onnx runs as segments
    whose initializers are the file's own references, each resolved by ONNX Runtime: the result
    matches PyTorch, a damaged tensor is caught, and a truncated shard is reported in one line."""
    from shardex._export import plan_export
    from shardex._source import resolve_source
    from shardex._verify import _segments, reference_run, verify_global

    ckpt = models.make_llama(tmp_path / "ckpt", layers=3, dtype=torch.bfloat16)
    out = tmp_path / "out"
    shardex.export(ckpt, out, verify=False)
    options = shardex.load_manifest(out)["options"]
    plan, memory = plan_export(resolve_source(ckpt), options, None, None, None)
    inputs = plan.example.resized()
    reference = reference_run(plan, memory, inputs).outputs
    block_bytes = sum(plan.entry(f"model.layers.0.{n}").nbytes for n in plan.groups[0].weight_names)
    graph = onnx_ir.load(out / "model.onnx").graph
    assert len(_segments(graph, block_bytes)) > 4  # embedding, each layer, norm and head apart

    def check() -> list:
        return verify_global(plan, os.fspath(out), inputs, reference, 5e-2, 5e-2, True, block_bytes)[0]

    assert all(c.passed for c in check())
    corrupt_tensor(out, "lm_head.weight", dtype=np.uint16)
    failed = {c.name for c in check() if not c.passed}
    assert failed == {"output:logits"}  # the KV cache does not go through the LM head
    shard = out / external_initializers(out / "model.onnx")["model.norm.weight"]["location"]
    os.truncate(shard, 10)
    (failure,) = check()
    assert not failure.passed and "ONNX Runtime cannot run model.onnx" in failure.error
    assert "\n" not in failure.error


def test_block_checks_ride_on_the_segmented_pass(tmp_path, reruns_on_recorded_inputs):
    """A promoted (bf16) export runs in segments with each block call a segment of its own: a
    block is checked on what it computed in the global step, and only a block failing there
    runs again, on PyTorch's recorded inputs, in the same session: a damaged weight is pinned to
    its block, not to the blocks after it that were fed its error."""
    from shardex._export import plan_export
    from shardex._source import resolve_source
    from shardex._verify import reference_run, verify_global

    rerun = reruns_on_recorded_inputs

    ckpt = models.make_llama(tmp_path / "ckpt", layers=3, dtype=torch.bfloat16)
    out = tmp_path / "out"
    shardex.export(ckpt, out, verify=False)
    plan, memory = plan_export(resolve_source(ckpt), shardex.load_manifest(out)["options"], None, None, None)
    inputs = plan.example.resized()
    reference = reference_run(plan, memory, inputs)

    def check() -> tuple[list, list]:
        return verify_global(
            plan, os.fspath(out), inputs, reference.outputs, 5e-2, 5e-2, True, None, reference.boundaries
        )

    outputs, blocks = check()
    assert all(c.passed for c in outputs + blocks)
    assert [c.name for c in blocks] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert rerun == []
    corrupt_tensor(out, "model.layers.1.mlp.down_proj.weight", dtype=np.uint16)
    outputs, blocks = check()
    assert {c.name for c in blocks if not c.passed} == {"model.layers.1"}
    assert rerun == ["model.layers.1", "model.layers.2"]
    assert not all(c.passed for c in outputs)

"""Generation-ready exports: the KV cache as inputs and outputs, greedy decoding in plain ONNX
Runtime equal to transformers' `generate`, left padding, empty and long pasts; a state-space
model's recurrent state as its cache (Mamba)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch

import shardex
from tests.architectures import BY_NAME
from tests.models import save_block_stack, save_hf
from tests.onnx_support import (
    greedy_onnx,
    greedy_transformers,
    left_padded_prompts,
    past_name,
    same_greedy_tokens,
    session,
    step_feeds,
)

pytestmark = pytest.mark.usefixtures("ray_local")

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def build(family: str):
    import transformers

    configs = {
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)),
        "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON)),
        # a window shorter than prompt + new tokens: the mask, not the cache, applies it
        "mistral": lambda: transformers.MistralForCausalLM(
            transformers.MistralConfig(**COMMON, sliding_window=4)
        ),
        "gemma2": lambda: transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=4)
        ),
        "gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=128, n_positions=256, n_embd=64, n_layer=3, n_head=4)
        ),
    }
    torch.manual_seed(0)
    return configs[family]().eval()


@pytest.mark.parametrize(
    "family",
    [
        "llama",
        "mistral",
        pytest.param("qwen2", marks=pytest.mark.slow),
        pytest.param("gemma2", marks=pytest.mark.slow),
        pytest.param("gpt2", marks=pytest.mark.slow),
    ],
)
def test_greedy_tokens_equal_transformers(tmp_path, family):
    model = build(family)
    ckpt = save_hf(model, tmp_path / "ckpt")
    out = tmp_path / "out"
    shardex.export(ckpt, out)

    manifest = shardex.load_manifest(out)
    assert manifest["verification"]["passed"]
    generation = manifest["verification"]["generation"]  # shardex's own check: 8 choices through the cache
    assert generation["tokens_equal"] and generation["new_tokens"] == 8
    assert [len(row) for row in generation["torch_tokens"]] == [8, 8, 8]  # 3 prompts, one left-padded
    proto = onnx.load(out / "model.onnx", load_external_data=False)
    layers = model.config.num_hidden_layers
    # one function per distinct layer (Gemma 2: its sliding and its global layers) ...
    assert len(proto.functions) == len(manifest["plan"]["groups"]) == (2 if family == "gemma2" else 1)
    calls = [n for n in proto.graph.node if n.domain == "shardex.blocks"]
    assert len(calls) == layers  # ... and is called once per layer, with its cache in and out
    assert all(len(c.input) == len(proto.functions[0].input) for c in calls)
    assert {f"past_key_values.{layers - 1}.value", f"present.{layers - 1}.key"} <= {
        *(i.name for i in proto.graph.input),
        *(o.name for o in proto.graph.output),
    }

    for batch in (1, 2):
        ids, mask = left_padded_prompts(batch)
        expected = greedy_transformers(model, ids, mask, 16)
        actual = greedy_onnx(out / "model.onnx", ids, mask, 16)
        assert same_greedy_tokens(actual, expected), (actual.tolist(), expected)
        assert sum(map(len, expected)) >= 8 * batch  # most rows decode well past the prompt


def test_a_present_the_steps_misread_fails_decoding_not_the_prompt(tmp_path):
    """shardex's generation check runs ONNX Runtime through its cache (prompt, one token, the
    rest) against PyTorch's one pass over the same sequence. A present that comes out wrong (here
    scaled, as a wrong layout or offset would spoil it) leaves the prompt's logits and every block
    right, and fails the decode positions, which read it back as their past, and that output."""
    ckpt = save_hf(build("llama"), tmp_path / "ckpt")
    out = tmp_path / "out"
    shardex.export(ckpt, out, verify=False)
    proto = onnx.load(out / "model.onnx", load_external_data=False)
    (producer,) = [n for n in proto.graph.node if "present.0.key" in n.output]
    producer.output[list(producer.output).index("present.0.key")] = "present.0.key.unscaled"
    half = onnx.helper.make_tensor("half", onnx.TensorProto.FLOAT, [], [0.5])
    proto.graph.initializer.append(half)
    proto.graph.node.append(
        onnx.helper.make_node("Mul", ["present.0.key.unscaled", "half"], ["present.0.key"])
    )
    onnx.save(proto, out / "model.onnx")
    manifest = json.loads((out / "manifest.json").read_text())  # as if the exporter wrote it so
    manifest["model"]["sha256"] = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(shardex.VerificationError) as caught:
        shardex.verify(out)

    failed = {c.name for c in caught.value.failures}
    generation = shardex.load_manifest(out)["verification"]["generation"]
    assert generation["prefill"]["passed"] and not generation["decode"]["passed"]
    assert "output:present.0.key" in failed and "output:present.0.value" not in failed
    assert not any(name.startswith("model.layers.") for name in failed)


def test_blocks_are_checked_on_what_they_computed_in_the_steps(tmp_path, reruns_on_recorded_inputs):
    """A bf16 export is verified in segments, every step through a block's session before the
    next block's opens. Each block is checked on its outputs in those steps (prompt, one token,
    the rest: laid end to end, the cache after the last; real positions only, which a sliding
    window's padded positions need): none runs again on PyTorch's recorded inputs when all pass.
    A damaged block fails there, and so does the next (fed its error); both run again on their
    recorded inputs, which pin the damage to the one block."""
    from shardex._export import VERIFY_GROWTH, plan_export
    from shardex._generation import reference_generation, verify_saved_model
    from shardex._source import resolve_source
    from tests.test_export import corrupt_tensor

    ckpt = save_hf(build("gemma2").to(torch.bfloat16), tmp_path / "ckpt")
    out = tmp_path / "out"
    shardex.export(ckpt, out, verify=False)
    plan, memory = plan_export(resolve_source(ckpt), shardex.load_manifest(out)["options"], None, None, None)
    reference = reference_generation(plan, memory, plan.example.resized(VERIFY_GROWTH), 8)
    rerun = reruns_on_recorded_inputs

    def check() -> tuple[list, object, list]:
        return verify_saved_model(plan, str(out), reference, 1e-4, 1e-3, True, reference.boundaries)

    outputs, generation, blocks = check()
    assert all(c.passed for c in outputs + blocks) and generation.passed
    assert [c.name for c in blocks] == [f"model.layers.{i}" for i in range(3)] and rerun == []
    corrupt_tensor(out, "model.layers.1.mlp.down_proj.weight", dtype=np.uint16)
    outputs, generation, blocks = check()
    assert {c.name for c in blocks if not c.passed} == {"model.layers.1"}
    assert rerun == ["model.layers.1", "model.layers.2"] and not generation.passed


def test_text_generation_task_has_no_cache(tmp_path):
    ckpt = save_hf(build("llama"), tmp_path / "ckpt")
    out = tmp_path / "out"
    shardex.export(ckpt, out, task="text-generation", verify=False)
    sess = session(out / "model.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]


def test_task_errors_are_one_line(tmp_path):
    with pytest.raises(shardex.OptionsError, match="task must be one of"):
        shardex.export("unused", tmp_path / "out", task="translation")
    weights = tmp_path / "stack.safetensors"
    save_block_stack(weights)
    with pytest.raises(shardex.PlanError, match="needs a Hugging Face checkpoint"):
        shardex.export(
            "tests.models:make_block_stack", tmp_path / "out", weights=weights, task="text-generation"
        )


def build_state_space(family: str):
    """A tiny Mamba-like model with its own lm_head (tied to random embeddings, greedy decoding
    repeats one token; untied, the tokens vary)."""
    import transformers

    names = {"mamba": "Mamba", "falcon_mamba": "FalconMamba"}[family]
    config = getattr(transformers, f"{names}Config")(
        **BY_NAME["mamba"].config_kwargs, tie_word_embeddings=False
    )
    torch.manual_seed(0)
    return getattr(transformers, f"{names}ForCausalLM")(config).eval()


def _step(sess, ids: torch.Tensor, total: int, past: dict | None) -> dict[str, np.ndarray]:
    """One step in ONNX Runtime: `ids` after a sequence of `total` - len tokens (the mask covers all)."""
    feeds = step_feeds(sess, ids.numpy(), np.ones((ids.shape[0], total), np.int64), past)
    results = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    return results | {past_name(n): v for n, v in results.items() if n.startswith("present")}


def _max_diff(actual: dict[str, np.ndarray], logits: torch.Tensor, cache, layers: int) -> float:
    """ONNX Runtime's logits and present states against transformers' logits and cache."""
    diffs = [np.abs(actual["logits"] - logits.numpy()).max()]
    for i in range(layers):
        layer = cache.layers[i]
        diffs.append(np.abs(actual[f"present_conv.{i}"] - layer.conv_states[0].numpy()).max())
        diffs.append(np.abs(actual[f"present_ssm.{i}"] - layer.recurrent_states[0].numpy()).max())
    return float(max(diffs))


@pytest.mark.parametrize("family", ["mamba", pytest.param("falcon_mamba", marks=pytest.mark.slow)])
def test_state_space_state_is_the_cache(tmp_path, family):
    model = build_state_space(family)
    ckpt = save_hf(model, tmp_path / "ckpt")
    out = tmp_path / "out"
    shardex.export(ckpt, out)

    manifest = shardex.load_manifest(out)
    assert manifest["plan"]["task"] == "text-generation-with-past"
    assert manifest["verification"]["passed"]
    assert manifest["verification"]["generation"]["tokens_equal"]  # shardex's own check, state threaded
    config, layers = model.config, model.config.num_hidden_layers
    proto = onnx.load(out / "model.onnx", load_external_data=False)
    (function,) = proto.functions  # one function for every layer ...
    calls = [n for n in proto.graph.node if n.domain == "shardex.blocks"]
    assert len(calls) == layers  # ... called once per layer, its state two more inputs and outputs
    assert {"past.conv", "past.ssm"} <= set(function.input)
    assert list(function.output) == ["output", "present.conv", "present.ssm"]
    sess = session(out / "model.onnx")
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    for i in range(layers):
        assert inputs[f"past_conv.{i}"] == ["batch_size", config.intermediate_size, config.conv_kernel]
        assert inputs[f"past_ssm.{i}"] == ["batch_size", config.intermediate_size, config.state_size]
        assert {f"present_conv.{i}", f"present_ssm.{i}"} <= set(outputs)
    assert not (out / "genai_config.json").exists()  # onnxruntime-genai runs no Mamba

    # prefill (zero state), transformers' decode step from the prefill's state, and three tokens
    # after the prompt in one step against transformers' prefill of all nine
    ids = torch.randint(3, config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        prefill = model(ids[:, :6], use_cache=True)
        after_prompt = _step(sess, ids[:, :6], 6, None)
        assert _max_diff(after_prompt, prefill.logits, prefill.cache, layers) <= 1e-4
        decode = model(ids[:, 6:7], cache=prefill.cache, use_cache=True)  # one token: the decode path
        assert (
            _max_diff(_step(sess, ids[:, 6:7], 7, after_prompt), decode.logits, decode.cache, layers) <= 1e-4
        )
        whole = model(ids, use_cache=True)
        chunk = _step(sess, ids[:, 6:], 9, after_prompt)
        assert _max_diff(chunk, whole.logits[:, 6:], whole.cache, layers) <= 1e-4

    # greedy decoding, the second prompt left-padded: the mask zeroes the pads' inputs
    ids, mask = left_padded_prompts(2, vocab=config.vocab_size)
    expected = greedy_transformers(model, ids, mask, 16)
    actual = greedy_onnx(out / "model.onnx", ids, mask, 16)
    assert same_greedy_tokens(actual, expected), (actual.tolist(), expected)
    assert sum(map(len, expected)) >= 16 and all(len(set(row)) > 2 for row in expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamed_weights_give_the_loaded_reference(tmp_path, monkeypatch, family):
    """The CPU reference streams its large 2-D weights (rows read where F.linear/F.embedding use
    them, a chunk at a time; any other use, GPT-2's Conv1D addmm, loads the weight): outputs,
    block boundaries and the generation pass equal those of loaded weights. Tied embeddings included."""
    from shardex import _verify
    from shardex._generation import reference_generation
    from shardex._plan import make_plan
    from shardex._source import resolve_source
    from shardex._tasks import TEXT_GENERATION_WITH_PAST

    model = build(family).to(torch.bfloat16)
    if family == "llama":
        model.config.tie_word_embeddings = True
        model.tie_weights()
    plan, memory = make_plan(
        resolve_source(save_hf(model, tmp_path / "ckpt")),
        **dict(dtype=None, args=None, kwargs=None, dynamic_shapes=None, block_pattern=None),
        **dict(max_shard_size=1 << 30, opset=None, task=TEXT_GENERATION_WITH_PAST),
    )
    inputs = plan.example.resized()

    def reference(stream: bool):
        monkeypatch.setattr(_verify, "STREAM_MIN_BYTES", 0 if stream else 1 << 60)
        monkeypatch.setattr(_verify, "STREAM_CHUNK_BYTES", 3000)  # several chunks per weight
        run = _verify.reference_run(plan, memory, inputs)
        return run, reference_generation(plan, memory, inputs, 4)

    rows = []
    monkeypatch.setattr(
        _verify._WeightLoader,
        "_rows",
        lambda *a, _rows=_verify._WeightLoader._rows: rows.append(a[2]) or _rows(*a),
    )
    loaded, loaded_tokens = reference(stream=False)
    assert not rows
    streamed, streamed_tokens = reference(stream=True)
    assert rows  # weights were streamed
    np.testing.assert_array_equal(streamed_tokens.logits.argmax(-1), loaded_tokens.logits.argmax(-1))
    for name, value in loaded_tokens.outputs.items():  # the generation pass: logits and cache
        np.testing.assert_allclose(streamed_tokens.outputs[name], value, rtol=1e-5, atol=1e-6)
    for a, b in zip(streamed.outputs, loaded.outputs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for path, (inputs_, outputs) in loaded.boundaries.items():
        for a, b in zip([*streamed.boundaries[path][0], *streamed.boundaries[path][1]], [*inputs_, *outputs]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

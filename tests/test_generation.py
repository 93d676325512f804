"""Generation-ready exports: the KV cache as inputs and outputs, greedy decoding in plain ONNX
Runtime equal to transformers' `generate`, left padding, empty and long pasts."""

from __future__ import annotations

import onnx
import pytest
import torch

import shardex
from tests.models import save_block_stack, save_hf
from tests.onnx_support import (
    greedy_onnx,
    greedy_transformers,
    left_padded_prompts,
    same_greedy_tokens,
    session,
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
    generation = manifest["verification"]["generation"]  # shardex's own check: same tokens, 8 by default
    assert (
        generation["tokens_equal"] and generation["new_tokens"] == 8 and len(generation["torch_tokens"]) == 2
    )
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

"""Encoder-decoders exported the way Optimum runs them: `encoder_model.onnx`, `decoder_model.onnx`
(the first step: no past, it computes the cross-attention cache) and
`decoder_with_past_model.onnx` (self- and cross-attention caches in), one set of weight shards.

Greedy decoding through the three files in plain ONNX Runtime (the protocol Optimum follows,
written out here) must give transformers' `generate` tokens; Optimum's own classes are run in
their environment (`tests/runtimes.py`). The tiny models get a wider initialization than
transformers' default, so that greedy decoding picks varied tokens rather than one repeated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import onnx
import pytest

import shardex
from tests.architectures import BY_NAME
from tests.cli_support import coordinator_capture_hands, export_without_ray
from tests.onnx_support import session
from tests.runtime_runner import hf_seq2seq_greedy
from tests.runtimes import requires_runtime, run_in_runtime

pytestmark = pytest.mark.usefixtures("ray_local")

NEW_TOKENS = 8
# Wider initializations (see the module docstring), per family.
WIDE_INIT = {"t5": {"initializer_factor": 8.0}, "bart": {"init_std": 1.0}, "whisper": {"init_std": 0.3}}
FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


def _family(name: str):
    arch = BY_NAME[name]
    return dataclasses.replace(arch, config_kwargs={**arch.config_kwargs, **WIDE_INIT[name]})


@pytest.fixture(
    scope="module",
    params=[
        "t5",
        pytest.param("bart", marks=pytest.mark.slow),
        pytest.param("whisper", marks=pytest.mark.slow),
    ],
)
def exported(request, tmp_path_factory):
    """(family, checkpoint, export directory, encoder inputs, transformers' greedy tokens)."""
    arch = _family(request.param)
    ckpt = tmp_path_factory.mktemp(arch.name) / "ckpt"
    arch.build().save_pretrained(ckpt)
    out = ckpt.parent / "onnx"
    shardex.export(ckpt, out)
    model = arch.load(ckpt)
    model.config.use_cache = True
    inputs = {k: v.numpy() for k, v in arch.inputs(model, 2, 7).items() if not k.startswith("decoder")}
    if "attention_mask" in inputs:
        inputs["attention_mask"][1, -3:] = 0  # the second source is shorter
        inputs["input_ids"][1, -3:] = 0
    expected = hf_seq2seq_greedy(model, {k: v.tolist() for k, v in inputs.items()}, NEW_TOKENS)
    assert len({tuple(row) for row in expected}) == 2 and len(set(expected[0])) > 2, (
        f"Bug: degenerate {expected}"
    )
    return arch, ckpt, out, inputs, expected


def ort_greedy(out, inputs: dict[str, np.ndarray], start: int, eos: int, new_tokens: int) -> list[list[int]]:
    """Greedy decoding through the three files as Optimum does it: the encoder once, the first
    decoder step from the start token (it returns the cross-attention keys and values), then
    one token at a time with the self-attention present fed back and the cross cache kept."""
    encoder, first, later = (session(out / name) for name in FILES)
    hidden = encoder.run(None, {i.name: inputs[i.name] for i in encoder.get_inputs()})[0]
    context = {"encoder_hidden_states": hidden, "encoder_attention_mask": inputs.get("attention_mask")}
    ids = np.full((hidden.shape[0], 1), start, np.int64)
    names = [o.name for o in first.get_outputs()]
    feeds = {"input_ids": ids} | context
    outputs = dict(zip(names, first.run(None, {i.name: feeds[i.name] for i in first.get_inputs()})))
    cache = {n.replace("present.", "past_key_values.", 1): v for n, v in outputs.items() if n != "logits"}
    tokens = []
    for _ in range(new_tokens):
        tokens.append(outputs["logits"][:, -1].argmax(-1))
        feeds = {"input_ids": tokens[-1][:, None].astype(np.int64)} | context | cache
        names = [o.name for o in later.get_outputs()]
        outputs = dict(zip(names, later.run(None, {i.name: feeds[i.name] for i in later.get_inputs()})))
        cache |= {
            n.replace("present.", "past_key_values.", 1): v for n, v in outputs.items() if n != "logits"
        }
    rows = np.stack(tokens, axis=1).tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def test_files_share_one_set_of_shards(exported):
    """Three files, Optimum's names and inputs, each referencing only its own weights in the
    same shards; each stack's repeated layers are one function per distinct block."""
    arch, _, out, _, _ = exported
    manifest = shardex.load_manifest(out)
    assert [m["file"] for m in manifest["models"]] == list(FILES)
    shard_files = {s["file"] for s in manifest["shards"]}
    referenced = {}
    for model in manifest["models"]:
        proto = onnx.load(out / model["file"], load_external_data=False)
        locations = {
            entry.value
            for t in proto.graph.initializer
            for entry in t.external_data
            if entry.key == "location"
        }
        assert locations <= shard_files
        referenced[model["file"]] = {
            t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        }
        calls = [n for n in proto.graph.node if n.domain == "shardex.blocks"]
        assert len(proto.functions) == len(model["groups"])
        assert len(calls) == sum(len(g["members"]) for g in model["groups"])
    encoder, decoder, with_past = (referenced[name] for name in FILES)
    assert not any(".decoder." in name or name.startswith("decoder.") for name in encoder)
    assert with_past <= decoder
    inputs = {m["file"]: m["inputs"] for m in manifest["models"]}
    assert "past_key_values.0.encoder.key" in inputs["decoder_with_past_model.onnx"]
    assert not any(n.startswith("past_key_values") for n in inputs["decoder_model.onnx"])
    outputs = {m["file"]: m["outputs"] for m in manifest["models"]}
    assert "present.0.encoder.value" in outputs["decoder_model.onnx"]
    assert not any(".encoder." in n for n in outputs["decoder_with_past_model.onnx"])
    with open(out / "manifest.json") as f:
        assert "config.json" in json.load(f)["runtime_files"]


def test_captures_shared_by_the_coordinator_and_its_fork_give_the_same_files(exported, tmp_path):
    """With no Ray running, the coordinator captures pieces in its own thread and in its fork
    (`_fork.CaptureFork`), with the local Ray it starts taking any left (an encoder-decoder has
    more pieces than the coordinator captures alone); the files are byte for byte those of the
    fixture's export, captured on Ray workers only."""
    _, ckpt, out, _, _ = exported
    other = tmp_path / "onnx"
    done = export_without_ray(ckpt, other)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(coordinator_capture_hands(other)) == 2  # the coordinator's capture thread and its fork

    def digests(directory):
        names = sorted(n for n in os.listdir(directory) if n.endswith((".onnx", ".data")))
        return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in names}

    assert digests(other) == digests(out)


def test_verification_decodes_greedily_through_the_three_files(exported):
    _, _, out, _, _ = exported
    verification = shardex.load_manifest(out)["verification"]
    assert verification["passed"]
    assert verification["generation"]["tokens_equal"]
    assert len(verification["generation"]["torch_tokens"][0]) == NEW_TOKENS
    files = {check["name"].split(":")[0] for check in verification["outputs"]}
    assert files == set(FILES)


def test_onnx_runtime_generates_transformers_tokens(exported):
    arch, ckpt, out, inputs, expected = exported
    config = arch.load(ckpt).generation_config
    start = config.decoder_start_token_id
    assert ort_greedy(out, inputs, start, config.eos_token_id, NEW_TOKENS) == expected


def test_verify_command_rechecks_every_file(exported):
    _, _, out, _, _ = exported
    report = shardex.verify(out)
    assert report.passed and report.generation.tokens_equal
    with open(out / "decoder_with_past_model.onnx", "ab") as f:
        f.write(b"\0")
    try:
        with pytest.raises(shardex.VerificationError, match="decoder_with_past_model.onnx no longer match"):
            shardex.verify(out)
    finally:
        with open(out / "decoder_with_past_model.onnx", "rb+") as f:
            f.truncate(os.path.getsize(out / "decoder_with_past_model.onnx") - 1)


@pytest.mark.slow  # ~15 s per family: Optimum, transformers 4 and torch imported in its environment
@requires_runtime("optimum")
def test_optimum_generates_transformers_tokens(exported):
    """Optimum's `ORTModelForSeq2SeqLM` / `ORTModelForSpeechSeq2Seq.from_pretrained(OUT)` loads
    the directory as written and generates transformers' greedy tokens."""
    _, _, out, inputs, expected = exported
    request = {k: v.tolist() for k, v in inputs.items()}
    got = run_in_runtime(
        "optimum",
        "optimum_seq2seq_greedy",
        model_dir=os.fspath(out),
        inputs=request,
        max_new_tokens=NEW_TOKENS,
    )
    assert got == expected


@pytest.mark.parametrize(
    ("family", "task", "fits"),
    [
        ("t5", "text-generation-with-past", "text2text-generation-with-past"),
        ("llama", "text2text-generation-with-past", "text-generation-with-past"),
    ],
)
def test_a_task_that_does_not_fit_the_model_is_refused_in_one_line(family, task, fits, tmp_path):
    BY_NAME[family].build().save_pretrained(tmp_path / "ckpt")
    with pytest.raises(shardex.PlanError, match=f"does not fit {family}, .*; its task is {fits}") as caught:
        shardex.export(tmp_path / "ckpt", tmp_path / "out", task=task)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")

"""The capture cache: pieces reused across checkpoints of one architecture, byte-identical output,
keys that change with what shapes a piece, damaged entries recaptured, bounded size."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import shardex
from shardex._capture import CapturedPiece
from shardex._capture_cache import CaptureCache, piece_keys
from shardex._export import _export_options, plan_export
from shardex._source import resolve_source
from tests import models


def output_digests(out) -> dict[str, str]:
    names = sorted(n for n in os.listdir(out) if n == "model.onnx" or n.endswith(".data"))
    return {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names}


def fine_tune(directory, seed: int) -> str:
    """A checkpoint of the same architecture with other weights (what a fine-tune is)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(models.llama_config(3)).eval()
    return models.save_hf(model, directory)


def keys_of(checkpoint, **options) -> dict[str, str]:
    recorded = _export_options(options.get("dtype"), "1GiB", None, None, False, False, None, None) | {
        "task": options.get("task"),
        "runtime": "onnxruntime",
        "zero_copy": False,
    }
    plan, _ = plan_export(resolve_source(checkpoint), recorded, None, None, None)
    return piece_keys(plan)


@pytest.mark.usefixtures("ray_local")
def test_fine_tunes_share_pieces_and_output_is_byte_identical(tmp_path):
    cache = tmp_path / "cache"
    base = fine_tune(tmp_path / "base", seed=0)
    tuned = fine_tune(tmp_path / "tuned", seed=1)

    shardex.export(base, tmp_path / "first", verify=False, capture_cache=cache)
    first = shardex.load_manifest(tmp_path / "first")["capture_cache"]
    assert first["directory"] == os.fspath(cache)
    assert first["hits"] == [] and first["misses"] == ["trunk", "LlamaDecoderLayer"]

    shardex.export(tuned, tmp_path / "cached", capture_cache=cache)  # verified: the cached pieces are sound
    manifest = shardex.load_manifest(tmp_path / "cached")
    assert manifest["capture_cache"]["hits"] == ["trunk", "LlamaDecoderLayer"]
    assert manifest["capture_cache"]["misses"] == []
    assert manifest["verification"]["passed"]
    assert not [
        r
        for r in json.loads((tmp_path / "cached" / "timeline.json").read_text())["traceEvents"]
        if r.get("cat") == "capture"
    ]

    shardex.export(tuned, tmp_path / "uncached", verify=False, capture_cache=False)
    assert shardex.load_manifest(tmp_path / "uncached")["capture_cache"]["directory"] is None
    assert output_digests(tmp_path / "cached") == output_digests(tmp_path / "uncached")


@pytest.mark.usefixtures("ray_local")
def test_damaged_entry_is_captured_again(tmp_path):
    cache = tmp_path / "cache"
    checkpoint = fine_tune(tmp_path / "ckpt", seed=0)
    shardex.export(checkpoint, tmp_path / "first", verify=False, capture_cache=cache)
    entries = sorted((cache / "pieces").rglob("*.piece"))
    assert len(entries) == 2
    data = bytearray(entries[0].read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the stored graph
    entries[0].write_bytes(bytes(data))

    shardex.export(checkpoint, tmp_path / "second", verify=False, capture_cache=cache)
    account = shardex.load_manifest(tmp_path / "second")["capture_cache"]
    assert len(account["misses"]) == 1 and len(account["hits"]) == 1
    assert output_digests(tmp_path / "first") == output_digests(tmp_path / "second")
    assert entries[0].read_bytes() != bytes(data)  # rewritten


def test_keys_follow_architecture_and_options_not_weights(tmp_path):
    base = keys_of(fine_tune(tmp_path / "a", seed=0))
    assert base == keys_of(fine_tune(tmp_path / "b", seed=1))  # other weights
    assert set(base) == {"trunk", "LlamaDecoderLayer"}
    wider = keys_of(models.make_llama(tmp_path / "c", layers=3, intermediate_size=256))
    assert wider["trunk"] != base["trunk"] and wider["LlamaDecoderLayer"] != base["LlamaDecoderLayer"]
    deeper = keys_of(models.make_llama(tmp_path / "d", layers=4))
    assert deeper["trunk"] != base["trunk"]  # (the block's too: config.json is keyed whole)
    half = keys_of(tmp_path / "a", dtype="float16")
    assert half["trunk"] != base["trunk"] and half["LlamaDecoderLayer"] != base["LlamaDecoderLayer"]
    no_past = keys_of(tmp_path / "a", task="text-generation")
    assert no_past["LlamaDecoderLayer"] != base["LlamaDecoderLayer"]


def test_factory_and_module_sources_are_not_cached(tmp_path):
    weights = tmp_path / "w.safetensors"
    models.save_block_stack(weights)
    source = resolve_source("tests.models:make_block_stack", weights=weights)
    recorded = _export_options(None, "1GiB", None, None, False, False, None, None) | {"zero_copy": False}
    plan, _ = plan_export(source, recorded, (torch.randn(2, 5, 16),), None, None)
    assert piece_keys(plan) is None


def test_cache_is_bounded_least_recently_used_first(tmp_path):
    for i in range(4):
        CaptureCache(os.fspath(tmp_path)).put(f"{i:02d}" * 32, CapturedPiece(f"p{i}", bytes(1000), [], 1.0))
    cache = CaptureCache(os.fspath(tmp_path), max_bytes=2600)  # room for two entries
    for i in range(4):
        os.utime(cache._path(f"{i:02d}" * 32), (i, i))  # distinct ages, oldest first
    cache.get("00" * 32)  # used now: kept
    cache.put("ff" * 32, CapturedPiece("new", bytes(1000), ["w"], 1.0))
    kept = {p.name.removesuffix(".piece")[:2] for p in (tmp_path / "pieces").rglob("*.piece")}
    assert kept == {"00", "ff"}
    piece = cache.get("ff" * 32)
    assert piece.name == "new" and piece.weight_inputs == ["w"] and piece.model_bytes == bytes(1000)
    assert not list(tmp_path.rglob("*.partial"))


def test_truncated_entry_is_a_miss_and_removed(tmp_path):
    cache = CaptureCache(os.fspath(tmp_path))
    key = "ab" * 32
    cache.put(key, CapturedPiece("trunk", b"graph bytes", [], 1.0))
    path = cache._path(key)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    assert cache.get(key) is None and not os.path.exists(path)


def test_fully_cached_unverified_export_starts_no_ray(tmp_path):
    """A trunk and one distinct block are captured by the coordinator itself, and every piece
    cached with no verification needs no capture at all: no Ray either time, the shards written
    by the coordinator's threads."""
    cache = tmp_path / "cache"
    checkpoint = fine_tune(tmp_path / "ckpt", seed=0)
    script = (
        "import sys, shardex, ray\n"
        "for out in sys.argv[3:]:\n"
        "    shardex.export(sys.argv[1], out, verify=False, capture_cache=sys.argv[2])\n"
        "    print(ray.is_initialized())\n"
    )
    outs = [tmp_path / "first", tmp_path / "second"]
    done = subprocess.run(
        [sys.executable, "-c", script, checkpoint, os.fspath(cache), *map(os.fspath, outs)],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"SHARDEX_CAPTURE_CACHE": "off"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]
    first, second = (shardex.load_manifest(out) for out in outs)
    assert [n["node_id"] for n in second["placement"]] == ["coordinator"]
    assert [n["node_id"] for n in first["placement"]] == ["coordinator"]
    assert len(first["capture_cache"]["misses"]) == 2  # captured here: the trunk and the block
    assert second["capture_cache"]["misses"] == []
    assert output_digests(outs[0]) == output_digests(outs[1])

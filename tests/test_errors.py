"""Bad input fails early, with one line naming the problem, and leaves nothing that looks done."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import shardex
from tests import models


def assert_one_line(error: Exception, *fragments: str) -> None:
    message = str(error)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_source_path(tmp_path):
    with pytest.raises(shardex.SourceError) as caught:
        shardex.export(tmp_path / "nowhere", tmp_path / "out")
    assert_one_line(caught.value, "does not exist")


def test_directory_without_config(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(shardex.SourceError) as caught:
        shardex.export(tmp_path / "ckpt", tmp_path / "out")
    assert_one_line(caught.value, "config.json")


def test_missing_shard_file_named_by_index(tmp_path):
    ckpt = models.make_llama(tmp_path / "ckpt", layers=2, max_shard_size="100KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    os.remove(os.path.join(ckpt, sorted(set(index["weight_map"].values()))[-1]))
    with pytest.raises(shardex.SourceError) as caught:
        shardex.export(ckpt, tmp_path / "out")
    assert_one_line(caught.value, "missing file")


def test_checkpoint_shape_mismatch(tmp_path):
    ckpt = models.make_llama(tmp_path / "ckpt", layers=2)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(shardex.SourceError) as caught:
        shardex.export(ckpt, tmp_path / "out")
    assert_one_line(caught.value, "mlp", "[96, 64]", "[128, 64]", "does not match")


def test_checkpoint_missing_tensor(tmp_path):
    ckpt = models.make_llama(tmp_path / "ckpt", layers=2)
    path = os.path.join(ckpt, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(shardex.SourceError) as caught:
        shardex.export(ckpt, tmp_path / "out")
    assert_one_line(caught.value, "model.layers.1.mlp.up_proj.weight", "missing")


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [("no_such_package.models:make", "cannot import"), ("tests.models:no_such_function", "no callable")],
)
def test_unknown_factory_path(tmp_path, factory, fragment):
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, weights)
    with pytest.raises(shardex.SourceError) as caught:
        shardex.export(factory, tmp_path / "out", weights=weights)
    assert_one_line(caught.value, "unknown factory", fragment)


def test_factory_without_weights(tmp_path):
    with pytest.raises(shardex.SourceError) as caught:
        shardex.export("tests.models:make_block_stack", tmp_path / "out")
    assert_one_line(caught.value, "weights=")


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"max_shard_size": "lots"}, "max_shard_size"),
        ({"max_shard_size": 0}, "greater than 0"),
        ({"workers": 0}, "workers"),
        ({"atol": -1.0}, "atol"),
    ],
)
def test_bad_options_fail_before_any_work(tmp_path, option, fragment):
    with pytest.raises(shardex.OptionsError) as caught:
        shardex.export(tmp_path / "nowhere", tmp_path / "out", **option)
    assert_one_line(caught.value, fragment)
    assert not (tmp_path / "out").exists()


def test_non_empty_output_directory_is_refused(tmp_path):
    ckpt = models.make_llama(tmp_path / "ckpt", layers=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(shardex.OptionsError) as caught:
        shardex.export(ckpt, tmp_path / "out")
    assert_one_line(caught.value, "not empty", "overwrite")
    with pytest.raises(shardex.OptionsError) as caught:
        shardex.export(ckpt, tmp_path / "out", overwrite=True)
    assert_one_line(caught.value, "notes.txt")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_model_without_repeated_blocks_needs_a_pattern(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(shardex.PlanError) as caught:
        shardex.export(model, tmp_path / "out", args=(torch.randn(2, 4),))
    assert_one_line(caught.value, "block_pattern")
    with pytest.raises(shardex.PlanError) as caught:
        shardex.export(model, tmp_path / "out2", args=(torch.randn(2, 4),), block_pattern="layers.*")
    assert_one_line(caught.value, "matches no module")


def test_model_without_vocabulary_needs_inputs(tmp_path):
    with pytest.raises(shardex.PlanError) as caught:
        shardex.export(models.BlockStack(), tmp_path / "out")
    assert_one_line(caught.value, "args=")


def test_verify_of_a_directory_that_is_not_an_export(tmp_path):
    with pytest.raises(shardex.ShardexError) as caught:
        shardex.verify(tmp_path)
    assert_one_line(caught.value, "manifest.json")

"""The `shardex` command as a user runs it: export, verify, inspect, --json, exit codes, errors.

One Llama export is shared by the tests that only read it (each command run starts its own
local Ray, a few seconds on a small machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import models
from tests.cli_support import FACTORY, FACTORY_INPUT, error_lines, shardex


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    """A 2-layer Llama exported with --json, in several shards; its parsed result."""
    root = tmp_path_factory.mktemp("cli")
    checkpoint = models.make_llama(root / "llama", layers=2)
    out = root / "out"
    result = shardex("export", checkpoint, out, "--max-shard-size", "200KB", "--json")
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout), result


def test_export_json_result_and_files(llama_export):
    out, result, process = llama_export
    assert result["status"] == "complete"
    assert result["output_dir"] == os.fspath(out)
    stored = load_file(os.path.join(result["source"]["location"], "model.safetensors"))
    assert result["parameters"] >= sum(t.numel() for t in stored.values())  # + non-persistent buffers
    assert result["blocks"] == 2
    assert [f["function"] for f in result["functions"]] == ["LlamaDecoderLayer"]
    assert len(result["shards"]) >= 2
    assert result["bytes"] == sum(
        os.path.getsize(out / s["file"]) for s in result["shards"]
    ) + os.path.getsize(out / "model.onnx")
    assert 0 <= result["max_abs_diff"] < 1e-4
    assert set(result["timings"]) >= {"plan", "capture_and_weights", "stitch", "verify", "total"}
    report = (out / "report.html").read_text()
    assert result["report"] == os.fspath(out / "report.html")
    assert "<svg" in report and "model.layers.1: max abs diff" in report and "Stage timings" in report
    assert not [line for line in error_lines(process) if "capture:" in line]  # not a terminal: no progress


def test_verify_then_inspect(llama_export):
    out, result, _ = llama_export
    verified = shardex("verify", out)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"verified {result['source']['location']} -> {out} (complete)")
    assert "blocks: 2/2 passed" in verified.stdout

    inspected = shardex("inspect", out)
    assert inspected.returncode == 0, inspected.stderr
    text = inspected.stdout
    for fragment in (
        "input_ids: int64[batch_size, sequence_length]",
        "past_key_values.1.value: float32[batch_size, 2, past_sequence_length, 16]",
        "logits: float32[batch_size, sequence_length, 128]",
        "present.0.key: float32[batch_size, 2, total_sequence_length, 16]",
        "shardex.blocks.LlamaDecoderLayer",
        "called 2x",
        "model-00001-of-",
        "verified    passed",
    ):
        assert fragment in text, text

    described = json.loads(shardex("inspect", out, "--json").stdout)
    (function,) = described["functions"]
    assert function["calls"] == ["model.layers.0", "model.layers.1"]
    assert function["weights"] == 9
    assert all(s["present"] and s["tensors"] > 0 for s in described["shards"])


def test_a_piece_that_cannot_be_captured_fails_in_one_line(tmp_path):
    """Captured by the command itself (one machine, no Ray): the failure is the stage's one
    line, exit 3 (a capture failure), and nothing in the output that looks like an export."""
    weights = tmp_path / "weights.safetensors"
    torch.manual_seed(0)
    save_file(models.make_spectral_stack().state_dict(), os.fspath(weights))
    out = tmp_path / "out"
    result = shardex("export", "tests.models:make_spectral_stack", out, "--weights", weights, *FACTORY_INPUT)
    assert result.returncode == 3
    lines = error_lines(result)
    assert len(lines) == 1 and "capturing SpectralBlock failed" in lines[0], lines
    assert not (out / "model.onnx").exists() and not (out / "manifest.json").exists()


def test_corrupt_shard_fails_verification_with_exit_1(llama_export, tmp_path):
    out, result, _ = llama_export
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    name = result["shards"][0]["file"]
    shard = copy / name
    data = bytearray(shard.read_bytes())
    data[100:104] = b"\xff\x7f\xff\x7f"
    shard.write_bytes(bytes(data))

    result = shardex("verify", copy)

    assert result.returncode == 1, result.stderr
    assert error_lines(result)[-1].startswith("shardex: error: verification failed")
    assert f"digest changed: {name}" in result.stdout
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["status"] == "verification_failed"
    assert "FAILED" in (copy / "report.html").read_text()


def test_export_factory_shows_progress_and_summary(tmp_path):
    weights = tmp_path / "stack.safetensors"
    models.save_block_stack(weights)
    out = tmp_path / "out"

    result = shardex("export", FACTORY, out, "--weights", weights, *FACTORY_INPUT, "--verbose")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"exported {FACTORY} -> {out} (complete)"
    assert "  blocks      4 layers, 1 distinct: ResidualBlock x4" in lines
    assert any(line.startswith("  verified    passed") for line in lines)
    assert f"  report      {out / 'report.html'}" in lines
    progress = result.stderr
    assert "capture: ResidualBlock done" in progress and "MB/s" in progress and "verify: passed" in progress
    # --overwrite takes a directory holding an export and its report.html (which the library
    # alone refuses as a file it did not write): here it gets as far as planning.
    again = shardex(
        "export", FACTORY, out, "--weights", weights, *FACTORY_INPUT, "--overwrite", "--blocks", "none.*"
    )
    assert again.returncode == 2
    assert "block pattern 'none.*' matches no module" in error_lines(again)[-1]


BAD_INPUTS = {
    "missing source": (["export", "{tmp}/nowhere", "{tmp}/out"], "does not exist"),
    "not a checkpoint": (["export", "{tmp}", "{tmp}/out"], "config.json"),
    "bad dtype": (["export", "{tmp}/nowhere", "{tmp}/out", "--dtype", "float8"], "dtype must be one of"),
    "bad shard size": (["export", "{tmp}", "{tmp}/out", "--max-shard-size", "lots"], "max_shard_size must"),
    "bad input spec": (["export", FACTORY, "{tmp}/out", "--input", "x=2by16"], "--input must look like"),
    "int input without bound": (["export", FACTORY, "{tmp}/out", "--input", "ids=2x8:int64"], "upper bound"),
    "bad dynamic axes": (
        ["export", FACTORY, "{tmp}/out", "--dynamic-axes", "x=batch"],
        "--dynamic-axes must",
    ),
    "unknown flag": (["export", "{tmp}", "{tmp}/out", "--bogus"], "unrecognized arguments: --bogus"),
    "contradicting flags": (["export", "{tmp}", "{tmp}/out", "--overwrite", "--resume"], "not allowed with"),
    "bad int flag": (["export", "{tmp}", "{tmp}/out", "--opset", "new"], "invalid int value"),
    "no command": ([], "required: COMMAND"),
    "verify a non-export": (["verify", "{tmp}"], "not a finished shardex export"),
    "inspect a missing dir": (["inspect", "{tmp}/nowhere"], "is not a directory"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    argv, fragment = BAD_INPUTS[case]
    result = shardex(*[arg.format(tmp=tmp_path) for arg in argv])
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert line.startswith("shardex: error: ") and fragment in line, line


def test_unreadable_manifest_is_bad_input(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    result = shardex("inspect", tmp_path, "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout)["exit_code"] == 2
    (line,) = error_lines(result)
    assert "manifest.json" in line and "unreadable" in line


def test_debug_shows_the_traceback(tmp_path):
    result = shardex("export", tmp_path / "nowhere", tmp_path / "out", "--debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "SourceError" in result.stderr
    assert error_lines(result)[-1].startswith("shardex: error: source")


def test_help_documents_flags_and_exit_codes():
    result = shardex("export", "--help")
    assert result.returncode == 0
    for flag in (
        "--dtype",
        "--max-shard-size",
        "--blocks",
        "--dynamic-axes",
        "--input",
        "--no-verify",
        "--address",
    ):
        assert flag in result.stdout
    assert "exit codes:" in result.stdout and "130" in result.stdout
    assert "shardex export ./Llama-3-8B" in result.stdout


def test_console_script_is_installed():
    script = shutil.which("shardex", path=os.path.dirname(sys.executable))
    assert script, "pip install -e . installs the `shardex` console script"


def test_manifest_with_sha256_shard_digests_still_verifies_and_resumes(llama_export, tmp_path):
    """Exports written before shards were hashed with BLAKE3 record a plain ``sha256`` per shard:
    verify checks them by sha256 (and still catches a changed shard), resume keeps them."""
    out, result, _ = llama_export
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry.pop("digest")
        entry["sha256"] = hashlib.sha256((copy / entry["file"]).read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))

    assert shardex("verify", copy).returncode == 0

    resumed = shardex("export", result["source"]["location"], copy, "--max-shard-size", "200KB", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((copy / "manifest.json").read_text())
    assert sorted(manifest["reused_shards"]) == sorted(s["file"] for s in manifest["shards"])
    assert all(s["digest"].startswith("sha256:") for s in manifest["shards"])

    shard = copy / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[100:104] = b"\xff\x7f\xff\x7f"
    shard.write_bytes(bytes(data))
    failed = shardex("verify", copy)
    assert failed.returncode == 1, failed.stderr
    assert f"digest changed: {shard.name}" in failed.stdout

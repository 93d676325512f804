"""The bad-input matrix: broken, tampered and hostile inputs, through the library and the CLI.

Every case asserts what a user is owed: a one-line message naming the problem (file, tensor),
the stage's error class from the library and exit code 2 from ``shardex`` (1 where `verify`
finds a tampered export), the source untouched, and no file under a final name in the output
directory. The CLI runs in-process (``shardex.cli.main``): the same code as the command, without
a Python start per case; the cases that need a filesystem of their own run the real command.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import shardex
from shardex import cli
from tests import models

CKPT_FILE = "model.safetensors"
# Names a finished (or finishing) export puts in its directory: none may appear for refused input.
FINAL_NAMES = ("model.onnx", "manifest.json", "inputs.safetensors", "report.html", "timeline.json")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return Path(models.make_llama(tmp_path_factory.mktemp("bad") / "llama", layers=2))


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    """A private copy of the tiny Llama checkpoint, for one case to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def digests(directory: Path) -> dict[str, str]:
    return {
        os.fspath(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def final_files(out: Path) -> list[str]:
    if not out.exists():
        return []
    return [n for n in os.listdir(out) if n in FINAL_NAMES or (n.startswith("model-") and "." in n)]


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def run_cli(capsys, *argv) -> tuple[int, str]:
    """`shardex ARGV` in this process: its exit code and its one stderr line."""
    capsys.readouterr()
    code = cli.main([os.fspath(a) for a in argv])
    return code, one_line(capsys.readouterr().err)


def assert_refused(capsys, ckpt: Path, out: Path, error: type, fragments, *extra_argv) -> None:
    """The library raises `error` and the CLI exits 2, each with one line holding `fragments`;
    the checkpoint is untouched and the output holds no final name."""
    before = digests(ckpt)
    with pytest.raises(error) as caught:
        shardex.export(ckpt, out / "library", verify=False)
    message = str(caught.value)
    assert "\n" not in message
    code, line = run_cli(capsys, "export", ckpt, out / "cli", "--no-verify", *extra_argv)
    assert code == 2, line
    assert line == f"shardex: error: {message}"
    for fragment in fragments:
        assert fragment in message, message
    assert digests(ckpt) == before
    assert not final_files(out / "library") and not final_files(out / "cli")


# --- damaging a checkpoint -------------------------------------------------------------------


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_raw(path: Path, header: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def edit_header(ckpt: Path, change: Callable[[dict], None]) -> None:
    path = ckpt / CKPT_FILE
    header, data = read_header(path)
    change(header)
    write_raw(path, json.dumps(header).encode(), data)


def edit_tensors(ckpt: Path, change: Callable[[dict], None]) -> None:
    path = ckpt / CKPT_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


UP = "model.layers.1.mlp.up_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"  # same number of elements as UP


def overlap(header: dict) -> None:
    header[DOWN]["data_offsets"] = list(header[UP]["data_offsets"])


def out_of_range(header: dict) -> None:
    begin, end = header[UP]["data_offsets"]
    header[UP]["data_offsets"] = [begin + (1 << 30), end + (1 << 30)]


def wrong_size(header: dict) -> None:
    header[UP]["shape"] = [128, 32]


def duplicated_key(ckpt: Path) -> None:
    path = ckpt / CKPT_FILE
    header, data = read_header(path)
    text = json.dumps(header)
    entry = json.dumps(header[UP])
    write_raw(path, text.replace("{", f'{{"{UP}": {entry}, ', 1).encode(), data)


def duplicated_across_files(ckpt: Path) -> None:
    tensors = load_file(ckpt / CKPT_FILE)
    os.remove(ckpt / CKPT_FILE)
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({n: tensors[n] for n in [*first, UP]}, ckpt / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in second}, ckpt / "model-00002-of-00002.safetensors")


def truncated(ckpt: Path) -> None:
    path = ckpt / CKPT_FILE
    os.truncate(path, os.path.getsize(path) - 100)


def garbage(ckpt: Path) -> None:
    (ckpt / CKPT_FILE).write_bytes(random.Random(0).randbytes(4096))


def header_longer_than_file(ckpt: Path) -> None:
    path = ckpt / CKPT_FILE
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2 * len(raw)) + raw[8:])


def pickle_only(ckpt: Path) -> None:
    tensors = load_file(ckpt / CKPT_FILE)
    os.remove(ckpt / CKPT_FILE)
    torch.save(tensors, ckpt / "pytorch_model.bin")


def write_index(ckpt: Path, file: str) -> None:
    tensors = load_file(ckpt / CKPT_FILE)
    weight_map = dict.fromkeys(tensors, CKPT_FILE) | {UP: file}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def edit_config(ckpt: Path, change: Callable[[dict], None]) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    change(config)
    (ckpt / "config.json").write_text(json.dumps(config))


def remote_code(config: dict) -> None:
    config["architectures"] = ["HomemadeForCausalLM"]
    config["auto_map"] = {"AutoModelForCausalLM": "homemade.HomemadeForCausalLM"}


# name -> (damage, fragments the message must hold); every one a SourceError (exit 2)
CHECKPOINT_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "truncated safetensors": (truncated, (CKPT_FILE, "outside the file's", "data bytes")),
    "empty safetensors": (lambda c: save_file({}, c / CKPT_FILE), ("missing from the checkpoint",)),
    "zero-byte safetensors": (
        lambda c: (c / CKPT_FILE).write_bytes(b""),
        (CKPT_FILE, "not a safetensors file", "0 bytes"),
    ),
    "garbage safetensors": (garbage, (CKPT_FILE, "not a safetensors file", "exceeds the file")),
    "header longer than the file": (header_longer_than_file, (CKPT_FILE, "exceeds the file")),
    "overlapping offsets": (lambda c: edit_header(c, overlap), (CKPT_FILE, UP, DOWN, "share bytes")),
    "out-of-range offsets": (lambda c: edit_header(c, out_of_range), (CKPT_FILE, UP, "outside the file's")),
    "size differs from shape": (lambda c: edit_header(c, wrong_size), (CKPT_FILE, UP, "needs 16384")),
    "unknown dtype": (
        lambda c: edit_header(c, lambda h: h[UP].update(dtype="Q7")),
        (CKPT_FILE, UP, "unknown dtype 'Q7'"),
    ),
    "unsupported dtype (fp8)": (
        lambda c: edit_tensors(c, lambda t: t.update({UP: t[UP].to(torch.float8_e4m3fn)})),
        (CKPT_FILE, UP, "F8_E4M3", "cannot store"),
    ),
    "dtype differs from the model": (
        lambda c: edit_tensors(c, lambda t: t.update({UP: t[UP].to(torch.int32)})),
        (UP, "is I32", "expects float32"),
    ),
    "shape differs from the model": (
        lambda c: edit_tensors(c, lambda t: t.update({UP: t[UP][:64]})),
        (UP, "[64, 64]", "[128, 64]"),
    ),
    "missing tensor": (lambda c: edit_tensors(c, lambda t: t.pop(UP)), (UP, "missing")),
    "extra tensor": (
        lambda c: edit_tensors(c, lambda t: t.update({"model.layers.1.mlp.spare.weight": t[UP].clone()})),
        ("model.layers.1.mlp.spare.weight", "not in the model"),
    ),
    "duplicated tensor in one header": (duplicated_key, (CKPT_FILE, UP, "twice")),
    "duplicated tensor in two files": (duplicated_across_files, (UP, "appears in both")),
    "pickle checkpoint only": (pickle_only, ("no *.safetensors", "pytorch_model.bin", "pickle")),
    "index pointing outside the directory": (
        lambda c: write_index(c, "../../../../etc/passwd"),
        ("model.safetensors.index.json", "../../../../etc/passwd", "outside the checkpoint directory"),
    ),
    "index pointing at a missing file": (
        lambda c: write_index(c, "model-00002-of-00002.safetensors"),
        ("model-00002-of-00002.safetensors", "missing file"),
    ),
    "config.json missing": (lambda c: os.remove(c / "config.json"), ("no config.json",)),
    "config.json empty": (lambda c: (c / "config.json").write_text(""), ("config.json", "not readable JSON")),
    "config.json not JSON": (
        lambda c: (c / "config.json").write_text("{model_type: llama"),
        ("config.json", "not readable JSON"),
    ),
    "unknown model_type": (
        lambda c: edit_config(c, lambda cfg: cfg.update(model_type="no-such-model")),
        ("config.json", "transformers cannot read", "no-such-model"),
    ),
    "remote code without --trust-remote-code": (
        lambda c: edit_config(c, remote_code),
        ("homemade.HomemadeForCausalLM", "needs its own code", "--trust-remote-code"),
    ),
}


@pytest.mark.usefixtures("ray_local")  # a few cases are found while planning, inside the Ray session
@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_damaged_checkpoint_is_refused(case, ckpt, tmp_path, capsys):
    damage, fragments = CHECKPOINT_CASES[case]
    damage(ckpt)
    assert_refused(capsys, ckpt, tmp_path / "out", shardex.SourceError, fragments)

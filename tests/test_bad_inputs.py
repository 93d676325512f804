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
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import shardex
from shardex import cli
from tests import models
from tests.cli_support import REPO, error_lines

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
    assert line.startswith("shardex: error: ")
    for fragment in fragments:
        assert fragment in message and fragment in line, message
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


# --- the output directory --------------------------------------------------------------------


def test_output_inside_the_checkpoint_is_refused(ckpt, capsys):
    assert_refused(capsys, ckpt, ckpt / "onnx", shardex.OptionsError, ("inside the checkpoint directory",))


def can_mount() -> bool:
    """Whether this process may mount a filesystem in a mount namespace of its own."""
    probe = 'd=$(mktemp -d) && mount -t tmpfs tmpfs "$d" && umount "$d" && rmdir "$d"'
    try:
        return subprocess.run(PRIVATE_MOUNTS + [probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


PRIVATE_MOUNTS = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]


def export_on_tmpfs(mount_options: str, directory: Path, ckpt: Path) -> subprocess.CompletedProcess:
    """`shardex export` into `directory`, a fresh tmpfs (`mount_options`) only this command sees."""
    directory.mkdir()
    script = f'mount -t tmpfs -o {mount_options} tmpfs "$1" && shift && exec "$@"'
    argv = [sys.executable, "-m", "shardex", "export", ckpt, directory / "out", "--no-verify"]
    return subprocess.run(
        [*PRIVATE_MOUNTS, script, "sh", directory, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


needs_mounts = pytest.mark.skipif(
    not can_mount(), reason="mounting a tmpfs in a mount namespace (unshare --mount) is not allowed here"
)


@needs_mounts
def test_unwritable_output_is_refused_before_any_work(pristine, tmp_path):
    before = digests(pristine)
    result = export_on_tmpfs("ro", tmp_path / "ro", pristine)
    assert result.returncode == 2, result.stderr
    line = error_lines(result)[-1]
    assert "cannot be written" in line and "Read-only file system" in line, line
    assert len(error_lines(result)) == 1
    assert digests(pristine) == before


@needs_mounts
def test_full_output_filesystem_is_refused_before_any_shard(pristine, tmp_path):
    before = digests(pristine)
    result = export_on_tmpfs("size=64k", tmp_path / "small", pristine)
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result)
    assert "bytes free but the export writes" in line, line
    assert digests(pristine) == before


# --- tampered exports: verify and inspect ----------------------------------------------------


@pytest.fixture(scope="module")
def finished(pristine, tmp_path_factory, ray_local) -> Path:
    """A verified export of the tiny Llama, in several shards."""
    out = tmp_path_factory.mktemp("finished") / "out"
    shardex.export(pristine, out, max_shard_size="200KB")
    return out


@pytest.fixture
def export_copy(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "export"))


def edit_manifest(out: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["/etc/passwd", "../../../../etc/passwd"])
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_manifest_naming_files_outside_the_export_is_refused(export_copy, capsys, name, command):
    edit_manifest(export_copy, lambda m: m["shards"][0].update(file=name))
    code, line = run_cli(capsys, command, export_copy)
    assert code == 2
    assert name in line and "not a file name inside" in line and "manifest.json" in line, line


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_model_onnx_edited_by_one_byte_fails_verify_naming_it(export_copy, pristine, capsys):
    before = digests(pristine)
    flip_byte(export_copy / "model.onnx", os.path.getsize(export_copy / "model.onnx") // 2)
    code, line = run_cli(capsys, "verify", export_copy, "--quiet")
    assert code == 1
    assert line.startswith("shardex: error: verification failed") and "model.onnx" in line, line
    manifest = json.loads((export_copy / "manifest.json").read_text())
    assert manifest["status"] == "verification_failed"
    assert manifest["verification"]["shard_hash_mismatches"] == ["model.onnx"]
    assert digests(pristine) == before


@pytest.mark.usefixtures("ray_local")
def test_shard_edited_by_one_byte_fails_verify_naming_it(export_copy, pristine, capsys):
    before = digests(pristine)
    shard = json.loads((export_copy / "manifest.json").read_text())["shards"][-1]["file"]
    flip_byte(export_copy / shard, 0)
    code, line = run_cli(capsys, "verify", export_copy, "--quiet")
    assert code == 1
    assert line.startswith("shardex: error: verification failed") and shard in line, line
    assert digests(pristine) == before


def test_manifest_naming_a_factory_imports_nothing(export_copy, tmp_path, monkeypatch, capsys):
    """An export's manifest is data: a factory it names is reported, never imported."""
    marker = tmp_path / "imported"
    (tmp_path / "payload_of_the_manifest.py").write_text(
        f"open({os.fspath(marker)!r}, 'w').close()\ndef build():\n    raise SystemExit('ran')\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    edit_manifest(
        export_copy, lambda m: m["source"].update(kind="factory", location="payload_of_the_manifest:build")
    )
    code, line = run_cli(capsys, "verify", export_copy)
    assert code == 2
    assert "payload_of_the_manifest:build" in line and "--factory" in line, line
    assert not marker.exists()
    assert cli.main(["inspect", os.fspath(export_copy)]) == 0
    assert (
        "factory payload_of_the_manifest:build (verify imports it only with --factory"
        in capsys.readouterr().out
    )
    assert not marker.exists()


def test_manifest_asking_for_remote_code_is_reported_not_obeyed(export_copy, ckpt, tmp_path, capsys):
    """The checkpoint needs its own code and the manifest asks for it: verify without
    --trust-remote-code says so and runs nothing."""
    marker = tmp_path / "imported"
    (ckpt / "homemade.py").write_text(f"open({os.fspath(marker)!r}, 'w').close()\n")
    edit_config(ckpt, remote_code)

    def point_at_ckpt(manifest: dict) -> None:
        manifest["source"]["location"] = os.fspath(ckpt)
        manifest["options"]["trust_remote_code"] = True

    edit_manifest(export_copy, point_at_ckpt)
    capsys.readouterr()
    assert cli.main(["verify", os.fspath(export_copy)]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()[-2:]
    assert "manifest asks for trust_remote_code" in warning and "only from the caller" in warning
    assert "needs its own code" in error and "--trust-remote-code" in error
    assert not marker.exists()


@pytest.mark.usefixtures("ray_local")
def test_overwrite_keeps_the_previous_export_until_the_new_one_is_complete(export_copy, pristine, capsys):
    before = digests(export_copy)
    code, line = run_cli(capsys, "export", pristine, export_copy, "--overwrite", "--blocks", "no.such.*")
    assert code == 2 and "matches no module" in line
    assert digests(export_copy) == before, "a failed overwrite changed the previous export"

    old_shards = len(shardex.load_manifest(export_copy)["shards"])
    program = shardex.export(pristine, export_copy, overwrite=True, max_shard_size="1GiB", verify=False)
    manifest = shardex.load_manifest(export_copy)
    assert manifest["options"]["max_shard_size"] == 1 << 30 and len(manifest["shards"]) < old_shards
    names = {"model.onnx", "manifest.json", "timeline.json", *manifest["runtime_files"]}
    names |= {s["file"] for s in manifest["shards"]}  # a generation export's nested inputs are not saved
    assert set(os.listdir(export_copy)) == names  # the old shards are gone, nothing staged is left
    weight = program.model.graph.initializers["model.norm.weight"].const_value
    assert os.path.samefile(weight.base_dir, export_copy)
    assert weight.numpy().shape == (64,)

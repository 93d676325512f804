"""`shardex zoo`: many models, one failure alone, re-runs that skip what is done, interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from shardex._commands.export import zoo_options
from shardex._zoo import load_zoo
from tests import models
from tests.cli_support import FACTORY, REPO, error_lines, make_decoder, shardex


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings and lists of strings read the same in TOML


def write_zoo(path, models_: list[dict], defaults: dict | None = None):
    lines = ["[defaults]", *(f"{k} = {toml_value(v)}" for k, v in (defaults or {}).items()), ""]
    for entry in models_:
        lines += ["[[model]]", *(f"{k} = {toml_value(v)}" for k, v in entry.items()), ""]
    path.write_text("\n".join(lines))
    return path


def results(out) -> dict[str, dict]:
    return {m["name"]: m for m in json.loads((out / "zoo.json").read_text())["models"]}


def statuses(out) -> list[str]:
    return [m["status"] for m in results(out).values()]


# --- fast: no export gets as far as Ray -----------------------------------------------------


def test_entry_options_become_export_flags(tmp_path):
    (tmp_path / "ckpt").mkdir()
    manifest = write_zoo(
        tmp_path / "zoo.toml",
        [
            {"name": "hf", "source": "ckpt", "inline": True, "max_shard_size": "2GiB"},
            {
                "name": "mlp",
                "source": FACTORY,
                "weights": "w.safetensors",
                "verify": False,
                "input": ["x=2x16"],
            },
        ],
        defaults={"max_shard_size": "64MB", "dtype": "bf16"},
    )
    hf, mlp = load_zoo(os.fspath(manifest), zoo_options())
    assert hf.source == os.fspath(tmp_path / "ckpt")  # relative to the manifest
    assert hf.export_flags() == ["--max-shard-size", "2GiB", "--dtype", "bf16", "--inline"]
    assert mlp.source == FACTORY
    assert mlp.export_flags() == [
        "--max-shard-size",
        "64MB",
        "--dtype",
        "bf16",
        "--weights",
        os.fspath(tmp_path / "w.safetensors"),
        "--no-verify",
        "--input",
        "x=2x16",
    ]


BAD_MANIFESTS = {
    "unknown key": (
        '[[model]]\nname = "a"\nsource = "x"\ncolour = "red"\n',
        "model 'a' has unknown key 'colour'",
    ),
    "unknown default": (
        '[defaults]\nresume = true\n[[model]]\nname = "a"\nsource = "x"\n',
        "[defaults] has unknown key 'resume'",
    ),
    "bad value": (
        '[[model]]\nname = "a"\nsource = "x"\nopset = "new"\n',
        "model 'a': argument --opset: invalid int value",
    ),
    "list for one value": (
        '[[model]]\nname = "a"\nsource = "x"\ndtype = ["bf16"]\n',
        "dtype takes one value, not a list",
    ),
    "zoo-controlled key": (
        '[[model]]\nname = "a"\nsource = "x"\noverwrite = true\n',
        "model 'a' has unknown key 'overwrite'",
    ),
    "reserved name": ('[[model]]\nname = "logs"\nsource = "x"\n', "name must be a plain directory name"),
    "no name": ('[[model]]\nsource = "x"\n', 'needs name = "..."'),
    "not TOML": ("[[model]\n", "is not valid TOML"),
    "unknown table": ('[[models]]\nname = "a"\n', "unknown table or key 'models'"),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_bad_manifest_is_one_line_and_exit_2(tmp_path, case):
    text, fragment = BAD_MANIFESTS[case]
    (tmp_path / "zoo.toml").write_text(text)
    result = shardex("zoo", tmp_path / "zoo.toml", tmp_path / "out")
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert line.startswith("shardex: error: ") and fragment in line, line


def test_missing_manifest_is_exit_2(tmp_path):
    result = shardex("zoo", tmp_path / "zoo.toml", tmp_path / "out")
    assert result.returncode == 2
    assert "cannot read zoo manifest" in error_lines(result)[0]


def test_failed_models_do_not_stop_others_and_are_retried(tmp_path):
    (tmp_path / "empty").mkdir()
    manifest = write_zoo(
        tmp_path / "zoo.toml",
        [{"name": "missing", "source": "nowhere"}, {"name": "empty", "source": "empty"}],
    )
    out = tmp_path / "out"

    first = shardex("zoo", manifest, out, "--max-concurrent", "2", "--verbose")

    assert first.returncode == 1, first.stderr
    rows = results(out)
    assert [rows[n]["status"] for n in ("missing", "empty")] == ["failed", "failed"]
    assert "does not exist" in rows["missing"]["error"] and "config.json" in rows["empty"]["error"]
    assert rows["missing"]["exit_code"] == 2
    assert "| missing | failed |" in (out / "zoo.md").read_text()
    assert "0/2 models exported" in first.stdout

    again = shardex("zoo", manifest, out, "--verbose")
    assert again.returncode == 1
    assert "zoo: missing resumed" in again.stderr and "zoo: empty resumed" in again.stderr


# --- slow: real exports, each in its own process with its own Ray ----------------------------


@pytest.mark.slow
def test_zoo_of_five_one_broken_then_rerun(tmp_path):
    sources = tmp_path / "sources"
    models.make_llama(sources / "llama", layers=2)
    models.make_gpt2(sources / "gpt2", layers=2)
    make_decoder(sources / "qwen2", "Qwen2")
    models.save_block_stack(sources / "stack.safetensors")
    (sources / "mistral").mkdir()  # broken on purpose: a config, no weights
    make_decoder(tmp_path / "mistral-later", "Mistral")
    os.replace(tmp_path / "mistral-later" / "config.json", sources / "mistral" / "config.json")
    manifest = write_zoo(
        tmp_path / "zoo.toml",
        [
            {"name": "llama", "source": "sources/llama"},
            {"name": "gpt2", "source": "sources/gpt2", "max_shard_size": "100KB"},
            {"name": "qwen2", "source": "sources/qwen2", "inline": True},
            {
                "name": "stack",
                "source": FACTORY,
                "weights": "sources/stack.safetensors",
                "input": ["x=2x5x16"],
                "dynamic_axes": ["x=0:batch,1:steps"],
            },
            {"name": "mistral", "source": "sources/mistral"},
        ],
        defaults={"max_shard_size": "256KB"},
    )
    out = tmp_path / "out"

    first = shardex("zoo", manifest, out, "--max-concurrent", "2", "--verbose", timeout=600)

    assert first.returncode == 1, first.stderr
    rows = results(out)
    assert list(rows) == ["llama", "gpt2", "qwen2", "stack", "mistral"]
    assert {n: r["status"] for n, r in rows.items()} == {
        "llama": "complete",
        "gpt2": "complete",
        "qwen2": "complete",
        "stack": "complete",
        "mistral": "failed",
    }
    assert "no *.safetensors files" in rows["mistral"]["error"]
    for name in ("llama", "gpt2", "qwen2", "stack"):
        assert rows[name]["max_abs_diff"] < 1e-3 and rows[name]["parameters"] > 0
        assert (out / name / "report.html").is_file()
    table = first.stdout
    for name in rows:
        assert f"\n{name} " in table
    markdown = (out / "zoo.md").read_text()
    assert all(f"[{n}]({n}/report.html)" in markdown for n in ("llama", "gpt2", "qwen2", "stack"))
    assert "| mistral | failed |" in markdown

    for name in ("model.safetensors", "generation_config.json"):  # repair the broken entry
        os.replace(tmp_path / "mistral-later" / name, sources / "mistral" / name)
    second = shardex("zoo", manifest, out, "--max-concurrent", "2", "--verbose", timeout=600)

    assert second.returncode == 0, second.stderr
    rows = results(out)
    assert {n: r["status"] for n, r in rows.items()} == {
        "llama": "skipped",
        "gpt2": "skipped",
        "qwen2": "skipped",
        "stack": "skipped",
        "mistral": "complete",
    }
    for name in ("llama", "gpt2", "qwen2", "stack"):
        assert f"zoo: {name} skipped: its export is complete and intact" in second.stderr
    assert "zoo: mistral resumed" in second.stderr and "5/5 models exported" in second.stdout


@pytest.mark.slow
def test_killed_zoo_resumes_with_the_rest(tmp_path):
    checkpoint = models.make_llama(tmp_path / "llama", layers=2)
    names = ["first", "second", "third"]
    manifest = write_zoo(tmp_path / "zoo.toml", [{"name": n, "source": checkpoint} for n in names])
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "shardex", "zoo", manifest, out, "--verbose"]
    with open(tmp_path / "zoo.log", "w") as log:
        zoo = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while not (out / "zoo.json").exists() or statuses(out) != ["complete", "running"]:
            assert zoo.poll() is None and time.monotonic() < deadline, (tmp_path / "zoo.log").read_text()
            time.sleep(0.2)
        descendants = psutil.Process(zoo.pid).children(recursive=True)
    finally:
        os.kill(zoo.pid, signal.SIGKILL)
        zoo.wait()
    assert statuses(out) == ["complete", "running"]
    assert descendants, "the second export was running"
    # the export stops its Ray on SIGTERM; Ray's agents notice a dead raylet within a minute or two
    _, alive = psutil.wait_procs(descendants, timeout=180)
    assert not alive, f"exports outlived the killed zoo: {alive}"

    rerun = shardex("zoo", manifest, out, "--verbose", timeout=600)

    assert rerun.returncode == 0, rerun.stderr
    assert "zoo: second resumed" in rerun.stderr and "zoo: third started" in rerun.stderr
    assert {n: r["status"] for n, r in results(out).items()} == {
        "first": "skipped",
        "second": "complete",
        "third": "complete",
    }
    assert json.loads((out / "zoo.json").read_text())["finished"]

"""The architecture matrix: every family of tests/architectures.py through three exporters.

For each architecture a tiny random-weight checkpoint is written by transformers'
`save_pretrained`, then exported by
  shardex       ``shardex.export(CKPT, OUT)`` with its defaults (local Ray, its own task choice:
                causal LMs get the KV-cache step, fed an empty past here);
  torch.onnx    ``torch.onnx.export(model, kwargs=..., dynamic_shapes=..., dynamo=True)`` with
                dynamic batch and sequence axes, its defaults otherwise;
  transformers  ``OnnxExporter().export(model, kwargs, OnnxConfig(dynamic=True))``,
and each saved program is run in plain ONNX Runtime against transformers (the model loaded
with ``from_pretrained``, no cache) at the two sizes of `tests.architectures.SIZES`. Pass =
exported and max |onnx - torch| <= 1e-4 at both sizes, on the architecture's checked output.

Every (architecture, exporter) pair runs in its own subprocess with a timeout, so a crash or a
hang costs only that cell. Results go to OUTPUT.json (resumable: finished cells are skipped
unless --redo) and OUTPUT.md, a table with shardex's failures and their stages.

    python scripts/arch_matrix.py                                   # everything not yet done
    python scripts/arch_matrix.py --only llama,mixtral --redo       # some rows again
    python scripts/arch_matrix.py --exporters shardex --timeout 300 --jobs 1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.architectures import ARCHITECTURES, BY_NAME, EXAMPLE, SIZES  # noqa: E402

EXPORTERS = ("shardex", "torch.onnx", "transformers")
ATOL = 1e-4
DEFAULT_OUTPUT = os.path.join(ROOT, "benchmarks", "arch_matrix")
# shardex functions that identify the stage an error came from; the deepest one in the
# traceback (a worker's included) wins.
STAGE_FUNCTIONS = {
    "resolve_source": "source",
    "make_plan": "plan",
    "capture_trunk": "capture trunk",
    "capture_block": "capture block",
    "write_shard": "weights",
    "link_shard": "weights",
    "stitch": "stitch",
    "_write_runtime_layout": "stitch",
    "_verify": "verify",
}
STAGE_CLASSES = {
    "OptionsError": "options",
    "SourceError": "source",
    "PlanError": "plan",
    "CaptureError": "capture",
    "WeightsError": "weights",
    "StitchError": "stitch",
    "VerificationError": "verify",
}


# --- one cell, in its own process ----------------------------------------------------------


def run_cell(name: str, exporter: str) -> dict[str, Any]:
    """Checkpoint, reference, export, compare: the cell's record (never raises)."""
    import torch

    _quiet_transformers()
    arch = BY_NAME[name]
    record: dict[str, Any] = {"architecture": name, "kind": arch.kind, "exporter": exporter}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"arch-{name}-") as tmp:
        checkpoint = os.path.join(tmp, "checkpoint")
        arch.build().save_pretrained(checkpoint)
        model = arch.load(checkpoint)
        cases = []
        with torch.no_grad():
            for batch, seq in SIZES:
                inputs = arch.inputs(model, batch, seq)
                output = model(**inputs)
                cases.append((batch, seq, inputs, output))
        out = os.path.join(tmp, "out")
        try:
            export_info = EXPORT[exporter](arch, model, checkpoint, out)
            record.update(export_info)
        except BaseException as e:  # noqa: BLE001 - every failure is a result
            record.update(_describe_error(e))
        finally:
            record.update(_exported_files(out))
        if record["exported"]:
            try:
                record["sizes"] = [
                    {"batch": b, "seq": s, "max_abs_diff": compare(out, arch, inputs, output)}
                    for b, s, inputs, output in cases
                ]
            except Exception as e:  # noqa: BLE001
                record["compare_error"] = f"{type(e).__name__}: {_first_line(e)}"
    diffs = [c["max_abs_diff"] for c in record.get("sizes", [])]
    record["max_abs_diff"] = max(diffs) if len(diffs) == len(SIZES) else None
    record["passed"] = bool(
        record["exported"]
        and "error" not in record
        and record["max_abs_diff"] is not None
        and record["max_abs_diff"] <= ATOL
    )
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _quiet_transformers() -> None:
    """No progress bars or warnings from transformers in the logs: errors are what matter there."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def export_shardex(arch, model, checkpoint: str, out: str) -> dict[str, Any]:
    import shardex

    try:
        shardex.export(checkpoint, out)
        return {"own_verification": "passed"}
    except shardex.VerificationError as e:
        return {"own_verification": f"failed: {_first_line(e)}"}


def export_torch_onnx(arch, model, checkpoint: str, out: str) -> dict[str, Any]:
    import torch

    example = arch.inputs(model, *EXAMPLE)
    program = torch.onnx.export(
        model, args=(), kwargs=example, dynamic_shapes=_dynamic_axes(example), dynamo=True
    )
    os.makedirs(out)
    program.save(os.path.join(out, "model.onnx"), external_data=True)
    return {}


def export_transformers(arch, model, checkpoint: str, out: str) -> dict[str, Any]:
    from transformers.exporters import OnnxConfig, OnnxExporter

    exported = OnnxExporter().export(model, dict(arch.inputs(model, *EXAMPLE)), OnnxConfig(dynamic=True))
    exported.save_pretrained(out)
    return {}


EXPORT = {"shardex": export_shardex, "torch.onnx": export_torch_onnx, "transformers": export_transformers}


def _dynamic_axes(example: dict) -> dict[str, dict[int, str]]:
    """Batch everywhere; the sequence axis of token inputs (the decoder's its own)."""
    axes = {}
    for name, value in example.items():
        axes[name] = {0: "batch"}
        if value.dim() == 2:
            axes[name][1] = "decoder_sequence" if name.startswith("decoder_") else "sequence"
    return axes


def _exported_files(out: str) -> dict[str, Any]:
    """Whether a program was saved; for shardex, what the manifest says about it."""
    info: dict[str, Any] = {"exported": _program_files(out) is not None}
    manifest_path = os.path.join(out, "manifest.json")
    if not os.path.exists(manifest_path):
        return info
    import onnx

    with open(manifest_path) as f:
        manifest = json.load(f)
    plan = manifest["plan"]
    info |= {
        "task": plan.get("task"),
        "groups": len(plan["groups"]),
        "blocks": sum(len(g["members"]) for g in plan["groups"]),
        "status": manifest.get("status"),
    }
    files = _program_files(out) or []
    info["functions"] = sum(
        len(onnx.load(os.path.join(out, f), load_external_data=False).functions) for f in files
    )
    return info


def _program_files(out: str) -> list[str] | None:
    """``model.onnx``, or an encoder and a decoder under Optimum's names; None if neither."""
    for files in (["model.onnx"], ["encoder_model.onnx", "decoder_model.onnx"]):
        if all(os.path.exists(os.path.join(out, f)) for f in files):
            return files
    return None


# --- comparison in plain ONNX Runtime -----------------------------------------------------


def compare(out: str, arch, inputs: dict, reference) -> float:
    """Max |onnx - torch| of the architecture's checked output at one size."""
    import numpy as np

    files = _program_files(out)
    assert files is not None, "Bug: compare() called without a saved program"
    feeds = {k: v.numpy() for k, v in inputs.items()}
    if files == ["model.onnx"]:
        got = _run(os.path.join(out, "model.onnx"), feeds, reference, arch.output)
    else:
        got = _run_encoder_decoder(out, feeds, reference, arch.output)
    want = reference[arch.output].numpy()
    if got.shape != want.shape:
        raise ValueError(f"{arch.output} has shape {list(got.shape)}, transformers gives {list(want.shape)}")
    diff = float(np.abs(got.astype(np.float64) - want).max())
    return diff if np.isfinite(diff) else float("inf")


def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _run(path: str, feeds: dict, reference, output: str):
    """Run one program, fed by input name; a cache input gets an empty past (a first step), a
    recurrent state a zero state."""
    from tests.onnx_support import positions, step_feeds

    sess = _session(path)
    names = [i.name for i in sess.get_inputs()]
    if any(n.startswith(("past_key_values.", "past_conv.", "past_ssm.")) for n in names):
        feeds = feeds | step_feeds(sess, feeds["input_ids"], feeds["attention_mask"])
    elif "position_ids" in names and "position_ids" not in feeds:
        feeds = feeds | {"position_ids": positions(feeds["attention_mask"])}
    return _pick(sess, sess.run(None, _only(names, feeds)), reference, output)


def _run_encoder_decoder(out: str, feeds: dict, reference, output: str):
    """Optimum's layout: the encoder's last_hidden_state feeds the decoder (no cache)."""
    encoder = _session(os.path.join(out, "encoder_model.onnx"))
    encoded = encoder.run(None, _only([i.name for i in encoder.get_inputs()], feeds))[0]
    decoder = _session(os.path.join(out, "decoder_model.onnx"))
    decoder_feeds = {
        "input_ids": feeds["decoder_input_ids"],
        "encoder_hidden_states": encoded,
        "encoder_attention_mask": feeds.get("attention_mask"),
    }
    names = [i.name for i in decoder.get_inputs()]
    return _pick(decoder, decoder.run(None, _only(names, decoder_feeds)), reference, output)


def _only(names: list[str], feeds: dict) -> dict:
    missing = [n for n in names if feeds.get(n) is None]
    if missing:
        raise ValueError(f"cannot feed the program's inputs {missing} (it takes {names})")
    return {n: feeds[n] for n in names}


def _pick(sess, results: list, reference, output: str):
    """The checked output: by name, else at its position among the model's flattened outputs
    (torch.onnx names outputs after graph nodes)."""
    from torch.utils import _pytree as pytree

    names = [o.name for o in sess.get_outputs()]
    if output in names:
        return results[names.index(output)]
    leaves = pytree.tree_flatten_with_path(dict(reference))[0]
    position = next(i for i, (path, _) in enumerate(leaves) if path[0].key == output)
    if len(names) != len(leaves):
        raise ValueError(f"no output named {output!r} and {len(names)} outputs for the model's {len(leaves)}")
    return results[position]


# --- errors -------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    """The line that says what went wrong: torch.onnx puts it under "## Exception summary",
    after a paragraph of advice."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1 :]
    lines = [line for line in lines if line] or [""]
    first = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return first[:400]


def _describe_error(e: BaseException) -> dict[str, Any]:
    text = "".join(traceback.format_exception(e))
    return {
        "error": f"{type(e).__name__}: {_first_line(e)}",
        "stage": _stage(e, text),
        "traceback_tail": text.strip().splitlines()[-40:],
    }


def _stage(e: BaseException, text: str) -> str | None:
    """The shardex stage of a failure: a capture error's piece, else the deepest stage function
    in the traceback (a Ray worker's traceback is part of the text), else the error's class."""
    piece = getattr(e, "piece", None)
    if piece is not None:
        return "capture trunk" if piece == "trunk" else f"capture block ({piece})"
    found = None
    for match in re.finditer(r'shardex/_\w+\.py", line \d+, in (\w+)', text):
        found = STAGE_FUNCTIONS.get(match.group(1), found)
    return found or STAGE_CLASSES.get(type(e).__name__)


# --- the driver ----------------------------------------------------------------------------


def run_in_subprocess(name: str, exporter: str, timeout: float, logs: str) -> dict[str, Any]:
    """One cell in a fresh interpreter; on a timeout its whole process tree is stopped."""
    os.makedirs(logs, exist_ok=True)
    log_path = os.path.join(logs, f"{name}.{exporter}.log")
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        command = [sys.executable, os.path.abspath(__file__), "--cell", name, exporter, result_path]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        started = time.perf_counter()
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop_tree(process.pid)
                process.wait()
                code = None
        if os.path.exists(result_path):
            with open(result_path) as f:
                return json.load(f)
    base = {"architecture": name, "kind": BY_NAME[name].kind, "exporter": exporter, "exported": False}
    base |= {"passed": False, "seconds": round(time.perf_counter() - started, 1), "log": log_path}
    if code is None:
        return base | {"error": f"timeout after {timeout:.0f} s", "stage": "timeout"}
    with open(log_path) as f:
        tail = f.read().strip().splitlines()[-1:] or [""]
    return base | {"error": f"process exited with code {code}: {tail[0][:300]}", "stage": "crash"}


def _stop_tree(pid: int) -> None:
    """SIGKILL `pid` and every process it started (found through /proc), children first."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def output_scales(names: list[str]) -> dict[str, float]:
    """transformers' largest |output| at the compared sizes: the scale a difference is read against
    (random weights give small outputs)."""
    import torch

    _quiet_transformers()
    scales = {}
    for name in names:
        arch = BY_NAME[name]
        with tempfile.TemporaryDirectory() as checkpoint:
            arch.build().save_pretrained(checkpoint)
            model = arch.load(checkpoint)
        with torch.no_grad():
            outputs = [model(**arch.inputs(model, b, s))[arch.output] for b, s in SIZES]
        scales[name] = max(float(o.abs().max()) for o in outputs)
    return scales


def load_results(path: str) -> dict[str, Any]:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"results": {}}


def save_results(results: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def summary(results: dict[str, Any], names: list[str]) -> str:
    parts = []
    for exporter in EXPORTERS:
        cells = [results["results"].get(n, {}).get(exporter) for n in names]
        passed = sum(1 for c in cells if c and c["passed"])
        missing = sum(1 for c in cells if c is None)
        parts.append(f"{exporter} {passed}/{len(names)}" + (f" ({missing} not run)" if missing else ""))
    return ", ".join(parts)


def _cell(record: dict[str, Any] | None) -> str:
    if record is None:
        return "not run"
    if record["passed"]:
        return f"pass ({record['max_abs_diff']:.0e})"
    if record.get("stage") == "timeout":
        return "timeout"
    if not record["exported"]:
        return "fail"
    if record.get("error"):
        return "fail (after saving)"
    if record.get("compare_error"):
        return "exported, not runnable"
    return (
        f"mismatch ({record['max_abs_diff']:.1e})" if record.get("max_abs_diff") is not None else "mismatch"
    )


def _notes(record: dict[str, Any] | None, scale: float | None) -> str:
    """Output scale, then shardex's task, functions vs groups, failing stage."""
    notes = [f"output max {scale:.2g}"] if scale is not None else []
    if record is None:
        return "; ".join(notes)
    if record.get("task"):
        notes.append(f"task {record['task']}")
    if "functions" in record:
        notes.append(
            f"{record['functions']} function(s) / {record['groups']} group(s) of {record['blocks']} blocks"
        )
    if record.get("stage"):
        notes.append(f"stage: {record['stage']}")
    if record.get("compare_error"):
        notes.append(f"ORT: {record['compare_error']}")
    own = record.get("own_verification", "")
    if own.startswith("failed"):
        notes.append("shardex's own verification failed")
    return "; ".join(notes)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown(results: dict[str, Any], names: list[str], path: str) -> None:
    lines = [
        "# Architecture matrix",
        "",
        "Runs that wrote these results (each fills or redoes some cells):",
        "",
        *(f"- `{r['command']}` at {r['commit']}, {r['date']}" for r in results.get("runs", [])),
        "",
        f"Versions: {results.get('versions', '')}",
        "",
        f"Tiny random-weight checkpoints (`tests/architectures.py`), compared in ONNX Runtime (CPU) "
        f"with transformers at (batch, seq) = {list(SIZES)}; pass = exported and max abs diff "
        f"<= {ATOL:g} at both sizes. shardex: `shardex.export(CKPT, OUT)` defaults (causal LMs: the "
        "KV-cache step, fed an empty past); torch.onnx: `dynamo=True`, dynamic batch/sequence; "
        "transformers: `OnnxExporter` with `OnnxConfig(dynamic=True)`. The other two export the model "
        "loaded with `from_pretrained` and `use_cache=False`.",
        "",
        f"**{summary(results, names)}**",
        "",
        "| architecture | kind | shardex | torch.onnx | transformers | shardex error (first line) | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        row = results["results"].get(name, {})
        shardex_record = row.get("shardex") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    BY_NAME[name].kind,
                    *(_cell(row.get(e)) for e in EXPORTERS),
                    _escape(shardex_record.get("error", "")[:200]),
                    _escape(_notes(row.get("shardex"), results.get("scales", {}).get(name))),
                ]
            )
            + " |"
        )
    others = [
        (name, exporter, row[exporter])
        for name in names
        for exporter in EXPORTERS[1:]
        if (row := results["results"].get(name, {})).get(exporter) and not row[exporter]["passed"]
    ]
    if others:
        lines += ["", "## torch.onnx and transformers failures", ""]
        for name, exporter, record in others:
            why = (
                record.get("error")
                or record.get("compare_error")
                or f"max abs diff {record.get('max_abs_diff')}"
            )
            lines.append(f"- **{name}**, {exporter}: {_escape(why[:300])}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _versions() -> str:
    packages = ["torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime-gpu", "ray"]
    versions = []
    for package in packages:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(versions)


def _run_record(argv: list[str]) -> dict[str, str]:
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    )
    return {
        "command": " ".join(["python scripts/arch_matrix.py", *argv]),
        "commit": commit.stdout.strip() or "?",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="comma-separated architecture names (default: all)")
    parser.add_argument(
        "--exporters", default=",".join(EXPORTERS), help="comma-separated subset of " + ", ".join(EXPORTERS)
    )
    parser.add_argument("--redo", action="store_true", help="run cells that already have a result again")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (default 1)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per cell (default 300)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="writes OUTPUT.json and OUTPUT.md")
    parser.add_argument("--logs", default=os.path.join(tempfile.gettempdir(), "arch_matrix_logs"))
    parser.add_argument("--cell", nargs=3, metavar=("NAME", "EXPORTER", "RESULT"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)

    if options.cell:
        name, exporter, result_path = options.cell
        record = run_cell(name, exporter)
        with open(result_path, "w") as f:
            json.dump(record, f)
        return 0

    names = options.only.split(",") if options.only else [a.name for a in ARCHITECTURES]
    exporters = options.exporters.split(",")
    unknown = [n for n in names if n not in BY_NAME] + [e for e in exporters if e not in EXPORTERS]
    if unknown:
        parser.error(f"unknown architecture(s) or exporter(s) {unknown}; see tests/architectures.py")
    json_path, md_path = f"{options.output}.json", f"{options.output}.md"
    results = load_results(json_path)
    results["versions"] = _versions()
    todo = [
        (n, e) for n in names for e in exporters if options.redo or e not in results["results"].get(n, {})
    ]
    all_names = [a.name for a in ARCHITECTURES]
    scales = results.setdefault("scales", {})
    scales |= output_scales([n for n in all_names if n not in scales])
    if todo:
        results.setdefault("runs", []).append(_run_record(argv))
    with concurrent.futures.ThreadPoolExecutor(max_workers=options.jobs) as pool:
        futures = {
            pool.submit(run_in_subprocess, n, e, options.timeout, options.logs): (n, e) for n, e in todo
        }
        for future in concurrent.futures.as_completed(futures):
            name, exporter = futures[future]
            record = future.result()
            results["results"].setdefault(name, {})[exporter] = record
            save_results(results, json_path)
            write_markdown(results, all_names, md_path)
            print(
                f"{name:15s} {exporter:12s} {_cell(record):24s} {record['seconds']:6.1f}s {record.get('error', '')[:120]}",
                flush=True,
            )
    save_results(results, json_path)
    write_markdown(results, all_names, md_path)
    print(summary(results, all_names))
    return 0


if __name__ == "__main__":
    sys.exit(main())

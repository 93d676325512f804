"""Batch export of a model zoo described in TOML, one ``shardex export`` subprocess per model.

    [defaults]                     # options every model gets unless it sets its own
    max_shard_size = "2GiB"

    [[model]]
    name = "llama-3-8b"            # output directory under the zoo's output dir
    source = "ckpts/Llama-3-8B"    # relative paths are relative to this file
    dtype = "bf16"

Each model is exported by its own ``python -m shardex export ... --json`` process: a crash or
out-of-memory in one model's capture cannot take the others down, each has its own log, and the
library's process-wide state (its Ray session, meta-device patching) is never shared. Exports
join the zoo's ``--address`` cluster when one is given, else each starts a local Ray (a few
seconds, negligible next to a large model). Children get SIGTERM if the zoo dies (Linux), so a
killed zoo leaves no orphan exports behind.

A re-run skips a model whose export is complete and intact (manifest status complete, every file
present with its recorded size, model.onnx's sha256 unchanged) and whose entry has not changed
since; it retries every other model, with ``--resume`` when its entry is unchanged (the shards
already written are kept) and ``--overwrite`` otherwise. ``zoo.json`` is rewritten as each model
starts and finishes, so a killed zoo remembers what it finished and what was running.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from shardex._errors import OptionsError, ShardexError
from shardex._hub import looks_like_repo_id
from shardex._output import load_manifest, model_files, write_atomic
from shardex._report import REPORT_FILE, human_bytes, human_count, summarize
from shardex._weights import file_sha256

logger = logging.getLogger("shardex")

RESULTS_JSON = "zoo.json"
RESULTS_MARKDOWN = "zoo.md"
LOG_DIR = "logs"
RESERVED_NAMES = frozenset({RESULTS_JSON, RESULTS_MARKDOWN, LOG_DIR})
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
POLL_SECONDS = 0.2
TERMINATE_GRACE_SECONDS = 60  # a terminated export stops its Ray before exiting
PR_SET_PDEATHSIG = 1
DONE_STATUSES = frozenset({"complete", "skipped"})


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo: where it comes from, where it goes, its export options."""

    name: str
    source: str
    options: dict[str, Any]  # export flag (with '_' for '-') -> value; defaults merged in

    def export_flags(self) -> list[str]:
        """The options as ``shardex export`` flags: ``inline=true`` -> ``--inline``, ``verify=false``
        -> ``--no-verify``, a list -> the flag repeated."""
        flags: list[str] = []
        for key, value in self.options.items():
            flag = key.replace("_", "-")
            if isinstance(value, bool):
                flags.append(f"--{flag}" if value else f"--no-{flag}")
            else:
                for item in value if isinstance(value, list) else [value]:
                    flags += [f"--{flag}", str(item)]
        return flags


@dataclasses.dataclass
class ModelResult:
    """One row of the zoo summary."""

    name: str
    source: str
    options: dict[str, Any]
    status: str
    output_dir: str
    seconds: float | None = None  # this run's wall time; None when skipped
    parameters: int | None = None
    bytes: int | None = None
    max_abs_diff: float | None = None
    error: str | None = None
    exit_code: int | None = None
    log: str | None = None

    @property
    def done(self) -> bool:
        return self.status in DONE_STATUSES


def load_zoo(path: str, known_options: Collection[str]) -> list[ZooEntry]:
    """Read and check a zoo manifest; every problem is one `OptionsError` naming the entry and key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise OptionsError(f"cannot read zoo manifest {path}: {e.strerror}; pass a TOML file.") from None
    except tomllib.TOMLDecodeError as e:
        raise OptionsError(f"zoo manifest {path} is not valid TOML: {e}.") from None
    unknown = sorted(set(data) - {"defaults", "model"})
    if unknown:
        raise OptionsError(
            f"zoo manifest {path} has unknown table or key {unknown[0]!r}; it holds [defaults] and [[model]] entries."
        )
    defaults = data.get("defaults", {})
    models = data.get("model", [])
    if (
        not isinstance(defaults, dict)
        or not isinstance(models, list)
        or not models
        or not all(isinstance(m, dict) for m in models)
    ):
        raise OptionsError(
            f"zoo manifest {path} needs one [[model]] table per model (and an optional [defaults])."
        )
    _check_options(defaults, known_options, f"{path}: [defaults]")
    base = os.path.dirname(os.path.abspath(path))
    entries: list[ZooEntry] = []
    for number, model in enumerate(models, start=1):
        where = f"{path}: [[model]] #{number}"
        name, source = model.get("name"), model.get("source")
        for key, value in (("name", name), ("source", source)):
            if not isinstance(value, str) or not value:
                raise OptionsError(f'{where} needs {key} = "..." (a string).')
        where = f"{path}: model {name!r}"
        if not NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES:
            raise OptionsError(
                f"{where}: name must be a plain directory name (letters, digits, '.', '_', '-'), not one of "
                f"{sorted(RESERVED_NAMES)}."
            )
        if name in {e.name for e in entries}:
            raise OptionsError(f"{where}: the name is used twice; each model needs its own output name.")
        options = {k: v for k, v in model.items() if k not in ("name", "source")}
        _check_options(options, known_options, where)
        merged = {**defaults, **options}
        if isinstance(merged.get("weights"), str):
            merged["weights"] = _resolve(merged["weights"], base)
        entries.append(ZooEntry(name, _resolve_source(source, base), merged))
    return entries


def _check_options(options: dict, known: Collection[str], where: str) -> None:
    for key, value in options.items():
        if key not in known:
            raise OptionsError(
                f"{where} has unknown key {key!r}; known keys are name, source, {', '.join(sorted(known))}."
            )
        scalar = (str, int, float, bool)
        if not isinstance(value, scalar) and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise OptionsError(
                f"{where}: {key} must be a string, number, boolean or list of strings, got {value!r}."
            )


def _resolve(path: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _resolve_source(source: str, base: str) -> str:
    """A path relative to the manifest's directory; where none exists, a factory
    'package.module:function' or a Hub id 'org/name' as is."""
    path = _resolve(source, base)
    return source if (":" in source or looks_like_repo_id(source)) and not os.path.exists(path) else path


def export_is_complete(output_dir: str) -> bool:
    """Whether `output_dir` holds a finished, verified (or unverified by choice), intact export."""
    try:
        manifest = load_manifest(output_dir)
    except (ShardexError, OSError, ValueError):
        return False
    models = [(os.path.join(output_dir, m["file"]), m["bytes"], m["sha256"]) for m in model_files(manifest)]
    files = [(path, size) for path, size, _ in models] + [
        (os.path.join(output_dir, s["file"]), s["nbytes"]) for s in manifest["shards"]
    ]
    return (
        manifest["status"] == "complete"
        and all(os.path.isfile(p) and os.path.getsize(p) == n for p, n in files)
        and all(file_sha256(path) == digest for path, _, digest in models)
    )


def run_zoo(
    entries: list[ZooEntry], output_dir: str, *, max_concurrent: int, address: str | None
) -> list[ModelResult]:
    """Export every entry not already done, at most `max_concurrent` at once; results in entry order."""
    out = os.path.abspath(output_dir)
    os.makedirs(os.path.join(out, LOG_DIR), exist_ok=True)
    previous = {r["name"]: r for r in _read_results(out)}
    results: dict[str, ModelResult] = {}
    queue: list[ZooEntry] = []
    for entry in entries:
        if _unchanged(entry, previous.get(entry.name)) and export_is_complete(os.path.join(out, entry.name)):
            results[entry.name] = _skipped(entry, out)
            logger.info("zoo: %s skipped: its export is complete and intact", entry.name)
        else:
            queue.append(entry)
    running: list[_Export] = []
    try:
        while queue or running:
            while queue and len(running) < max_concurrent:
                entry = queue.pop(0)
                resume = _unchanged(entry, previous.get(entry.name))
                running.append(_Export.start(entry, out, address, resume=resume))
                results[entry.name] = running[-1].running()
                write_results(_in_order(entries, results), out, finished=False)
                logger.info(
                    "zoo: %s %s (log %s)", entry.name, "resumed" if resume else "started", running[-1].log
                )
            time.sleep(POLL_SECONDS)
            for export in [e for e in running if e.process.poll() is not None]:
                running.remove(export)
                result = results[export.entry.name] = export.result()
                logger.info(
                    "zoo: %s %s in %.1fs (%d/%d done)",
                    result.name,
                    result.status,
                    result.seconds,
                    len(results),
                    len(entries),
                )
                write_results(_in_order(entries, results), out, finished=False)
    except BaseException:
        for export in running:
            export.process.terminate()
        for export in running:
            export.wait_or_kill()
            results[export.entry.name] = dataclasses.replace(export.result(), status="interrupted")
        write_results(_in_order(entries, results), out, finished=False)
        raise
    ordered = _in_order(entries, results)
    write_results(ordered, out, finished=True)
    return ordered


def _unchanged(entry: ZooEntry, previous: dict | None) -> bool:
    return previous is not None and (previous["source"], previous["options"]) == (entry.source, entry.options)


def _in_order(entries: list[ZooEntry], results: dict[str, ModelResult]) -> list[ModelResult]:
    return [results[e.name] for e in entries if e.name in results]


def _skipped(entry: ZooEntry, out: str) -> ModelResult:
    directory = os.path.join(out, entry.name)
    summary = summarize(load_manifest(directory), directory)
    return ModelResult(
        entry.name,
        entry.source,
        entry.options,
        "skipped",
        directory,
        parameters=summary["parameters"],
        bytes=summary["bytes"],
        max_abs_diff=summary["max_abs_diff"],
    )


@dataclasses.dataclass
class _Export:
    """One running ``shardex export`` child: stdout (its --json result) and stderr go to files."""

    entry: ZooEntry
    process: subprocess.Popen
    output_dir: str
    log: str
    result_file: str
    started: float

    @classmethod
    def start(cls, entry: ZooEntry, out: str, address: str | None, *, resume: bool) -> _Export:
        """`resume` keeps the shards an earlier run of the same entry wrote; otherwise whatever
        shardex export is in the way is replaced."""
        output_dir = os.path.join(out, entry.name)
        log = os.path.join(out, LOG_DIR, f"{entry.name}.log")
        result_file = os.path.join(out, LOG_DIR, f"{entry.name}.json")
        argv = [sys.executable, "-m", "shardex", "export", entry.source, output_dir]
        argv += ["--json", "--verbose", "--resume" if resume else "--overwrite", *entry.export_flags()]
        argv += ["--address", address] if address else []
        with open(log, "w") as stderr, open(result_file, "w") as stdout:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        return cls(entry, process, output_dir, log, result_file, time.perf_counter())

    def wait_or_kill(self) -> None:
        try:
            self.process.wait(TERMINATE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def running(self) -> ModelResult:
        """The row of a model being exported: what zoo.json shows if the zoo dies meanwhile."""
        return ModelResult(
            self.entry.name, self.entry.source, self.entry.options, "running", self.output_dir, log=self.log
        )

    def result(self) -> ModelResult:
        code = self.process.returncode
        status = {0: "complete", 1: "verification_failed", 130: "interrupted"}.get(code, "failed")
        summary = _read_json(self.result_file)
        error = summary.get("error") or (None if code == 0 else _error_of(self.log, code))
        return ModelResult(
            self.entry.name,
            self.entry.source,
            self.entry.options,
            status,
            self.output_dir,
            seconds=time.perf_counter() - self.started,
            parameters=summary.get("parameters"),
            bytes=summary.get("bytes"),
            max_abs_diff=summary.get("max_abs_diff"),
            error=error,
            exit_code=code,
            log=self.log,
        )


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the zoo process dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _error_of(log: str, code: int) -> str:
    """The one-line error a child printed last, or how it ended when it printed none."""
    try:
        with open(log, errors="replace") as f:
            lines = [line.strip() for line in f if line.startswith("shardex: ")]
    except OSError:
        lines = []
    if lines:
        return lines[-1].removeprefix("shardex: ").removeprefix("error: ")
    return f"killed by signal {-code}" if code < 0 else f"exited with code {code}"


def _read_results(out: str) -> list[dict]:
    return _read_json(os.path.join(out, RESULTS_JSON)).get("models", [])


def write_results(results: list[ModelResult], out: str, *, finished: bool) -> None:
    """Write zoo.json (every field) and zoo.md (the table, with links to each model's report)."""
    data = {"finished": finished, "models": [dataclasses.asdict(r) for r in results]}
    write_atomic(os.path.join(out, RESULTS_JSON), json.dumps(data, indent=2))
    rows = [
        [f"[{r.name}]({r.name}/{REPORT_FILE})" if _has_report(r) else r.name, *_cells(r)] for r in results
    ]
    table = _markdown_table(COLUMNS, [[cell.replace("|", "\\|") for cell in row] for row in rows])
    title = "# shardex zoo" + ("" if finished else " (unfinished)")
    write_atomic(os.path.join(out, RESULTS_MARKDOWN), f"{title}\n\n{table}\n")


COLUMNS = ["model", "status", "params", "time", "size", "max diff", "error"]


def _cells(r: ModelResult) -> list[str]:
    """Every column after the model name, as text."""
    return [
        r.status,
        human_count(r.parameters) if r.parameters is not None else "-",
        f"{r.seconds:.1f}s" if r.seconds is not None else "-",
        human_bytes(r.bytes) if r.bytes is not None else "-",
        f"{r.max_abs_diff:.1e}" if r.max_abs_diff is not None else "-",
        r.error or "",
    ]


def format_table(results: list[ModelResult]) -> str:
    """The summary as aligned plain text (the error column last, unpadded)."""
    rows = [COLUMNS] + [[r.name, *_cells(r)] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip() for row in rows]
    return "\n".join(lines)


def _has_report(result: ModelResult) -> bool:
    return os.path.isfile(os.path.join(result.output_dir, REPORT_FILE))


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)

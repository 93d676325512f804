"""The output directory: its layout, atomic writes, the journal, the manifest, the example inputs.

Layout: ``model.onnx``, ``model-0000K-of-0000N.data`` shards (``.safetensors`` hard links in
zero-copy mode), ``inputs.safetensors``, ``manifest.json``, and ``report.html`` /
``timeline.json``. Every file is written under a hidden ``.NAME.partial`` name, fsynced and
renamed, so a final name always holds a complete file. Shards appear first, ``model.onnx``
after every shard, ``manifest.json`` last: a directory without a manifest is an unfinished
export. While one runs, ``.journal.json`` records the shards finished so far (resume). An
export replacing a previous one (overwrite) is written in ``.shardex-staging/`` and swapped in
when complete, so a failed or mistyped overwrite leaves the previous export as it was.

Names read back from a manifest or a journal are checked to be plain file names in the
directory: a downloaded export cannot make shardex read or hash files elsewhere.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from typing import Any

from shardex._cluster import MARKER_PREFIX
from shardex._errors import OptionsError
from shardex._files import fsync_directory, write_atomic
from shardex._layout import is_runtime_file
from shardex._tasks import SEQ2SEQ_COMPONENTS
from shardex._weights import ShardResult, file_digest, file_sha256, header_sha256, link_digest

logger = logging.getLogger("shardex")

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "shardex/2"  # 2: shards record "digest" ("blake3:<hex>"); 1 recorded "sha256"
INPUTS_FILE = "inputs.safetensors"
JOURNAL_FILE = ".journal.json"
TIMELINE_FILE = "timeline.json"
REPORT_FILE = "report.html"  # written by the CLI (_report); listed so overwrite and resume know it
# Files an export may leave in its directory besides shards.
STAGING_DIR = ".shardex-staging"  # a new export is written here while a previous one stays in place
OWN_FILES = frozenset(
    {
        MODEL_FILE,
        MANIFEST_FILE,
        INPUTS_FILE,
        JOURNAL_FILE,
        REPORT_FILE,
        TIMELINE_FILE,
        *SEQ2SEQ_COMPONENTS.values(),
    }
)
VERSIONED_PACKAGES = (
    "shardex",
    "torch",
    "onnx",
    "onnx-ir",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "ray",
    "transformers",
    "safetensors",
)


# --- writing files -------------------------------------------------------------------------


def write_json_atomic(path: str, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


def save_model(model, out: str, file: str = MODEL_FILE) -> str:
    """Write the stitched `onnx_ir.Model` (weights stay external) as `file`."""
    import onnx_ir as ir

    path = os.path.join(out, file)
    write_atomic(path, ir.serde.serialize_model(model).SerializeToString())
    return path


# --- what may be in the directory ----------------------------------------------------------


def is_shard_file(name: str) -> bool:
    bare = name.removeprefix(".").removesuffix(".partial")
    return (bare.startswith("model-") and bare.endswith((".data", ".safetensors"))) or (
        name.startswith(".") and name.endswith(".partial")
    )


def file_in(directory: str, name: Any, *, named_by: str) -> str:
    """The path of `name` in `directory`, where `name` comes from a file (`named_by`) that may
    have been edited: a plain file name, never a path that leaves the directory."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or os.path.basename(name) != name
        or "\\" in name
        or "\0" in name
    ):
        raise OptionsError(
            f"{named_by} names {name!r}, which is not a file name inside {directory}; the file was "
            "edited or damaged: export the model again."
        )
    return os.path.join(directory, name)


@dataclasses.dataclass(frozen=True)
class OutputDir:
    """Where an export goes (`final`) and where it is written (`work`): `final` itself, or a
    hidden staging directory inside it when `final` holds a previous export, which then stays
    intact until the new one is complete (`commit`)."""

    final: str
    work: str

    @contextlib.contextmanager
    def staged(self) -> Iterator[None]:
        """Write the export inside the block; `commit` it when the block completes, `discard`
        it when the block fails."""
        try:
            yield
        except BaseException:
            self.discard()
            raise
        self.commit()

    def commit(self) -> None:
        """Swap the staged export in: the old manifest goes first (the directory is unfinished
        for that moment), then the new files replace the old ones, the new manifest last."""
        if self.work == self.final:
            return
        new = [n for n in os.listdir(self.work) if n != MANIFEST_FILE]
        old = [n for n in os.listdir(self.final) if n != STAGING_DIR]
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.final, MANIFEST_FILE))
        for name in new:
            os.replace(os.path.join(self.work, name), os.path.join(self.final, name))
        for name in set(old) - set(new) - {MANIFEST_FILE}:
            os.remove(os.path.join(self.final, name))
        os.replace(os.path.join(self.work, MANIFEST_FILE), os.path.join(self.final, MANIFEST_FILE))
        os.rmdir(self.work)
        fsync_directory(self.final)

    def discard(self) -> None:
        """After a failure: drop what was staged; the previous export is as it was."""
        if self.work != self.final:
            shutil.rmtree(self.work, ignore_errors=True)


def prepare_output_dir(
    path: str, *, overwrite: bool, resume: bool, source_dir: str | None = None
) -> OutputDir:
    """Check `path` can take this export, before any work: a writable directory, not inside
    the checkpoint directory `source_dir`, empty unless `overwrite` (a previous shardex export
    there is replaced once the new one is complete) or `resume` (kept for `reusable_shards`).
    A directory holding anything else is refused: shardex never deletes files it did not write."""
    out = os.path.abspath(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise OptionsError(f"output {out} exists and is not a directory; choose a directory path.")
    if source_dir is not None and _inside(out, source_dir):
        raise OptionsError(
            f"output directory {out} is inside the checkpoint directory {source_dir}; shardex never writes "
            "into its source: choose an output directory elsewhere."
        )
    _check_writable(out)
    existing = os.listdir(out) if os.path.isdir(out) else []
    if not existing:
        return OutputDir(out, out)
    if not overwrite and not resume:
        raise OptionsError(
            f"output directory {out} is not empty; choose an empty one, or pass overwrite=True "
            "(--overwrite) to replace a previous export or resume=True (--resume) to finish it."
        )
    # A probe marker is left only by a coordinator killed during the storage check.
    foreign = [
        n
        for n in existing
        if n not in OWN_FILES
        and n != STAGING_DIR
        and not is_shard_file(n)
        and not is_runtime_file(n)
        and not n.startswith(MARKER_PREFIX)
    ]
    if foreign:
        raise OptionsError(
            f"output directory {out} holds files shardex did not write (e.g. {foreign[0]}); "
            "shardex only replaces or resumes its own exports. Choose another directory."
        )
    staging = os.path.join(out, STAGING_DIR)
    shutil.rmtree(staging, ignore_errors=True)  # left by an overwrite that was killed
    return OutputDir(out, out if resume else staging)


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _check_writable(out: str) -> None:
    """Create (and drop) a nameless file where the export will create its first file."""
    existing = out
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OptionsError(
            f"output directory {out} cannot be written ({existing}: {e.strerror or e}); choose a directory "
            "you can write to."
        ) from None


def check_free_space(out: str, nbytes: int) -> None:
    """Before any shard is written: `out`'s filesystem has room for `nbytes` more."""
    free = shutil.disk_usage(out).free
    if free < nbytes:
        raise OptionsError(
            f"output directory {out} has {free:,} bytes free but the export writes {nbytes:,}; free some "
            "space or choose another filesystem."
        )


# --- journal and resume --------------------------------------------------------------------


class Journal:
    """The shards finished so far, persisted after each one so a killed export can resume.
    Removed once the manifest (which holds the same results) is written."""

    def __init__(self, out: str, fingerprint: str, reused: dict[str, ShardResult]) -> None:
        self.out = out
        self.fingerprint = fingerprint
        self.results = dict(reused)
        os.makedirs(out, exist_ok=True)
        self.reused = set(reused)
        self._write()
        if reused:
            logger.info(
                "resume: keeping %d shard(s) already written (%s)", len(reused), ", ".join(sorted(reused))
            )

    def record(self, result: ShardResult) -> None:
        self.results[result.file] = result
        self._write()

    @property
    def bytes_written(self) -> int:
        return sum(r.nbytes for f, r in self.results.items() if f not in self.reused and r.hashed == "file")

    def _write(self) -> None:
        shards = [dataclasses.asdict(r) for r in self.results.values()]
        write_json_atomic(
            os.path.join(self.out, JOURNAL_FILE), {"fingerprint": self.fingerprint, "shards": shards}
        )

    def close(self) -> None:
        os.remove(os.path.join(self.out, JOURNAL_FILE))


def fingerprint(plan, options: dict) -> str:
    """Identity of an export's inputs: source (with header hashes), plan, options that change
    the bytes. Equal fingerprints produce byte-identical shards and model."""
    # A Hub revision counts through the commit it resolved to (in the plan's source).
    ignored = ("verify", "verify_tokens", "atol", "rtol", "revision")
    relevant = {k: v for k, v in options.items() if k not in ignored}
    identity = {"plan": plan.to_json(), "source": source_hashes(plan), "options": relevant}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def reusable_shards(out: str, plan, fingerprint: str) -> dict[str, ShardResult]:
    """Shards of an earlier run of the same export whose files still hash as recorded."""
    previous = None
    for name in (JOURNAL_FILE, MANIFEST_FILE):
        path = os.path.join(out, name)
        if os.path.isfile(path):
            previous = _read_json(path)
            break
    if previous is None:
        return {}
    if previous.get("fingerprint") != fingerprint:
        raise OptionsError(
            f"output directory {out} holds an export of another model or with other options; "
            "resume refuses to mix them. Choose another directory or pass overwrite=True (--overwrite)."
        )
    planned = {s.file for s in plan.shards}
    candidates = []
    for record in previous.get("shards", []):
        result = ShardResult(**shard_record(record))
        path = file_in(out, result.file, named_by=os.path.join(out, name))
        if result.file in planned and os.path.isfile(path):
            candidates.append((result, record))
    hashes = shard_hashes(out, [record for _, record in candidates])
    return {r.file: r for (r, _), digest in zip(candidates, hashes) if digest.result() == r.digest}


def model_files(manifest: dict) -> list[dict]:
    """The ONNX files of an export as the manifest records them (``file``, ``bytes``,
    ``sha256``): ``model.onnx``, or an encoder-decoder's encoder and decoders."""
    return manifest.get("models") or [manifest["model"]]


def model_sha256(out: str, file: str = MODEL_FILE) -> str | None:
    """sha256 of the ONNX file `file` in `out` (None when it is missing)."""
    path = os.path.join(out, file)
    return file_sha256(path) if os.path.isfile(path) else None


def shard_hashes(out: str, shards: list[dict], threads: int | None = None) -> list[concurrent.futures.Future]:
    """Hash `shards` (manifest entries) in background threads, `threads` of them (default one
    per CPU): the hashes and reads release the GIL, so a 13 GB export hashes at the speed of all
    cores, beside other work. One future per shard, giving its digest by the algorithm its entry
    records (None for a missing file), to compare with `recorded_digest`."""
    pool = concurrent.futures.ThreadPoolExecutor(
        threads or max(1, min(len(shards), os.cpu_count() or 1)), thread_name_prefix="shardex-hash"
    )
    futures = [pool.submit(shard_digest, out, shard) for shard in shards]
    pool.shutdown(wait=False)
    return futures


def shard_digest(out: str, shard: dict) -> str | None:
    """A shard's digest as the manifest records it: of its header for a zero-copy link (its
    data is the source's), else of the whole file, by the entry's algorithm (None when the file
    is missing)."""
    path = file_in(out, shard["file"], named_by=os.path.join(out, MANIFEST_FILE))
    if not os.path.isfile(path):
        return None
    if shard.get("hashed") == "header":
        return link_digest(path)
    return file_digest(path, recorded_digest(shard).partition(":")[0])


def recorded_digest(shard: dict) -> str:
    """A manifest or journal entry's digest, ``"<algorithm>:<hex>"``; entries written before
    shards were hashed with BLAKE3 (format ``shardex/1``) record a plain ``sha256``."""
    return shard["digest"] if "digest" in shard else "sha256:" + shard["sha256"]


def shard_record(entry: dict) -> dict:
    """A journal or manifest shard entry as `ShardResult`'s fields (an old entry's ``sha256``
    becomes its ``digest``; the manifest's ``tensors`` count is not a field)."""
    fields = {f.name for f in dataclasses.fields(ShardResult)}
    return {k: v for k, v in entry.items() if k in fields} | {"digest": recorded_digest(entry)}


# --- manifest ------------------------------------------------------------------------------


def source_hashes(plan) -> list[dict]:
    """Cheap identity of the source: size and header hash of each file (data is not re-read)."""
    files = list(plan.source.files)
    config = os.path.join(plan.source.location, "config.json") if plan.source.kind == "hf" else None
    if config:
        files.insert(0, config)
    return [{"path": p, "bytes": os.path.getsize(p), "header_sha256": header_sha256(p)} for p in files]


def versions() -> dict[str, str]:
    """Versions of the packages that shaped the export (those installed)."""
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_manifest(
    out: str,
    *,
    plan,
    shards: list[ShardResult],
    options: dict,
    journal: Journal,
    report,
    timings: dict[str, float],
    capture_seconds: dict[str, float],
    capture_cache: dict,
    peak_memory,
    placement: list[dict],
    runtime_files: list[str],
    components: list | None = None,
) -> None:
    """`components`: the plans of an encoder-decoder's files, each recorded under ``models``;
    ``model`` is then the first of them."""
    models = [
        {
            "file": p.model_file,
            "component": p.component,
            "bytes": os.path.getsize(os.path.join(out, p.model_file)),
            "sha256": model_sha256(out, p.model_file),
            "inputs": p.input_names,
            "outputs": p.output_names,
            "groups": p.to_json()["groups"],
        }
        for p in components or [plan]
    ]
    manifest = {
        "format": MANIFEST_FORMAT,
        "fingerprint": journal.fingerprint,
        "status": "complete" if report is None or report.passed else "verification_failed",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "source": plan.source.describe() | {"hashes": source_hashes(plan)},
        "options": options,
        "model_class": plan.model_class,
        "parameters": sum(math.prod(t.shape) for t in plan.tensors if not t.is_buffer),
        "model": {k: models[0][k] for k in ("file", "bytes", "sha256")},
        **({"models": models} if components else {}),
        "shards": [
            dataclasses.asdict(s) | {"tensors": len(spec.tensors)} for s, spec in zip(shards, plan.shards)
        ],
        "plan": plan.to_json(),
        "capture_seconds": capture_seconds,
        "capture_cache": capture_cache,
        "timings": timings,
        "peak_memory": dataclasses.asdict(peak_memory),
        "bytes_written": journal.bytes_written,
        "reused_shards": sorted(journal.reused),
        "placement": placement,
        "runtime_files": runtime_files,
        "verification": report.to_json() if report is not None else None,
    }
    write_json_atomic(os.path.join(out, MANIFEST_FILE), manifest)


def load_manifest(output_dir: str | os.PathLike) -> dict:
    """The manifest of a finished export. A missing, unreadable or edited one (a file name that
    leaves the directory) raises `OptionsError`: the directory is not a sound shardex export."""
    out = os.fspath(output_dir)
    path = os.path.join(out, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise OptionsError(f"{output_dir} has no {MANIFEST_FILE}: it is not a finished shardex export.")
    manifest = _read_json(path)
    try:
        names = [*(m["file"] for m in model_files(manifest)), *(s["file"] for s in manifest["shards"])]
    except (KeyError, TypeError) as e:
        raise OptionsError(
            f"{path} lacks {e} (not a shardex manifest, or damaged); export the model again with overwrite=True."
        ) from None
    for name in names:
        file_in(out, name, named_by=path)
    return manifest


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise OptionsError(f"{path} is unreadable ({e}); export the model again with overwrite=True.") from e
    if not isinstance(data, dict):
        raise OptionsError(f"{path} is not a JSON object; export the model again with overwrite=True.")
    return data


# --- example inputs ------------------------------------------------------------------------


def save_example_inputs(example, out: str) -> None:
    """Keep the example inputs beside the model so `verify` can rerun without the caller's code."""
    import torch
    from safetensors.torch import save

    if not all(isinstance(a, torch.Tensor) for a in [*example.args, *example.kwargs.values()]):
        return  # nested inputs: verify needs them passed again
    tensors = {f"args.{i}": a for i, a in enumerate(example.args)}
    tensors |= {f"kwargs.{k}": v for k, v in example.kwargs.items()}
    write_atomic(os.path.join(out, INPUTS_FILE), save({k: v.contiguous() for k, v in tensors.items()}))


def load_example_inputs(out: str, manifest: dict) -> tuple[tuple, dict, Any]:
    """The saved example inputs as (args, kwargs, dynamic_shapes)."""
    from safetensors.torch import load_file

    path = os.path.join(out, INPUTS_FILE)
    if not os.path.isfile(path):
        raise OptionsError(
            f"{out} has no {INPUTS_FILE} (its inputs were nested); pass args=/kwargs= to verify."
        )
    tensors = load_file(path)
    args = tuple(tensors[f"args.{i}"] for i in range(sum(k.startswith("args.") for k in tensors)))
    names = [k.removeprefix("kwargs.") for k in tensors if k.startswith("kwargs.")]
    kwargs = {n: tensors[f"kwargs.{n}"] for n in names}
    axes = [
        {int(d): a for d, a in axis.items()} for axis in manifest["plan"]["example_inputs"]["dynamic_axes"]
    ]
    dynamic = tuple(axes[: len(args)]) if args else dict(zip(names, axes[len(args) :]))
    return args, kwargs, dynamic

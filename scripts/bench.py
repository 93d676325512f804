"""Benchmarks shardex side by side with the torch.onnx path and the copy floor, in one run.

For each case: create the synthetic checkpoint once (cached), warm the page cache, then measure
(a) the floor: `cp -r` of the checkpoint plus `sync`; (b) the torch.onnx path in a subprocess:
`from_pretrained` -> `torch.onnx.export(dynamo=True)` -> `ONNXProgram.save(external_data=True)`;
(c) `shardex export` as a user runs it (local Ray, verification off), then `shardex verify`.
Wall time, peak memory summed (PSS) over every process each one started, and bytes written.
The table of ratios goes to stdout and, with the command, versions and machine, to
benchmarks/results.md (and .json).

    python scripts/bench.py                       # all cases
    python scripts/bench.py --cases 1.1b-bf16,depth --skip-torch-onnx
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from shardex._measure import ProcessTreeSampler  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    dtype: str
    vocab: int = 32000


CASES = {
    "0.4b-fp32": Case("0.4b-fp32", 1536, 3584, 12, 12, 12, "float32"),
    "1.1b-bf16": Case("1.1b-bf16", 2048, 5632, 22, 32, 4, "bfloat16"),
    "6.7b-bf16": Case("6.7b-bf16", 4096, 11008, 32, 32, 32, "bfloat16"),
}
DEPTH = [Case(f"depth-{n}", 1024, 2816, n, 16, 16, "bfloat16") for n in (8, 64)]


@dataclasses.dataclass
class Measurement:
    wall_s: float
    peak_pss_bytes: int
    bytes_written: int
    detail: dict = dataclasses.field(default_factory=dict)


def run_measured(command: list[str], output_dir: str | None, env: dict | None = None) -> Measurement:
    """Run `command`, sampling its whole process tree; bytes written = size of `output_dir`."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    with ProcessTreeSampler(process.pid, interval=0.05) as sampler:
        stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{stderr[-3000:]}")
    last = (stdout.strip().splitlines() or [""])[-1]
    detail = json.loads(last) if last.startswith("{") else {}
    return Measurement(
        wall, sampler.peak.total_pss_bytes, directory_bytes(output_dir) if output_dir else 0, detail
    )


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def ensure_checkpoint(case: Case, cache: str) -> str:
    path = os.path.join(cache, case.name)
    if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "make_checkpoint.py"),
                path,
                "--hidden",
                str(case.hidden),
                "--intermediate",
                str(case.intermediate),
                "--layers",
                str(case.layers),
                "--heads",
                str(case.heads),
                "--kv-heads",
                str(case.kv_heads),
                "--vocab",
                str(case.vocab),
                "--dtype",
                case.dtype,
            ],
            check=True,
        )
    return path


def warm_page_cache(path: str) -> None:
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            while f.read(64 << 20):
                pass


def measure_floor(checkpoint: str, work: str) -> Measurement:
    target = os.path.join(work, "floor")
    shutil.rmtree(target, ignore_errors=True)
    result = run_measured(["bash", "-c", f"cp -r '{checkpoint}' '{target}' && sync"], target)
    shutil.rmtree(target)
    return result


def measure_torch_onnx(checkpoint: str, work: str) -> Measurement:
    target = os.path.join(work, "torch-onnx")
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    result = run_measured([sys.executable, __file__, "--torch-onnx-child", checkpoint, target], target)
    shutil.rmtree(target)
    return result


def measure_shardex(
    checkpoint: str, work: str, keep: bool = False, extra: tuple[str, ...] = ()
) -> Measurement:
    target = os.path.join(work, "shardex")
    shutil.rmtree(target, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "shardex",
        "export",
        checkpoint,
        target,
        "--no-verify",
        "--quiet",
        *extra,
    ]
    result = run_measured(command, target)
    with open(os.path.join(target, "manifest.json")) as f:
        manifest = json.load(f)
    result.detail = {k: manifest[k] for k in ("timings", "capture_seconds", "peak_memory")}
    if not keep:
        shutil.rmtree(target)
    return result


def measure_verify(work: str) -> Measurement:
    target = os.path.join(work, "shardex")
    result = run_measured([sys.executable, "-m", "shardex", "verify", target, "--quiet"], None)
    shutil.rmtree(target)
    return result


def torch_onnx_child(checkpoint: str, target: str) -> None:
    """The path users take today, timed by phase; prints JSON."""
    import torch
    import transformers

    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto").eval()
    model.config.use_cache = False
    loaded = time.perf_counter()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    dims = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    program = torch.onnx.export(
        model,
        (),
        kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        dynamic_shapes={"input_ids": dims, "attention_mask": dims},
        dynamo=True,
    )
    exported = time.perf_counter()
    program.save(os.path.join(target, "model.onnx"), external_data=True)
    saved = time.perf_counter()
    print(json.dumps({"load_s": loaded - start, "export_s": exported - loaded, "save_s": saved - exported}))


def fmt_gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="0.4b-fp32,1.1b-bf16,6.7b-bf16,depth")
    parser.add_argument(
        "--cache", default=os.path.join(ROOT, "bench-cache"), help="synthetic checkpoints live here"
    )
    parser.add_argument("--skip-torch-onnx", action="store_true")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument(
        "--reuse", help="a results .json whose cases are taken as measured (a long run that stopped part-way)"
    )
    parser.add_argument("--torch-onnx-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_onnx_child:
        torch_onnx_child(*args.torch_onnx_child)
        return 0

    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES and n != "depth"]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {[*CASES, 'depth']}")
    work = os.path.join(args.cache, "work")
    os.makedirs(work, exist_ok=True)
    rows, depth = [], {}
    if args.reuse:
        with open(args.reuse) as f:
            earlier = json.load(f)
        rows = [r for r in earlier["rows"] if r["case"] in names]
        names = [n for n in names if n not in {r["case"] for r in rows}]
    for name in names:
        for case in DEPTH if name == "depth" else [CASES[name]]:
            checkpoint = ensure_checkpoint(case, args.cache)
            size = directory_bytes(checkpoint)
            print(f"== {case.name}: {fmt_gb(size)}", file=sys.stderr)
            if name == "depth":
                # Capture alone (zero-copy: no weight bytes competing for the CPUs), then a full export.
                depth[case.layers] = {}
                for mode, extra in (("zero_copy", ("--zero-copy",)), ("copy", ())):
                    warm_page_cache(checkpoint)
                    run = measure_shardex(checkpoint, work, extra=extra)
                    depth[case.layers][mode] = {
                        "wall_s": run.wall_s,
                        "capture_s": max(run.detail["capture_seconds"].values()),
                        "plan_s": run.detail["timings"]["plan"],
                    }
                continue
            row = {"case": case.name, "checkpoint_bytes": size}
            warm_page_cache(checkpoint)
            row["floor"] = dataclasses.asdict(measure_floor(checkpoint, work))
            available = psutil.virtual_memory().available
            if args.skip_torch_onnx:
                row["torch_onnx"] = None
                row["torch_onnx_skipped"] = "--skip-torch-onnx"
            elif size * 1.1 > available:
                row["torch_onnx"] = None
                row["torch_onnx_skipped"] = f"needs ~{fmt_gb(int(size * 1.1))}, {fmt_gb(available)} available"
            else:
                warm_page_cache(checkpoint)
                row["torch_onnx"] = dataclasses.asdict(measure_torch_onnx(checkpoint, work))
            warm_page_cache(checkpoint)
            row["shardex"] = dataclasses.asdict(measure_shardex(checkpoint, work, keep=True))
            row["verify"] = dataclasses.asdict(measure_verify(work))
            rows.append(row)
            print(json.dumps(row, indent=1), file=sys.stderr)
            save(args.results, rows, depth)
    report = render(rows, depth, " ".join([os.path.relpath(sys.argv[0], ROOT), *(argv or sys.argv[1:])]))
    print(report)
    save(args.results, rows, depth)
    with open(args.results + ".md", "w") as f:
        f.write(report)
    return 0


def save(results: str, rows: list[dict], depth: dict) -> None:
    """Written after every case, so a run that stops part-way can be finished with --reuse."""
    os.makedirs(os.path.dirname(results), exist_ok=True)
    with open(results + ".json", "w") as f:
        json.dump({"rows": rows, "depth": depth, "machine": machine()}, f, indent=2)


def machine() -> dict:
    versions = {}
    for package in (
        "shardex",
        "torch",
        "onnx",
        "onnx-ir",
        "onnxscript",
        "onnxruntime-gpu",
        "ray",
        "transformers",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def render(rows: list[dict], depth: dict, command: str) -> str:
    info = machine()
    lines = [
        f"Command: `python {command}`  ",
        f"Machine: {info['cpus']} CPUs, {info['memory_gb']} GiB RAM, {info['platform']}, Python {info['python']}  ",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f"  \nDate: {info['date']}",
        "",
        "| case | checkpoint | floor (cp+sync) | torch.onnx path | its peak memory | shardex export | its peak memory "
        "| shardex / torch.onnx | shardex / floor | verify | verify peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor, ours, verify, theirs = r["floor"], r["shardex"], r["verify"], r["torch_onnx"]
        theirs_cells = (
            [
                f"{theirs['wall_s']:.1f} s",
                fmt_gb(theirs["peak_pss_bytes"]),
                f"{ours['wall_s'] / theirs['wall_s']:.2f}",
            ]
            if theirs
            else [f"skipped ({r['torch_onnx_skipped']})", "", ""]
        )
        lines.append(
            f"| {r['case']} | {fmt_gb(r['checkpoint_bytes'])} | {floor['wall_s']:.1f} s | {theirs_cells[0]} | "
            f"{theirs_cells[1]} | {ours['wall_s']:.1f} s | {fmt_gb(ours['peak_pss_bytes'])} | {theirs_cells[2]} | "
            f"{ours['wall_s'] / floor['wall_s']:.2f} | {verify['wall_s']:.1f} s | {fmt_gb(verify['peak_pss_bytes'])} |"
        )
    if depth:
        lines += [
            "",
            "| depth sweep (hidden 1024, bf16) | capture, zero-copy | export wall, zero-copy "
            "| capture, copying weights | export wall, copying weights |",
            "|---|---|---|---|---|",
        ]
        for n, d in sorted(depth.items(), key=lambda kv: int(kv[0])):
            z, c = d["zero_copy"], d["copy"]
            lines.append(
                f"| {n} layers | {z['capture_s']:.1f} s | {z['wall_s']:.1f} s | {c['capture_s']:.1f} s | {c['wall_s']:.1f} s |"
            )
        if len(depth) == 2:
            low, high = sorted(depth, key=int)
            ratio = {
                m: depth[high][m]["capture_s"] / depth[low][m]["capture_s"] for m in ("zero_copy", "copy")
            }
            lines.append(f"| ratio {high}/{low} | {ratio['zero_copy']:.2f} | | {ratio['copy']:.2f} | |")
    lines += [
        "",
        "Peak memory is PSS summed over every process the command started (coordinator, Ray daemons, "
        "workers), sampled every 50 ms. Bytes written per tool are in the JSON file beside this one.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

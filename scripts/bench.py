"""Benchmarks shardex side by side with its peers and the copy floor, case by case, resumably.

For each case the synthetic checkpoint is created once (cached in bench-cache/), the page cache
is warmed, then every tool runs as a user runs it, in its own process tree, measured for wall
time and peak memory (PSS summed over every process it started, sampled every 50 ms):

  floor         `cp -r` of the checkpoint + `sync`
  torch.onnx    `from_pretrained` -> `torch.onnx.export(dynamo=True)` -> `save(external_data=True)`
  transformers  `from_pretrained` -> `OnnxExporter().export_for_generation` (whole model in
                memory; prefill + decode with the KV cache, ONNX Runtime CPU fusions) -> save
  builder       the onnxruntime-genai model builder (scripts/bench_builder.py, fp32 for CPU)
  shardex cold  `shardex export CKPT OUT --no-verify` with an empty capture cache
  shardex logits  `--task text-generation` (no KV cache), cold: what the cache costs to export
  shardex warm  shardex cold again with the pieces cached (a re-export, a fine-tune, a zoo member)
  verify        `shardex verify OUT` on that export (8 tokens through the cache, per-block checks, hashes)

plus, where a case asks for it, the runtime speed of the builder's output and shardex's
(prefill latency of 128 tokens, decode tokens/s over 64, 2 threads: bench_builder.runtime_speed),
a zoo of 4 checkpoints of one architecture (`shardex zoo`, one capture cache) against 4
separate exports without the cache, and a Llama-2-70B-shaped sparse checkpoint exported with
--zero-copy. Every measurement is saved as soon as it is taken (benchmarks/results.json): a run
that stops resumes where it stopped, skipping what is measured (--fresh forgets it). The
machine's load average is recorded beside each measurement: on a shared machine only ratios
from one quiet run count. The table goes to stdout and benchmarks/results.md.

    python scripts/bench.py                                   # every case (see --help for the time)
    python scripts/bench.py --cases demo,1.1b-bf16 --tools floor,shardex-cold,shardex-warm
    python scripts/bench.py --cases 70b-sparse                # the 70B-shaped export alone
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
    sparse: bool = False
    tools: tuple[str, ...] = ()  # default: every tool that applies
    speed: bool = False  # runtime speed of the builder's output vs shardex's
    family: str = "llama"  # make_checkpoint.py --family: llama, or t5 (an encoder-decoder)


EXPORTERS = ("torch-onnx", "transformers", "builder")
TOOLS = ("floor", *EXPORTERS, "shardex-cold", "shardex-logits", "shardex-warm", "verify")
CASES = {
    "demo": Case(
        "demo", 512, 1408, 8, 8, 8, "float32", tools=("floor", "shardex-cold", "shardex-warm", "verify")
    ),
    "0.4b-fp32": Case("0.4b-fp32", 1536, 3584, 12, 12, 12, "float32", speed=True),
    "1.1b-bf16": Case("1.1b-bf16", 2048, 5632, 22, 32, 4, "bfloat16"),
    # The builder writes float32 for the CPU: 27 GB for 6.7B, more disk than a bench should take.
    "6.7b-bf16": Case(
        "6.7b-bf16",
        4096,
        11008,
        32,
        32,
        32,
        "bfloat16",
        tools=(
            "floor",
            "torch-onnx",
            "transformers",
            "shardex-cold",
            "shardex-logits",
            "shardex-warm",
            "verify",
        ),
    ),
    # An encoder-decoder (T5 v1.1-large-shaped, 24 + 24 layers): Optimum's three files from shardex,
    # transformers' prefill + decode programs (each with its own copy of the weights).
    "t5-0.8b": Case(
        "t5-0.8b",
        1024,
        2816,
        24,
        16,
        16,
        "float32",
        family="t5",
        tools=("floor", "torch-onnx", "transformers", "shardex-cold", "shardex-warm", "verify"),
    ),
    "70b-sparse": Case(
        "70b-sparse", 8192, 28672, 80, 64, 8, "bfloat16", sparse=True, tools=("shardex-cold", "shardex-warm")
    ),
}
ZOO = Case("zoo", 1024, 2816, 8, 16, 16, "bfloat16")
ZOO_MEMBERS = 4
DEPTH = [Case(f"depth-{n}", 1024, 2816, n, 16, 16, "bfloat16") for n in (8, 64)]
ALL = [*CASES, "zoo", "depth"]


@dataclasses.dataclass
class Measurement:
    wall_s: float
    peak_pss_bytes: int
    bytes_written: int
    load_average: float  # 1-minute load average when it started: the machine's other work
    detail: dict = dataclasses.field(default_factory=dict)


def run_measured(command: list[str], output_dir: str | None, env: dict | None = None) -> Measurement:
    """Run `command`, sampling its whole process tree; bytes written = size of `output_dir`."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, cwd=ROOT
    )
    with ProcessTreeSampler(process.pid, interval=0.05) as sampler:
        stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{stderr[-3000:]}")
    last = (stdout.strip().splitlines() or [""])[-1]
    detail = json.loads(last) if last.startswith("{") else {}
    written = directory_bytes(output_dir) if output_dir else 0
    return Measurement(wall, sampler.peak.total_pss_bytes, written, load, detail)


def directory_bytes(path: str) -> int:
    """Bytes allocated on disk (a sparse file's holes take none)."""
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(path) for f in files)


def ensure_checkpoint(case: Case, cache: str, seed: int = 0, name: str | None = None) -> str:
    path = os.path.join(cache, name or case.name)
    if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        shutil.rmtree(path, ignore_errors=True)
        command = [sys.executable, os.path.join(HERE, "make_checkpoint.py"), path, "--family", case.family]
        command += ["--hidden", str(case.hidden), "--intermediate", str(case.intermediate)]
        command += [
            "--layers",
            str(case.layers),
            "--heads",
            str(case.heads),
            "--kv-heads",
            str(case.kv_heads),
        ]
        command += ["--vocab", str(case.vocab), "--dtype", case.dtype, "--seed", str(seed)]
        subprocess.run(command + (["--sparse"] if case.sparse else []), check=True)
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


def measure_peer(tool: str, checkpoint: str, work: str, keep: bool = False) -> Measurement:
    """torch.onnx or transformers in a child of this script, or the builder (its own venv)."""
    target = os.path.join(work, tool)
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    if tool == "builder":
        from scripts.bench_builder import ensure_tokenizer
        from tests.runtimes import builder_command

        ensure_tokenizer(checkpoint)
        result = run_measured(builder_command(checkpoint, target, precision="fp32"), target)
    else:
        result = run_measured([sys.executable, __file__, "--child", tool, checkpoint, target], target)
    if not keep:
        shutil.rmtree(target)
    return result


def shardex_export(checkpoint: str, target: str, *flags: str) -> Measurement:
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
        *flags,
    ]
    result = run_measured(command, target)
    with open(os.path.join(target, "manifest.json")) as f:
        manifest = json.load(f)
    result.detail = {
        k: manifest.get(k) for k in ("timings", "capture_seconds", "capture_cache", "peak_memory")
    }
    return result


def measure_verify(target: str) -> Measurement:
    result = run_measured([sys.executable, "-m", "shardex", "verify", target, "--quiet"], None)
    with open(os.path.join(target, "manifest.json")) as f:
        result.detail = {"passed": json.load(f)["verification"]["passed"]}
    return result


def measure_speed(model_dir: str) -> dict:
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "bench_builder.py"), "speed", model_dir],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout)
    return {k: result[k] for k in ("prefill_s", "decode_tokens_per_s", "session_load_s", "tokens")}


def child(tool: str, checkpoint: str, target: str) -> None:
    """The peers' paths as users take them, timed by phase; prints JSON."""
    import torch
    import transformers

    start = time.perf_counter()
    seq2seq = transformers.AutoConfig.from_pretrained(checkpoint).is_encoder_decoder
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(checkpoint, dtype="auto").eval()
    loaded = time.perf_counter()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    mask = torch.ones_like(ids)
    if tool == "torch-onnx":
        model.config.use_cache = False
        dims = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
        kwargs = {"input_ids": ids, "attention_mask": mask}
        kwargs |= {"decoder_input_ids": ids[:, :5]} if seq2seq else {}  # the full forward
        program = torch.onnx.export(
            model, (), kwargs=kwargs, dynamic_shapes=dict.fromkeys(kwargs, dims), dynamo=True
        )
        exported = time.perf_counter()
        program.save(os.path.join(target, "model.onnx"), external_data=True)
    else:
        from transformers.exporters.configs import OnnxConfig
        from transformers.exporters.exporter_onnx import OnnxExporter

        config = OnnxConfig(dynamic=True, ort_fusions="cpu")
        program = OnnxExporter().export_for_generation(
            model, {"input_ids": ids, "attention_mask": mask}, config
        )
        exported = time.perf_counter()
        program.save_pretrained(target)
    saved = time.perf_counter()
    print(json.dumps({"load_s": loaded - start, "export_s": exported - loaded, "save_s": saved - exported}))


# --- cases -----------------------------------------------------------------------------------


class Results:
    """Every measurement by case and tool, written to disk after each one (resumable)."""

    def __init__(self, path: str, fresh: bool) -> None:
        self.path = path
        self.data: dict = {"cases": {}, "depth": {}}
        if not fresh and os.path.isfile(path + ".json"):
            with open(path + ".json") as f:
                self.data |= {k: v for k, v in json.load(f).items() if k in ("cases", "depth")}

    def get(self, case: str, tool: str):
        return self.data["cases"].get(case, {}).get(tool)

    def put(self, case: str, tool: str, value) -> None:
        self.data["cases"].setdefault(case, {})[tool] = value
        self.save()

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".json", "w") as f:
            json.dump(self.data | {"machine": machine()}, f, indent=2)


def measure(results: Results, case: str, tool: str, fn) -> None:
    if results.get(case, tool) is not None:
        print(f"   {tool}: measured before, kept (--fresh measures again)", file=sys.stderr)
        return
    print(f"   {tool} ...", file=sys.stderr, flush=True)
    os.sync()  # the previous measurement's dirty pages are written back now, not during this one
    try:
        value = fn()
        value = dataclasses.asdict(value) if isinstance(value, Measurement) else value
    except Exception as e:  # a peer that fails (out of memory, unsupported) is a result too
        value = {"failed": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"}
    results.put(case, tool, value)
    print(f"   {tool}: {summary(value)}", file=sys.stderr, flush=True)


def summary(value: dict) -> str:
    if "failed" in value or "skipped" in value:
        return value.get("failed") or value["skipped"]
    if "wall_s" in value:
        return f"{value['wall_s']:.1f} s, {value['peak_pss_bytes'] / 1e9:.2f} GB (load {value['load_average']:.1f})"
    return json.dumps(value)[:200]


def run_case(case: Case, results: Results, tools: set[str], cache: str, work: str) -> None:
    checkpoint = ensure_checkpoint(case, cache)
    size = sum(os.path.getsize(os.path.join(checkpoint, f)) for f in os.listdir(checkpoint))
    results.data["cases"].setdefault(case.name, {})["checkpoint_bytes"] = size
    print(f"== {case.name}: {size / 1e9:.2f} GB", file=sys.stderr)
    wanted = [t for t in (case.tools or TOOLS) if t in tools]
    available = psutil.virtual_memory().available
    free_disk = shutil.disk_usage(work).free
    capture_cache = os.path.join(work, "capture-cache", case.name)
    out = os.path.join(work, "shardex")
    flags = ["--zero-copy"] if case.sparse else []
    for tool in wanted:
        if not case.sparse:
            warm_page_cache(checkpoint)
        if tool == "floor":
            measure(results, case.name, tool, lambda: measure_floor(checkpoint, work))
        elif tool in EXPORTERS:
            needed = size * (4 if case.dtype == "bfloat16" and tool == "builder" else 2)
            if tool != "builder" and size * 1.1 > available:
                results.put(case.name, tool, {"skipped": f"needs ~{size * 1.1 / 1e9:.1f} GB of memory"})
            elif needed > free_disk:
                results.put(case.name, tool, {"skipped": f"needs ~{needed / 1e9:.0f} GB of disk"})
            else:
                keep = tool == "builder" and case.speed
                measure(results, case.name, tool, lambda t=tool, k=keep: measure_peer(t, checkpoint, work, k))
        elif tool == "shardex-cold":
            shutil.rmtree(capture_cache, ignore_errors=True)
            cold = ["--capture-cache-dir", capture_cache, *flags]
            measure(results, case.name, tool, lambda f=cold: shardex_export(checkpoint, out, *f))
        elif tool == "shardex-logits":  # the no-cache task, cold: what the KV cache costs to export
            shutil.rmtree(capture_cache, ignore_errors=True)
            logits = ["--task", "text-generation", "--capture-cache-dir", capture_cache, *flags]
            measure(results, case.name, tool, lambda f=logits: shardex_export(checkpoint, out, *f))
            shutil.rmtree(capture_cache, ignore_errors=True)
        elif tool == "shardex-warm":
            warm = ["--capture-cache-dir", capture_cache, *flags]
            if not os.path.isdir(capture_cache):  # pieces of an earlier run: fill the cache first
                shardex_export(checkpoint, out, *warm)
            measure(results, case.name, tool, lambda f=warm: shardex_export(checkpoint, out, *f))
        elif tool == "verify":
            if not os.path.isfile(os.path.join(out, "manifest.json")):
                shardex_export(checkpoint, out, "--capture-cache-dir", capture_cache, *flags)
            measure(results, case.name, tool, lambda: measure_verify(out))
    if case.speed and {"builder", "shardex-warm"} <= set(wanted) and results.get(case.name, "speed") is None:
        builder_out = os.path.join(work, "builder")
        if not os.path.isdir(builder_out):
            measure_peer("builder", checkpoint, work, keep=True)
        if not os.path.isfile(os.path.join(out, "manifest.json")):
            shardex_export(checkpoint, out, "--capture-cache-dir", capture_cache)
        measure(
            results,
            case.name,
            "speed",
            lambda: {"builder": measure_speed(builder_out), "shardex": measure_speed(out)},
        )
        shutil.rmtree(builder_out, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(capture_cache, ignore_errors=True)


def run_zoo(results: Results, cache: str, work: str) -> None:
    """4 checkpoints of one architecture: `shardex zoo` (one capture cache, one model at a time)
    against 4 separate exports that capture every piece."""
    checkpoints = [ensure_checkpoint(ZOO, cache, seed=i, name=f"zoo-{i}") for i in range(ZOO_MEMBERS)]
    print(f"== zoo: {ZOO_MEMBERS} checkpoints of one architecture", file=sys.stderr)
    out = os.path.join(work, "zoo")
    capture_cache = os.path.join(work, "capture-cache", "zoo")

    def separate() -> Measurement:
        total = Measurement(0.0, 0, 0, os.getloadavg()[0])
        for i, checkpoint in enumerate(checkpoints):
            warm_page_cache(checkpoint)
            one = shardex_export(checkpoint, os.path.join(out, f"m{i}"), "--no-capture-cache")
            total.wall_s += one.wall_s
            total.peak_pss_bytes = max(total.peak_pss_bytes, one.peak_pss_bytes)
            total.bytes_written += one.bytes_written
        shutil.rmtree(out)
        return total

    def zoo() -> Measurement:
        shutil.rmtree(capture_cache, ignore_errors=True)
        os.makedirs(out, exist_ok=True)
        manifest = os.path.join(work, "zoo.toml")
        with open(manifest, "w") as f:
            f.write(f'[defaults]\nverify = false\ncapture_cache_dir = "{capture_cache}"\n')
            for i, checkpoint in enumerate(checkpoints):
                f.write(f'\n[[model]]\nname = "m{i}"\nsource = "{checkpoint}"\n')
        for checkpoint in checkpoints:
            warm_page_cache(checkpoint)
        command = [sys.executable, "-m", "shardex", "zoo", manifest, out, "--max-concurrent", "1", "--quiet"]
        result = run_measured(command, out)
        shutil.rmtree(out)
        shutil.rmtree(capture_cache)
        return result

    measure(results, "zoo", "separate exports", separate)
    measure(results, "zoo", "shardex zoo", zoo)


def run_depth(results: Results, cache: str, work: str) -> None:
    for case in DEPTH:
        checkpoint = ensure_checkpoint(case, cache)
        print(f"== {case.name}", file=sys.stderr)
        for mode, extra in (("zero_copy", ("--zero-copy",)), ("copy", ())):
            if results.data["depth"].get(str(case.layers), {}).get(mode):
                continue
            warm_page_cache(checkpoint)
            run = shardex_export(checkpoint, os.path.join(work, "shardex"), "--no-capture-cache", *extra)
            results.data["depth"].setdefault(str(case.layers), {})[mode] = {
                "wall_s": run.wall_s,
                "capture_s": max(run.detail["capture_seconds"].values()),
                "plan_s": run.detail["timings"]["plan"],
                "load_average": run.load_average,
            }
            results.save()
        shutil.rmtree(os.path.join(work, "shardex"), ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(ALL), help=f"comma-separated, from {', '.join(ALL)}")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from {', '.join(TOOLS)}")
    parser.add_argument(
        "--cache", default=os.path.join(ROOT, "bench-cache"), help="synthetic checkpoints live here"
    )
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--fresh", action="store_true", help="measure everything again (default: resume)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    names = args.cases.split(",")
    unknown = [n for n in names if n not in ALL]
    tools = set(args.tools.split(","))
    if unknown or tools - set(TOOLS):
        parser.error(f"unknown case(s) or tool(s) {unknown + sorted(tools - set(TOOLS))}")
    work = os.path.join(args.cache, "work")
    os.makedirs(work, exist_ok=True)
    results = Results(args.results, args.fresh)
    for name in names:
        if name == "zoo":
            run_zoo(results, args.cache, work)
        elif name == "depth":
            run_depth(results, args.cache, work)
        else:
            run_case(CASES[name], results, tools, args.cache, work)
    report = render(results.data, " ".join([os.path.relpath(sys.argv[0], ROOT), *(argv or sys.argv[1:])]))
    print(report)
    with open(args.results + ".md", "w") as f:
        f.write(report)
    return 0


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


def _cell(m: dict | None, *, memory: bool = True) -> str:
    if m is None:
        return ""
    if "wall_s" not in m:
        return m.get("skipped") or m.get("failed", "")
    return f"{m['wall_s']:.1f} s" + (f" / {m['peak_pss_bytes'] / 1e9:.2f} GB" if memory else "")


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or "wall_s" not in a or "wall_s" not in b:
        return ""
    return f"{a['wall_s'] / b['wall_s']:.2f}"


def _pair(first: str, second: str) -> str:
    return f"{first}, {second}" if first and second else first or second


def render(data: dict, command: str) -> str:
    info = machine()
    lines = [
        f"Command: `python {command}`  ",
        f"Machine: {info['cpus']} CPUs, {info['memory_gb']} GiB RAM, {info['platform']}, Python {info['python']}  ",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f"  \nDate: {info['date']}",
        "",
        "Wall time / peak memory (PSS summed over the process tree). Ratios: the peer's wall time over "
        "shardex's (warm capture cache: > 1 means shardex is faster); shardex over the copy floor; "
        "verify over the export.",
        "",
        "| case | checkpoint | floor | torch.onnx | transformers | builder | shardex cold | shardex warm "
        "| export time (cold, warm) | verify | torch.onnx / shardex (cold, warm) | transformers / shardex "
        "| builder / shardex | shardex / floor (cold, warm) | verify / export (warm) "
        "| shardex logits-only, cold | KV-cache / logits-only (cold) | load avg |",
        "|" + "---|" * 18,
    ]
    for name, row in data["cases"].items():
        if name == "zoo":
            continue
        cold, warm = row.get("shardex-cold"), row.get("shardex-warm")
        ours = warm if warm and "wall_s" in warm else cold
        totals = [
            f"{m['detail']['timings']['total']:.1f} s"
            if m and "detail" in m and m["detail"].get("timings")
            else ""
            for m in (cold, warm)
        ]
        loads = [m["load_average"] for m in row.values() if isinstance(m, dict) and "load_average" in m]
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    f"{row.get('checkpoint_bytes', 0) / 1e9:.2f} GB",
                    _cell(row.get("floor"), memory=False),
                    _cell(row.get("torch-onnx")),
                    _cell(row.get("transformers")),
                    _cell(row.get("builder")),
                    _cell(cold),
                    _cell(warm),
                    ", ".join(totals),
                    _cell(row.get("verify")),
                    _pair(_ratio(row.get("torch-onnx"), cold), _ratio(row.get("torch-onnx"), warm)),
                    _pair(_ratio(row.get("transformers"), cold), _ratio(row.get("transformers"), warm)),
                    _pair(_ratio(row.get("builder"), cold), _ratio(row.get("builder"), warm)),
                    _pair(_ratio(cold, row.get("floor")), _ratio(warm, row.get("floor"))),
                    _ratio(row.get("verify"), ours),
                    _cell(row.get("shardex-logits")),
                    _ratio(cold, row.get("shardex-logits")),
                    f"{min(loads):.1f}–{max(loads):.1f}" if loads else "",
                ]
            )
            + " |"
        )
    for name, row in data["cases"].items():
        speed = row.get("speed")
        if speed and "builder" in speed:
            b, s = speed["builder"], speed["shardex"]
            lines += [
                "",
                f"Runtime speed on {name} (ONNX Runtime CPU, 2 threads, prompt 128 tokens, 64 greedy tokens):",
                "",
                "| model | prefill | decode | same greedy tokens |",
                "|---|---|---|---|",
                f"| builder | {b['prefill_s'] * 1e3:.0f} ms | {b['decode_tokens_per_s']:.1f} tokens/s | |",
                f"| shardex | {s['prefill_s'] * 1e3:.0f} ms | {s['decode_tokens_per_s']:.1f} tokens/s "
                f"| {b['tokens'] == s['tokens']} |",
            ]
    zoo = data["cases"].get("zoo")
    if zoo:
        separate, together = zoo.get("separate exports"), zoo.get("shardex zoo")
        lines += [
            "",
            f"Zoo of {ZOO_MEMBERS} checkpoints of one architecture ({ZOO.layers} layers, hidden {ZOO.hidden}, "
            f"{ZOO.dtype}), no verification:",
            "",
            "| 4 separate exports, no capture cache | `shardex zoo` (one capture cache) | ratio |",
            "|---|---|---|",
            f"| {_cell(separate)} | {_cell(together)} | {_ratio(separate, together)} |",
        ]
    depth = data.get("depth") or {}
    if depth:
        lines += [
            "",
            "| depth sweep (hidden 1024, bf16, no capture cache) | capture, zero-copy | export wall, zero-copy "
            "| capture, copying weights | export wall, copying weights |",
            "|---|---|---|---|---|",
        ]
        for n, d in sorted(depth.items(), key=lambda kv: int(kv[0])):
            z, c = d.get("zero_copy", {}), d.get("copy", {})
            lines.append(
                f"| {n} layers | {z.get('capture_s', 0):.1f} s | {z.get('wall_s', 0):.1f} s "
                f"| {c.get('capture_s', 0):.1f} s | {c.get('wall_s', 0):.1f} s |"
            )
    lines += ["", "Raw numbers, phases and load averages: results.json beside this file.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

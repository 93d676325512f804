"""The onnxruntime-genai model builder as a benchmark peer, and the runtime speed of any KV-cache model.

`build`: runs `python -m onnxruntime_genai.models.builder -i CKPT -o OUT -p PRECISION -e cpu` in
the runtimes environment (.venv-runtimes/genai, see scripts/setup_runtimes.sh), sampling the
peak memory (PSS summed over its process tree) and wall time. A checkpoint without tokenizer
files (scripts/make_checkpoint.py writes none) first gets the tests' tiny tokenizer.

`speed`: prefill latency of a PROMPT-token prompt and decode tokens/s over NEW greedy tokens,
in plain ONNX Runtime (CPU provider, THREADS intra-op threads, sequential execution), for any
directory whose model has the KV-cache I/O runtimes use: `input_ids`, `attention_mask`,
optionally `position_ids`, `past_key_values.{i}.key/value` -> `logits`, `present.{i}.key/value`
(the builder's output and shardex's alike); the prompt is seeded random ids, the decode greedy
(the tokens are returned). Head count and size come from static input dims, else
from genai_config.json or config.json. Each step feeds the previous step's present tensors as
numpy arrays (one copy per step, the same for every model measured).

    python scripts/bench_builder.py build CKPT OUT [--precision fp32]
    python scripts/bench_builder.py speed MODEL_DIR [--prompt 128 --new 64 --threads 2 --repeat 3]

Both print one JSON object; `measure_builder` and `runtime_speed` are the same as functions.
`speed` needs only onnxruntime and numpy, so any environment's python can run it (the main
one has onnxruntime-gpu, .venv-runtimes/genai the CPU onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def ensure_tokenizer(checkpoint: str) -> bool:
    """The builder needs tokenizer files; synthetic benchmark checkpoints get the tests' tiny
    tokenizer (its size does not matter to the builder). Returns whether it wrote one."""
    from tests.tokenizers_support import save_tokenizer

    if any(name.startswith("tokenizer") for name in os.listdir(checkpoint)):
        return False
    save_tokenizer(checkpoint)
    return True


def measure_builder(checkpoint: str, output_dir: str, *, precision: str = "fp32") -> dict:
    """Run the builder once: wall seconds, peak PSS of its process tree, bytes written."""
    from shardex._measure import ProcessTreeSampler
    from tests.runtimes import builder_command

    ensure_tokenizer(checkpoint)
    command = builder_command(checkpoint, output_dir, precision=precision)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with ProcessTreeSampler(process.pid, interval=0.05) as sampler:
        log, _ = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"builder exited {process.returncode}:\n{log[-3000:]}")
    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(output_dir) for f in files)
    return {
        "tool": "onnxruntime-genai builder",
        "precision": precision,
        "wall_s": wall,
        "peak_pss_bytes": sampler.peak.total_pss_bytes,
        "peak_root_rss_bytes": sampler.peak.root_rss_bytes,
        "bytes_written": written,
    }


def _cache_shape(model_dir: str, session) -> tuple[int, int, int]:
    """(layers, kv heads, head size) from the past inputs, filling symbolic dims from the configs."""
    pasts = [
        i for i in session.get_inputs() if i.name.startswith("past_key_values.") and i.name.endswith(".key")
    ]
    heads, size = pasts[0].shape[1], pasts[0].shape[3]
    if isinstance(heads, int) and isinstance(size, int):
        return len(pasts), heads, size
    genai = _read_json(model_dir, "genai_config.json").get("model", {}).get("decoder", {})
    config = _read_json(model_dir, "config.json")
    config = {**config, **config.get("text_config", {})}
    if not isinstance(heads, int):
        heads = (
            genai.get("num_key_value_heads")
            or config.get("num_key_value_heads")
            or config["num_attention_heads"]
        )
    if not isinstance(size, int):
        size = (
            genai.get("head_size")
            or config.get("head_dim")
            or config["hidden_size"] // config["num_attention_heads"]
        )
    return len(pasts), heads, size


def _read_json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def runtime_speed(
    model_dir: str,
    *,
    prompt: int = 128,
    new: int = 64,
    threads: int = 2,
    repeat: int = 3,
    model_file: str = "model.onnx",
) -> dict:
    """Median prefill latency (s) and decode tokens/s over `repeat` runs after one warm-up run."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    load_start = time.perf_counter()
    session = ort.InferenceSession(
        os.path.join(model_dir, model_file), options, providers=["CPUExecutionProvider"]
    )
    load_s = time.perf_counter() - load_start
    types = {i.name: i.type for i in session.get_inputs()}
    float_type = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[types["past_key_values.0.key"]]
    layers, heads, size = _cache_shape(model_dir, session)
    vocab = session.get_outputs()[0].shape[-1]
    ids = np.random.default_rng(0).integers(3, vocab if isinstance(vocab, int) else 1000, (1, prompt))
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]

    def step(tokens: np.ndarray, past: list[np.ndarray], done: int) -> list[np.ndarray]:
        feed = {"input_ids": tokens, "attention_mask": np.ones((1, done + tokens.shape[1]), np.int64)}
        if "position_ids" in types:
            feed["position_ids"] = np.arange(done, done + tokens.shape[1], dtype=np.int64)[None]
        feed |= {
            f"past_key_values.{i}.{kv}": past[2 * i + j]
            for i in range(layers)
            for j, kv in enumerate(("key", "value"))
        }
        return session.run(outputs, feed)

    tokens: list[int] = []

    def generate() -> tuple[float, float]:
        tokens.clear()
        start = time.perf_counter()
        logits, *past = step(ids, [np.zeros((1, heads, 0, size), float_type)] * (2 * layers), 0)
        prefilled = time.perf_counter()
        for n in range(new):
            token = logits[:, -1:].argmax(-1).astype(np.int64)
            tokens.append(int(token[0, 0]))
            logits, *past = step(token, past, prompt + n)
        return prefilled - start, time.perf_counter() - prefilled

    generate()  # warm-up: first-run allocations and kernel selection
    runs = [generate() for _ in range(repeat)]
    prefills, decodes = [r[0] for r in runs], [r[1] for r in runs]
    return {
        "model_dir": os.path.abspath(model_dir),
        "onnxruntime": ort.__version__,
        "threads": threads,
        "prompt_tokens": prompt,
        "new_tokens": new,
        "session_load_s": load_s,
        "prefill_s": statistics.median(prefills),
        "prefill_s_runs": prefills,
        "decode_tokens_per_s": new / statistics.median(decodes),
        "decode_s_runs": decodes,
        "prompt_ids": ids[0].tolist(),
        "tokens": tokens,  # greedy, so a caller can check the loop against a reference
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="run the builder, measured")
    build.add_argument("checkpoint")
    build.add_argument("output_dir")
    build.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int4", "int8"])
    speed = commands.add_parser("speed", help="prefill latency and decode tokens/s of a KV-cache model")
    speed.add_argument("model_dir")
    speed.add_argument("--prompt", type=int, default=128)
    speed.add_argument("--new", type=int, default=64)
    speed.add_argument("--threads", type=int, default=2)
    speed.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "build":
        result = measure_builder(args.checkpoint, args.output_dir, precision=args.precision)
    else:
        result = runtime_speed(
            args.model_dir, prompt=args.prompt, new=args.new, threads=args.threads, repeat=args.repeat
        )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

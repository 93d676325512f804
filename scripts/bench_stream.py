"""The weight stream alone: shardex's shard writer against the copy floor, by number of writers.

Lays a safetensors checkpoint out as an export would (1 GiB shards, page-aligned, plan order)
and writes every shard with `write_shard` (kernel copy, BLAKE3 of the shard, fsync, rename) from
THREADS threads of one process, as a single-node export does; then the floor: `cp -r` of the
checkpoint plus `sync`. Also the BLAKE3 and sha256 rates of one core. No model is built: only the
safetensors headers are read, so it runs wherever shardex imports (the numbers of the scaling
model in BENCHMARKS.md).

    python scripts/bench_stream.py CKPT_DIR SCRATCH_DIR [--threads 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import blake3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from shardex._plan import TensorEntry, _assign_shards  # noqa: E402
from shardex._source import index_checkpoint, safetensors_files  # noqa: E402
from shardex._weights import write_shard  # noqa: E402

TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def layout(checkpoint: str, max_shard_size: int = 1 << 30):
    """The checkpoint's tensors in shards as an export lays them out (no conversion)."""
    index = index_checkpoint(safetensors_files(checkpoint))
    tensors = [
        TensorEntry(name, (name,), loc.shape, TORCH_NAMES[loc.dtype], loc, nbytes=loc.nbytes)
        for name, loc in index.items()
    ]
    return tensors, _assign_shards(tensors, max_shard_size, zero_copy=False)


def stream(checkpoint: str, out: str, threads: int) -> dict:
    tensors, shards = layout(checkpoint)
    entries = {t.name: t for t in tensors}
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda s: write_shard(s, [entries[n] for n in s.tensors], out), shards))
    wall = time.perf_counter() - start
    total = sum(s.size for s in shards)
    shutil.rmtree(out)
    return {"threads": threads, "wall_s": wall, "bytes": total, "gb_per_s": total / wall / 1e9}


def floor(checkpoint: str, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["bash", "-c", f"cp -r '{checkpoint}' '{out}' && sync"], check=True)
    wall = time.perf_counter() - start
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    shutil.rmtree(out)
    return {"wall_s": wall, "bytes": total, "gb_per_s": total / wall / 1e9}


def digest_rate(algorithm) -> float:
    """GB/s of one core hashing 256 MiB in 16 MiB updates, as shards are hashed."""
    data = memoryview(os.urandom(256 << 20))
    digest = algorithm()
    start = time.perf_counter()
    for i in range(0, len(data), 16 << 20):
        digest.update(data[i : i + (16 << 20)])
    return len(data) / (time.perf_counter() - start) / 1e9


def warm(checkpoint: str) -> None:
    for name in os.listdir(checkpoint):
        with open(os.path.join(checkpoint, name), "rb") as f:
            while f.read(64 << 20):
                pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("scratch", help="a directory on the filesystem to measure (emptied)")
    parser.add_argument("--threads", default="1,2,4,8")
    args = parser.parse_args(argv)
    os.makedirs(args.scratch, exist_ok=True)
    result = {
        "cpus": os.cpu_count(),
        "blake3_gb_per_s_one_core": digest_rate(blake3.blake3),
        "sha256_gb_per_s_one_core": digest_rate(hashlib.sha256),
    }
    warm(args.checkpoint)
    result["floor"] = floor(args.checkpoint, os.path.join(args.scratch, "floor"))
    print(json.dumps(result), file=sys.stderr, flush=True)
    result["stream"] = []
    for threads in map(int, args.threads.split(",")):
        warm(args.checkpoint)
        result["stream"].append(stream(args.checkpoint, os.path.join(args.scratch, "stream"), threads))
        print(json.dumps(result["stream"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

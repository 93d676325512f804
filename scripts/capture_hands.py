"""Who captured what, family by family: every architecture of the matrix (`tests/architectures.py`)
exported through the CLI with no Ray running, as a user on one machine runs it, and for each
the pieces captured, the processes that captured them (the coordinator's capture thread, its
fork, Ray workers) and the wall time. A fork that could not take a task says so in the debug
log, which is scanned for it.

    python scripts/capture_hands.py                  # every family (~10 min on 2 cores)
    python scripts/capture_hands.py t5 gemma2        # some
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.architectures import ARCHITECTURES  # noqa: E402


def capture_hands(timeline: str) -> tuple[int, dict[str, int]]:
    """The capture tasks in a timeline and how many each process row (node/worker) ran."""
    with open(timeline) as f:
        events = json.load(f)["traceEvents"]
    nodes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    hands: dict[str, int] = {}
    for e in events:
        if e["ph"] == "X" and e["name"].startswith("capture "):
            hand = f"{nodes.get(e['pid'], e['pid'])} / {e['tid']}"
            hands[hand] = hands.get(hand, 0) + 1
    return sum(hands.values()), hands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="families to export (default: all)")
    args = parser.parse_args(argv)
    wanted = [a for a in ARCHITECTURES if not args.names or a.name in args.names]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="shardex-hands-") as work:
        for arch in wanted:
            checkpoint, out = os.path.join(work, "ckpt"), os.path.join(work, "onnx")
            arch.build().save_pretrained(checkpoint)
            command = [sys.executable, "-m", "shardex", "export", checkpoint, out]
            command += ["--no-verify", "--no-capture-cache", "--debug"]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
            wall = time.perf_counter() - start
            if done.returncode:
                print(f"{arch.name:16} FAILED: {(done.stderr.strip().splitlines() or [''])[-1]}", flush=True)
            else:
                pieces, hands = capture_hands(os.path.join(out, "timeline.json"))
                fell_back = "capture fork" in done.stderr and "running it here" in done.stderr
                note = "  (the fork could not take a task)" if fell_back else ""
                print(
                    f"{arch.name:16} {pieces} pieces, {len(hands)} hands {sorted(hands.values())}, {wall:5.1f} s{note}",
                    flush=True,
                )
            shutil.rmtree(checkpoint)
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

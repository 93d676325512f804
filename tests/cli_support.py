"""Run the `shardex` command as a user does, and tiny checkpoints of more architectures for the
zoo (Llama, GPT-2 and the plain-torch factory model are in tests/models.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FACTORY = "tests.models:make_block_stack"  # importable from the repository root, where commands run
FACTORY_INPUT = ["--input", "x=2x5x16", "--dynamic-axes", "x=0:batch,1:steps"]


def shardex(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m shardex ARGS` from the repository root, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "shardex", *map(os.fspath, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def export_without_ray(ckpt, out, *flags: str) -> subprocess.CompletedProcess:
    """`shardex export CKPT OUT --no-verify -q FLAGS` with no Ray to join (no ``RAY_ADDRESS``):
    the coordinator captures with its thread and its fork, as on a user's machine."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "shardex", "export", ckpt, out, "--no-verify", "-q", *flags]
    return subprocess.run(
        [*map(os.fspath, command)], cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )


def coordinator_capture_hands(out) -> set[int]:
    """The threads of the coordinator's row of OUT/timeline.json that captured pieces (its
    fork's captures are recorded there, on a thread of their own)."""
    with open(Path(out) / "timeline.json") as f:
        events = json.load(f)["traceEvents"]
    coordinator = next(
        e["pid"]
        for e in events
        if e["name"] == "process_name" and e["args"]["name"].startswith("coordinator")
    )
    return {
        e["tid"]
        for e in events
        if e["ph"] == "X" and e["name"].startswith("capture ") and e["pid"] == coordinator
    }


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """What the command printed on stderr, minus Ray's start-up banner."""
    return [
        line for line in result.stderr.splitlines() if line.strip() and "authentication_token" not in line
    ]


def make_decoder(directory, architecture: str) -> str:
    """A 2-layer decoder of a transformers architecture ("Qwen2", "Mistral") with random weights."""
    import transformers

    config = getattr(transformers, f"{architecture}Config")(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    getattr(transformers, f"{architecture}ForCausalLM")(config).eval().save_pretrained(directory)
    return os.fspath(directory)

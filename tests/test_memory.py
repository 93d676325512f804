"""Peak memory does not grow with the number of layers (slow: exports ~0.3 and ~1.8 GB models)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

EXPORT = """
import sys, shardex
shardex.export(sys.argv[1], sys.argv[2])
"""


def export_in_subprocess(checkpoint, out) -> dict:
    """A fresh coordinator (and its own local Ray), so earlier tests' memory does not count."""
    subprocess.run([sys.executable, "-c", EXPORT, str(checkpoint), str(out)], check=True, timeout=600)
    return json.loads((out / "manifest.json").read_text())


def make_checkpoint(directory, layers: int) -> None:
    subprocess.run(
        [
            sys.executable,
            "scripts/make_checkpoint.py",
            str(directory),
            "--hidden",
            "1024",
            "--intermediate",
            "4096",
            "--heads",
            "16",
            "--layers",
            str(layers),
            "--vocab",
            "8192",
        ],
        check=True,
    )


def test_peak_memory_is_flat_in_depth(tmp_path):
    """Both depths hold more weights than one verification session may (`SESSION_BUDGET_CAP`,
    1 GiB): below it a session holds the whole model, which is bounded but not flat."""
    peaks = {}
    for layers in (24, 44):
        make_checkpoint(tmp_path / f"ckpt{layers}", layers)
        manifest = export_in_subprocess(tmp_path / f"ckpt{layers}", tmp_path / f"out{layers}")
        assert manifest["verification"]["passed"]
        peaks[layers] = manifest["peak_memory"]
    shallow, deep = peaks[24], peaks[44]
    layer_bytes = (4 * 1024 * 1024 + 3 * 1024 * 4096) * 4  # 64 MiB per layer in float32
    added = 20 * layer_bytes  # the deep model holds 1.3 GB more weights
    # Every process (coordinator, Ray daemons, workers) together grows by far less than the weights.
    assert deep["total_pss_bytes"] - shallow["total_pss_bytes"] < 0.25 * added, peaks
    # The coordinator keeps per-layer bookkeeping (plan, graph, the block checks' recorded
    # inputs: ~8 MB a layer here), never a layer's weights (64 MB).
    assert deep["root_rss_bytes"] - shallow["root_rss_bytes"] < 0.25 * added, peaks
    assert deep["max_child_rss_bytes"] - shallow["max_child_rss_bytes"] < 0.25 * added, peaks

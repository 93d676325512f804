"""The transformers exporter pieces shardex reuses are where shardex looks for them.

They are private parts of an experimental package (`transformers.exporters`); a release that moves
one must fail here, loudly, rather than export without it."""

from __future__ import annotations

import subprocess
import sys

import torch

from shardex import _hf_export


def test_pieces_present_and_usable():
    patches, table, fix_program, fuse = _hf_export._pieces()
    with _hf_export.export_patches():  # installs and removes its patches
        assert torch.where is not _ORIGINAL_WHERE
    assert torch.where is _ORIGINAL_WHERE
    # the MoE experts' op and index_put: what MoE and several families need
    assert torch.ops.transformers.grouped_mm_fallback.default in table
    assert torch.ops.aten.index_put.default in table
    assert callable(fix_program) and callable(fuse)


_ORIGINAL_WHERE = torch.where


def test_patches_skip_families_this_process_never_imported():
    """A family's patch applies when its modeling module is imported (the model being captured
    is), and is not imported just to be patched (transformers would import ~35 families)."""
    script = """
import importlib, sys
from shardex import _hf_export
registered = _hf_export._pieces()[0][0]
family = [(p, a) for p, a, _ in registered["dynamo"] if p.startswith("transformers.models.")]
(used_path, used_attr), (unused_path, _) = family[0], next(f for f in family if f[0].split(".")[2] != family[0][0].split(".")[2])
module = importlib.import_module(".".join(used_path.split(".")[:4]))
owner = _hf_export._pieces()[0][1](used_path)
original = getattr(owner, used_attr)
with _hf_export.export_patches():
    assert getattr(owner, used_attr) is not original, used_path
    assert ".".join(unused_path.split(".")[:4]) not in sys.modules, unused_path
assert getattr(owner, used_attr) is original
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]

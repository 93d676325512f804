"""The transformers exporter pieces shardex reuses are where shardex looks for them.

They are private parts of an experimental package (`transformers.exporters`); a release that moves
one must fail here, loudly, rather than export without it."""

from __future__ import annotations

import torch

from shardex import _hf_export


def test_pieces_present_and_usable():
    apply_patches, table, fix_program, fuse = _hf_export._pieces()
    with _hf_export.export_patches():  # installs and removes its patches
        assert torch.where is not _ORIGINAL_WHERE
    assert torch.where is _ORIGINAL_WHERE
    # the MoE experts' op and index_put: what MoE and several families need
    assert torch.ops.transformers.grouped_mm_fallback.default in table
    assert torch.ops.aten.index_put.default in table
    assert callable(fix_program) and callable(fuse)


_ORIGINAL_WHERE = torch.where

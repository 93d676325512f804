"""What transformers' own ONNX exporter knows, applied to shardex's captures.

transformers (``transformers.exporters``, experimental) carries per-family export knowledge that
shardex reuses rather than rediscovers: reversible torch patches (`apply_patches`, for the
``"dynamo"`` and ``"onnx"`` backends; the latter also re-runs its FX node fixes after torch.onnx's
decompositions), a translation table for ops torch.onnx lacks (the grouped matmul MoE experts run
through, ``index_put`` and others), ONNX IR fixes for ONNX Runtime, and the fusions into ONNX
Runtime's own ops. It applies them to one whole model in one process; shardex applies them to
each piece it captures (the trunk and each distinct block), so the same knowledge reaches models
of any size.

These are private-ish pieces of an experimental package: the versions they were tested with are
`TESTED_TRANSFORMERS`; a release that moves them fails loudly (`tests/test_hf_export.py`, and a
one-line `CaptureError` here) instead of silently exporting without them. Sources that are not
transformers models (factories, in-memory modules) get the same patches when transformers is
installed and none when it is not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from typing import Any

from shardex._errors import CaptureError

TESTED_TRANSFORMERS = ">=5.23,<5.25"  # fuse_for_onnxruntime first appears in 5.23


def _installed() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _pieces():
    """The exporter's pieces, or a one-line error naming the one a transformers release moved."""
    try:
        from transformers.exporters.exporter_onnx import _ONNX_TRANSLATION_TABLE, apply_onnx_ir_fixes
        from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime
        from transformers.exporters.utils import _PATCHES, import_dotted_path, patch_attributes
    except ImportError as e:
        import transformers

        raise CaptureError(
            f"transformers {transformers.__version__} lacks an exporter piece shardex uses ({e}); install "
            f"transformers{TESTED_TRANSFORMERS}, the versions shardex is tested with.",
            piece="transformers",
        ) from e
    patches = (_PATCHES, import_dotted_path, patch_attributes)
    return patches, _ONNX_TRANSLATION_TABLE, apply_onnx_ir_fixes, fuse_for_onnxruntime


@contextlib.contextmanager
def export_patches() -> Iterator[None]:
    """transformers' reversible patches for torch.export and torch.onnx, inside the block.

    As transformers' `apply_patches("dynamo")` and `("onnx")`, except that a patch of a model
    family's module this process has not imported is left out: no model code running here can
    reach it. transformers resolves every patch by importing its module, ~35 families' modeling
    files (~180 modules, 0.9 s) for every first capture in a process, whatever the model."""
    if not _installed():
        yield
        return
    registered, import_dotted_path, patch_attributes = _pieces()[0]
    resolved = [
        (target, attribute, factory)
        for backend in ("dynamo", "onnx")
        for path, attribute, factory in registered.get(backend, [])
        if _reachable(path) and (target := import_dotted_path(path, missing_ok=True)) is not None
    ]
    with patch_attributes(resolved):
        yield


def _reachable(path: str) -> bool:
    """Whether model code in this process can use the object at dotted `path`: anything but a
    model family's module that is not imported (``transformers.models.<family>.<module>...``)."""
    parts = path.split(".")
    return parts[:2] != ["transformers", "models"] or ".".join(parts[:4]) in sys.modules


def translation_table() -> dict[Any, Any]:
    """transformers' ONNX translations of ops torch.onnx lacks or lowers badly (empty without
    transformers)."""
    return dict(_pieces()[1]) if _installed() else {}


def fix_program(program) -> None:
    """transformers' ONNX IR fixes for ONNX Runtime, in place on a `torch.onnx.ONNXProgram`."""
    if _installed():
        _pieces()[2](program)


def fuse(model, provider: str) -> bool:
    """transformers' fusions into ONNX Runtime's ops for `provider` ("cpu", "cuda"), in place;
    False when transformers is not installed (the caller falls back to onnxscript's)."""
    if not _installed():
        return False
    _pieces()[3](model, provider)
    return True

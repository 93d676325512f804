"""shardex: export PyTorch models too large for ordinary tools to one verified ONNX program.

The pipeline, one module per stage: `_source` -> `_plan` -> `_capture` (parallel) and
`_weights` (parallel, streamed) -> `_stitch` -> `_verify`; `_ray` runs the parallel stages on
Ray and `_export` coordinates them.

Names are imported on first use: a Ray worker that only streams weights unpickles
`shardex._weights` and should not pay for ONNX, onnxscript and ONNX Runtime imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    # the verbs
    "export",
    "verify",
    "load_manifest",
    # results
    "VerificationReport",
    "CheckResult",
    # errors
    "ShardexError",
    "OptionsError",
    "SourceError",
    "PlanError",
    "CaptureError",
    "WeightsError",
    "StitchError",
    "VerificationError",
]

__version__ = "0.1.0"

_HOMES = {
    "export": "shardex._export",
    "verify": "shardex._export",
    "load_manifest": "shardex._output",
    "VerificationReport": "shardex._verify",
    "CheckResult": "shardex._verify",
    **{name: "shardex._errors" for name in __all__ if name.endswith("Error")},
}

if TYPE_CHECKING:
    from shardex._errors import (
        CaptureError,
        OptionsError,
        PlanError,
        ShardexError,
        SourceError,
        StitchError,
        VerificationError,
        WeightsError,
    )
    from shardex._export import export, verify
    from shardex._output import load_manifest
    from shardex._verify import CheckResult, VerificationReport


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'shardex' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

"""shardex: export PyTorch models too large for ordinary tools to one verified ONNX program.

The pipeline, one module per stage: `_source` -> `_plan` -> `_capture` (parallel) and
`_weights` (parallel, streamed) -> `_stitch` -> `_verify`; `_ray` runs the parallel stages on
Ray and `_export` coordinates them.
"""

from __future__ import annotations

__all__ = [
    # the verb
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
from shardex._export import export, load_manifest, verify
from shardex._verify import CheckResult, VerificationReport

__version__ = "0.1.0"

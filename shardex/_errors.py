"""One exception type per pipeline stage, under one base class.

Every message is one line that states the rule, the offending value and the fix, so the CLI can
print it as is.
"""

from __future__ import annotations


class ShardexError(Exception):
    """Base class of every error shardex raises on purpose."""

    def __reduce__(self):
        """Pickle the keyword fields too: Ray ships a worker's error back to the coordinator."""
        return _restore, (type(self), self.args, vars(self))


def _restore(cls: type[ShardexError], args: tuple, fields: dict) -> ShardexError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(fields)
    return error


class OptionsError(ShardexError, ValueError):
    """An option passed to `export` is invalid (checked before any work starts)."""


class SourceError(ShardexError):
    """The model source cannot be read: missing files, bad factory path, mismatched checkpoint."""


class PlanError(ShardexError):
    """The model could not be planned: no repeated blocks, unrecordable forward, bad inputs."""


class CaptureError(ShardexError):
    """Capturing or translating one piece (the trunk or a block) to ONNX failed."""

    def __init__(self, message: str, *, piece: str) -> None:
        super().__init__(message)
        self.piece = piece


class WeightsError(ShardexError):
    """Streaming weights into a shard failed."""

    def __init__(self, message: str, *, shard: str) -> None:
        super().__init__(message)
        self.shard = shard


class StitchError(ShardexError):
    """The captured pieces do not fit together into one model."""


class VerificationError(ShardexError):
    """The exported program does not match PyTorch within tolerance.

    `failures` lists the failed checks (global outputs and/or blocks) with their numbers.
    """

    def __init__(self, message: str, *, failures: list) -> None:
        super().__init__(message)
        self.failures = failures

"""Files that appear whole or not at all: written under a hidden temporary name (`.NAME.partial`),
fsynced, renamed over the final name, and the directory entry fsynced, so a crash or a kill
never leaves a partial file under a name a reader trusts."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import BinaryIO


def partial_path(output_dir: str, file: str) -> str:
    return os.path.join(output_dir, f".{file}.partial")


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """A binary file to write that appears at `path` only once it is complete and durable."""
    partial = partial_path(*os.path.split(path))
    try:
        with open(partial, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise
    fsync_directory(os.path.dirname(path))


def write_atomic(path: str, data: str | bytes) -> None:
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def fsync_directory(directory: str) -> None:
    """Make renames in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Shared fixtures: one local Ray for the whole session, stopped at the end; a record of the
blocks that verification ran again on their recorded inputs.

Ray is started with this process's import path for its workers, so factory models defined
under tests/ import on workers as they do here. The capture cache is off for every test (and
the commands they start) unless a test passes its own directory: a test must not read or fill
the user's cache, and tests of captures must capture.
"""

from __future__ import annotations

import os

import pytest

os.environ["SHARDEX_CAPTURE_CACHE"] = "off"


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from shardex._ray import worker_runtime_env

    ray.init(num_cpus=2, include_dashboard=False, runtime_env=worker_runtime_env(), log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def reruns_on_recorded_inputs(monkeypatch) -> list[str]:
    """The paths of the blocks a segmented verification in this process ran on PyTorch's
    recorded inputs (`_Segment.check`), in order."""
    from shardex._verify import _Segment

    reruns: list[str] = []
    check = _Segment.check
    monkeypatch.setattr(_Segment, "check", lambda self, *a: reruns.append(self.block) or check(self, *a))
    return reruns

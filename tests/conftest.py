"""Shared fixtures: one local Ray for the whole session, stopped at the end.

Ray is started with this process's import path for its workers, so factory models defined
under tests/ import on workers as they do here.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from shardex._ray import worker_runtime_env

    ray.init(num_cpus=2, include_dashboard=False, runtime_env=worker_runtime_env(), log_to_driver=False)
    yield
    ray.shutdown()

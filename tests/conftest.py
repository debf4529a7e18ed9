"""Shared fixtures. Ray starts once per test session, quiet and without a dashboard."""

import os

import pytest

# Tests may turn Ray's token authentication off on their own throwaway local clusters; the
# project itself never does.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny models: one torch thread is faster, and two stall when the CPU is busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs for the whole session (actors still start in seconds each)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
    yield ray
    ray.shutdown()

"""Reusable pytest fixtures that run the real local stack (import them from conftest.py).

    from obs_pipeline_tests.stack_fixtures import stack, stack_env  # noqa: F401
"""

from __future__ import annotations

import pytest

from obs_pipeline.stack import LocalStack


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One LocalStack (main + replica + redis) per test session, in its own tmp folder; down at the end."""
    local = LocalStack(tmp_path_factory.mktemp("stack"))
    try:
        local.up()
        yield local
    finally:
        local.down()


@pytest.fixture
def stack_env(stack, monkeypatch):
    """`stack.env()` exported into os.environ for one test (OBS_REDIS_URL, OBS_MAIN_DB_URL, ...)."""
    env = stack.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env

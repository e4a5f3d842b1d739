"""Fixtures shared by integration modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from redisserver import Redis, start_redis


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    """One real Redis for a test module."""
    r = start_redis(tmp_path_factory.mktemp("redis"))
    yield r
    r.stop()


@pytest.fixture
def store(server: Redis) -> Iterator[Redis]:
    """The module's Redis, emptied for the test."""
    redis.Redis.from_url(server.url).flushall()
    yield server

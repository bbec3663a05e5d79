"""Suite-wide setup: GPU tests skip cleanly without CUDA; a real Redis server for the redis tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvtier.utils.redis_server import RedisServer, redis_server_available


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server of the test's own (`kvtier.utils.redis_server`), stopped
    afterwards. Skips where the machine has no redis-server binary."""
    if not redis_server_available():
        pytest.skip("needs the redis-server binary")
    server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()

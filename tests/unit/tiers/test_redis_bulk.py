"""BulkReader against a real redis-server: values of every size come back byte for byte, each
thread on its own connection; credentials and the database are honoured; an error reply
leaves the connection usable, and a dropped one is replaced."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
import redis
import torch

from kvtier.tiers.redis_bulk import BulkReader, supports
from kvtier.utils.redis_server import RedisServer

SIZES = [0, 1, 9, 65_536, 65_537, 200_003, 3 << 20]
"""Empty, tiny, around the reader's 64 KB first receive (header and value in one piece or
not), and a few MB."""


def reader_for(url: str) -> tuple[BulkReader, redis.Redis]:
    client = redis.Redis.from_url(url)
    return BulkReader(client, timeout_s=5.0), client


def test_values_of_every_size_come_back_exactly(redis_server: RedisServer) -> None:
    reader, client = reader_for(redis_server.url)
    values = {f"v{size}".encode(): os.urandom(size) for size in SIZES}
    for key, value in values.items():
        client.set(key, value)
    for key, value in values.items():
        got = reader.get(key)
        assert got is not None and got.dtype == torch.uint8
        assert bytes(got.numpy()) == value
    assert reader.get(b"no-such-key") is None
    reader.close()


def test_threads_read_at_once_each_on_its_own_connection(redis_server: RedisServer) -> None:
    reader, client = reader_for(redis_server.url)
    values = {f"t{i}".encode(): os.urandom(1 << 20) for i in range(16)}
    for key, value in values.items():
        client.set(key, value)
    before = client.info("clients")["connected_clients"]
    keys = list(values)
    together = threading.Barrier(4)

    def read_a_quarter(part: int) -> list[bytes]:
        together.wait()  # four threads, each reading at the same time
        return [bytes(reader.get(key).numpy()) for key in keys[part::4] * 3]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(read_a_quarter, range(4)))
    assert got == [[values[key] for key in keys[part::4] * 3] for part in range(4)]
    assert client.info("clients")["connected_clients"] == before + 4
    reader.close()
    deadline = time.monotonic() + 5.0  # the server notices the closes in its own time
    while client.info("clients")["connected_clients"] != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.info("clients")["connected_clients"] == before


def test_credentials_and_database_are_those_of_the_url(redis_server: RedisServer) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    admin.execute_command("ACL", "SETUSER", "kvtier", "on", ">s3cret", "~*", "+@all")
    try:
        socket = quote(str(redis_server.socket))
        reader, client = reader_for(f"unix://kvtier:s3cret@{socket}?db=3")
        client.set(b"k", b"in db 3")
        admin.set(b"k", b"in db 0")
        got = reader.get(b"k")
        assert got is not None and bytes(got.numpy()) == b"in db 3"
        wrong, _ = reader_for(f"unix://kvtier:wrong@{socket}?db=3")
        with pytest.raises(redis.AuthenticationError):
            wrong.get(b"k")
        reader.close()
    finally:
        admin.execute_command("ACL", "DELUSER", "kvtier")


def test_an_error_reply_leaves_the_connection_usable(redis_server: RedisServer) -> None:
    reader, client = reader_for(redis_server.url)
    client.hset(b"a-hash", b"field", b"value")
    client.set(b"a-string", b"ok")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        reader.get(b"a-hash")
    got = reader.get(b"a-string")
    assert got is not None and bytes(got.numpy()) == b"ok"
    reader.close()


def test_a_dropped_connection_fails_one_read_and_the_next_reconnects(
        redis_server: RedisServer) -> None:
    reader, client = reader_for(redis_server.url)
    client.set(b"k", b"value")
    assert reader.get(b"k") is not None
    client.client_kill_filter(_type="normal", skipme=True)  # drops the reader's connection
    with pytest.raises(redis.ConnectionError):
        reader.get(b"k")
    got = reader.get(b"k")
    assert got is not None and bytes(got.numpy()) == b"value"
    reader.close()
    with pytest.raises(redis.ConnectionError, match="closed"):
        reader.get(b"k")


def test_tls_clients_are_left_to_redis_py() -> None:
    assert not supports(redis.Redis.from_url("rediss://localhost:6380/0"))
    assert supports(redis.Redis.from_url("redis://localhost:6380/0"))
    with pytest.raises(ValueError, match="plain TCP"):
        BulkReader(redis.Redis.from_url("rediss://localhost:6380/0"), timeout_s=1.0)

"""`--kv-tier` specs: a value that could never work is refused at start, naming it."""

from __future__ import annotations

import re

import pytest

from kvtier.config import ConfigError, EngineConfig, TierSpec


@pytest.mark.parametrize(("text", "bad"), [
    ("cpu:0", "'0'"),
    ("cpu:0.4", "'0.4'"),  # rounds down to no byte
    ("disk:/var/kv:0GiB", "'0GiB'"),
    ("redis:redis://cache:6379/0:0:s3fifo", "'0'"),
])
def test_a_size_of_no_bytes_is_refused_naming_the_spec(text: str, bad: str) -> None:
    """Before, `disk:PATH:0` and `redis:URL:0` started a tier that refused every store,
    silently."""
    with pytest.raises(ConfigError, match="must be positive") as error:
        TierSpec.parse(text)
    assert repr(text) in str(error.value)


@pytest.mark.parametrize("text", ["disk::10GiB", "disk: :10GiB"])
def test_an_empty_disk_path_is_refused(text: str) -> None:
    """Before, `disk::SIZE` put the tier in whatever directory the engine started in."""
    with pytest.raises(ConfigError, match="path is empty") as error:
        TierSpec.parse(text)
    assert repr(text) in str(error.value)


def test_a_spec_built_in_code_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="size 0 bytes"):
        EngineConfig.from_kwargs(kv_tiers=(TierSpec("disk", 0, path="/var/kv"),))


@pytest.mark.parametrize("text", ["cpu:1", "disk:/var/kv:10GiB", "disk:C:/kv:1GiB:lru",
                                  "redis:cache:6379:1B"])
def test_sizes_and_paths_that_can_work_are_taken(text: str) -> None:
    assert TierSpec.parse(text).capacity_bytes >= 1


@pytest.mark.parametrize(("text", "url"), [
    ("redis://127.0.0.1:1:1GiB", "redis://127.0.0.1:1"),
    ("redis://cache:6379/2:1GiB:s3fifo", "redis://cache:6379/2"),
    ("redis:redis://cache:6379/0:1GiB", "redis://cache:6379/0"),
    ("redis:cache:6379:1GiB", "redis://cache:6379"),
    ("redis:unix:///run/redis.sock:1GiB", "unix:///run/redis.sock"),
])
def test_a_redis_url_given_as_the_whole_spec_keeps_its_host(text: str, url: str) -> None:
    """Before, `redis://127.0.0.1:1:1GiB` became the URL `redis:////127.0.0.1:1`, which
    redis-py reads as localhost:6379: the tier silently used another server."""
    assert TierSpec.parse(text).url == url


@pytest.mark.parametrize("text", ["redis:redis:////cache:6379:1GiB", "redis:///cache:1GiB"])
def test_a_redis_url_without_a_host_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="expected redis://HOST:PORT") as error:
        TierSpec.parse(text)
    assert repr(text) in str(error.value)


@pytest.mark.parametrize("text", ["cpu:" + "9" * 400, "disk:/var/kv:" + "9" * 320 + "TiB"])
def test_a_size_too_large_for_a_number_is_refused_naming_the_spec(text: str) -> None:
    """Before, `float` overflowed to infinity and `int(inf)` raised OverflowError: a
    traceback out of `kvtier serve`, which reports only ConfigError/ValueError in one line."""
    with pytest.raises(ConfigError, match="too large") as error:
        TierSpec.parse(text)
    assert repr(text) in str(error.value)
    with pytest.raises(ConfigError, match="kv_cache_memory_bytes"):
        EngineConfig.from_kwargs(kv_cache_memory_bytes="9" * 400)


@pytest.mark.parametrize(("url", "bad"), [
    ("redis://cache:notaport", "Port could not be cast"),
    ("redis://cache:99999", "out of range"),
    ("redis://cache:0", "port 0"),  # redis-py: port 6379
    ("redis://cache:6379/kv", "the database 'kv' is not a number"),  # redis-py: db 0
    ("redis://cache:6379/0?sockettimeout=1", "unexpected keyword argument"),
    ("unix:///run/redis.sock?db=x", "Invalid value for 'db'"),
])
def test_a_redis_url_redis_py_would_misread_is_refused(url: str, bad: str) -> None:
    """Before, these were taken: at start the tier was disabled with a log line (a bad port),
    the start ended in a TypeError traceback (an unknown `?option`), or redis-py silently
    used its default database or port instead."""
    text = f"redis:{url}:1GiB"
    with pytest.raises(ConfigError, match=re.escape(bad)) as error:
        TierSpec.parse(text)
    assert repr(text) in str(error.value)
    with pytest.raises(ConfigError, match=re.escape(bad)):  # a spec built in code too
        TierSpec("redis", 1 << 30, url=url)


@pytest.mark.parametrize("text", ["redis://cache:6379/15:1GiB", "redis://cache/:1GiB",
                                  "redis:rediss://u:p@cache:6380/2?ssl_cert_reqs=none:1GiB",
                                  "redis:unix:///run/redis.sock?db=3:1GiB"])
def test_redis_urls_with_options_redis_py_takes_are_taken(text: str) -> None:
    assert TierSpec.parse(text).kind == "redis"


def test_tiers_without_the_prefix_cache_are_refused() -> None:
    """The tiers are looked up and filled through the prefix cache's block hashes: with it
    off they did nothing, silently, while a cpu tier still took its host memory."""
    with pytest.raises(ConfigError, match="kv_tiers need enable_prefix_caching"):
        EngineConfig.from_kwargs(kv_tiers=("cpu:1GiB",), enable_prefix_caching=False)
    EngineConfig.from_kwargs(enable_prefix_caching=False)  # without tiers: fine

"""`--kv-tier` specs: a value that could never work is refused at start, naming it."""

from __future__ import annotations

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

"""Threads carry their Python names in the kernel (`comm`), for top -H, py-spy and the lab's
per-thread CPU record."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvtier.utils.thread_names import name_os_threads, set_os_thread_name

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux prctl")


def comm(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().rstrip("\n")


@pytest.fixture
def restore_profile():
    yield
    threading.setprofile(None)  # type: ignore[arg-type]


def in_thread(name: str | None = None) -> str:
    """The kernel name of a thread started now (named `name` in Python)."""
    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.append(comm(threading.get_native_id())),
                              name=name)
    thread.start()
    thread.join()
    return seen[0]


def test_threads_started_after_the_call_carry_their_python_names(restore_profile) -> None:
    threading.setprofile(None)  # type: ignore[arg-type]  # whatever an earlier test left
    main = threading.main_thread().native_id
    main_before = comm(main)
    assert in_thread("kvtier-engine-updates") == main_before  # before: the process's name
    try:
        name_os_threads("kvtier-test")
        assert comm(threading.get_native_id()) == "kvtier-test"
        assert in_thread("kvtier-engine-updates") == "kvtier-engine-u"  # 15 bytes
        with ThreadPoolExecutor(1, thread_name_prefix="kvtier-store") as pool:
            assert pool.submit(lambda: comm(threading.get_native_id())).result() \
                == "kvtier-store_0"
        # The hook names the thread and leaves: the thread runs unprofiled.
        profiles: list[object] = []
        thread = threading.Thread(target=lambda: profiles.append(sys.getprofile()))
        thread.start()
        thread.join()
        assert profiles == [None]
    finally:
        set_os_thread_name(main_before)


def test_a_long_name_is_cut_at_a_character_boundary() -> None:
    before = comm(threading.get_native_id())
    try:
        # "kvtier-x" is 8 bytes and é 2: the 15th byte would be half of the fourth é.
        assert set_os_thread_name("kvtier-xéééééé")
        assert comm(threading.get_native_id()) == "kvtier-xééé"
    finally:
        set_os_thread_name(before)

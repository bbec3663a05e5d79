"""One disk tier per folder: a second opener is refused while the first holds the folder's
lock, and a lock whose process died (however it died) blocks nobody.

Before, two engines (or two stores in one process) could share a folder: each cleared the
other's temporaries at start, and each one's eviction unlinked files the other's index
still listed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvtier.config import ConfigError
from kvtier.tiers.disk import LOCK_NAME, DiskStore
from kvtier.tiers.policy import create_policy
from tests.unit.tiers.test_stores import LAYOUT, make_meta, payload_for, put

pytestmark = pytest.mark.timeout(60)


def open_store(path: Path) -> DiskStore:
    return DiskStore(LAYOUT, 1 << 20, create_policy("lru"), str(path))


def test_a_second_store_on_the_folder_is_refused_until_the_first_closes(
        tmp_path: Path) -> None:
    first = open_store(tmp_path)
    meta = make_meta(1)
    assert put(first, meta)
    lock = first.root / LOCK_NAME
    with pytest.raises(ConfigError) as refused:
        open_store(tmp_path)
    assert str(refused.value) == (
        f"disk tier folder {first.root} is in use by another kvtier process "
        f"(lock file {lock}, held by pid {os.getpid()})")
    assert first.has(meta.key)  # the refused opener touched nothing
    assert torch.equal(first.read(meta), payload_for(meta))
    first.close()
    reopened = open_store(tmp_path)  # a restart: the entries survive, the lock file is no entry
    assert reopened.has(meta.key) and reopened.num_entries == 1
    assert reopened.stats.num_errors == 0 and lock.exists()
    reopened.close()


def test_another_model_shares_the_folder(tmp_path: Path) -> None:
    """The lock is per layout namespace (the subfolder): two models' engines may share one
    --kv-tier path."""
    from dataclasses import replace
    first = open_store(tmp_path)
    other = DiskStore(replace(LAYOUT, model_id="another-model"), 1 << 20, create_policy("lru"),
                      str(tmp_path))
    assert other.root != first.root
    first.close()
    other.close()


LOCK_AND_WAIT = textwrap.dedent("""
    import sys, time
    from kvtier.tiers.disk import DiskStore
    from kvtier.tiers.policy import create_policy
    from tests.unit.tiers.test_stores import LAYOUT
    store = DiskStore(LAYOUT, 1 << 20, create_policy("lru"), sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_lock_held_by_a_killed_process_blocks_nobody(tmp_path: Path) -> None:
    # The repo first, then the caller's path (where the GPU machine keeps redis & co.).
    root = Path(__file__).parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root / "src"), str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    holder = subprocess.Popen([sys.executable, "-c", LOCK_AND_WAIT, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(ConfigError, match=f"held by pid {holder.pid}"):
            open_store(tmp_path)  # another process holds it
    finally:
        holder.send_signal(signal.SIGKILL)  # no close(), no clean-up: the kernel drops it
        holder.wait(timeout=30)
    store = open_store(tmp_path)
    assert put(store, make_meta(1))  # taken, and it stores
    store.close()


def test_a_folder_that_cannot_be_made_is_refused_naming_it(tmp_path: Path) -> None:
    """Before, the store logged an error and ran as a tier that stored nothing, so a typo in
    --kv-tier served with no disk tier at all."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError) as refused:
        open_store(blocker / "kv")
    root = blocker / "kv" / LAYOUT.namespace
    assert str(refused.value) == (f"disk tier folder {blocker / 'kv'}: cannot create {root} "
                                  "(Not a directory)")


def test_a_folder_it_cannot_write_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """os.access decides (a root test runner writes anywhere, so it is told no here)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False
                        if Path(path).is_relative_to(tmp_path) else real_access(path, mode))
    with pytest.raises(ConfigError, match=f"^disk tier folder {tmp_path}: .* is not writable$"):
        open_store(tmp_path)
    assert not (tmp_path / LAYOUT.namespace / LOCK_NAME).exists()  # nothing taken


def test_a_folder_under_the_home_directory_is_found_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--kv-tier disk:~/kv:SIZE`: the shell does not expand a `~` after `disk:`. Before, the
    store made a folder named `~` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    store = DiskStore(LAYOUT, 1 << 20, create_policy("lru"), "~/kv")
    try:
        assert store.root == tmp_path / "home" / "kv" / LAYOUT.namespace
        assert store.root.is_dir() and not (tmp_path / "~").exists()
    finally:
        store.close()

"""`kvtier serve --api-server-count N`'s multiprocess-metrics directory: named with the
supervisor's pid and flocked by it while it runs; the ones that killed supervisors left are
removed at the next start.

Before, the directory was `kvtier-metrics-<random>`: a supervisor killed with SIGKILL left it
in the temporary directory for good, and nothing could tell whose it was."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kvtier.server import api_servers
from kvtier.server.api_servers import OWNER_LOCK, remove_stale_metrics_dirs, run_api_servers


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def metrics_dir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir()
    (path / "histogram_1.db").write_bytes(b"\0" * 64)
    return path


def test_only_the_directories_of_dead_supervisors_are_removed(tmp_path: Path) -> None:
    dead = metrics_dir(tmp_path, f"kvtier-metrics-{dead_pid()}-ab_c12")
    live = metrics_dir(tmp_path, f"kvtier-metrics-{os.getpid()}-def345")
    legacy = metrics_dir(tmp_path, "kvtier-metrics-0gg6jd7c")  # no pid: whose is unknown
    other = metrics_dir(tmp_path, "other-metrics-1-x")
    not_a_dir = tmp_path / f"kvtier-metrics-{dead_pid()}-file"
    not_a_dir.write_text("x")
    assert remove_stale_metrics_dirs(tmp_path) == [dead]
    assert not dead.exists()
    assert all(p.exists() for p in (live, legacy, other, not_a_dir))
    assert remove_stale_metrics_dirs(tmp_path / "missing") == []


def test_a_start_clears_stale_directories_and_names_its_own_with_its_pid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    stale = metrics_dir(tmp_path, f"kvtier-metrics-{dead_pid()}-zz9")
    seen: list[Path] = []

    def supervise(self: object, *args: object) -> int:  # the front ends would start here
        seen.append(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
        assert not stale.exists() and seen[0].is_dir()
        # The owner lock is held while the supervisor runs.
        with (seen[0] / OWNER_LOCK).open("rb") as probe, pytest.raises(BlockingIOError):
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert remove_stale_metrics_dirs(tmp_path) == []
        return 0

    monkeypatch.setattr(api_servers._Supervisor, "run", supervise)
    assert run_api_servers(None, None, [], max_waiting_requests=None,  # type: ignore[arg-type]
                           shutdown_timeout_s=1.0) == 0
    [made] = seen
    assert made.parent == tmp_path and made.name.startswith(f"kvtier-metrics-{os.getpid()}-")
    assert not made.exists() and "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_the_owner_lock_decides_over_the_pid(tmp_path: Path) -> None:
    """A supervisor in another pid namespace (a container sharing /tmp) has a pid that reads
    as dead here, but holds its lock: its directory stays. A lock nobody holds marks a
    directory stale even where the pid in its name was reused by a live process."""
    held = metrics_dir(tmp_path, f"kvtier-metrics-{dead_pid()}-held1")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'wb'); "
         "fcntl.flock(f.fileno(), fcntl.LOCK_EX); print('locked', flush=True); "
         "time.sleep(60)", str(held / OWNER_LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        unheld = metrics_dir(tmp_path, f"kvtier-metrics-{os.getpid()}-unheld")
        (unheld / OWNER_LOCK).write_bytes(b"")
        assert remove_stale_metrics_dirs(tmp_path) == [unheld]
        assert held.exists()
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale_metrics_dirs(tmp_path) == [held]  # its holder died: the kernel let go

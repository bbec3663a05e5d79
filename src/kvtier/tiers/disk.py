"""Disk tier: one checksummed file per entry under `<path>/<layout namespace>/`.

Each file holds an entry in `entry_codec`'s self-checking format (header with the layout
namespace, block hashes and crc32, then the payload).

Files are written to a temporary name and renamed, so a crash never leaves a half entry under a
real name. The index is rebuilt from the headers on start (oldest first), which is what lets
cached prefixes survive an engine restart. Any failure to read (missing, truncated, corrupt
header, checksum mismatch) drops the entry and counts an error; the engine recomputes.
`complete_store` and `read` do blocking I/O: call them from a transfer thread.

One store owns a folder at a time: it holds an exclusive `flock` on `LOCK_NAME` inside it
from start to `close()`, and a second opener (another engine, or a second store in this
process) is refused with a ConfigError naming the folder. Two owners would delete each
other's files (start-up clears temporaries, eviction unlinks) behind each other's index. The
kernel drops the lock when its process dies, however it dies, so a crash never leaves the
folder locked; the lock file itself stays (removing it would race with a new opener).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import os
import shutil
import stat
import time
import zlib
from pathlib import Path

import torch

from kvtier.config import ConfigError
from kvtier.tiers import entry_codec
from kvtier.tiers.base import EntryMeta, KVLayout, StoreHandle, TierError, TierStore, _Entry
from kvtier.tiers.policy import EvictionPolicy
from kvtier.types import BlockHash

logger = logging.getLogger(__name__)

_SUFFIX = ".kvt"
LOCK_NAME = ".kvtier.lock"
"""The lock file inside the tier's folder (a dot name without the entry suffix, so the index
scan never reads it as an entry)."""
STALE_PROBE_S = 600.0
"""A probe's scratch directory older than this was left by a process that died."""


class DiskStore(TierStore):
    name = "disk"

    def __init__(self, layout: KVLayout, capacity_bytes: int, policy: EvictionPolicy,
                 path: str) -> None:
        super().__init__(layout, capacity_bytes, policy)
        # `--kv-tier disk:~/kv:SIZE`: the shell leaves a `~` after `disk:` alone, and taken
        # literally it made a folder named `~` in the working directory.
        self.root = Path(path).expanduser() / layout.namespace
        self._lock_file: io.TextIOWrapper | None = None
        # A folder that cannot be made or written is the operator's to fix: refused at start,
        # not served as a tier that stores nothing.
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"disk tier folder {path}: cannot create {self.root} "
                              f"({exc.strerror or exc})") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ConfigError(f"disk tier folder {path}: {self.root} is not writable")
        self._lock_file = _lock_folder(self.root)
        self._rebuild_index()

    def _path(self, key: BlockHash) -> Path:
        return self.root / f"{key.hex()}{_SUFFIX}"

    def _entry_bytes(self, meta: EntryMeta) -> int:
        return entry_codec.encoded_bytes(meta, self.layout.namespace)

    # -- start-up ----------------------------------------------------------------------------

    def _rebuild_index(self) -> None:
        for tmp in self.root.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        # Scratch directories of start-up probes (`tiers.stack`) that a process left when it
        # died; a probe takes well under a second, so an older one is nobody's.
        for scratch in self.root.glob(".probe-*"):
            with contextlib.suppress(OSError):
                if time.time() - scratch.stat().st_mtime > STALE_PROBE_S:
                    shutil.rmtree(scratch, ignore_errors=True)
        # A name may be gone by the time it is looked at (a dangling link, another process's
        # clean-up), or be no file at all: dropped below as unreadable, never fatal.
        files = sorted(self.root.glob(f"*{_SUFFIX}"), key=_mtime)
        for path in files:
            try:
                meta, _ = self._read_header(path)
            except (OSError, TierError, ValueError) as exc:
                logger.warning("disk tier: dropping unreadable %s: %s", path.name, exc)
                self.stats.num_errors += 1
                with contextlib.suppress(OSError):  # a directory of that name stays
                    path.unlink(missing_ok=True)
                continue
            with self._lock:
                if not self._reserve(meta, path):
                    path.unlink(missing_ok=True)
                    continue
                self._entries[meta.key].ready = True
                self.policy.insert(meta.key)
        logger.info("disk tier %s: %d entries, %d bytes", self.root, self.num_entries,
                    self.used_bytes)

    def _read_header(self, path: Path) -> tuple[EntryMeta, int]:
        """Parse and validate a file's header; returns the entry and its crc32. Any damage
        (torn, truncated, a header of the wrong shape) is a TierError."""
        with _open_entry(path) as f:
            length = entry_codec.read_preamble(path.name, f.read(entry_codec.PREAMBLE_BYTES))
            meta, crc = entry_codec.parse_header(path.name, f.read(length),
                                                 self.layout.namespace)
            size = os.fstat(f.fileno()).st_size
        if size != entry_codec.PREAMBLE_BYTES + length + meta.num_bytes:
            raise TierError(f"{path.name}: truncated")
        if path.name != f"{meta.key.hex()}{_SUFFIX}":
            raise TierError(f"{path.name}: name does not match its key")
        return meta, crc

    # -- store -------------------------------------------------------------------------------

    def prepare_store(self, meta: EntryMeta) -> StoreHandle | None:
        with self._lock:
            if meta.key in self._entries:
                return None
            if not self._reserve(meta, self._path(meta.key)):
                self.stats.num_rejected += 1
                return None
        return StoreHandle(meta, torch.empty(meta.num_bytes, dtype=torch.uint8),
                           self._path(meta.key))

    def complete_store(self, handle: StoreHandle, success: bool) -> None:
        meta = handle.meta
        if success:
            success = self._write(handle)
        with self._lock:
            self._finish_store(meta, success)

    def _write(self, handle: StoreHandle) -> bool:
        path = Path(str(handle.location))
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
        payload = handle.buffer.numpy().data
        try:
            with open(tmp, "wb") as f:
                f.write(entry_codec.preamble(handle.meta, self.layout.namespace, payload))
                f.write(payload)
            os.replace(tmp, path)
            return True
        except OSError as exc:
            logger.warning("disk tier: write of %s failed: %s", path.name, exc)
            with self._lock:
                self.stats.num_errors += 1
            tmp.unlink(missing_ok=True)
            return False

    # -- load --------------------------------------------------------------------------------

    def read(self, meta: EntryMeta) -> torch.Tensor:
        path = self._path(meta.key)
        try:
            stored, crc = self._read_header(path)
            if stored != meta:
                raise TierError("header does not match the index")
            buffer = torch.empty(meta.num_bytes, dtype=torch.uint8)
            view = buffer.numpy().data
            with _open_entry(path) as f:
                f.seek(-meta.num_bytes, os.SEEK_END)
                if f.readinto(view) != meta.num_bytes:
                    raise TierError("short read")
            if zlib.crc32(view) != crc:
                raise TierError("checksum mismatch")
        except (OSError, TierError, ValueError, KeyError) as exc:
            raise self._fail(meta, f"{path.name}: {exc}") from exc
        self._mark_read(meta)
        return buffer

    def close(self) -> None:
        """Release the folder's lock (another store may then open it)."""
        lock_file, self._lock_file = self._lock_file, None
        if lock_file is not None:
            lock_file.close()  # closing the descriptor drops its flock

    def _release(self, entry: _Entry) -> None:
        try:
            Path(str(entry.location)).unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("disk tier: cannot delete %s: %s", entry.location, exc)


def _lock_folder(root: Path) -> io.TextIOWrapper | None:
    """The open lock file of `root`, exclusively flocked, with this process's id in it (for
    people); ConfigError where another store holds it. A file system without flock (some
    network mounts) runs the tier unguarded, as before there was a lock, with a warning."""
    path = root / LOCK_NAME
    try:
        lock_file = open(path, "a+", encoding="ascii")  # noqa: SIM115 - held until close()
    except OSError as exc:
        logger.warning("disk tier %s: cannot open the lock file %s (%s): running without "
                       "the guard against a second kvtier process", root, path, exc)
        return None
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = ""
        with contextlib.suppress(OSError, ValueError):  # the pid is only a courtesy
            lock_file.seek(0)
            holder = lock_file.read(32).strip()
        lock_file.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"disk tier folder {root} is in use by another kvtier process "
                              f"(lock file {path}"
                              f"{', held by pid ' + holder if holder.isdigit() else ''})"
                              ) from None
        logger.warning("disk tier %s: cannot lock %s (%s): running without the guard "
                       "against a second kvtier process", root, path, exc)
        return None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file


def _mtime(path: Path) -> float:
    """When the file at `path` was written; 0 for a name that is already gone."""
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _open_entry(path: Path) -> io.BufferedReader:
    """`path` opened for reading; TierError where it is not a regular file (a directory, a
    FIFO: opened plainly, a FIFO would block until some writer came)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TierError(f"{path.name}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise

"""One engine core, several front ends (`kvtier serve --api-server-count N`, as vLLM's).

    front end 0 ── pipe ──► reader 0 ─┐                       ┌─► pipe 0: its requests' part
    front end 1 ── pipe ──► reader 1 ─┼─► CommandInbox ─► core ┤
    ...                               ┘   (emit = fan out)    └─► pipe 1: ...

Every front end's commands go into the core's one inbox; each `CoreUpdate` is split so that a
front end gets the acceptances, outputs and aborts of the requests it sent, and every front
end gets the stats snapshot. A front end whose pipe closes (it died) has its live requests
aborted, so their KV blocks are freed. The core stops once every front end has sent
`StopCore` or gone: each front end drains its own requests first, so the last one to stop
decides when.
"""

from __future__ import annotations

import logging
import threading
import time
from multiprocessing.connection import Connection

from kvtier.engine.core_messages import (
    AbortRequest,
    AddRequest,
    CoreUpdate,
    ResetPrefixCache,
    StopCore,
)
from kvtier.engine.engine_core import CommandInbox

logger = logging.getLogger(__name__)

SNAPSHOT_INTERVAL_S = 0.005
"""A front end with nothing of its own in a turn gets the stats snapshot at most this often
from the core's loop (pickling every turn's snapshot once per front end would cost the
loop's time); a snapshot held back is sent this long later by the fanout's flusher thread,
so that a front end's stats settle once the engine goes idle."""


class CoreFanout:
    """Engine-process side: the readers of every front end's pipe and the core's `emit`."""

    def __init__(self, conns: list[Connection], inbox: CommandInbox) -> None:
        self._conns = conns
        self._inbox = inbox
        self._owners: dict[str, int] = {}
        """Live request id (or a cache reset's call id) -> the front end that sent it
        (readers add, the core removes)."""
        self._lock = threading.Lock()
        self._stopped = [False] * len(conns)
        """Sent StopCore or closed its pipe."""
        self._unreachable = [False] * len(conns)
        """Gone, or a send to it failed: nothing more is sent there."""
        self._send_locks = [threading.Lock() for _ in conns]
        """The core's loop and the flusher both send."""
        self._turn = 0
        self._sent_turn = [0] * len(conns)
        """The turn of the newest update sent to each front end (under its send lock)."""
        self._last_sent = [0.0] * len(conns)
        self._held: dict[int, tuple[int, CoreUpdate]] = {}
        """Front end -> the newest snapshot-only update held back, and its turn."""
        self._held_cond = threading.Condition()

    def start_readers(self) -> None:
        """The pipes' readers, and the flusher of held-back snapshots."""
        for index in range(len(self._conns)):
            threading.Thread(target=self._read, args=(index,), name=f"kvtier-commands-{index}",
                             daemon=True).start()
        threading.Thread(target=self._flush_held, name="kvtier-snapshots", daemon=True).start()

    def _read(self, index: int) -> None:
        conn = self._conns[index]
        while True:
            try:
                command = conn.recv()
            except (EOFError, OSError):
                self._stop(index, gone=True)
                return
            if isinstance(command, StopCore):
                self._stop(index, gone=False)
                return
            if isinstance(command, AddRequest):
                # Before the inbox: the core's acceptance must find its owner.
                self._owners[command.request_id] = index
            elif isinstance(command, ResetPrefixCache):
                self._owners[command.call_id] = index
            self._inbox.put(command)

    def _stop(self, index: int, gone: bool) -> None:
        with self._lock:
            if self._stopped[index]:
                return
            self._stopped[index] = True
            everyone = all(self._stopped)
        if gone:  # nobody reads these requests' outputs any more: free their KV blocks now
            self._unreachable[index] = True
            for request_id, owner in list(self._owners.items()):
                if owner == index:  # a reset's call id among them: the core ignores it
                    self._inbox.put(AbortRequest(request_id, None))
        if everyone:
            self._inbox.stop()

    def emit(self, update: CoreUpdate) -> None:
        """The core's emit: each front end's part of the turn's update."""
        parts: dict[int, CoreUpdate] = {}

        def part(request_id: str, finished: bool) -> CoreUpdate | None:
            index = (self._owners.pop(request_id, None) if finished
                     else self._owners.get(request_id))
            if index is None:
                logger.error("no front end owns request %s; its update is dropped", request_id)
                return None
            found = parts.get(index)
            if found is None:
                found = parts[index] = CoreUpdate(update.snapshot, 0, update.time,
                                                  closed=update.closed)
            return found

        for accepted in update.accepted:
            target = part(accepted.request_id, finished=accepted.error is not None)
            if target is not None:
                target.accepted.append(accepted)
                target.num_adds_drained += 1  # every add the core drained is answered
        for delta in update.outputs:
            target = part(delta.request_id, finished=delta.finished)
            if target is not None:
                target.outputs.append(delta)
        for aborted in update.aborted:
            target = part(aborted.request_id, finished=True)
            if target is not None:
                target.aborted.append(aborted)
        for reset in update.resets:
            target = part(reset.call_id, finished=True)
            if target is not None:
                target.resets.append(reset)
        self._turn += 1
        now = time.monotonic()
        for index in range(len(self._conns)):
            if self._unreachable[index]:
                continue
            message = parts.get(index)
            if message is None:
                if update.snapshot is None and not update.closed:
                    continue
                message = CoreUpdate(update.snapshot, 0, update.time, closed=update.closed)
                if not update.closed and now - self._last_sent[index] < SNAPSHOT_INTERVAL_S:
                    with self._held_cond:
                        self._held[index] = (self._turn, message)
                        self._held_cond.notify()
                    continue
            self._send(index, self._turn, message)
            self._last_sent[index] = now

    def _send(self, index: int, turn: int, message: CoreUpdate) -> None:
        with self._send_locks[index]:
            if self._unreachable[index] or turn <= self._sent_turn[index]:
                return  # a newer update went out already (the flusher lost a race)
            try:
                self._conns[index].send(message)
            except (OSError, ValueError):
                self._unreachable[index] = True
                return
            self._sent_turn[index] = turn

    def _flush_held(self) -> None:
        while True:
            with self._held_cond:
                self._held_cond.wait_for(lambda: bool(self._held))
            time.sleep(SNAPSHOT_INTERVAL_S)
            with self._held_cond:
                held, self._held = self._held, {}
            for index, (turn, message) in held.items():
                self._send(index, turn, message)

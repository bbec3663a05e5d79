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

An update goes out on the core's loop while its front end's pipe has room, as a plain send
would, but never blocks there: a front end that stops reading (frozen, or stopped under a
debugger) fills its pipe, and from then on its updates queue for its own sender thread, so the
core's loop and the other front ends go on. Its outputs wait in memory, as vLLM's engine core
keeps outputs queued for a slow front end; its stats snapshots collapse into the newest.
Handing every update to a sender thread instead cost S with four front ends 12-14% in decode
step time on an H200 (BENCHMARKS.md, 2026-12-02): threads waking for the GIL each step.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import NamedTuple

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

DIRECT_SEND_MAX_BYTES = 32 * 1024
"""An update up to this size is written by the thread that posts it (the core's loop or the
flusher) when nothing of its front end's is queued and the pipe polls writable. Linux reports
a unix socket writable while at most a quarter of its send buffer (208 KiB by default) is in
use, so such a write cannot block. Larger ones go through the front end's sender thread."""


class _Posted(NamedTuple):
    """One front end's update, pickled as `Connection.send` would pickle it."""

    turn: int
    snapshot_only: bool
    payload: memoryview


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
        self._outboxes: list[deque[_Posted]] = [deque() for _ in conns]
        """Per front end: updates that could not be written at once, in the order posted;
        its sender thread writes them. While one is queued, every later one queues too."""
        self._outbox_conds = [threading.Condition() for _ in conns]
        """Per front end: guards its outbox and its direct writes (loop and flusher)."""
        self._writable = []
        for conn in conns:
            poller = select.poll()
            poller.register(conn.fileno(), select.POLLOUT)
            self._writable.append(poller)
        self._turn = 0
        self._sent_turn = [0] * len(conns)
        """The turn of the newest update sent to each front end."""
        self._last_sent = [0.0] * len(conns)
        self._held: dict[int, tuple[int, CoreUpdate]] = {}
        """Front end -> the newest snapshot-only update held back, and its turn."""
        self._held_cond = threading.Condition()

    def start_readers(self) -> None:
        """The pipes' readers and senders, and the flusher of held-back snapshots."""
        for index in range(len(self._conns)):
            threading.Thread(target=self._read, args=(index,), name=f"kvtier-commands-{index}",
                             daemon=True).start()
            threading.Thread(target=self._send_posted, args=(index,),
                             name=f"kvtier-updates-{index}", daemon=True).start()
        threading.Thread(target=self._flush_held, name="kvtier-snapshots", daemon=True).start()

    def close(self, timeout_s: float) -> bool:
        """Once the core has stopped: wait up to timeout_s for every reachable front end's
        posted updates to be sent (a front end that stopped reading must not keep the engine
        process from exiting). True when all went out."""
        deadline = time.monotonic() + timeout_s
        drained = True
        for index, cond in enumerate(self._outbox_conds):
            with cond:
                cond.notify_all()
                drained &= cond.wait_for(
                    lambda i=index: self._unreachable[i] or not self._outboxes[i],
                    max(0.0, deadline - time.monotonic()))
        return drained

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
            self._post(index, self._turn, message)
            self._last_sent[index] = now

    def _post(self, index: int, turn: int, message: CoreUpdate) -> None:
        """Write the update now if that cannot block, else queue it for the sender thread."""
        if self._unreachable[index]:
            return
        payload = ForkingPickler.dumps(message)
        posted = _Posted(turn, _snapshot_only(message), payload)
        cond, outbox = self._outbox_conds[index], self._outboxes[index]
        with cond:
            if self._unreachable[index]:
                return  # its pipe failed while this update was pickled
            if not outbox:
                if turn <= self._sent_turn[index]:
                    return  # a newer update went out already (the flusher lost a race)
                if len(payload) <= DIRECT_SEND_MAX_BYTES and self._has_room(index):
                    self._write(index, posted)
                    return
            elif len(outbox) >= 2 and posted.snapshot_only and outbox[-1].snapshot_only:
                # Snapshots are cumulative: of two queued snapshot-only updates only the newer
                # turn's is kept (the flusher may post an older one late), so a front end that
                # stops reading holds one snapshot, not one per 5 ms of the others' work.
                # Never the head: its sender may be writing it.
                if turn > outbox[-1].turn:
                    outbox[-1] = posted
                return
            outbox.append(posted)
            cond.notify_all()

    def _has_room(self, index: int) -> bool:
        return any(events & select.POLLOUT for _, events in self._writable[index].poll(0))

    def _write(self, index: int, posted: _Posted) -> bool:
        """Send one update (the caller holds the front end's turn to write); False when its
        pipe is gone."""
        try:
            self._conns[index].send_bytes(posted.payload)
        except (OSError, ValueError):
            self._unreachable[index] = True
            return False
        self._sent_turn[index] = posted.turn
        return True

    def _send_posted(self, index: int) -> None:
        """Front end `index`'s sender: its posted updates, in order, each newer than the last
        sent (a held-back snapshot that a newer update overtook is dropped)."""
        cond, outbox = self._outbox_conds[index], self._outboxes[index]
        while True:
            with cond:
                cond.wait_for(lambda: bool(outbox))
                posted = outbox[0]
            # Outside the lock (the write may block for as long as the front end does not
            # read); nobody else writes while the outbox is not empty.
            if posted.turn > self._sent_turn[index] and not self._write(index, posted):
                with cond:
                    outbox.clear()
                    cond.notify_all()
                return
            with cond:
                outbox.popleft()  # only after the write: `close` waits for an empty outbox
                cond.notify_all()

    def _flush_held(self) -> None:
        while True:
            with self._held_cond:
                self._held_cond.wait_for(lambda: bool(self._held))
            time.sleep(SNAPSHOT_INTERVAL_S)
            with self._held_cond:
                held, self._held = self._held, {}
            for index, (turn, message) in held.items():
                self._post(index, turn, message)


def _snapshot_only(update: CoreUpdate) -> bool:
    """Carries the stats snapshot and nothing a front end must see one by one."""
    return not (update.accepted or update.outputs or update.aborted or update.resets
                or update.closed or update.num_adds_drained)

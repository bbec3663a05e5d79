"""Large Redis values read straight off the socket into a buffer of their own.

redis-py reads a reply in 64 KB pieces, feeds each to its parser (a copy, under the GIL) and
then builds the value as a bytes object (another copy): a 7 MB KV entry came in at
0.65-0.9 GB/s on an H200's host, whatever the number of threads. `BulkReader.get` sends the
GET itself and receives the value with `recv_into` into a uint8 tensor sized from the reply's
header: no copy, and the GIL is free while the bytes arrive, so reads in several threads
overlap (on this repo's 2-core box, 0.7 -> 2.8-3.3 GB/s for one reader).

It speaks the part of RESP2 a GET needs: the reply is a bulk string (`$<n>` and the bytes), a
nil (`$-1`: no such key) or an error (`-...`). Each thread has its own connection, opened
with the client's address, credentials and database; TLS connections are not handled (the
caller keeps redis-py's GET for those). A connection that fails or sees anything unexpected is
closed, and the next call opens a new one.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import redis
import torch

_LINE_LIMIT = 1 << 16
"""A status or header line longer than this is not a reply to our command."""


def supports(client: redis.Redis) -> bool:
    """Whether a BulkReader can reach what `client` connects to (a plain TCP or unix socket)."""
    pool = client.connection_pool
    return pool.connection_class in (redis.Connection, redis.UnixDomainSocketConnection)


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class BulkReader:
    def __init__(self, client: redis.Redis, timeout_s: float) -> None:
        if not supports(client):
            raise ValueError("BulkReader reaches plain TCP and unix-socket servers only")
        self._kwargs: dict[str, Any] = dict(client.connection_pool.connection_kwargs)
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False

    def get(self, key: bytes) -> torch.Tensor | None:
        """The value at `key` as a new uint8 tensor, or None where there is none. Raises
        redis.ConnectionError (or TimeoutError) when the connection fails and
        redis.ResponseError for an error reply."""
        sock = self._connection()
        try:
            sock.sendall(_command(b"GET", key))
            header, extra = _read_line(sock, b"")
            if header[:1] == b"-":
                raise redis.ResponseError(header[1:].decode(errors="replace"))
            if header[:1] != b"$":
                raise redis.ConnectionError(f"unexpected reply to GET: {header[:40]!r}")
            length = int(header[1:])
            if length < 0:
                if extra:
                    raise redis.ConnectionError("bytes after a nil reply")
                return None
            # The value and its trailing CRLF, received in place.
            buffer = torch.empty(length + 2, dtype=torch.uint8)
            view = buffer.numpy().data
            if len(extra) > length + 2:
                raise redis.ConnectionError("more bytes than the reply holds")
            view[:len(extra)] = extra
            received = len(extra)
            while received < length + 2:
                count = sock.recv_into(view[received:])
                if count == 0:
                    raise redis.ConnectionError("connection closed mid-reply")
                received += count
            if bytes(view[length:]) != b"\r\n":
                raise redis.ConnectionError("reply not terminated by CRLF")
            return buffer[:length]
        except (OSError, ValueError) as exc:
            self._discard(sock)
            if isinstance(exc, TimeoutError):
                raise redis.TimeoutError(f"GET timed out after {self._timeout_s} s") from exc
            raise redis.ConnectionError(f"GET failed: {exc}") from exc
        except redis.ConnectionError:
            self._discard(sock)
            raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for sock in self._open:
                sock.close()
            self._open.clear()

    def _connection(self) -> socket.socket:
        if self._closed:
            raise redis.ConnectionError("the reader is closed")
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            return sock
        kwargs = self._kwargs
        try:
            if "path" in kwargs:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._timeout_s)
                sock.connect(kwargs["path"])
            else:
                sock = socket.create_connection((kwargs.get("host", "localhost"),
                                                 int(kwargs.get("port", 6379))),
                                                timeout=self._timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._handshake(sock)
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise redis.ConnectionError(f"cannot connect: {exc}") from exc
        except redis.RedisError:
            sock.close()
            raise
        with self._lock:
            if self._closed:  # closed while this connection opened
                sock.close()
                raise redis.ConnectionError("the reader is closed")
            self._open.add(sock)
        self._local.sock = sock
        return sock

    def _handshake(self, sock: socket.socket) -> None:
        """AUTH and SELECT as the client's own connections do."""
        password, username = self._kwargs.get("password"), self._kwargs.get("username")
        if password is not None:
            auth = [b"AUTH"] + ([username.encode()] if username else []) + [password.encode()]
            _expect_ok(sock, _command(*auth), redis.AuthenticationError)
        db = int(self._kwargs.get("db") or 0)
        if db:
            _expect_ok(sock, _command(b"SELECT", str(db).encode()), redis.ResponseError)

    def _discard(self, sock: socket.socket) -> None:
        """Close a connection in an unknown state; this thread opens a new one next time."""
        self._local.sock = None
        with self._lock:
            self._open.discard(sock)
        sock.close()


def _expect_ok(sock: socket.socket, command: bytes, error: type[redis.RedisError]) -> None:
    """Send a command whose reply is +OK; an error reply raises `error`."""
    sock.sendall(command)
    line, extra = _read_line(sock, b"")
    if line[:1] == b"-":
        raise error(line[1:].decode(errors="replace"))
    if line != b"+OK" or extra:
        raise redis.ConnectionError(f"unexpected reply: {line[:40]!r}")


def _read_line(sock: socket.socket, pending: bytes) -> tuple[bytes, memoryview]:
    """(the first CRLF-terminated line, without its CRLF; the bytes received after it)."""
    data = pending
    while True:
        end = data.find(b"\r\n")
        if end >= 0:
            return data[:end], memoryview(data)[end + 2:]
        if len(data) > _LINE_LIMIT:
            raise redis.ConnectionError("reply line too long")
        chunk = sock.recv(_LINE_LIMIT)
        if not chunk:
            raise redis.ConnectionError("connection closed")
        data += chunk

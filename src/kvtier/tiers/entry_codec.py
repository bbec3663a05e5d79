"""The self-checking byte format of an entry outside the process (a disk file, a Redis value).

Little-endian:

    b"KVTIER01" | u32 header length | JSON header | payload
    header = {"namespace", "block_hashes": [hex...], "num_bytes", "crc32"}

The header names the layout namespace and every block hash, so a reader that finds an entry by
its key alone (a disk tier rebuilding its index, a replica reading what another stored) can
check that the bytes are the entry it expects, whole and undamaged.
"""

from __future__ import annotations

import json
import struct
import zlib

from kvtier.tiers.base import EntryMeta, TierError
from kvtier.types import BlockHash

MAGIC = b"KVTIER01"
LENGTH = struct.Struct("<I")
PREAMBLE_BYTES = len(MAGIC) + LENGTH.size


def header_json(meta: EntryMeta, namespace: str, crc: int) -> bytes:
    return json.dumps({"namespace": namespace,
                       "block_hashes": [h.hex() for h in meta.block_hashes],
                       "num_bytes": meta.num_bytes, "crc32": crc}).encode()


def encoded_bytes(meta: EntryMeta, namespace: str) -> int:
    """An upper bound of the encoded entry's size (the crc's widest decimal form), the same
    for every payload of this entry: what capacity accounting charges it."""
    return PREAMBLE_BYTES + len(header_json(meta, namespace, 0xFFFFFFFF)) + meta.num_bytes


def preamble(meta: EntryMeta, namespace: str, payload: memoryview | bytes) -> bytes:
    """Magic, length and header of an entry whose payload follows them."""
    header = header_json(meta, namespace, zlib.crc32(payload))
    return MAGIC + LENGTH.pack(len(header)) + header


def read_preamble(name: str, preamble_bytes: bytes) -> int:
    """The header's length, after checking the magic (TierError naming `name` otherwise)."""
    if preamble_bytes[:len(MAGIC)] != MAGIC:
        raise TierError(f"{name}: bad magic")
    try:
        (length,) = LENGTH.unpack(preamble_bytes[len(MAGIC):PREAMBLE_BYTES])
    except struct.error as exc:
        raise TierError(f"{name}: malformed header ({exc!r})") from exc
    return length


def parse_header(name: str, header: bytes, namespace: str) -> tuple[EntryMeta, int]:
    """(the entry, its payload's crc32) that a header describes, checked to be of `namespace`;
    a header of the wrong shape is a TierError naming `name`."""
    try:
        fields = json.loads(header)
        hashes = tuple(BlockHash(bytes.fromhex(h)) for h in fields["block_hashes"])
        meta = EntryMeta(hashes[-1], hashes, int(fields["num_bytes"]))
        crc = int(fields["crc32"])
        stored_namespace = fields["namespace"]
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise TierError(f"{name}: malformed header ({exc!r})") from exc
    if stored_namespace != namespace:
        raise TierError(f"{name}: namespace mismatch")
    return meta, crc


def decode(name: str, blob: bytes | memoryview, expected: EntryMeta,
           namespace: str) -> memoryview:
    """The payload of an encoded entry held whole in memory, after checking that it is
    `expected`, complete and undamaged (TierError otherwise)."""
    blob = memoryview(blob)
    length = read_preamble(name, bytes(blob[:PREAMBLE_BYTES]))
    stored, crc = parse_header(name, bytes(blob[PREAMBLE_BYTES:PREAMBLE_BYTES + length]),
                               namespace)
    if stored != expected:
        raise TierError(f"{name}: header does not match the index")
    payload = blob[PREAMBLE_BYTES + length:]
    if len(payload) != expected.num_bytes:
        raise TierError(f"{name}: truncated")
    if zlib.crc32(payload) != crc:
        raise TierError(f"{name}: checksum mismatch")
    return payload

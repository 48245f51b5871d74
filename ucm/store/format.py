"""On-disk format of a file store: directory layout, object header, names of temp files.

Layout under the store root::

    ucm-store.json              marker: {"format": "ucm-file-store", "version": 1}
    objects/abc/<key hex>.kv    one published object per key (4,096 shards: first 3 hex digits)
    objects/abc/.<key hex>.<host>.<pid>.<rand>.tmp   a write in progress (or one killed)
    quarantine/<key hex>.<rand> objects found damaged (kept for inspection, removed by `gc`)

Why: one file per object makes publication atomic (write a temp file, then `link`/`rename`
it into place) on local disks and on NFS alike, without locks. 4,096 shard directories keep
each one small (10 M blocks is ~2,400 per directory) while being few enough to create them all
up front (in the background at start-up): a young store then pays no mkdir per write, as a
65,536-leaf two-level tree would for its first few hundred thousand blocks. Temp files live next to their
target so the final rename never crosses a directory on the server; their names start with a
dot and end with `.tmp`, so nothing that looks for `*.kv` can ever see a half-written object.

Every object starts with a fixed 4,096-byte header (so the payload is aligned for O_DIRECT and
buffered and direct writers produce the same files). The header carries a magic, a format
version, the store salt, the key, the payload layout, the payload length and an xxh3_64
checksum of the payload, and an xxh3_64 checksum of the header itself. A reader accepts an
object only if all of these match what it expects.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import struct

import xxhash

MAGIC = b"UCMKVOBJ"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
MARKER_NAME = "ucm-store.json"
MARKER_FORMAT = "ucm-file-store"
OBJECTS_DIR = "objects"
QUARANTINE_DIR = "quarantine"
OBJECT_SUFFIX = ".kv"
TEMP_SUFFIX = ".tmp"
SALT_BYTES = 16
MAX_KEY_BYTES = 64
MAX_LAYOUT_BYTES = 256

# magic, version, header size, salt, key length, key, layout length, layout, payload length,
# payload checksum; then the header checksum over everything before it.
_FIELDS = struct.Struct(f"<8sHH{SALT_BYTES}sH{MAX_KEY_BYTES}sH{MAX_LAYOUT_BYTES}sQQ")
_HEADER_CHECKSUM = struct.Struct("<Q")
_HOST = socket.gethostname().replace(".", "_").replace("/", "_")[:32] or "host"


class HeaderError(ValueError):
    """An object's header is not one this reader accepts; the message says which field."""


@dataclasses.dataclass(frozen=True)
class Header:
    salt: bytes
    key: bytes
    layout: str
    payload_len: int
    payload_checksum: int

    def encode(self) -> bytes:
        """The full HEADER_SIZE bytes, zero-padded."""
        key = self.key
        layout = self.layout.encode("utf-8")
        if len(key) > MAX_KEY_BYTES:
            raise ValueError(f"key is {len(key)} bytes; at most {MAX_KEY_BYTES} fit the header")
        if len(layout) > MAX_LAYOUT_BYTES:
            raise ValueError(f"layout description is {len(layout)} bytes; at most {MAX_LAYOUT_BYTES}")
        fields = _FIELDS.pack(
            MAGIC,
            FORMAT_VERSION,
            HEADER_SIZE,
            self.salt,
            len(key),
            key,
            len(layout),
            layout,
            self.payload_len,
            self.payload_checksum,
        )
        out = bytearray(HEADER_SIZE)
        out[: _FIELDS.size] = fields
        _HEADER_CHECKSUM.pack_into(out, _FIELDS.size, xxhash.xxh3_64_intdigest(fields))
        return bytes(out)


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and check a header; raises HeaderError naming the first field that is wrong."""
    if len(data) < _FIELDS.size + _HEADER_CHECKSUM.size:
        raise HeaderError(f"header truncated ({len(data)} bytes)")
    fields = bytes(data[: _FIELDS.size])
    magic, version, header_size, salt, key_len, key, layout_len, layout, payload_len, checksum = (
        _FIELDS.unpack(fields)
    )
    if magic != MAGIC:
        raise HeaderError(f"foreign format (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise HeaderError(f"format version {version}, this reader understands {FORMAT_VERSION}")
    (stored_checksum,) = _HEADER_CHECKSUM.unpack_from(data, _FIELDS.size)
    if stored_checksum != xxhash.xxh3_64_intdigest(fields):
        raise HeaderError("header checksum mismatch")
    if header_size != HEADER_SIZE or key_len > MAX_KEY_BYTES or layout_len > MAX_LAYOUT_BYTES:
        raise HeaderError("header sizes out of range")
    return Header(
        salt=salt,
        key=key[:key_len],
        layout=layout[:layout_len].decode("utf-8", errors="replace"),
        payload_len=payload_len,
        payload_checksum=checksum,
    )


def payload_checksum(payload: bytes | bytearray | memoryview) -> int:
    """xxh3_64 of the payload (releases the GIL while hashing large buffers)."""
    return xxhash.xxh3_64_intdigest(payload)


SHARD_CHARS = 3
SHARD_NAMES = tuple(f"{i:03x}" for i in range(16**SHARD_CHARS))


def shard_dir(objects_root: str, key_hex: str) -> str:
    return os.path.join(objects_root, key_hex[:SHARD_CHARS])


def object_path(objects_root: str, key: bytes) -> str:
    key_hex = key.hex()
    return os.path.join(objects_root, key_hex[:SHARD_CHARS], key_hex + OBJECT_SUFFIX)


def temp_name(key_hex: str) -> str:
    """A name no other writer on any host can pick: host, pid and 64 random bits."""
    return f".{key_hex}.{_HOST}.{os.getpid()}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


def key_from_name(name: str) -> bytes | None:
    """The key of a published object's file name, or None for anything else."""
    if not name.endswith(OBJECT_SUFFIX) or name.startswith("."):
        return None
    try:
        return bytes.fromhex(name[: -len(OBJECT_SUFFIX)])
    except ValueError:
        return None


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)

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

Two versions, on purpose independent: the marker's `version` (MARKER_VERSION) is that of the
directory layout above, and the header's (FORMAT_VERSION) that of an object. A new object
format needs no new directory: objects of another format version are misses (quarantined on
first load, then rewritten by the next dump), so a store survives an upgrade without a wipe.

Every object starts with a fixed 4,096-byte header (so the payload is aligned for O_DIRECT and
buffered and direct writers produce the same files). The header carries a magic, a format
version, the store salt, the key, the payload layout, the payload length and an xxh3_64
checksum of the payload; its last 8 bytes are an xxh3_64 checksum of all 4,088 bytes before
them, padding included, so a field added to the padding later is covered without a new check
and a damaged byte anywhere in the header is detected. A reader accepts an object only if all
of these match what it expects. Format version 1 checksummed the fields only (the padding
was unchecked); its objects are clean misses for this reader.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import struct

import xxhash

MAGIC = b"UCMKVOBJ"
FORMAT_VERSION = 2  # of an object header; 2: the header checksum covers every header byte
MARKER_VERSION = 1  # of the directory layout (the marker); see the module docstring
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
# payload checksum; then zero padding; the header checksum (over every byte before it) last.
_FIELDS = struct.Struct(f"<8sHH{SALT_BYTES}sH{MAX_KEY_BYTES}sH{MAX_LAYOUT_BYTES}sQQ")
_PREAMBLE = struct.Struct("<8sH")  # magic and version: read before the checksum, for clear messages
_HEADER_CHECKSUM = struct.Struct("<Q")
_CHECKSUM_OFFSET = HEADER_SIZE - _HEADER_CHECKSUM.size
assert _FIELDS.size <= _CHECKSUM_OFFSET
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
        _HEADER_CHECKSUM.pack_into(out, _CHECKSUM_OFFSET, _header_checksum(out))
        return bytes(out)


def _header_checksum(header: bytes | bytearray) -> int:
    """xxh3_64 of every header byte before the checksum itself, padding included."""
    return xxhash.xxh3_64_intdigest(memoryview(header)[:_CHECKSUM_OFFSET])


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and check a header; raises HeaderError naming the first field that is wrong.
    Magic and version are checked before the checksum so that a foreign file or an object of
    another format version is reported as such rather than as damage."""
    if len(data) < HEADER_SIZE:
        raise HeaderError(f"header truncated ({len(data)} bytes)")
    header = bytes(data[:HEADER_SIZE])
    magic, version = _PREAMBLE.unpack_from(header)
    if magic != MAGIC:
        raise HeaderError(f"foreign format (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise HeaderError(f"format version {version}, this reader understands {FORMAT_VERSION}")
    (stored_checksum,) = _HEADER_CHECKSUM.unpack_from(header, _CHECKSUM_OFFSET)
    if stored_checksum != _header_checksum(header):
        raise HeaderError("header checksum mismatch")
    _, _, header_size, salt, key_len, key, layout_len, layout, payload_len, checksum = (
        _FIELDS.unpack_from(header)
    )
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

"""What the scheduler-side connector tells the workers each step (pickled with the scheduler output).

Block hashes travel as bytes; each worker turns them into store keys for the heads it owns, so the
scheduler never needs to know the TP layout of the pool it schedules for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class LoadSpec:
    """Load these blocks of a request from the store (`block_ids[i]` gets `block_hashes[i]`)."""

    req_id: str
    block_ids: list[int]
    block_hashes: list[bytes]
    is_async: bool = False


@dataclass
class SaveSpec:
    """Save these blocks of a request, which become full during this step."""

    req_id: str
    block_ids: list[int]
    block_hashes: list[bytes]


@dataclass
class UCMConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    # Blocks of requests that finished (generated tokens included, for a chat's next turn). Their KV
    # is complete; vLLM keeps the blocks until every worker reports the request as finished sending.
    finish_saves: list[SaveSpec] = field(default_factory=list)
    sparse_meta: object | None = None

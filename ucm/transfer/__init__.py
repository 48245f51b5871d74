"""The GPU/host transfer path of the KV connector (torch only; no vLLM, no kubernetes).

`paged` views any supported paged-cache layout canonically and gathers/scatters blocks with one
indexing call per batch; `staging` moves batches to and from host payloads layer by layer with CUDA
streams and events; `buffers` is the bounded pool of (pinned) host staging memory.
"""

from ucm.transfer.buffers import HostBufferPool, PoolExhausted
from ucm.transfer.paged import (
    CacheLayout,
    PagedKV,
    canonical_view,
    gather_blocks,
    gather_groups,
    gather_layer,
    scatter_blocks,
    scatter_groups,
    scatter_groups_layer,
    scatter_layer,
)
from ucm.transfer.staging import HeadGroup, HostPayload, LoadBatch, SaveBatch

__all__ = [
    "CacheLayout",
    "HeadGroup",
    "HostBufferPool",
    "HostPayload",
    "LoadBatch",
    "PagedKV",
    "PoolExhausted",
    "SaveBatch",
    "canonical_view",
    "gather_blocks",
    "gather_groups",
    "gather_layer",
    "scatter_blocks",
    "scatter_groups",
    "scatter_groups_layer",
    "scatter_layer",
]
